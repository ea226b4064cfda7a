"""Estimate the GPU memory of a fine-tuning run: weights, gradients, optimizer state, activations, logits (notebook 04).

The rules are the course's "Memory formulas" (shared/reference/facts.md):

- full fine-tuning, mixed precision AdamW: 18 bytes/param (weights 4 + 2, grads 4, Adam 8);
  fp32 AdamW: 16 bytes/param;
- LoRA: frozen base at its dtype + 16 bytes per trainable parameter (fp32 adapter 4, grad 4, Adam 8);
- QLoRA: the decoder's linear layers at 0.5 byte/param + absmax (0.0625 byte/param, ~0.0158 with
  double quantization); embeddings, output head and norms stay at the compute dtype, as bitsandbytes does;
- activations per layer, 16-bit, no recomputation: s*b*h*(34 + 5*a*s/h) bytes (Korthikanti et al. 2022);
  full checkpointing keeps ~2*s*b*h per layer plus one layer's activations while it is recomputed;
- logits: batch * seq * vocab * 4 bytes (the loss upcasts them to fp32), kept again for their gradient.

Sizes are in decimal units (1 GB = 1e9 bytes). It is an estimate to reason with, not an allocator trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterable

from labkit import LabkitError
from labkit.models import LINEAR_NAMES

GB = 1e9
MB = 1e6

METHODS = ("full", "lora", "qlora")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "sgd": 0}  # state bytes per trainable parameter

MASTER_BYTES = 4  # fp32 weights (the master copy in mixed precision), fp32 gradients, fp32 adapters
NF4_BYTES = 0.5
ABSMAX_BYTES = 4 / 64  # one fp32 absmax per block of 64
ABSMAX_BYTES_DOUBLE_QUANT = 1 / 64 + 4 / (64 * 256)  # 8-bit absmax + one fp32 per 256 of them
LOGITS_BYTES = 4
LOGITS_COPIES = 2  # the logits and their gradient


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-shaped decoder that memory depends on."""

    n_params: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int | None = None  # None: hidden // heads

    @property
    def head_size(self) -> int:
        """Width of one attention head."""
        return self.head_dim or self.hidden // self.heads


