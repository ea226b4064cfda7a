"""LoRA (and DoRA, rsLoRA) from scratch, laid out like peft's LoRA layer so weights copy across.

A frozen linear layer W gets a trainable low-rank update: y = W x + (B A x) * scaling, with
A (r x in) and B (out x r). B starts at zero, so the adapted model equals the base at step 0.
Names follow peft: `<module>.base_layer.weight`, `<module>.lora_A`, `<module>.lora_B`,
`<module>.lora_magnitude_vector` (peft adds an adapter name and `.weight` to these).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
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
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if r <= 0:
            raise LabkitError(f"LoRA rank r must be a positive integer, got {r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.use_rslora, self.use_dora = r, alpha, use_rslora, use_dora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
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
            f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, rslora={self.use_rslora}, "
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
    alpha: float = 16,
    target_modules: Sequence[str] | str = ("q_proj", "v_proj"),
    dropout: float = 0.0,
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
        setattr(parent, child, LoRALinear(base, r, alpha, dropout, use_rslora, use_dora))
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


# ================================================================ notebook 03: counting, ranks, training


def lora_parameter_count(d_in: int, d_out: int, r: int) -> int:
    """Parameters of one LoRA adapter on a d_in -> d_out layer: A is r x d_in, B is d_out x r."""
    return r * (d_in + d_out)


def adapter_megabytes(trainable: int, bytes_per_param: int = 4) -> float:
    """Size of an adapter file in MB (1e6 bytes): fp32 by default, 2 bytes for a bf16/fp16 save."""
    return trainable * bytes_per_param / 1e6


def energy_in_top(singular_values: Tensor, r: int) -> float:
    """Share of a matrix's squared Frobenius norm held by its top-r singular values."""
    s2 = singular_values.double() ** 2
    return float(s2[:r].sum() / s2.sum())


