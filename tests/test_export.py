"""GGUF export, specified on tiny random Llamas: what transformers loads back is what we wrote.

The tokenizer is a 300-token byte-level BPE with SmolLM2's special tokens and chat template: the same code paths as
SmolLM2's 49,152 tokens, whose metadata takes the GGUF reader most of a minute to parse.
"""

import numpy as np
import pytest
import torch

from labkit import LabkitError
from labkit.export import (cached_gguf, export_gguf, export_lora_gguf, gguf_name, load_gguf_model, lora_factors,
                           permute_rows, unpermute_rows, weights_digest)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_tokenizer(tokenizer):
    """A byte-level BPE tokenizer of 300 tokens trained on a few tickets, with SmolLM2's specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from labkit.data import read_jsonl
    from labkit.paths import data_dir

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [m["content"] for ex in read_jsonl(data_dir() / "train.jsonl")[:50] for m in ex["messages"]]
    bpe.train_from_iterator(texts, trainer)
    small = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                    unk_token="<|endoftext|>", pad_token="<|im_end|>")
    small.chat_template = tokenizer.chat_template
    return small


@pytest.fixture(scope="module")
def model(small_tokenizer, tiny_llama):
    """A 2-layer Llama with SmolLM2's vocabulary and tied embeddings, as SmolLM2 has."""
    return tiny_llama(vocab_size=len(small_tokenizer), tie_word_embeddings=True, rope_theta=100000.0,
                      max_position_embeddings=512)


@pytest.fixture(scope="module")
def ids(small_tokenizer):
    return torch.tensor([small_tokenizer("My Nimbus Router keeps disconnecting, order ORD-12345.")["input_ids"]])


@pytest.fixture(scope="module")
def f32_file(model, small_tokenizer, tmp_path_factory):
    return export_gguf(model, small_tokenizer, tmp_path_factory.mktemp("gguf") / "tiny-F32.gguf", "F32")


def test_permute_rows_is_undone_by_unpermute_rows():
    weight = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)
    assert np.array_equal(unpermute_rows(permute_rows(weight, 3), 3), weight)


