"""Full fine-tuning: every weight trainable, on the same loop, batches and loss as LoRA SFT, for a fair comparison."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from labkit.checkpoint import CHECKSUMS, CheckpointError, verify_checksums, write_checksums
from labkit.paths import cache_root
from labkit.runtime import pick_amp_dtype, pick_device
from labkit.sft import SFT, data_digest, train_loop
from labkit.store import cached, content_key


@dataclass
class FullFTConfig:
    """Everything that defines a full fine-tuning run (and so its cache key); the names mean what SFTConfig's do."""

    steps: int = 40
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-5  # every weight moves: full fine-tuning needs a far lower learning rate than LoRA
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    eval_every: int = 10
    seed: int = 0  # the same seed as an SFTConfig gives the same batches in the same order
    # read by labkit.sft.train_loop; class constants, not fields, so they are not part of the run's cache key
    trains: ClassVar[str] = "all"  # every weight: no adapter
    patience: ClassVar[None] = None  # never stop early
    checkpoint_every: ClassVar[int] = 0  # the finished run is cached (cached_full_ft); no checkpoints on the way


@dataclass
class FullFTResult:
    """The fully fine-tuned model (best weights by validation loss), its history and training time."""

    model: Any
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_val_loss: float = math.inf
    train_seconds: float = 0.0


def train_full(model, tokenizer, train: list[dict], validation: list[dict] | None, config: FullFTConfig,
               **loop_options) -> FullFTResult:
    """Fine-tune every weight of `model` with AdamW on chat examples; keep the best weights by validation loss.

    labkit.sft.train_loop does it (the config's `trains = "all"`): the same loop, loss and batches as LoRA SFT.
    `loop_options` are its plot and progress.
    """
    result = train_loop(model, tokenizer, train, validation, config, SFT, **{"plot": False, **loop_options})
    return FullFTResult(result.model, result.history, result.best_step, result.best_val_loss, result.train_seconds)


def full_ft_key(model_name: str, train: list[dict], validation: list[dict] | None, config: FullFTConfig) -> str:
    """The cache key of a full fine-tuning run: hash of (model, training and validation data, config)."""
    key = {"model": model_name, "data": data_digest(train), "validation": data_digest(validation or []),
           "config": asdict(config), "method": "full"}
    if (amp := pick_amp_dtype(pick_device())) is not None:
        key["precision"] = str(amp)
    return content_key(key)


def cached_full_ft(model, tokenizer, model_name: str, train: list[dict], validation: list[dict] | None,
                   config: FullFTConfig) -> tuple[FullFTResult, Path]:
    """The weights and history of an identical earlier full fine-tuning run from labkit's cache, or train and cache it."""
    folder = cache_root() / "full_ft" / full_ft_key(model_name, train, validation, config)
    result = cached(folder, lambda path: load_full_ft(model, path),
                    lambda: train_full(model, tokenizer, train, validation, config), save_full_ft, folder=True)
    return result, folder


def load_full_ft(model, folder: Path) -> FullFTResult:
    """A cached full fine-tuning run loaded into `model`, once its files are verified."""
    from safetensors.torch import load_model

    fix = f"delete {folder}; the next run trains it again"
    if (folder / CHECKSUMS).is_file():  # runs cached before checksums existed are checked by reading them
        verify_checksums(folder, fix, ("model.safetensors", "run.json"))
    try:
        run = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        load_model(model, folder / "model.safetensors", device=str(next(model.parameters()).device))
    except Exception as e:  # a missing, truncated or foreign file
        raise CheckpointError(f"{folder}: cached run cannot be read ({type(e).__name__}). Fix: {fix}") from None
    model.requires_grad_(False)
    return FullFTResult(model.eval(), **run)


def save_full_ft(result: FullFTResult, folder: Path) -> None:
    """Write a full fine-tuning run's weights, record and checksums into the (new, empty) `folder`."""
    from safetensors.torch import save_model

    save_model(result.model, str(folder / "model.safetensors"))  # shared tensors (tied embeddings) stored once
    run = {k: getattr(result, k) for k in ("history", "best_step", "best_val_loss", "train_seconds")}
    (folder / "run.json").write_text(json.dumps(run), encoding="utf-8")
    write_checksums(folder)


def course_full_config(budget: dict) -> FullFTConfig:
    """Full fine-tuning on notebook 05's main LoRA run's batches: its steps, batch, schedule and seed; a lower lr."""
    from labkit.sft import course_config

    lora = course_config(budget)
    return FullFTConfig(steps=lora.steps, batch_size=lora.batch_size, grad_accum=lora.grad_accum,
                        lr=budget["full_ft_lr"], warmup_ratio=lora.warmup_ratio, weight_decay=lora.weight_decay,
                        max_grad_norm=lora.max_grad_norm, max_length=lora.max_length, eval_every=lora.eval_every,
                        seed=lora.seed)
