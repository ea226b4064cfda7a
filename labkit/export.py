"""Export a (merged) Llama model to GGUF, the file format llama.cpp and Ollama run, written with the `gguf` package.

A GGUF file is one header of key/value metadata (architecture, shapes, the tokenizer, the chat template) followed
by the tensors, each stored at its own type: F32, F16, or a block-quantized type such as Q8_0 or Q4_0.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from labkit import LabkitError
from labkit.merge import check_loaded, lora_modules
from labkit.paths import cache_root
from labkit.store import StoreError, cached, write_file

# What each quantization level writes for the big matrices (norms always stay F32, as llama.cpp does).
# Q8_0: blocks of 32 int8 values + one f16 scale (8.5 bits per weight). Q4_0: blocks of 32 4-bit values + one
# f16 scale (4.5 bits). Q4_K_M (llama.cpp's own quantizer) mixes 4- and 6-bit "k-quant" super-blocks.
GGUF_TYPES = {"F32": "F32", "F16": "F16", "Q8_0": "Q8_0", "Q4_0": "Q4_0"}

# Hugging Face Llama tensor names -> llama.cpp's names ("{i}" is the layer).
TENSOR_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for a Hugging Face Llama tensor name."""
    parts = hf_name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"]:
        layer = parts[2]
        pattern = ".".join(parts[:2] + ["{i}"] + parts[3:])
        if pattern in TENSOR_NAMES:
            return TENSOR_NAMES[pattern].format(i=layer)
    if hf_name in TENSOR_NAMES:
        return TENSOR_NAMES[hf_name]
    raise LabkitError(f"tensor {hf_name!r} has no GGUF name: export_gguf writes Llama-architecture models only. "
                      "Fix: export a LlamaForCausalLM (merge any adapter first with merge_and_unload)")


def permute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows from Hugging Face's rotary layout (halves) to llama.cpp's (interleaved pairs)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_rows: llama.cpp's interleaved rotary layout back to Hugging Face's."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tensor_type(name: str, array: np.ndarray, level: str) -> str:
    """The GGUF type one tensor is written at: 1-D tensors (norms) F32, matrices at `level`."""
    return "F32" if array.ndim == 1 or level == "F32" else level


def write_tokenizer(writer, tokenizer, pre: str) -> None:
    """Write a byte-level BPE tokenizer (tokens, types, merges, special ids, chat template) into GGUF metadata."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise LabkitError(f"the tokenizer is {spec['model']['type']}, export_gguf writes byte-level BPE only. "
                          "Fix: use llama.cpp's convert_hf_to_gguf.py for this model")
    vocab = dict(spec["model"]["vocab"])
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    for t in spec.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, i in vocab.items():
        tokens[i] = text
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(size)])  # 3 = control, 1 = normal
    merges = spec["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for key, token in [("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token), ("unk", tokenizer.unk_token),
                       ("padding", tokenizer.pad_token)]:
        if token is not None:
            writer.add_uint32(f"tokenizer.ggml.{key}_token_id", tokenizer.convert_tokens_to_ids(token))
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_metadata(writer, config, level: str, name: str) -> None:
    """Write the llama architecture's hyperparameters (what llama.cpp builds the graph from) into GGUF metadata."""
    import gguf

    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7, "Q4_0": 2}[level])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def export_gguf(model, tokenizer, path: str | Path, level: str = "F16", name: str = "model", pre: str = "smollm") -> Path:
    """Write a Llama model and its tokenizer as one GGUF file at `level` (F32, F16, Q8_0 or Q4_0); atomic."""
    import gguf

    if level not in GGUF_TYPES:
        raise LabkitError(f"level={level!r} is not a GGUF type export_gguf writes. Fix: pick one of {list(GGUF_TYPES)} "
                          "(Q4_K_M: quantize the F16 file with quantize_gguf)")
    config = model.config
    if config.model_type != "llama":
        raise LabkitError(f"model_type={config.model_type!r}: export_gguf writes Llama-architecture models only. "
                          "Fix: use llama.cpp's convert_hf_to_gguf.py for other architectures")
    return write_file(path, lambda tmp: write_gguf(model, tokenizer, tmp, level, name, pre))


