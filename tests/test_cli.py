"""`python -m labkit sft|dpo`: settings from defaults, a config file and flags; bad input is one line, status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labkit.__main__ import main
from labkit.cli import build_config, parser_for, read_examples
from labkit.dpo import DPOConfig
from labkit.sft import SFTConfig

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "data" / "train.jsonl"
PAIRS = ROOT / "data" / "preferences_train.jsonl"


def config_from(argv: list[str], command: str = "sft"):
    return build_config(parser_for(command).parse_args(["--data", "x", "--out", "y", *argv]), command)


def only_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_every_config_field_has_a_flag():
    flags = parser_for("dpo").format_help()
    for name in DPOConfig.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in flags


def test_flags_override_the_config_file_which_overrides_the_defaults(tmp_path):
    (tmp_path / "run.yaml").write_text("steps: 7\nlr: 0.002\ntarget_modules: [q_proj, v_proj]\n")
    config = config_from(["--config", str(tmp_path / "run.yaml"), "--lr", "0.005"])
    assert (config.steps, config.lr, config.target_modules, config.r) == (7, 0.005, ["q_proj", "v_proj"], SFTConfig.r)


def test_a_json_config_file_and_comma_separated_lists_are_read(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"beta": 0.3}))
    config = config_from(["--config", str(tmp_path / "run.json"), "--target-modules", "q_proj,k_proj"], "dpo")
    assert (config.beta, config.target_modules, config.steps) == (0.3, ["q_proj", "k_proj"], DPOConfig.steps)


def test_an_unknown_setting_in_the_config_file_is_named(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("stepz: 7\n")
    assert main(["sft", "--data", str(TRAIN), "--out", str(tmp_path), "--config", str(tmp_path / "run.yaml")]) == 2
    assert "'stepz' is not a sft setting" in only_line(capsys)


def test_a_missing_data_file_is_one_line_and_status_2(tmp_path, capsys):
    assert main(["sft", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)]) == 2
    assert "nope.jsonl: no such file" in only_line(capsys)


def test_an_unknown_flag_is_one_line_and_status_2(tmp_path, capsys):
    assert main(["sft", "--data", str(TRAIN), "--out", str(tmp_path), "--stepz", "3"]) == 2
    assert "unrecognized arguments: --stepz 3" in only_line(capsys)


def test_a_missing_required_flag_is_one_line_and_status_2(capsys):
    assert main(["dpo", "--data", str(PAIRS)]) == 2
    assert "--out" in only_line(capsys)


def test_preference_pairs_given_to_sft_point_to_dpo(tmp_path, capsys):
    assert main(["sft", "--data", str(PAIRS), "--out", str(tmp_path)]) == 2
    line = only_line(capsys)
    assert "preferences_train.jsonl:1:messages" in line and "python -m labkit dpo" in line


def test_a_file_that_is_not_json_lines_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text("this is not json\nnor this\nnor this\n")
    assert main(["sft", "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path)]) == 2
    assert "bad.jsonl" in only_line(capsys)


def test_chat_examples_are_read_for_sft_and_pairs_for_dpo():
    assert len(read_examples(str(TRAIN), "sft")) > 100
    assert set(read_examples(str(PAIRS), "dpo")[0]) >= {"prompt", "chosen", "rejected"}


def test_the_command_itself_prints_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "labkit", "sft", "--data", str(tmp_path / "nope.jsonl"),
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: ")


# ---------------------------------------------------------------- every input checked before the model loads


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if the command gets as far as loading a model: every check must come before it."""
    from labkit import cli

    monkeypatch.setattr(cli, "load_base", lambda *a, **k: pytest.fail("loaded the model before refusing the input"))


