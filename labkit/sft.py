"""Supervised fine-tuning with LoRA: assistant-only labels and a training loop you can read in one sitting."""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm

from labkit import LabkitError, distributed
from labkit.checkpoint import (
    adapter_state,
    check_writable,
    fill_adapter,
    latest_checkpoint,
    load_checkpoint,
    load_adapter_weights,
    load_cached_adapter,
    run_identity,
    save_checkpoint,
)
from labkit.paths import cache_root
from labkit.runtime import model_autocast, pick_amp_dtype, pick_device
from labkit.store import cached, content_key

IGNORE = -100  # label value that cross-entropy skips


# ---------------------------------------------------------------- tokenization


def tokenize_chat(tokenizer, messages: list[dict], max_length: int | None = None) -> dict[str, list[int]]:
    """Token ids of a conversation and labels that are -100 everywhere except assistant replies."""
    ids = tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The reply spans from where "everything before it + assistant header" stops matching the conversation's
        # tokens (a reply starting with whitespace merges with the header's newline, as TRL finds) to its own end.
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, return_dict=True)["input_ids"]
        start = next((k for k, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
        end = len(tokenizer.apply_chat_template(messages[: i + 1], return_dict=True)["input_ids"])
        labels[start:end] = ids[start:end]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def label_mask_html(tokenizer, row: dict[str, list[int]]) -> str:
    """One tokenized example as HTML: tokens that are trained on (they have a label) in green, the rest grey."""
    import html

    spans = []
    for token, label in zip(row["input_ids"], row["labels"]):
        text = html.escape(tokenizer.decode([token])).replace("\n", "\u21b5")
        style = "background:#c6efce" if label != IGNORE else "color:#999"
        spans.append(f'<span style="{style};border:1px solid #ddd;margin:1px;padding:0 2px;'
                     f'font-family:monospace;white-space:pre">{text}</span>')
    return "<div style='line-height:1.9'>" + "".join(spans) + "</div>"


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

    # how long and how much per step
    steps: int = 40  # optimizer steps (not epochs): the budget a CPU can afford
    batch_size: int = 8  # examples per forward pass
    grad_accum: int = 1  # forward passes per optimizer step: effective batch = batch_size x grad_accum
    # the optimizer (AdamW) and its schedule
    lr: float = 1e-3  # peak learning rate, reached after warmup
    warmup_ratio: float = 0.05  # share of steps spent ramping the lr up from ~0: avoids early instability
    weight_decay: float = 0.0  # AdamW's decoupled decay on the adapter weights: mild regularisation
    max_grad_norm: float = 1.0  # gradients are clipped to this norm, so one bad batch cannot wreck the adapter
    # the adapter (peft's names)
    r: int = 16  # rank of the update B @ A: capacity and size of the adapter
    lora_alpha: int = 32  # the update is scaled by lora_alpha / r; keep about 2 x r
    lora_dropout: float = 0.0  # dropout on the adapter's input only
    target_modules: str | list[str] = "all-linear"  # which linear layers get an adapter
    # data, evaluation and safety nets
    max_length: int = 512  # longer examples are cut to this many tokens
    eval_every: int = 10  # steps between validation-loss evaluations (and best-checkpoint updates)
    patience: int | None = None  # evaluations without improvement before stopping; None = never stop early
    checkpoint_every: int = 0  # steps between checkpoints written to out_dir; 0 = none
    seed: int = 0  # adapter init, batch order and dropout: the same seed gives the same run

    def __post_init__(self) -> None:
        """Refuse a value no run can use: a ConfigError (a LabkitError) names the field and the accepted range."""
        from labkit.settings import FRACTION, NON_NEGATIVE, POSITIVE, check_fields, check_schedule, integer, layer_names

        check_fields(self, steps=integer(1), batch_size=integer(1), grad_accum=integer(1), lr=POSITIVE,
                     warmup_ratio=FRACTION, weight_decay=NON_NEGATIVE, max_grad_norm=POSITIVE, r=integer(1),
                     lora_alpha=POSITIVE, lora_dropout=FRACTION, target_modules=layer_names,
                     max_length=integer(1, optional=True), eval_every=integer(1), patience=integer(1, optional=True),
                     checkpoint_every=integer(0), seed=integer(0, 2**32 - 1))
        check_schedule(self)


def course_config(budget: dict) -> SFTConfig:
    """Notebook 05's main run for this machine's budget; 06, 07 and 08 load its adapter from the cache."""
    return SFTConfig(
        steps=budget["sft_steps"], batch_size=budget["batch_size"], lr=budget["sft_lr"],
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
        eval_every=budget["eval_every"], warmup_ratio=0.05,
        patience=2,  # stop after two evaluations without a new best validation loss
        seed=0,
    )


def recommended_config(budget: dict, effective_batch: int = 32) -> SFTConfig:
    """The articles' defaults on course_config's token budget: lr 2e-4, cosine with 5 % warmup, effective batch 32
    by gradient accumulation, weight decay 0.01, LoRA dropout 0.05; the same micro-batches, fewer and larger steps."""
    main = course_config(budget)
    accum = max(1, effective_batch // main.batch_size)
    return replace(main, steps=main.steps // accum, grad_accum=accum, lr=2e-4, warmup_ratio=0.05,
                   weight_decay=0.01, lora_dropout=0.05, eval_every=max(1, main.eval_every // accum))


@dataclass
class SFTResult:
    """What a run produced: the model with its best adapter, and the logged history."""

    model: PeftModel
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_val_loss: float = math.inf
    stopped_early: bool = False
    tokens_per_s: float = 0.0
    train_seconds: float = 0.0  # time in training steps, validation excluded


class TrainingDiverged(LabkitError):
    """The loss became NaN or infinite."""


def lr_at(step: int, lr: float, steps: int, warmup_ratio: float) -> float:
    """Learning rate at a step (0-based): linear warmup, then cosine decay to zero."""
    warmup = max(1, round(warmup_ratio * steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def add_lora(model, config: SFTConfig) -> PeftModel:
    """Wrap a model with a fresh peft LoRA adapter as the config describes."""
    lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


# ---------------------------------------------------------------- one step's gradients


def accumulate_gradients(model, micro_batches: list[dict[str, torch.Tensor]], objective: Objective,
                         ddp=None) -> tuple[float, dict[str, float], int]:
    """Forward and backward over one step's micro-batches: the mean loss per unit, mean metrics, tokens seen.

    With `ddp` (labkit.distributed.data_parallel) the micro-batches are this process's shards of the step's:
    the loss is divided by the units of every process's shards and the logged numbers are summed over processes.
    """
    n_units = sum(objective.units(b) for b in micro_batches)
    divisor = n_units
    if ddp is not None:  # DDP averages the gradients over processes: divide by units / processes to get their sum
        n_units = int(distributed.all_sum([n_units])[0])
        divisor = n_units / distributed.world_size()
    step_loss, metrics, tokens = 0.0, {}, 0
    for k, batch in enumerate(micro_batches):
        with distributed.sync_unless(k < len(micro_batches) - 1, ddp):  # DDP averages at the step's last one
            with model_autocast(model):  # bf16 mixed precision where the runtime picks it, else nothing changes
                loss, sums = objective.loss(model, batch) if ddp is None else ddp(batch)  # summed over its units
            (loss / divisor).backward()  # dividing by the whole step's units makes accumulation exact
        step_loss += loss.item() / n_units
        for name, value in sums.items():
            metrics[name] = metrics.get(name, 0.0) + value / n_units
        tokens += int(batch["attention_mask"].sum())
    if ddp is not None:
        step_loss, tokens, *values = distributed.all_sum([step_loss, tokens, *metrics.values()])
        metrics, tokens = dict(zip(metrics, values)), int(tokens)
    return step_loss, metrics, tokens


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
        with model_autocast(model):
            loss, _ = objective.loss(model, batch)
        total, count = total + loss.item(), count + objective.units(batch)
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------- the training loop


def keep_labelled(rows: list[dict], objective: Objective, pad_id: int, max_length: int | None, what: str) -> list[dict]:
    """The rows whose every sequence keeps a labelled token after truncation; the rest dropped with a warning, as TRL does."""
    kept = [r for r in rows if bool((objective.collate([r], pad_id)["labels"][:, 1:] != IGNORE).any(dim=1).all())]
    if rows and not kept:
        raise LabkitError(f"{what}: none of the {len(rows)} examples keeps a labelled token after truncation to "
                          f"max_length={max_length}. Fix: raise max_length, or shorten the prompts")
    if len(kept) < len(rows):
        warnings.warn(f"{what}: dropped {len(rows) - len(kept)} of {len(rows)} examples whose labels were all cut by "
                      f"max_length={max_length}; raise max_length to keep them", stacklevel=3)
    return kept


def train_sft(model, tokenizer, train: list[dict], validation: list[dict] | None = None,
              config: SFTConfig | None = None, **loop_options) -> SFTResult:
    """Fine-tune `model` with LoRA on chat examples and return the best adapter by validation loss.

    `loop_options` are train_loop's: out_dir, resume, plot, progress, and stop_after (end the run after that
    many steps, to demonstrate interruption and resume).
    """
    return train_loop(model, tokenizer, train, validation, config or SFTConfig(), SFT, **loop_options)


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
    """The one training loop: minimise `objective` on `train`, keep the best adapter by validation loss.

    LoRA by default; a config with `trains = "all"` (labkit.full_ft.FullFTConfig) trains every weight of `model`
    instead, on the same batches, and keeps the best weights.
    """
    full = getattr(config, "trains", "lora") == "all"
    torch.manual_seed(config.seed)
    if full:  # full fine-tuning: no adapter, every weight trains
        if out_dir:
            raise LabkitError("train_loop: checkpoints hold a LoRA adapter, so a full fine-tuning run cannot write "
                              "them. Fix: call it without out_dir (labkit.full_ft caches the finished run)")
        model.requires_grad_(True)
    else:  # the adapter: a fresh LoRA (B = 0, so the model starts exactly at the base), seeded
        model = model if isinstance(model, PeftModel) else add_lora(model, config)
    if out_dir:
        check_writable(Path(out_dir))  # fail now, not at the first checkpoint after compute was spent
    # the data: tokenize once, then fix every step's batch indices up front (length-grouped, shuffled)
    pad_id = tokenizer.pad_token_id
    rows = [objective.tokenize(tokenizer, ex, config.max_length) for ex in train]
    val_rows = [objective.tokenize(tokenizer, ex, config.max_length) for ex in validation or []]
    rows = keep_labelled(rows, objective, pad_id, config.max_length, "train")
    val_rows = keep_labelled(val_rows, objective, pad_id, config.max_length, "validation")
    schedule = length_grouped_batches([objective.length(r) for r in rows], config.batch_size,
                                      config.steps * config.grad_accum, config.seed)
    # several processes (a launcher started them): DDP around the loss; None when alone
    ddp = distributed.data_parallel(model, objective.loss)
    # the optimizer: AdamW over the adapter's parameters only (the base stays frozen), or over every weight
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    history: list[dict] = []
    # the best checkpoint so far: the adapter's weights, or (full fine-tuning) a copy of every weight
    snapshot = (lambda: {k: v.detach().clone() for k, v in model.state_dict().items()}) if full else (
        lambda: adapter_state(model))
    best = {"step": 0, "val_loss": math.inf, "adapter": None if full else snapshot(), "bad_evals": 0}
    start_step = 0
    out_dir = Path(out_dir) if out_dir else None
    # resume: adapter, optimizer state, history and RNG from the latest checkpoint, so the run continues exactly;
    # a checkpoint of other settings or other data is refused (resuming it would silently make another run)
    identity = None if full else run_identity(model, objective.name, config, {"data": data_label(train),
                                                                             "validation": data_label(validation)})
    if resume and out_dir and (state := load_checkpoint(out_dir, model, identity)):
        load_adapter_weights(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        history, best, start_step = state["history"], state["best"], state["step"]
        torch.set_rng_state(state["torch_rng"])
    live = LossPlot(objective.name, objective.loss_label) if plot and distributed.is_main() else None
    result = SFTResult(model, history)
    model.train()
    tokens, started, step_seconds = 0, time.perf_counter(), 0.0
    bar = tqdm(range(start_step, config.steps), desc=("full " if full else "") + objective.name, initial=start_step,
               total=config.steps, disable=not progress or not distributed.is_main())
    for step in bar:
        step_started = time.perf_counter()
        # the schedule: set this step's learning rate (warmup, then cosine decay)
        lr = lr_at(step, config.lr, config.steps, config.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the data: this step's micro-batches, padded only to their own longest row
        # (several processes: each takes its shard of every micro-batch; distributed.simulate: all shards in turn)
        micro = [objective.collate([rows[i] for i in part], pad_id) for k in range(config.grad_accum)
                 for part in distributed.my_shards(schedule[step * config.grad_accum + k])]
        # forward and backward: gradients of the mean loss over every unit (token, pair) of the step
        step_loss, metrics, seen = accumulate_gradients(model, micro, objective, ddp)
        tokens += seen
        # a NaN or inf loss would poison the adapter: stop with a clear message instead
        if not math.isfinite(step_loss):
            optimizer.zero_grad(set_to_none=True)
            where = f"; the last good checkpoint is {latest_checkpoint(out_dir)}" if out_dir and latest_checkpoint(out_dir) else ""
            raise TrainingDiverged(
                f"loss is {step_loss} at step {step + 1}: training diverged. The likely cause is a learning "
                f"rate that is too high (lr={config.lr:g}); try 10x lower, or lower max_grad_norm{where}."
            )
        # the update: clip the gradient norm, take an AdamW step, clear the gradients
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds += time.perf_counter() - step_started
        # evaluation: validation loss every eval_every steps and at the end; keep the best adapter seen
        record = {"step": step + 1, "loss": step_loss, "lr": lr, **metrics}
        last = step + 1 == config.steps
        if val_rows and ((step + 1) % config.eval_every == 0 or last):
            record["val_loss"] = validation_loss(model, val_rows, pad_id, objective=objective)
            if record["val_loss"] < best["val_loss"]:
                best = {"step": step + 1, "val_loss": record["val_loss"], "adapter": snapshot(), "bad_evals": 0}
            else:
                best["bad_evals"] += 1
        # logging: the progress bar, the live plot
        history.append(record)
        bar.set_postfix(loss=f"{step_loss:.3f}", **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
        if live and ("val_loss" in record or (step + 1) % 5 == 0 or last):
            live.update(history)
        # checkpoint: written atomically (by process 0 only), so an interruption leaves the previous one usable
        if out_dir and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and distributed.is_main():
            save_checkpoint(out_dir, step + 1, model, optimizer, history, best, identity)
        # early stopping: patience evaluations without a new best
        if config.patience is not None and best["bad_evals"] >= config.patience:
            result.stopped_early = True
            break
        if stop_after is not None and step + 1 >= start_step + stop_after:
            break
    bar.close()
    result.tokens_per_s = tokens / max(time.perf_counter() - started, 1e-9)
    result.train_seconds = step_seconds
    if val_rows and best["val_loss"] < math.inf:  # restore the best checkpoint, not the last
        model.load_state_dict(best["adapter"]) if full else load_adapter_weights(model, best["adapter"])
        result.best_step, result.best_val_loss = best["step"], best["val_loss"]
    result.history = history
    if full:
        model.requires_grad_(False)
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


def step_tokens(tokenizer, train: list[dict], config: SFTConfig) -> list[int]:
    """Tokens (padding excluded) each optimizer step trains on: the batches train_sft draws for this config."""
    rows = [tokenize_chat(tokenizer, ex["messages"], config.max_length) for ex in train]
    rows = keep_labelled(rows, SFT, tokenizer.pad_token_id, config.max_length, "train")
    micro = length_grouped_batches([len(r["input_ids"]) for r in rows], config.batch_size,
                                   config.steps * config.grad_accum, config.seed)
    per_micro = [sum(len(rows[i]["input_ids"]) for i in part) for part in micro]
    return [sum(per_micro[s * config.grad_accum : (s + 1) * config.grad_accum]) for s in range(config.steps)]


def plot_runs(runs: dict[str, tuple[list[dict], list[int]]], title: str = "LoRA SFT",
              loss_label: str = "loss per assistant token"):
    """Several runs' training and validation losses on one figure, against training tokens seen.

    `runs` maps a name to (history, tokens of each step), e.g. (result.history, step_tokens(...)).
    """
    import matplotlib.pyplot as plt
    from itertools import accumulate

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for k, (name, (history, tokens)) in enumerate(runs.items()):
        seen = list(accumulate(tokens))
        color = f"C{k}"
        ax.plot([seen[h["step"] - 1] for h in history], [h["loss"] for h in history], color=color, lw=1, alpha=0.5,
                label=f"{name}: train")
        evals = [h for h in history if "val_loss" in h]
        ax.plot([seen[h["step"] - 1] for h in evals], [h["val_loss"] for h in evals], "o-", color=color,
                label=f"{name}: validation")
    ax.set(xlabel="training tokens seen", ylabel=loss_label, title=title, yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- cached adapters


def data_digest(examples: list[dict]) -> str:
    """A short hash of a list of examples."""
    return content_key(examples)


def data_label(examples: list[dict] | None) -> str:
    """A list of examples named for a checkpoint's record: how many, and their hash."""
    return f"{len(examples or [])} examples, sha256 {data_digest(examples or [])}"


def run_key(model_name: str, train: list[dict], config: SFTConfig) -> str:
    """The cache key of a run: hash of (model, data, config including the seed)."""
    key = {"model": model_name, "data": data_digest(train), "config": asdict(config)}
    if (amp := pick_amp_dtype(pick_device())) is not None:  # a mixed-precision adapter is never an fp32 run's
        key["precision"] = str(amp)
    return content_key(key)


def run_record(result: SFTResult) -> dict:
    """What a cached adapter keeps of its run (run.json): history, best step and loss, early stop, speed."""
    return {k: getattr(result, k) for k in ("history", "best_step", "best_val_loss", "stopped_early", "tokens_per_s")}


def cached_adapter_run(model, folder: Path, train: Callable[[], SFTResult], expect: dict | None = None) -> SFTResult:
    """The run cached as an adapter in `folder`, loaded onto `model` once verified; else `train()` now, cached there."""
    def load(path: Path) -> SFTResult:
        peft_model, run = load_cached_adapter(model, path, expect)
        return SFTResult(peft_model, **run)

    return cached(folder, load, train, lambda result, tmp: fill_adapter(result.model, tmp, run_record(result)),
                  folder=True)


def cached_sft(model, tokenizer, model_name: str, train: list[dict], validation: list[dict] | None,
               config: SFTConfig, **train_kwargs) -> tuple[SFTResult, Path]:
    """The result of an identical earlier run from labkit's cache, or train it now and cache it."""
    folder = cache_root() / "adapters" / run_key(model_name, train, config)
    expect = {"r": config.r, "target_modules": config.target_modules}
    result = cached_adapter_run(model, folder, lambda: train_sft(model, tokenizer, train, validation, config,
                                                                 **train_kwargs), expect)
    return result, folder