def write_gguf(model, tokenizer, path: Path, level: str, name: str, pre: str) -> None:
    """Write the GGUF file itself (export_gguf has it written under a temporary name, then renamed into place)."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    write_metadata(writer, config, level, name)
    write_tokenizer(writer, tokenizer, pre)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd for the output head
    for hf_name, value in state.items():
        array = value.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            array = permute_rows(array, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            array = permute_rows(array, config.num_key_value_heads)
        kind = tensor_type(hf_name, array, level)
        qtype = gguf.GGMLQuantizationType[kind]
        data = (array.astype(np.float16) if kind == "F16" else array if kind == "F32"
                else gguf.quants.quantize(array, qtype))
        writer.add_tensor(gguf_name(hf_name), data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_lora_gguf(model, adapter: str, path: str | Path, name: str = "adapter") -> Path:
    """Write one LoRA adapter of a peft Llama model as a llama.cpp adapter file (GGUF, F32); atomic.

    Per wrapped layer, `<layer>.lora_a` is A (r x in) and `<layer>.lora_b` is B (out x r) under llama.cpp's layer
    names, q/k rows permuted as the base export permutes them. The layer's scaling (alpha / r) is folded into B and
    no `adapter.lora.alpha` is written, so llama.cpp adds B A x at scale 1: exact for any rank or alpha pattern.
    """
    base_config = model.get_base_model().config
    if base_config.model_type != "llama":
        raise LabkitError(f"model_type={base_config.model_type!r}: export_lora_gguf writes Llama adapters only")
    check_loaded(model, [adapter])
    return write_file(path, lambda tmp: write_lora_gguf(model, adapter, tmp, name))


def lora_factors(model, adapter: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(A, scaling * B) of every layer `adapter` wraps, by the layer's GGUF weight name, q/k rows permuted."""
    config = model.get_base_model().config
    factors = {}
    for layer_name, module in lora_modules(model).items():
        if adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter, False):
            raise LabkitError(f"adapter {adapter!r} is DoRA: llama.cpp's adapters are plain LoRA. Fix: merge it "
                              "into the weights (merge_and_unload) and export the model with export_gguf")
        a = module.lora_A[adapter].weight.detach().float().cpu().numpy()
        b = (module.lora_B[adapter].weight.detach().float().cpu() * module.scaling[adapter]).numpy()
        if layer_name.endswith("q_proj"):
            b = permute_rows(b, config.num_attention_heads)
        elif layer_name.endswith("k_proj"):
            b = permute_rows(b, config.num_key_value_heads)
        factors[gguf_name(f"{layer_name}.weight")] = (a, b)
    return factors


def write_lora_gguf(model, adapter: str, path: Path, name: str) -> None:
    """Write the adapter file itself (export_lora_gguf has it written under a temporary name, then renamed)."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_type("adapter")  # general.type: llama.cpp refuses to load a model file as an adapter
    writer.add_string("adapter.type", "lora")
    for weight_name, (a, b) in lora_factors(model, adapter).items():
        writer.add_tensor(f"{weight_name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(f"{weight_name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_gguf(source: str | Path, path: str | Path, level: str = "Q4_K_M", threads: int = 0) -> Path:
    """Quantize a GGUF file with llama.cpp's own quantizer (needs llama-cpp-python): Q4_K_M, Q5_K_M, Q6_K, ..."""
    try:
        import llama_cpp
    except ImportError:
        raise LabkitError(f"quantizing to {level} needs llama.cpp. Fix: pip install 'llama-cpp-python[server]==0.3.36' "
                          "(or `make setup`), or export Q4_0 with export_gguf instead") from None
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{level}", None)
    if ftype is None:
        raise LabkitError(f"llama.cpp has no quantization type {level!r}. Fix: use e.g. Q4_K_M, Q5_K_M, Q6_K, Q8_0")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, threads

    # llama-cpp-python prints llama.cpp's log (a line per tensor quantized: ~1,100 lines for SmolLM2) to stderr through
    # the "llama-cpp-python" logger (llama_cpp/_logger.py); a notebook shows that as a pink block. Errors still print.
    log = logging.getLogger("llama-cpp-python")

    def quantize(tmp: Path) -> None:
        was = log.level
        log.setLevel(logging.ERROR)
        try:
            failed = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0
        finally:
            log.setLevel(was)
        if failed:
            raise LabkitError(f"llama.cpp could not quantize {source} to {level}. Fix: check that the file is a "
                              "complete GGUF (delete it to re-export)")

    return write_file(path, quantize)


def weights_digest(model) -> str:
    """A short SHA-256 of a model's weights (names, shapes and bytes): the cache key of anything made from them."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
        digest.update(value.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_gguf(model, tokenizer, level: str, name: str = "model") -> Path:
    """The GGUF of these exact weights at `level` from labkit's cache, exported (or quantized from F16) on a miss."""
    path = cache_root() / "gguf" / weights_digest(model) / f"{name}-{level}.gguf"

    def make(_, tmp: Path) -> None:
        if level in GGUF_TYPES:
            export_gguf(model, tokenizer, tmp, level, name)
        else:
            quantize_gguf(cached_gguf(model, tokenizer, "F16", name), tmp, level)

    return cached(path, check_gguf, lambda: path, make)


def check_gguf(path: Path) -> Path:
    """`path` once it is seen to start like a GGUF file; a StoreError that says to delete it if not."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise StoreError(f"{path}: is not a GGUF file (it lacks the GGUF magic bytes). Fix: delete {path}; the "
                             "next run exports it again")
    return path


def load_gguf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a GGUF file back into a transformers model (dequantized to `dtype`), as a check of the export."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.eval()
