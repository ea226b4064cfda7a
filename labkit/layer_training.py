"""Cached-layer LoRA training on the task: fixed batches, a small loop, one-matrix updates, config sweeps (notebook 03).

A second loop on purpose, as a teaching device: 03 sweeps rank, alpha and learning rate over many short runs,
which it can afford only by caching each layer's inputs once and training one layer's LoRA on them. Every
course run of a whole model (SFT, full fine-tuning, DPO, ORPO, KTO) uses labkit.sft.train_loop; GRPO, which
samples its own data as it trains, has its loop in labkit.grpo.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from labkit import LabkitError
from labkit.lora import count_parameters, inject_lora, shared_copy
from labkit.models import LINEAR_NAMES
from labkit.sft import assistant_loss, collate, labelled_tokens, length_grouped_batches, lr_at, tokenize_chat


def layer_index(name: str) -> int | None:
    """The decoder layer a module name belongs to ('model.layers.12.mlp.up_proj' -> 12)."""
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def inject_lora_layers(model: nn.Module, layers: Iterable[int], target_modules: Sequence[str] | str = "all-linear",
                       **lora_kwargs) -> nn.Module:
    """inject_lora restricted to some decoder layers (peft's `layers_to_transform`)."""
    names = LINEAR_NAMES if target_modules == "all-linear" else tuple(target_modules)
    wanted = {int(i) for i in layers}
    full_names = [name for name, _ in model.named_modules()
                  if name.split(".")[-1] in names and layer_index(name) in wanted]
    return inject_lora(model, target_modules=full_names, **lora_kwargs)


# ---------------------------------------------------------------- fixed batches, and the cached layer input


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


class _CachedInput(nn.Module):
    """Stands in for the embedding layer: returns the cached input of the first layer that runs."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.hidden


def task_loss(model: nn.Module, data: TaskBatches, i: int) -> tuple[Tensor, int]:
    """Summed assistant-token cross-entropy of batch i and its token count (from the cached layer if any)."""
    batch = data.batches[i]
    if data.start_layer == 0:
        return assistant_loss(model, batch)
    decoder = _decoder(model)
    layers, embed = decoder.layers, decoder.embed_tokens
    decoder.layers = layers[data.start_layer :]  # run only the top layers ...
    decoder.embed_tokens = _CachedInput(data.hidden[i])  # ... on the cached input of the first of them
    try:
        return assistant_loss(model, batch)
    finally:
        decoder.layers, decoder.embed_tokens = layers, embed


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


# ---------------------------------------------------------------- a small training loop


def train_task(model: nn.Module, data: TaskBatches, lr: float = 1e-3, warmup_ratio: float = 0.1,
               max_grad_norm: float = 1.0, weight_decay: float = 0.0, params: list[Tensor] | None = None,
               optimizer: str = "adamw", seed: int = 0, progress: bool = False) -> list[dict]:
    """One optimizer step per batch (or group of micro-batches) of `data`; returns the loss history.

    Linear warmup then cosine decay (labkit.sft.lr_at); gradient clipping at max_grad_norm.
    """
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
    history = []
    model.train()
    started = time.perf_counter()
    for step, micro in enumerate(data.step_ranges()):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, data.steps, warmup_ratio)
        n_labels = sum(labelled_tokens(data.batches[i]) for i in micro)
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
    layer = layer_index(module_name)
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


def compare_configs(model: nn.Module, train_data: TaskBatches, val_data: TaskBatches, configs: dict[str, dict],
                    seed: int = 0) -> list[dict]:
    """Train one fresh adapter per config on the same batches and report its validation loss.

    Each config holds inject_lora options (r, lora_alpha, target_modules, use_rslora, use_dora,
    lora_dropout) and optionally `lr`. Adapters go on the layers from train_data.start_layer up (all
    layers when it is 0), each on its own shared_copy of `model`, which is left untouched.
    """
    layers = range(train_data.start_layer, len(_decoder(model).layers))
    rows = []
    for label, config in configs.items():
        options = dict(config)
        lr, target_modules = options.pop("lr", 1e-3), options.pop("target_modules", "all-linear")
        torch.manual_seed(seed)
        adapted = inject_lora_layers(shared_copy(model), layers, target_modules, **options)
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
