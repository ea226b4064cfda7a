"""Merging LoRA task adapters from scratch: linear, TIES and DARE on each layer's full update (notebook 08).

A LoRA adapter i adds a task update to every layer it wraps: delta_i = (B_i @ A_i) * scaling_i. Merging turns the
updates of several adapters into one:

- linear: sum_i w_i delta_i.
- TIES (Yadav et al., 2023): trim each update to its `density` share of largest entries, elect each entry's sign
  by the summed mass, then average only the entries that agree with the elected sign (the disjoint mean).
- DARE (Yu et al., 2023): drop each entry with probability 1 - density and scale the survivors by 1/density, then
  add up (dare_linear) or elect signs and take the disjoint mean (dare_ties).

peft's `add_weighted_adapter` names the same methods but applies `linear`, `ties` and `dare_*` to the A factors and
the B factors separately (cheap, but B_new @ A_new then has cross terms B_i @ A_j); its `cat`, `svd` and `*_svd`
types work on the full updates. `merge_adapters` does the latter, `merge_factors` the former; tests prove both.
`merge_state_dicts` merges whole fine-tuned models the same way, proven equal to mergekit's `task_arithmetic`
and `ties` (tests/test_merge.py).
"""

from __future__ import annotations

import copy
import math

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from labkit import LabkitError

METHODS = ("linear", "ties", "dare_linear", "dare_ties")

# ---------------------------------------------------------------- the methods, on tensors


def trim(delta: Tensor, density: float) -> Tensor:
    """Keep the int(density * n) entries largest in magnitude and zero the rest (TIES' first step).

    Entries tied with the k-th largest magnitude are all kept: with float updates that happens at 0, where keeping
    changes nothing. (kthvalue finds the threshold ~5x faster than topk's k indices on a layer's update.)
    """
    k = int(density * delta.numel())
    if density >= 1 or k == 0:
        return delta if density >= 1 else torch.zeros_like(delta)
    magnitude = delta.abs()
    threshold = magnitude.flatten().kthvalue(delta.numel() - k + 1).values
    return delta * (magnitude >= threshold)


def elect_sign(deltas: Tensor) -> Tensor:
    """Each entry's elected sign across stacked updates: that of their sum (+1 on a tie)."""
    return torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)


