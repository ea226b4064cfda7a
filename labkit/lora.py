"""LoRA (and DoRA, rsLoRA) from scratch, laid out like peft's LoRA layer so weights copy across (notebook 03).

A frozen linear layer W gets a trainable low-rank update: y = W x + (B A x) * scaling, with
A (r x in) and B (out x r). B starts at zero, so the adapted model equals the base at step 0.
Names follow peft: `<module>.base_layer.weight`, `<module>.lora_A`, `<module>.lora_B`,
`<module>.lora_magnitude_vector` (peft adds an adapter name and `.weight` to these).
"""

from __future__ import annotations

import copy
import math
import re
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit import LabkitError
from labkit.quant import NF4Linear

OUTPUT_HEAD = "lm_head"


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update B @ A (optionally DoRA)."""

    def __init__(
        self,
        base_layer: nn.Linear | NF4Linear,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if r <= 0:
            raise LabkitError(f"LoRA rank r must be a positive integer, got {r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.lora_alpha, self.use_rslora, self.use_dora = r, lora_alpha, use_rslora, use_dora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        weight = self.base_weight()
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear: U(+-1/sqrt(in_features))
        self.lora_magnitude_vector = None
        if use_dora:  # m starts at the row norms of W (B is zero), so DoRA also starts at the base
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm(weight))
        self.merged = False
        self._merged_weight_norm: Tensor | None = None

    def base_weight(self) -> Tensor:
        """The frozen base weight (out x in), dequantized if the base is 4-bit."""
        if isinstance(self.base_layer, NF4Linear):
            return self.base_layer.dequantize()
        return self.base_layer.weight

    def delta_weight(self) -> Tensor:
        """The update the adapter adds to W: (B @ A) * scaling."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def weight_norm(self, weight: Tensor) -> Tensor:
        """Row norms ||W + (B @ A) * scaling|| (one per output), detached as in the DoRA paper."""
        # B @ A computed as peft does, B(A(I))^T: another GEMM may round differently on another CPU.
        eye = torch.eye(self.lora_A.shape[1], device=self.lora_A.device, dtype=self.lora_A.dtype)
        lora_weight = F.linear(F.linear(eye, self.lora_A), self.lora_B).T.detach()
        return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).detach()

    def forward(self, x: Tensor) -> Tensor:
        """base(x) + B(A(dropout(x))) * scaling, or the DoRA output; just base(x) when merged."""
        result = self.base_layer(x)
        if self.merged:
            return result
        if self.use_dora:
            return result + self._dora_delta(x, result)
        lora_x = self.lora_dropout(x).to(self.lora_A.dtype)
        return result + F.linear(F.linear(lora_x, self.lora_A), self.lora_B) * self.scaling

    def _dora_delta(self, x: Tensor, result: Tensor) -> Tensor:
        """What DoRA adds to base(x): (m/||W'|| - 1) * W x + (m/||W'||) * B(A(x)) * scaling."""
        weight = self.base_weight().to(x.dtype)
        magnitude_scale = (self.lora_magnitude_vector / self.weight_norm(weight)).view(1, -1)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base_wx = result if bias is None else result - bias  # W x, without the bias
        else:  # with active dropout, peft recomputes W x on the dropped-out input
            x = self.lora_dropout(x)
            base_wx = F.linear(x, weight)
        lora_result = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return (magnitude_scale - 1) * base_wx + magnitude_scale * lora_result * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: W += (B @ A) * scaling (DoRA: W = m/||W'|| * W')."""
        if self.merged:
            return
        weight = self._mergeable_weight()
        delta = self.delta_weight()
        if self.use_dora:
            self._merged_weight_norm = self.weight_norm(weight)
            factor = (self.lora_magnitude_vector / self._merged_weight_norm).view(-1, 1)
            weight.copy_(factor * (weight + delta))
        else:
            weight += delta
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: W -= (B @ A) * scaling (DoRA: W = W' / (m/||W'||) - (B @ A) * scaling)."""
        if not self.merged:
            return
        weight = self._mergeable_weight()
        delta = self.delta_weight()
        if self.use_dora:
            factor = (self.lora_magnitude_vector / self._merged_weight_norm).view(-1, 1)
            weight.copy_(weight / factor - delta)
            self._merged_weight_norm = None
        else:
            weight -= delta
        self.merged = False

    def _mergeable_weight(self) -> Tensor:
        """The base weight tensor to edit in place; a 4-bit base cannot be merged into."""
        if isinstance(self.base_layer, NF4Linear):
            raise LabkitError(
                "Cannot merge a LoRA adapter into a 4-bit NF4Linear base: merging would re-quantize W. "
                "Load the base in fp32/bf16, copy the adapter onto it, then merge."
            )
        return self.base_layer.weight.data

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, rslora={self.use_rslora}, "
            f"dora={self.use_dora}, merged={self.merged}"
        )


# ---------------------------------------------------------------- whole models


def _is_linear(module: nn.Module) -> bool:
    """True for layers LoRA can wrap: nn.Linear and our 4-bit NF4Linear."""
    return isinstance(module, (nn.Linear, NF4Linear))


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head: `lm_head`, or whatever model.get_output_embeddings() is."""
    names = {OUTPUT_HEAD}
    if hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
        names |= {name.split(".")[-1] for name, module in model.named_modules() if module is head and name}
    return names


def _matches(name: str, targets: Iterable[str]) -> bool:
    """peft's rule: the module name equals a target or ends with '.' + target."""
    return any(name == target or name.endswith("." + target) for target in targets)