@pytest.mark.parametrize("command, flags, says", [
    ("sft", ["--steps", "0"], "--steps 0: must be an integer >= 1"),
    ("sft", ["--steps", "-1"], "--steps -1: must be an integer >= 1"),
    ("sft", ["--grad-accum", "0"], "--grad-accum 0: must be an integer >= 1"),
    ("sft", ["--max-grad-norm", "-1"], "--max-grad-norm -1.0: must be a finite number > 0"),
    ("sft", ["--max-length", "-5"], "--max-length -5: must be an integer >= 1 or None"),
    ("sft", ["--patience", "0"], "--patience 0: must be an integer >= 1 or None"),
    ("sft", ["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    ("sft", ["--lr", "-1"], "--lr -1.0: must be a finite number > 0"),
    ("sft", ["--lora-dropout", "1.5"], "--lora-dropout 1.5: must be a finite number in [0, 1)"),
    ("sft", ["--r", "0"], "--r 0: must be an integer >= 1"),
    ("sft", ["--eval-every", "0"], "--eval-every 0: must be an integer >= 1"),
    ("sft", ["--warmup-ratio", "nan"], "--warmup-ratio nan: must be a finite number in [0, 1)"),
    ("sft", ["--target-modules", "q_proj,,v_proj"], "--target-modules q_proj,,v_proj: must be 'all-linear' or"),
    ("sft", ["--threads", "0"], "--threads 0: must be an integer >= 1"),
    ("sft", ["--as-processes", "0"], "--as-processes 0: must be an integer >= 1"),
    ("sft", ["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    ("dpo", ["--beta", "0"], "--beta 0.0: must be a finite number > 0"),
    ("dpo", ["--loss-type", "ipo", "--beta", "-0.1"], "--beta -0.1: must be a finite number > 0"),
    ("dpo", ["--loss-type", "IPO"], "--loss-type IPO: must be one of ['sigmoid', 'ipo', 'hinge']"),
])
def test_a_bad_argument_is_one_line_and_status_2(tmp_path, capsys, no_model, command, flags, says):
    data = TRAIN if command == "sft" else PAIRS
    assert main([command, "--data", str(data), "--out", str(tmp_path / "run"), *flags]) == 2
    assert says in only_line(capsys)
    assert not (tmp_path / "run").exists()


CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "billing"}]


@pytest.mark.parametrize("record, says", [
    ({"messages": [{"role": "user", "content": None}, CHAT[1]]}, "bad.jsonl:2:messages[0].content: is null"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, CHAT[1]]},
     "bad.jsonl:2:messages[0].content: is a list of parts, not a string"),
    ({"messages": ["hi", CHAT[1]]}, "bad.jsonl:2:messages[0]: is a string, not a message"),
    ({"messages": [{"content": "hi"}, CHAT[1]]}, "bad.jsonl:2:messages[0].role: is missing"),
    ({"messages": [{"role": {"name": "user"}, "content": "hi"}, CHAT[1]]},
     "bad.jsonl:2:messages[0].role: is an object, not a string"),
    ({"messages": [{"role": "User", "content": "hi"}, CHAT[1]]},
     "bad.jsonl:2:messages[0].role: 'User' is not a known role. Fix: use system, user or assistant"),
    (7, "bad.jsonl:2:record: the line is a number, not a JSON object"),
    ({"messages": []}, "bad.jsonl:2:messages: is an empty list"),
    ({"messages": [CHAT[1], *CHAT]}, "bad.jsonl:2:messages[0].role: the conversation starts with an assistant turn"),
    ({"messages": [{"role": "system", "content": "be nice"}]}, "bad.jsonl:2:messages: holds only a system prompt"),
    ({"messages": CHAT[:1]}, "bad.jsonl:2:messages: has no assistant turn at the end"),
    ({"messages": [{"role": "user", "content": "word " * 20_000}, CHAT[1]]},
     "bad.jsonl:2:messages: holds 100,007 characters, more than max_length=512 tokens can hold"),
])
def test_a_bad_record_mixed_with_good_ones_is_one_line_before_the_model_loads(tmp_path, capsys, no_model, record,
                                                                               says):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"messages": CHAT}, record, {"messages": CHAT}]))
    assert main(["sft", "--data", str(path), "--out", str(tmp_path / "run")]) == 2
    assert says in only_line(capsys)


def test_many_bad_records_are_counted_in_the_one_line(tmp_path, capsys, no_model):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": []}) + "\n" * 1 + (json.dumps({"messages": CHAT[:1]}) + "\n") * 29)
    assert main(["sft", "--data", str(path), "--out", str(tmp_path)]) == 2
    line = only_line(capsys)
    assert line.startswith(f"error: 30 problems in {path}: bad.jsonl:1:messages: is an empty list")
    assert line.endswith("(and 29 more; `python -m labkit validate FILE` lists them)")