def disjoint_merge(deltas: Tensor, sign: Tensor, weights: Tensor) -> Tensor:
    """Sum of the weighted entries that agree with the elected sign, divided by how many agree (0 if none)."""
    agree = deltas.sign() == sign  # a trimmed (zero) entry agrees with neither sign
    return (deltas * weights * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def dare(delta: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """Drop each entry with probability 1 - density and scale the rest by 1/density (the same expected value)."""
    if density >= 1:
        return delta
    keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)  # a generator on delta.device
    return delta * keep / density


def merge_tensors(deltas: list[Tensor], weights: list[float], method: str = "linear", density: float = 1.0,
                  generator: torch.Generator | None = None) -> Tensor:
    """One update from several updates of the same shape by `method` (linear, ties, dare_linear, dare_ties)."""
    check_merge_args(len(deltas), weights, method, density)
    if method == "ties":
        deltas = [trim(delta, density) for delta in deltas]
    elif method.startswith("dare"):
        deltas = [dare(delta, density, generator) for delta in deltas]
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if method.endswith("linear"):
        return (stacked * w).sum(dim=0)
    return disjoint_merge(stacked, elect_sign(stacked), w)  # ties, dare_ties: signs elected before weighting


def check_merge_args(n: int, weights: list[float], method: str, density: float) -> None:
    """Raise LabkitError, saying how to fix it, when merge arguments cannot work."""
    if method not in METHODS:
        raise LabkitError(f"merge method {method!r} is unknown. Fix: use one of {METHODS}")
    if n == 0 or len(weights) != n:
        raise LabkitError(f"merging needs one weight per update: got {n} updates and {len(weights)} weights. "
                          "Fix: pass as many weights as adapters")
    if not 0 < density <= 1:
        raise LabkitError(f"density must be in (0, 1] (the share of entries kept), got {density}. Fix: e.g. 0.5")


# ---------------------------------------------------------------- LoRA adapters, layer by layer


def lora_modules(model: PeftModel) -> dict[str, LoraLayer]:
    """Every LoRA-wrapped layer of a peft model, by its name in the base model ('model.layers.0.self_attn.q_proj')."""
    return {name: module for name, module in model.get_base_model().named_modules() if isinstance(module, LoraLayer)}


def layer_delta(layer: LoraLayer, adapter: str) -> Tensor:
    """One adapter's full update of one layer, (B @ A) * scaling, in float32."""
    if layer.use_dora.get(adapter, False):
        raise LabkitError(f"adapter {adapter!r} is DoRA: its update is not B @ A * scaling. Fix: merge plain LoRA "
                          "adapters (use_dora=False)")
    return (layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float()) * layer.scaling[adapter]


def check_loaded(model: PeftModel, adapters: list[str]) -> None:
    """Raise LabkitError naming the loaded adapters when one of `adapters` is not among them."""
    missing = [adapter for adapter in adapters if adapter not in model.peft_config]
    if missing:
        raise LabkitError(f"adapter {missing[0]!r} is not loaded (loaded: {sorted(model.peft_config)}). Fix: "
                          "model.load_adapter(folder, adapter_name=...)")


@torch.no_grad()
def lora_deltas(model: PeftModel, adapter: str) -> dict[str, Tensor]:
    """One adapter's full update of every layer it wraps, by layer name."""
    check_loaded(model, [adapter])
    return {name: layer_delta(layer, adapter) for name, layer in lora_modules(model).items()
            if adapter in layer.lora_A}


@torch.no_grad()
def merge_adapters(model: PeftModel, adapters: list[str], weights: list[float], method: str = "linear",
                   density: float = 1.0, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The merged update of every layer: `merge_tensors` over the adapters' full updates (B @ A) * scaling."""
    check_merge_args(len(adapters), weights, method, density)
    check_loaded(model, adapters)
    return merge_updates([lora_deltas(model, adapter) for adapter in adapters], weights, method, density, generator)


@torch.no_grad()
def merge_updates(updates: list[dict[str, Tensor]], weights: list[float], method: str = "linear",
                  density: float = 1.0, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """`merge_tensors` layer by layer over several {layer name: full update} dicts (a layer in only some: those)."""
    check_merge_args(len(updates), weights, method, density)
    merged = {}
    for name in dict.fromkeys(name for update in updates for name in update):  # DARE's random draws follow this order
        present = [(update[name], w) for update, w in zip(updates, weights) if name in update]
        merged[name] = merge_tensors([d for d, _ in present], [w for _, w in present], method, density, generator)
    return merged


@torch.no_grad()
def merge_factors(model: PeftModel, adapters: list[str], weights: list[float], method: str = "linear",
                  density: float = 1.0, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """peft's `linear`/`ties`/`dare_*` update of every layer: A's and B's merged apart, then B_new @ A_new.

    Each factor gets sqrt(|w * scaling|) (A also its sign), so one adapter alone gives back w * delta.
    """
    check_merge_args(len(adapters), weights, method, density)
    check_loaded(model, adapters)
    merged = {}
    for name, layer in lora_modules(model).items():
        present = [(a, w * layer.scaling[a]) for a, w in zip(adapters, weights) if a in layer.lora_A]
        if not present:
            continue
        a_weights = [math.copysign(math.sqrt(abs(w)), w) for _, w in present]
        b_weights = [math.sqrt(abs(w)) for _, w in present]
        new_a = merge_tensors([layer.lora_A[a].weight for a, _ in present], a_weights, method, density, generator)
        new_b = merge_tensors([layer.lora_B[a].weight for a, _ in present], b_weights, method, density, generator)
        merged[name] = new_b.float() @ new_a.float()
    return merged


# ---------------------------------------------------------------- using a merge


def factorise(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(A, B) with B @ A the best rank-`rank` approximation of `delta` (truncated SVD; exact at full rank)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.numel())
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a[:k], b[:, :k] = vh[:k], u[:, :k] * s[:k]
    return a.to(delta.dtype), b.to(delta.dtype)


@torch.no_grad()
def add_merged_adapter(model: PeftModel, deltas: dict[str, Tensor], name: str, rank: int | None = None) -> PeftModel:
    """Add merged updates to `model` as a new LoRA adapter `name` (not activated) of rank `rank`.

    rank=None keeps every layer exact (full rank: as large as the layer itself); a smaller rank keeps the top
    singular directions, as peft's `svd` merge does. Activate it with model.set_adapter(name).
    """
    if name in model.peft_config:
        raise LabkitError(f"adapter {name!r} already exists. Fix: model.delete_adapter({name!r}) or pick a new name")
    rank = rank or max(min(delta.shape) for delta in deltas.values())
    model.add_adapter(name, LoraConfig(r=rank, lora_alpha=rank, target_modules=list(deltas), lora_dropout=0.0))
    layers = lora_modules(model)
    for layer_name, delta in deltas.items():
        a, b = factorise(delta.float(), rank)
        weight_a, weight_b = layers[layer_name].lora_A[name].weight, layers[layer_name].lora_B[name].weight
        weight_a.copy_(a.to(weight_a.dtype))  # scaling = lora_alpha / r = 1
        weight_b.copy_(b.to(weight_b.dtype))
    return model


@torch.no_grad()
def merged_model(model: PeftModel, deltas: dict[str, Tensor]) -> nn.Module:
    """A plain copy of `model`'s base with the merged updates added to its weights (W + delta); `model` is untouched."""
    plain = copy.deepcopy(model).unload()  # the base model, adapters removed without merging them
    for name, delta in deltas.items():
        weight = plain.get_submodule(name).weight
        weight.add_(delta.to(weight.dtype))
    return plain


@torch.no_grad()
def merge_state_dicts(base: dict[str, Tensor], finetuned: list[dict[str, Tensor]], weights: list[float],
                      method: str = "linear", density: float = 1.0,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Full models merged: base + the merged task vectors (finetuned - base) of every floating-point weight."""
    merged = {}
    for key, tensor in base.items():
        if not tensor.is_floating_point():
            merged[key] = tensor
            continue
        task_vectors = [model[key].float() - tensor.float() for model in finetuned]
        merged_delta = merge_tensors(task_vectors, weights, method, density, generator)
        merged[key] = (tensor.float() + merged_delta).to(tensor.dtype)
    return merged