def inject_lora(
    model: nn.Module,
    r: int = 8,
    lora_alpha: float = 16,
    target_modules: Sequence[str] | str = ("q_proj", "v_proj"),
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
) -> nn.Module:
    """Freeze `model` and wrap its matching linear layers in LoRALinear, in place; returns it."""
    for param in model.parameters():
        param.requires_grad = False
    if isinstance(target_modules, str) and target_modules != "all-linear":
        raise LabkitError(f'target_modules must be a list of names or "all-linear", got {target_modules!r}')
    heads = _output_head_names(model)

    def matches(name: str) -> bool:
        if target_modules == "all-linear":
            return name.split(".")[-1] not in heads
        return _matches(name, target_modules)

    targets = [
        name
        for name, module in model.named_modules()
        if _is_linear(module) and ".base_layer" not in name and matches(name)  # never wrap twice
    ]
    if not targets:
        raise LabkitError(f"No linear layer matches target_modules={target_modules!r}")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, LoRALinear(base, r, lora_alpha, lora_dropout, use_rslora, use_dora))
    return model


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    """Every LoRALinear in `model`."""
    return [module for module in model.modules() if isinstance(module, LoRALinear)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight (forward then costs nothing extra)."""
    for layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter from its base weight again."""
    for layer in lora_layers(model):
        layer.unmerge()
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts as its out x in parameters."""
    params = list(model.parameters())  # shared (tied) parameters are listed once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, sum(p.numel() for p in params) + quantized


# ---------------------------------------------------------------- to and from peft

_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?"  # peft's wrapper prefix
    r"(.*\.(?:lora_A|lora_B|lora_magnitude_vector))"  # our parameter name
    r"(?:\.[^.]+)?\.weight$"  # an adapter name left over, then .weight
)


def peft_key_to_ours(key: str, adapter: str = "default") -> str | None:
    """Map a peft adapter key ('base_model.model.x.lora_A[.default].weight') to ours ('x.lora_A')."""
    key = key.replace(f".{adapter}.", ".")
    match = _PEFT_KEY.match(key)
    return match.group(1) if match else None


def load_peft_state(model: nn.Module, peft_state: dict[str, Tensor], adapter: str = "default") -> nn.Module:
    """Copy adapter weights from a peft state dict (full or `get_peft_model_state_dict`) into ours."""
    ours = dict(model.named_parameters())
    copied = set()
    for key, value in peft_state.items():
        name = peft_key_to_ours(key, adapter)
        if name is None:
            continue
        if name not in ours:
            raise LabkitError(f"peft weight {key} has no counterpart {name} in this model (same targets?)")
        with torch.no_grad():
            ours[name].copy_(value.reshape(ours[name].shape))
        copied.add(name)
    missing = {n for n in ours if n.endswith(("lora_A", "lora_B", "lora_magnitude_vector"))} - copied
    if missing:
        raise LabkitError(f"{len(missing)} adapter weights were not in the peft state, e.g. {sorted(missing)[0]}")
    return model


def copy_from_peft(model: nn.Module, peft_model: nn.Module, adapter: str = "default") -> nn.Module:
    """Give our LoRA model the exact adapter weights of a peft model with the same targets."""
    return load_peft_state(model, peft_model.state_dict(), adapter)


def to_peft_state(model: nn.Module) -> dict[str, Tensor]:
    """Our adapter weights under the keys peft saves (adapter_model.safetensors, no adapter name)."""
    state = {}
    for name, param in model.named_parameters():
        if name.endswith(("lora_A", "lora_B", "lora_magnitude_vector")):
            state[f"base_model.model.{name}.weight"] = param.detach().clone()
    return state


# ---------------------------------------------------------------- copies and random adapters (parity demos)


def shared_copy(model: nn.Module, own: tuple[str, ...] = ()) -> nn.Module:
    """A copy of the module tree that shares its parameters' memory with `model` (no 538 MB copy).

    The copy's parameters are new Parameter objects over the same storage: freezing them (as
    inject_lora does) leaves `model`'s requires_grad flags alone, while an in-place edit of their
    values would show in `model` too. Parameters whose names end with one of `own` are copied, so
    that merging into them, or quantizing them, leaves `model` untouched. Tied weights stay tied.
    """
    memo = {
        id(p): nn.Parameter(p.data, requires_grad=p.requires_grad)
        for name, p in model.named_parameters()
        if not (own and name.endswith(own))
    }
    return copy.deepcopy(model, memo)


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 1, std: float = 0.02) -> nn.Module:
    """Give every adapter a non-zero B ~ N(0, std) (and DoRA magnitudes a ~10 % jitter), ours or peft's.

    A fresh adapter has B = 0 and changes nothing; comparing two implementations needs adapters
    that do change the output.
    """
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.copy_(torch.randn(param.shape, generator=g) * std)
        elif "lora_magnitude_vector" in name:
            param.mul_(1 + 0.1 * torch.randn(param.shape, generator=g))
    return model
