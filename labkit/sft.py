"""Supervised fine-tuning with LoRA: assistant-only labels and a training loop you can read in one sitting."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm

from labkit import LabkitError

IGNORE = -100  # label value that cross-entropy skips


# ---------------------------------------------------------------- tokenization


def tokenize_chat(tokenizer, messages: list[dict], max_length: int | None = None) -> dict[str, list[int]]:
    """Token ids of a conversation and labels that are -100 everywhere except assistant replies."""
    ids = tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The reply spans from the end of "everything before it + assistant header" to the end of itself.
        start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, return_dict=True)["input_ids"])
        end = len(tokenizer.apply_chat_template(messages[: i + 1], return_dict=True)["input_ids"])
        labels[start:end] = ids[start:end]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized rows into one batch."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def length_grouped_batches(lengths: list[int], batch_size: int, n_batches: int, seed: int) -> list[list[int]]:
    """n_batches batches of indices: shuffled each epoch, grouped by length so padding is small."""
    rng = random.Random(seed)
    batches: list[list[int]] = []
    while len(batches) < n_batches:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        chunk = batch_size * 32  # sort within chunks of 32 batches: similar lengths, still random
        epoch = []
        for c in range(0, len(order), chunk):
            part = sorted(order[c : c + chunk], key=lambda i: lengths[i])
            epoch += [part[b : b + batch_size] for b in range(0, len(part), batch_size)]
        rng.shuffle(epoch)
        batches += epoch
    return batches[:n_batches]


# ---------------------------------------------------------------- the loss


def labelled_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token logits at labelled positions only, their targets, and the (batch x seq-1) mask of those positions.

    The output head (576 -> 49,152) runs only at positions that have a label: batch x seq x vocab logits
    are never built.
    """
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    device = causal_lm.lm_head.weight.device
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return causal_lm.lm_head(hidden[:, :-1][keep]).float(), targets[keep], keep


def assistant_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled tokens, and their count."""
    logits, targets, keep = labelled_logits(model, batch)
    return F.cross_entropy(logits, targets, reduction="sum"), int(keep.sum())


def labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many tokens of a batch have a label (what the SFT loss is averaged over)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@dataclass(frozen=True)
class Objective:
    """What the training loop minimises: how an example becomes a row, rows a batch, and a batch a loss.

    `loss(model, batch)` returns the loss summed over the batch's units (labelled tokens for SFT, preference
    pairs for DPO) and a dict of metrics, also summed over those units; `units(batch)` counts them. The loop
    divides both by the units of the whole step, so it logs means.
    """

    name: str
    tokenize: Callable[[Any, dict, int | None], dict]  # (tokenizer, example, max_length) -> row
    collate: Callable[[list[dict], int], dict[str, torch.Tensor]]  # (rows, pad_id) -> batch
    loss: Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
    units: Callable[[dict[str, torch.Tensor]], int]
    length: Callable[[dict], int] = lambda row: len(row["input_ids"])  # for length-grouped batches
    loss_label: str = "loss per assistant token"  # the plot's y axis


SFT = Objective(
    name="SFT",
    tokenize=lambda tokenizer, example, max_length: tokenize_chat(tokenizer, example["messages"], max_length),
    collate=collate,
    loss=lambda model, batch: (assistant_loss(model, batch)[0], {}),
    units=labelled_tokens,
)


# ---------------------------------------------------------------- configuration and results


@dataclass
class SFTConfig:
    """Everything that defines a LoRA SFT run (and so its cache key)."""

    steps: int = 40
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: str | list[str] = "all-linear"
    max_length: int = 512
    eval_every: int = 10
    patience: int | None = None  # evaluations without improvement before stopping; None = never stop early
    checkpoint_every: int = 0  # steps between checkpoints; 0 = none
    seed: int = 0


@dataclass
class SFTResult:
    """What a run produced: the model with its best adapter, and the logged history."""

    model: PeftModel
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_val_loss: float = math.inf
    stopped_early: bool = False
    tokens_per_s: float = 0.0


class TrainingDiverged(LabkitError):
    """The loss became NaN or infinite."""


def lr_at(step: int, config: SFTConfig) -> float:
    """Learning rate at a step: linear warmup, then cosine decay to zero."""
    warmup = max(1, round(config.warmup_ratio * config.steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def add_lora(model, config: SFTConfig) -> PeftModel:
    """Wrap a model with a fresh peft LoRA adapter as the config describes."""
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=config.targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


# ---------------------------------------------------------------- checkpoints


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable (adapter) weights."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out_dir: Path, step: int, model, optimizer, history: list[dict], best: dict) -> Path:
    """Write a checkpoint atomically: a temporary folder renamed into place, then a 'latest' pointer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".tmp-"))
    torch.save({"step": step, "adapter": adapter_state(model), "optimizer": optimizer.state_dict(),
                "history": history, "best": best, "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
    final = out_dir / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    pointer = out_dir / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, out_dir / "latest")
    for old in out_dir.glob("checkpoint-*"):  # keep only the newest
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint folder that 'latest' points to, if any."""
    pointer = out_dir / "latest"
    if not pointer.exists():
        return None
    path = out_dir / pointer.read_text().strip()
    return path if (path / "state.pt").exists() else None


def load_adapter_weights(model: PeftModel, weights: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter weights into the model's trainable parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


# ---------------------------------------------------------------- evaluation loss


@torch.no_grad()
def validation_loss(model, rows: list[dict], pad_id: int, batch_size: int = 16, objective: Objective = SFT) -> float:
    """Mean loss per unit (per assistant token for SFT) over tokenized rows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: objective.length(rows[i]))
    for b in range(0, len(order), batch_size):
        batch = objective.collate([rows[i] for i in order[b : b + batch_size]], pad_id)
        loss, _ = objective.loss(model, batch)
        total, count = total + loss.item(), count + objective.units(batch)
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------- the training loop