def test_a_pair_with_a_bad_reply_is_one_line_for_dpo(tmp_path, capsys, no_model):
    pair = json.loads(PAIRS.read_text(encoding="utf-8").splitlines()[0])
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "rejected": pair["chosen"]}) + "\n")
    assert main(["dpo", "--data", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "pairs.jsonl:2:rejected: is the same reply as chosen" in only_line(capsys)


@pytest.mark.parametrize("make, says", [
    (lambda d: (d / "run" / "history.json").mkdir(parents=True), "history.json: is a folder where the run writes"),
    (lambda d: (d / "run").mkdir() or (d / "run" / "adapter").write_text("x"), "adapter: is a file where the run"),
    (lambda d: (d / "run").write_text("x"), "run: is a file, not a folder"),
])
def test_an_output_path_taken_by_the_wrong_kind_of_thing_is_refused_before_training(tmp_path, capsys, no_model,
                                                                                     make, says):
    make(tmp_path)
    assert main(["sft", "--data", str(TRAIN), "--out", str(tmp_path / "run")]) == 2
    assert says in only_line(capsys)


@pytest.mark.parametrize("make, says", [
    (lambda d: d / "nope", "--sft-adapter {d}/nope: no such folder"),
    (lambda d: (d / "adapter.safetensors").write_text("x") and d / "adapter.safetensors",
     "--sft-adapter {d}/adapter.safetensors: is a file, not an adapter folder"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "--sft-adapter {d}/empty: holds no adapter_config.json"),
])
def test_a_missing_or_wrong_sft_adapter_is_one_line(tmp_path, capsys, no_model, make, says):
    adapter = make(tmp_path)
    assert main(["dpo", "--data", str(PAIRS), "--out", str(tmp_path / "run"), "--sft-adapter", str(adapter)]) == 2
    assert says.format(d=tmp_path) in only_line(capsys)


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys, no_model):
    (tmp_path / "run.yaml").write_bytes("# réglages\nsteps: 3\n".encode("latin-1"))
    assert main(["sft", "--data", str(TRAIN), "--out", str(tmp_path / "run"), "--config", str(tmp_path / "run.yaml")]) == 2
    assert "run.yaml: is not UTF-8 (byte 3 is 0xe9" in only_line(capsys)


def test_a_bad_value_in_the_config_file_names_the_file(tmp_path, capsys, no_model):
    (tmp_path / "run.yaml").write_text("steps: 0\n")
    assert main(["sft", "--data", str(TRAIN), "--out", str(tmp_path / "run"), "--config", str(tmp_path / "run.yaml")]) == 2
    assert f"{tmp_path / 'run.yaml'}: steps = 0: must be an integer >= 1" in only_line(capsys)


def test_numbers_and_lists_a_yaml_file_writes_as_text_are_read(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 1e-3\ntarget_modules: q_proj,v_proj\n")
    config = config_from(["--config", str(tmp_path / "run.yaml")])
    assert (config.lr, config.target_modules) == (1e-3, ["q_proj", "v_proj"])


@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_a_bad_thread_setting_is_one_line(tmp_path, capsys, no_model, monkeypatch, value):
    monkeypatch.setenv("LABKIT_THREADS", value)
    assert main(["sft", "--data", str(TRAIN), "--out", str(tmp_path / "run")]) == 2
    assert f"LABKIT_THREADS='{value}' is not a whole number from 1 to 1024" in only_line(capsys)


def test_a_cuda_device_on_a_machine_without_one_is_one_line(tmp_path, capsys, no_model, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["sft", "--data", str(TRAIN), "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    assert "device 'cuda' was asked for, but this machine has no GPU" in only_line(capsys)


def test_an_unknown_target_module_lists_the_model_s_layers(tmp_path, capsys, monkeypatch, vocab_llama, tokenizer):
    from labkit import cli

    monkeypatch.setattr(cli, "load_base", lambda args, device: (vocab_llama(), tokenizer))
    assert main(["sft", "--data", str(TRAIN), "--out", str(tmp_path / "run"), "--target-modules", "q_proj,qkv"]) == 2
    assert ("target_modules: 'qkv' is not a layer of this model. Fix: use 'all-linear' or some of ['down_proj', "
            "'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']") in only_line(capsys)


def test_an_unexpected_error_is_one_line_saying_it_is_a_bug_and_the_traceback_only_with_debug(tmp_path, capsys,
                                                                                               monkeypatch):
    from labkit import cli

    monkeypatch.setattr(cli, "read_examples", lambda *a, **k: 1 / 0)
    argv = ["sft", "--data", str(TRAIN), "--out", str(tmp_path / "run")]
    assert main(argv) == 1
    line = only_line(capsys)
    assert line.startswith("error: unexpected ZeroDivisionError at test_cli.py:") and "This is a bug in labkit" in line
    assert "rerun with --debug" in line and "/issues" in line
    with pytest.raises(ZeroDivisionError):
        main([*argv, "--debug"])