def linear_dims(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer in one decoder layer."""
    h, q, kv, i = shape.hidden, shape.heads * shape.head_size, shape.kv_heads * shape.head_size, shape.intermediate
    return {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }


def linear_params(shape: ModelShape) -> int:
    """Parameters in the decoder layers' linear weights (what QLoRA quantizes to 4 bits)."""
    return shape.layers * sum(a * b for a, b in linear_dims(shape).values())


def count_params(shape: ModelShape) -> int:
    """Parameters of a Llama-style model (no biases): embeddings, layers, norms, output head."""
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    norms = (2 * shape.layers + 1) * shape.hidden
    return embeddings + linear_params(shape) + norms


PRESETS: dict[str, ModelShape] = {
    "SmolLM2-135M": ModelShape(134_515_008, 576, 30, 9, 3, 1536, 49152, True),
    "SmolLM2-1.7B": ModelShape(1_711_376_384, 2048, 24, 32, 32, 8192, 49152, True),
    "7B": ModelShape(6_738_415_616, 4096, 32, 32, 32, 11008, 32000, False),  # Llama-2-7B
    "8B": ModelShape(8_030_261_248, 4096, 32, 32, 8, 14336, 128256, False),  # Llama-3.1-8B
    "13B": ModelShape(13_015_864_320, 5120, 40, 40, 40, 13824, 32000, False),  # Llama-2-13B
    # Llama-3-70B; Llama-2-70B is the same but with vocab 32000 (68,976,648,192 params).
    "70B": ModelShape(70_553_706_496, 8192, 80, 64, 8, 28672, 128256, False),
}


def shape_from_config(config: Any) -> ModelShape:
    """The ModelShape of a transformers config (Llama-style attributes)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    try:
        hidden, heads = config.hidden_size, config.num_attention_heads
        shape = ModelShape(
            n_params=0, hidden=hidden, layers=config.num_hidden_layers, heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            intermediate=config.intermediate_size, vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            head_dim=getattr(config, "head_dim", None),
        )
    except AttributeError as err:
        raise LabkitError(f"{type(config).__name__} is not Llama-shaped ({err}): pass a Llama-style "
                          f"transformers config, a ModelShape or a preset name {sorted(PRESETS)}.") from None
    if shape.head_dim == hidden // heads:
        shape = replace(shape, head_dim=None)  # the default width: keep shapes comparable to the presets
    return replace(shape, n_params=count_params(shape))


def shape_for_params(n_params: float) -> ModelShape:
    """The preset nearest in size, carrying this parameter count (its shape sizes activations and adapters)."""
    if n_params <= 0:
        raise LabkitError(f"A model has a positive number of parameters, got {n_params}.")
    nearest = min(PRESETS.values(), key=lambda s: abs(math.log(s.n_params / n_params)))
    return replace(nearest, n_params=int(n_params))


def resolve_shape(model: ModelShape | str | float | Any) -> ModelShape:
    """A ModelShape from a shape, a preset name, a parameter count or a transformers config."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str):
        by_lower = {name.lower(): shape for name, shape in PRESETS.items()}
        if model.lower() not in by_lower:
            raise LabkitError(f"Unknown model preset {model!r}. Use one of {sorted(PRESETS)}, "
                              "a ModelShape, a parameter count or a transformers config.")
        return by_lower[model.lower()]
    if isinstance(model, (int, float)) and not isinstance(model, bool):
        return shape_for_params(model)
    return shape_from_config(model)


def lora_targets(target_modules: str | Iterable[str]) -> tuple[str, ...]:
    """The LoRA target module names: "all-linear" or a list of Llama projection names."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return LINEAR_NAMES  # PEFT's all-linear: every Linear except the output head
        target_modules = [target_modules]
    names = tuple(target_modules)
    unknown = [t for t in names if t not in LINEAR_NAMES]
    if unknown or not names:
        raise LabkitError(f"Unknown LoRA target modules {unknown or names!r}. "
                          f'Use "all-linear" or a list drawn from {list(LINEAR_NAMES)}.')
    return names


def lora_trainable_params(shape: ModelShape | str, r: int, target_modules: str | Iterable[str] = "all-linear") -> int:
    """Trainable LoRA parameters: r * (in + out) per adapted linear layer, over all layers."""
    shape = resolve_shape(shape)
    if not isinstance(r, int) or r < 1:
        raise LabkitError(f"LoRA rank r must be a positive integer (8-64 is typical), got {r!r}.")
    dims = linear_dims(shape)
    return shape.layers * sum(r * sum(dims[name]) for name in lora_targets(target_modules))


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes needed by one training run, by what holds them."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    label: str = ""

    @property
    def total(self) -> int:
        """All the bytes together."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    @property
    def total_gb(self) -> float:
        """The total in GB (1e9 bytes)."""
        return self.total / GB

    def __str__(self) -> str:
        parts = ["weights", "gradients", "optimizer", "activations", "logits", "total"]
        lines = [self.label] if self.label else []
        lines += [f"  {name:<12}{format_bytes(getattr(self, name)):>11}" for name in parts]
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    """Bytes as GB when at least 1 GB, else MB."""
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / MB:.1f} MB"


def fits(breakdown: MemoryBreakdown, gpu_gb: float, reserve_gb: float = 1.0) -> bool:
    """True if the run fits a GPU of gpu_gb, keeping reserve_gb for the CUDA context and allocator slack."""
    if gpu_gb <= 0:
        raise LabkitError(f"gpu_gb is the GPU's memory in GB, a positive number; got {gpu_gb}.")
    return breakdown.total + reserve_gb * GB <= gpu_gb * GB