def low_rank_approximation(matrix: Tensor, r: int) -> Tensor:
    """The best rank-r approximation of `matrix` (Eckart-Young: keep the top r singular triplets)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).to(matrix.dtype)


def rank_report(matrix: Tensor, r: int, singular_values: Tensor | None = None) -> dict:
    """What a rank-r factorisation B @ A of `matrix` keeps and costs.

    relative_error = ||M - M_r||_F / ||M||_F = sqrt(1 - energy), from the singular values alone.
    """
    s = torch.linalg.svdvals(matrix.double()) if singular_values is None else singular_values
    d_out, d_in = matrix.shape
    r = max(1, min(int(r), len(s)))
    energy = energy_in_top(s, r)
    return {
        "r": r,
        "energy": energy,
        "relative_error": math.sqrt(max(0.0, 1.0 - energy)),
        "lora_params": lora_parameter_count(d_in, d_out, r),
        "full_params": d_in * d_out,
        "param_share": lora_parameter_count(d_in, d_out, r) / (d_in * d_out),
    }


def rank_for_energy(singular_values: Tensor, energy: float) -> int:
    """The smallest r whose top-r singular values hold at least `energy` of the squared norm."""
    s2 = singular_values.double() ** 2
    cumulative = torch.cumsum(s2, 0) / s2.sum()
    index = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64)).item())
    return min(index + 1, len(s2))  # energy 1.0 may sit a rounding error above the last cumulative sum


def inject_lora_layers(model: nn.Module, layers: Iterable[int], targets: Sequence[str] | str = "all-linear",
                       **lora_kwargs) -> nn.Module:
    """inject_lora restricted to some decoder layers (peft's `layers_to_transform`)."""
    names = LINEAR_NAMES if targets == "all-linear" else tuple(targets)
    wanted = {int(i) for i in layers}
    full_names = [
        name for name, module in model.named_modules()
        if _is_linear(module) and name.split(".")[-1] in names and _layer_index(name) in wanted
    ]  # fmt: skip
    return inject_lora(model, target_modules=full_names, **lora_kwargs)


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _layer_index(name: str) -> int | None:
    """The decoder layer a module name belongs to ('model.layers.12.mlp.up_proj' -> 12)."""
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------- a small training loop


@dataclass
class TaskBatches:
    """Fixed training or validation batches; with start_layer > 0, also the (frozen) input of that layer.

    When every layer below `start_layer` is frozen and has no adapter, its output never changes, so
    it is computed once here and training runs only the layers from `start_layer` up.
    """

    batches: list[dict]
    start_layer: int = 0
    hidden: list[Tensor] | None = None
    grad_accum: int = 1  # micro-batches per optimizer step (a short batch may split into fewer)
    micro_counts: list[int] | None = None  # micro-batches of each step; None: grad_accum each

    def step_ranges(self) -> list[range]:
        """For each optimizer step, the indices of its (micro-)batches."""
        counts = self.micro_counts or [self.grad_accum] * (len(self.batches) // self.grad_accum)
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [range(start, start + n) for start, n in zip(starts, counts)]

    @property
    def steps(self) -> int:
        return len(self.micro_counts) if self.micro_counts else len(self.batches) // self.grad_accum

    @property
    def tokens(self) -> int:
        return sum(int(b["attention_mask"].sum()) for b in self.batches)


def _decoder(model: nn.Module) -> nn.Module:
    """The LlamaModel inside a causal LM (also through a peft wrapper)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model


class _StopForward(Exception):
    pass


@torch.no_grad()
def hidden_at_layer(model: nn.Module, batch: dict, layer: int) -> Tensor:
    """The hidden states that enter decoder layer `layer` for a batch (the forward stops there)."""
    decoder = _decoder(model)
    captured = {}

    def grab(module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        raise _StopForward

    handle = decoder.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["h"].detach()


def make_task_batches(model: nn.Module, tokenizer, examples: list[dict], batch_size: int, n_batches: int | None = None,
                      start_layer: int = 0, seed: int = 0, shuffle: bool = True,
                      micro_batch: int | None = None) -> TaskBatches:
    """Tokenize chat examples (assistant-only labels) into batches on the model's device.

    shuffle=True: `n_batches` length-grouped random batches (labkit.sft's sampler), for training;
    shuffle=False: every example once, sorted by length, for evaluation. `micro_batch` splits each
    batch into micro-batches whose gradients are accumulated; start_layer > 0 caches that layer's input.
    """
    from labkit.sft import collate, length_grouped_batches, tokenize_chat

    rows = [tokenize_chat(tokenizer, ex["messages"]) for ex in examples]
    if shuffle:
        n = n_batches or math.ceil(len(rows) / batch_size)
        groups = length_grouped_batches([len(r["input_ids"]) for r in rows], batch_size, n, seed)
    else:
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)][:n_batches]
    accum, counts = 1, None
    if micro_batch and micro_batch < batch_size:
        if batch_size % micro_batch:
            raise LabkitError(f"batch_size {batch_size} is not a multiple of micro_batch {micro_batch}")
        accum = batch_size // micro_batch
        split = [[g[i : i + micro_batch] for i in range(0, len(g), micro_batch)] for g in groups]
        counts = [len(parts) for parts in split]  # a short batch gives fewer micro-batches, never empty ones
        groups = [part for parts in split for part in parts]
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in collate([rows[i] for i in g], tokenizer.pad_token_id).items()}
               for g in groups]
    hidden = [hidden_at_layer(model, b, start_layer) for b in batches] if start_layer > 0 else None
    return TaskBatches(batches, start_layer, hidden, accum, counts)


def task_loss(model: nn.Module, data: TaskBatches, i: int) -> tuple[Tensor, int]:
    """Summed assistant-token cross-entropy of batch i and its token count (from the cached layer if any)."""
    from labkit.sft import IGNORE, assistant_loss

    batch = data.batches[i]
    if data.start_layer == 0:
        return assistant_loss(model, batch)
    decoder = _decoder(model)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = decoder.layers
    decoder.layers = layers[data.start_layer :]  # run only the top layers, on the cached input
    try:
        hidden = decoder(inputs_embeds=data.hidden[i], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state
    finally:
        decoder.layers = layers
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = inner.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), int(keep.sum())


@torch.no_grad()
def task_eval_loss(model: nn.Module, data: TaskBatches) -> float:
    """Mean loss per assistant token over all batches (eval mode)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(len(data.batches)):
        loss, n = task_loss(model, data, i)
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


def train_task(model: nn.Module, data: TaskBatches, lr: float = 1e-3, warmup_ratio: float = 0.1,
               max_grad_norm: float = 1.0, weight_decay: float = 0.0, params: list[Tensor] | None = None,
               optimizer: str = "adamw", seed: int = 0, progress: bool = False) -> list[dict]:
    """One optimizer step per batch (or group of micro-batches) of `data`; returns the loss history.

    Linear warmup then cosine decay (labkit.sft.lr_at); gradient clipping at max_grad_norm.
    """
    from labkit.sft import SFTConfig, lr_at

    torch.manual_seed(seed)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LabkitError("Nothing to train: no parameter requires a gradient (inject an adapter first).")
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr)
    else:
        raise LabkitError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    schedule = SFTConfig(steps=data.steps, lr=lr, warmup_ratio=warmup_ratio)
    history = []
    model.train()
    started = time.perf_counter()
    for step, micro in enumerate(data.step_ranges()):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule)
        n_labels = sum(int((data.batches[i]["labels"][:, 1:] != -100).sum()) for i in micro)
        step_loss = 0.0
        for i in micro:  # the step's loss is the mean over all its labelled tokens
            loss, _ = task_loss(model, data, i)
            (loss / n_labels).backward()
            step_loss += loss.item() / n_labels
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": step_loss, "seconds": time.perf_counter() - started})
        if progress:
            print(f"step {step + 1:>3}: loss {history[-1]['loss']:.3f}")
    model.eval()
    return history


def full_finetune_update(model: nn.Module, module_name: str, data: TaskBatches, lr: float = 1e-4,
                         optimizer: str = "adamw", seed: int = 0) -> Tensor:
    """Fully fine-tune ONE weight matrix (everything else frozen) and return its update W_after - W_before.

    The model is left exactly as it was: the weight is restored and requires_grad reset.
    """
    layer = _layer_index(module_name)
    if layer is not None and data.start_layer > layer:
        raise LabkitError(f"{module_name} is below the cached layer {data.start_layer}: cache a lower layer.")
    weight = model.get_submodule(module_name).weight
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad = False
    before = weight.detach().clone()
    weight.requires_grad = True
    try:
        train_task(model, data, lr=lr, params=[weight], optimizer=optimizer, seed=seed, max_grad_norm=0.0)
        delta = weight.detach() - before
    finally:
        with torch.no_grad():
            weight.copy_(before)
        for name, p in model.named_parameters():
            p.requires_grad = flags[name]
        model.train(was_training)
    return delta


# ---------------------------------------------------------------- copies and random adapters (parity demos)


def shared_copy(model: nn.Module, own: tuple[str, ...] = ()) -> nn.Module:
    """A copy of the module tree that shares its parameters' memory with `model` (no 538 MB copy).

    The copy's parameters are new Parameter objects over the same storage: freezing them (as
    inject_lora does) leaves `model`'s requires_grad flags alone, while an in-place edit of their
    values would show in `model` too. Parameters whose names end with one of `own` are copied, so
    that merging into them, or quantizing them, leaves `model` untouched. Tied weights stay tied.
    """
    import copy

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


def compare_configs(model: nn.Module, train_data: TaskBatches, val_data: TaskBatches, configs: dict[str, dict],
                    seed: int = 0) -> list[dict]:
    """Train one fresh adapter per config on the same batches and report its validation loss.

    Each config holds inject_lora options (r, alpha, targets, use_rslora, use_dora, dropout) and
    optionally `lr`. Adapters go on the layers from train_data.start_layer up (all layers when it
    is 0), each on its own shared_copy of `model`, which is left untouched.
    """
    layers = range(train_data.start_layer, len(_decoder(model).layers))
    rows = []
    for label, config in configs.items():
        options = dict(config)
        lr, targets = options.pop("lr", 1e-3), options.pop("targets", "all-linear")
        torch.manual_seed(seed)
        adapted = inject_lora_layers(shared_copy(model), layers, targets, **options)
        history = train_task(adapted, train_data, lr=lr, seed=seed)
        rows.append({
            "config": label,
            "trainable": count_parameters(adapted)[0],
            "lr": lr,
            "final train loss": history[-1]["loss"],
            "val loss": task_eval_loss(adapted, val_data),
            "seconds": history[-1]["seconds"],
        })  # fmt: skip
    return rows