def test_permute_rows_interleaves_the_two_halves_of_each_head():
    head = np.arange(8, dtype=np.float32)[:, None]  # one head of dimension 8: rows 0-3 pair with rows 4-7
    assert permute_rows(head, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_hugging_face_names_map_to_llama_cpp_names():
    assert gguf_name("model.layers.7.self_attn.q_proj.weight") == "blk.7.attn_q.weight"
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"


def test_an_unknown_tensor_name_is_refused():
    with pytest.raises(LabkitError, match="no GGUF name"):
        gguf_name("model.layers.0.mlp.experts.0.weight")


def test_an_f32_export_loads_back_with_identical_logits(model, ids, f32_file):
    back = load_gguf_model(f32_file)
    assert torch.equal(back(ids).logits, model(ids).logits)


def test_an_f16_export_holds_exactly_the_fp16_rounded_matrices(model, small_tokenizer, tmp_path):
    back = load_gguf_model(export_gguf(model, small_tokenizer, tmp_path / "tiny-F16.gguf", "F16")).state_dict()
    for name, value in model.state_dict().items():
        expected = value.half().float() if value.ndim == 2 else value  # norms stay F32
        assert torch.equal(back[name], expected), name


def test_q8_0_is_close_and_q4_0_is_further(model, small_tokenizer, ids, tmp_path):
    reference = model(ids).logits
    gaps = {level: (load_gguf_model(export_gguf(model, small_tokenizer, tmp_path / f"t-{level}.gguf", level))(ids).logits
                    - reference).abs().max().item() for level in ("Q8_0", "Q4_0")}
    assert 0 < gaps["Q8_0"] < gaps["Q4_0"]


def test_the_tokenizer_and_chat_template_travel_in_the_file(small_tokenizer, f32_file, ids):
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(str(f32_file.parent), gguf_file=f32_file.name)
    assert back("My Nimbus Router keeps disconnecting, order ORD-12345.")["input_ids"] == ids[0].tolist()
    assert back.chat_template == small_tokenizer.chat_template


def test_an_unknown_level_is_refused(model, small_tokenizer, tmp_path):
    with pytest.raises(LabkitError, match="Q4_K_M"):
        export_gguf(model, small_tokenizer, tmp_path / "x.gguf", "Q3_X")


def test_a_failed_export_leaves_no_file(model, small_tokenizer, tmp_path, monkeypatch):
    import labkit.export

    def fail_on_norm(name):
        if name == "model.norm.weight":
            raise LabkitError("no GGUF name")
        return gguf_name(name)

    monkeypatch.setattr(labkit.export, "gguf_name", fail_on_norm)  # fails half-way through the tensors
    with pytest.raises(LabkitError):
        export_gguf(model, small_tokenizer, tmp_path / "x.gguf", "F16")
    assert list(tmp_path.iterdir()) == []


def test_the_cache_key_changes_with_any_weight(tiny_llama):
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.model.norm.weight[0] += 1e-3
    assert weights_digest(a) != weights_digest(b)


def test_cached_gguf_exports_once(model, small_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    first = cached_gguf(model, small_tokenizer, "Q8_0", name="tiny")
    stamp = first.stat().st_mtime_ns
    assert cached_gguf(model, small_tokenizer, "Q8_0", name="tiny") == first and first.stat().st_mtime_ns == stamp


# ---------------------------------------------------------------- LoRA adapters as llama.cpp adapter files


@pytest.fixture(scope="module")
def lora_model(model):
    import copy

    from peft import LoraConfig, get_peft_model

    from labkit.lora import randomize_adapters

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                                adapter_name="triage")
    return randomize_adapters(peft_model, seed=1)


def test_lora_factors_fold_the_scaling_into_b_and_permute_q_and_k_rows_like_the_base(lora_model, model):
    layer = lora_model.get_base_model().model.layers[0].self_attn
    a, b = lora_factors(lora_model, "triage")["blk.0.attn_q.weight"]
    delta = (layer.q_proj.lora_B["triage"].weight @ layer.q_proj.lora_A["triage"].weight).detach().numpy() * 2.0
    np.testing.assert_allclose(b @ a, permute_rows(delta, model.config.num_attention_heads), atol=1e-6)
    a, b = lora_factors(lora_model, "triage")["blk.0.attn_v.weight"]  # v is not permuted
    delta = (layer.v_proj.lora_B["triage"].weight @ layer.v_proj.lora_A["triage"].weight).detach().numpy() * 2.0
    np.testing.assert_allclose(b @ a, delta, atol=1e-6)


def test_a_lora_export_is_a_gguf_adapter_file_with_both_factors_of_every_layer(lora_model, tmp_path):
    import gguf

    reader = gguf.GGUFReader(export_lora_gguf(lora_model, "triage", tmp_path / "triage.gguf"))
    kinds = {str(bytes(reader.fields[k].parts[-1]), "utf-8") for k in ["general.type", "adapter.type"]}
    names = {t.name for t in reader.tensors}
    assert kinds == {"adapter", "lora"} and len(names) == 2 * 7 * 2  # 7 linear layers x 2 layers, lora_a + lora_b
    assert {"blk.1.ffn_down.weight.lora_a", "blk.1.ffn_down.weight.lora_b"} <= names


def test_a_lora_export_of_an_adapter_that_is_not_loaded_is_refused_and_writes_nothing(lora_model, tmp_path):
    with pytest.raises(LabkitError, match="not loaded"):
        export_lora_gguf(lora_model, "reply", tmp_path / "reply.gguf")
    assert not (tmp_path / "reply.gguf").exists()


def test_quantizing_with_llama_cpp_writes_no_log_to_stderr(model, small_tokenizer, f32_file, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    from labkit.export import quantize_gguf

    f16 = export_gguf(model, small_tokenizer, tmp_path / "m-F16.gguf", "F16")
    capsys.readouterr()
    quantize_gguf(f16, tmp_path / "m-Q8_0.gguf", "Q8_0")
    assert (tmp_path / "m-Q8_0.gguf").stat().st_size > 0
    assert capsys.readouterr().err == ""