def weight_bytes(shape: ModelShape, method: str, dtype: str, trainable: int, double_quant: bool) -> float:
    """Bytes of the model's weights (and of the LoRA adapters, kept in fp32)."""
    compute = DTYPE_BYTES[dtype]
    if method == "full":
        return shape.n_params * (MASTER_BYTES + (compute if compute < MASTER_BYTES else 0))
    adapters = trainable * MASTER_BYTES
    if method == "lora":
        return shape.n_params * compute + adapters
    quantized = shape.n_params * linear_params(shape) / count_params(shape)
    absmax = ABSMAX_BYTES_DOUBLE_QUANT if double_quant else ABSMAX_BYTES
    return quantized * (NF4_BYTES + absmax) + (shape.n_params - quantized) * compute + adapters


def activation_bytes(shape: ModelShape, batch: int, seq_len: int, dtype: str,
                     checkpointing: bool, fused_attention: bool) -> float:
    """Bytes of activations kept for the backward pass (Korthikanti et al. 2022), scaled to the dtype."""
    sbh = seq_len * batch * shape.hidden
    scores = 0 if fused_attention else 5 * shape.heads * seq_len / shape.hidden  # a*s*s softmax maps
    one_layer = sbh * (34 + scores) * DTYPE_BYTES[dtype] / 2
    if not checkpointing:
        return shape.layers * one_layer
    # Checkpointing keeps each layer's input and recomputes one layer at a time during backward.
    return shape.layers * 2 * sbh * DTYPE_BYTES[dtype] / 2 + one_layer


def logits_bytes(shape: ModelShape, batch: int, seq_len: int, fraction: float) -> float:
    """Bytes of the fp32 logits and their gradient at the positions that materialise them."""
    return LOGITS_COPIES * batch * seq_len * fraction * shape.vocab * LOGITS_BYTES


def _check(name: str, value: Any, allowed: Iterable[str]) -> None:
    """Raise a LabkitError if value is not one of allowed."""
    if value not in allowed:
        raise LabkitError(f"Unknown {name} {value!r}: use one of {list(allowed)}.")


def _check_positive_int(name: str, value: Any) -> None:
    """Raise a LabkitError unless value is an integer >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LabkitError(f"{name} must be a positive integer, got {value!r}.")


def estimate_memory(
    model: ModelShape | str | float | Any,
    method: str = "lora",
    *,
    batch: int = 1,
    seq_len: int = 512,
    dtype: str = "bf16",
    r: int = 16,
    target_modules: str | Iterable[str] = "all-linear",
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    logits_fraction: float = 1.0,
    double_quant: bool = True,
    fused_attention: bool = False,
) -> MemoryBreakdown:
    """GPU memory of a training step for a model (preset name, ModelShape, config or parameter count).

    logits_fraction: share of positions whose logits are materialised (1.0: all, as transformers
    does; the labelled share when the loss only computes them where there is a label).
    fused_attention: SDPA/flash attention, which does not store the a*s*s attention maps.
    """
    shape = resolve_shape(model)
    _check("method", method, METHODS)
    _check("dtype", dtype, DTYPE_BYTES)
    _check("optimizer", optimizer, OPTIMIZER_BYTES)
    _check_positive_int("batch", batch)
    _check_positive_int("seq_len", seq_len)
    if not 0 < logits_fraction <= 1:
        raise LabkitError(f"logits_fraction is a share of positions in (0, 1], got {logits_fraction}.")
    trainable = shape.n_params if method == "full" else lora_trainable_params(shape, r, target_modules)
    return MemoryBreakdown(
        weights=round(weight_bytes(shape, method, dtype, trainable, double_quant)),
        gradients=trainable * MASTER_BYTES,
        optimizer=trainable * OPTIMIZER_BYTES[optimizer],
        activations=round(activation_bytes(shape, batch, seq_len, dtype, gradient_checkpointing, fused_attention)),
        logits=round(logits_bytes(shape, batch, seq_len, logits_fraction)),
        label=f"{method} {dtype} {optimizer}, batch {batch} x {seq_len}"
              + (", checkpointing" if gradient_checkpointing else ""),
    )