def train_sft(
    model,
    tokenizer,
    train: list[dict],
    validation: list[dict] | None = None,
    config: SFTConfig | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    plot: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
) -> SFTResult:
    """Fine-tune `model` with LoRA on chat examples and return the best adapter by validation loss.

    `stop_after` ends the run after that many steps (to demonstrate interruption and resume).
    """
    return train_loop(model, tokenizer, train, validation, config or SFTConfig(), SFT, out_dir=out_dir, resume=resume,
                      plot=plot, progress=progress, stop_after=stop_after)


def train_loop(
    model,
    tokenizer,
    train: list[dict],
    validation: list[dict] | None,
    config: SFTConfig,
    objective: Objective,
    out_dir: str | Path | None = None,
    resume: bool = False,
    plot: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
) -> SFTResult:
    """The one LoRA training loop: minimise `objective` on `train`, keep the best adapter by validation loss."""
    torch.manual_seed(config.seed)
    model = model if isinstance(model, PeftModel) else add_lora(model, config)
    pad_id = tokenizer.pad_token_id
    rows = [objective.tokenize(tokenizer, ex, config.max_length) for ex in train]
    val_rows = [objective.tokenize(tokenizer, ex, config.max_length) for ex in validation or []]
    schedule = length_grouped_batches([objective.length(r) for r in rows], config.batch_size,
                                      config.steps * config.grad_accum, config.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    history: list[dict] = []
    best = {"step": 0, "val_loss": math.inf, "adapter": adapter_state(model), "bad_evals": 0}
    start_step = 0
    out_dir = Path(out_dir) if out_dir else None
    if resume and out_dir and (ckpt := latest_checkpoint(out_dir)):
        state = torch.load(ckpt / "state.pt", weights_only=False)
        load_adapter_weights(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        history, best, start_step = state["history"], state["best"], state["step"]
        torch.set_rng_state(state["torch_rng"])
    live = LossPlot(objective.name, objective.loss_label) if plot else None
    result = SFTResult(model, history)
    model.train()
    tokens, started = 0, time.perf_counter()
    bar = tqdm(range(start_step, config.steps), desc=objective.name, disable=not progress, initial=start_step,
               total=config.steps)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        micro = [objective.collate([rows[i] for i in schedule[step * config.grad_accum + k]], pad_id)
                 for k in range(config.grad_accum)]
        n_units = sum(objective.units(b) for b in micro)
        step_loss, metrics = 0.0, {}
        for batch in micro:  # gradient accumulation: the loss is the mean over all units (tokens, pairs) of the step
            loss, sums = objective.loss(model, batch)
            (loss / n_units).backward()
            step_loss += loss.item() / n_units
            for name, value in sums.items():
                metrics[name] = metrics.get(name, 0.0) + value / n_units
            tokens += int(batch["attention_mask"].sum())
        if not math.isfinite(step_loss):
            optimizer.zero_grad(set_to_none=True)
            where = f"; the last good checkpoint is {latest_checkpoint(out_dir)}" if out_dir and latest_checkpoint(out_dir) else ""
            raise TrainingDiverged(
                f"loss is {step_loss} at step {step + 1}: training diverged. The likely cause is a learning "
                f"rate that is too high (lr={config.lr:g}); try 10x lower, or lower max_grad_norm{where}."
            )
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step + 1, "loss": step_loss, "lr": lr_at(step, config), **metrics}
        last = step + 1 == config.steps
        if val_rows and ((step + 1) % config.eval_every == 0 or last):
            record["val_loss"] = validation_loss(model, val_rows, pad_id, objective=objective)
            if record["val_loss"] < best["val_loss"]:
                best = {"step": step + 1, "val_loss": record["val_loss"], "adapter": adapter_state(model), "bad_evals": 0}
            else:
                best["bad_evals"] += 1
        history.append(record)
        bar.set_postfix(loss=f"{step_loss:.3f}", **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
        if live and ("val_loss" in record or (step + 1) % 5 == 0 or last):
            live.update(history)
        if out_dir and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            save_checkpoint(out_dir, step + 1, model, optimizer, history, best)
        if config.patience is not None and best["bad_evals"] >= config.patience:
            result.stopped_early = True
            break
        if stop_after is not None and step + 1 >= start_step + stop_after:
            break
    bar.close()
    result.tokens_per_s = tokens / max(time.perf_counter() - started, 1e-9)
    if val_rows and best["val_loss"] < math.inf:
        load_adapter_weights(model, best["adapter"])  # restore the best checkpoint, not the last
        result.best_step, result.best_val_loss = best["step"], best["val_loss"]
    result.history = history
    model.eval()
    return result


# ---------------------------------------------------------------- the live plot


class LossPlot:
    """A training/validation loss figure updated in place through one display handle."""

    def __init__(self, name: str = "SFT", loss_label: str = "loss per assistant token") -> None:
        self.handle = None
        self.title, self.loss_label = f"LoRA {name}", loss_label

    def update(self, history: list[dict]) -> None:
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            return
        if get_ipython() is None:
            return
        import matplotlib.pyplot as plt

        fig = plot_history(history, self.title, self.loss_label)
        if self.handle is None:
            self.handle = display(fig, display_id=True)
        else:
            self.handle.update(fig)
        plt.close(fig)


def plot_history(history: list[dict], title: str = "LoRA SFT", loss_label: str = "loss per assistant token"):
    """Training loss per step and validation loss per evaluation, on one figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train", lw=1)
    evals = [h for h in history if "val_loss" in h]
    if evals:
        ax.plot([h["step"] for h in evals], [h["val_loss"] for h in evals], "o-", label="validation")
    ax.set(xlabel="step", ylabel=loss_label, title=title, yscale="log")
    ax.legend()
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- cached adapters


def data_digest(examples: list[dict]) -> str:
    """A short hash of a list of examples."""
    return hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()[:16]


def run_key(model_name: str, train: list[dict], config: SFTConfig) -> str:
    """The cache key of a run: hash of (model, data, config including the seed)."""
    blob = json.dumps({"model": model_name, "data": data_digest(train), "config": asdict(config)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_sft(model, tokenizer, model_name: str, train: list[dict], validation: list[dict] | None,
               config: SFTConfig, **train_kwargs) -> tuple[SFTResult, Path]:
    """The result of an identical earlier run from labkit's cache, or train it now and cache it."""
    from labkit.models import cache_root

    folder = cache_root() / "adapters" / run_key(model_name, train, config)
    if (folder / "adapter_config.json").exists() and (folder / "run.json").exists():
        run = json.loads((folder / "run.json").read_text())
        return SFTResult(PeftModel.from_pretrained(model, folder), **run), folder
    result = train_sft(model, tokenizer, train, validation, config, **train_kwargs)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    result.model.save_pretrained(tmp)
    run = {k: getattr(result, k) for k in ("history", "best_step", "best_val_loss", "stopped_early", "tokens_per_s")}
    (tmp / "run.json").write_text(json.dumps(run))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return result, folder
