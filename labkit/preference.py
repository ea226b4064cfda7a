"""ORPO and KTO from scratch, next to DPO: the same pairs, labkit.sft's loop, one loss each.

ORPO (Hong et al., 2024) needs no reference model: an SFT loss on the chosen reply plus an odds-ratio term
that makes the chosen reply's odds beat the rejected one's, so SFT and preference tuning are one stage. Its
examples may mix in plain SFT conversations ({"messages": ...}) that replay an earlier task: those get the SFT
term only, as they would in a reply-SFT stage.
KTO (Ethayarajh et al., 2024) needs no pairs: each example is one reply labelled desirable or undesirable
(thumbs up or down), scored against the reference and against a batch-level KL estimate z0.
Both losses follow TRL's ORPOTrainer.odds_ratio_loss and KTOTrainer (tests/test_preference.py proves it).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel

from labkit import LabkitError
from labkit.dpo import pair_length, pair_sequence, reference_logps, sequence_logps, tokenize_pair
from labkit.paths import cache_root
from labkit.sft import IGNORE, Objective, SFTConfig, SFTResult, cached_adapter_run, collate, run_key, train_loop

# ---------------------------------------------------------------- ORPO: odds ratio, no reference


def reply_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Number of labelled (reply) tokens of each sequence in a batch."""
    return (batch["labels"][:, 1:] != IGNORE).sum(dim=1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, computed without cancellation (two formulas, switched at x = -ln 2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of a reply whose per-token mean log-prob is log p."""
    return mean_logps - log1mexp(mean_logps)


def odds_ratio_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor,
                    beta: float = 0.1) -> torch.Tensor:
    """ORPO's preference term per pair: -beta * log sigmoid(log odds(chosen) - log odds(rejected)).

    The log-probs are per reply token (length-averaged), as in the paper and TRL; beta is the paper's lambda.
    """
    return -beta * F.logsigmoid(log_odds(chosen_mean_logps.float()) - log_odds(rejected_mean_logps.float()))


def tokenize_orpo(tokenizer, example: dict, max_length: int | None = None) -> dict:
    """A pair split as `tokenize_pair` splits it; a replayed conversation ({"messages": [..., assistant]}) as a
    pair whose rejected reply is None (it gets ORPO's SFT term only)."""
    if "messages" not in example:
        return tokenize_pair(tokenizer, example, max_length)
    messages = example["messages"]
    if not messages or messages[-1].get("role") != "assistant":
        raise LabkitError(f"ORPO replay example {str(messages)[:80]}...: its last message must be the assistant's "
                          "reply (the SFT target). Fix: end each replayed conversation with an assistant message")
    row = tokenize_pair(tokenizer, {"prompt": messages[:-1], "chosen": messages[-1:], "rejected": messages[-1:]},
                        max_length)
    return {**row, "rejected_ids": None}


def collate_orpo(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """`collate_pairs`' layout for ORPO's rows: every row's prompt+chosen, then prompt+rejected of the real pairs only.

    `paired` marks which rows are pairs; for pairs alone the other tensors are exactly `collate_pairs`' batch.
    """
    pairs = [r for r in rows if r["rejected_ids"] is not None]
    batch = collate([pair_sequence(r, "chosen_ids") for r in rows] + [pair_sequence(r, "rejected_ids") for r in pairs],
                    pad_id)
    batch["paired"] = torch.tensor([r["rejected_ids"] is not None for r in rows])
    return batch


def count_rows(batch: dict[str, torch.Tensor]) -> int:
    """Number of ORPO examples (pairs and replayed conversations) in a batch."""
    return len(batch["paired"]) if "paired" in batch else batch["input_ids"].shape[0] // 2


def orpo_loss(model, batch: dict[str, torch.Tensor], beta: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed ORPO loss per example (NLL of the chosen reply per token + odds-ratio term) and TRL's metrics, summed.

    One forward pass over chosen and rejected sequences: no reference model, no adapter switched off. A replayed
    conversation (`paired` False, from `collate_orpo`) adds its NLL only; the metrics sum over the pairs, and
    `pairs` counts them (the loop divides every metric by all examples: divide by `pairs` for means over pairs).
    """
    sums = sequence_logps(model, batch)
    mean = sums / reply_tokens(batch).clamp(min=1).to(sums)  # log-prob per reply token
    n = count_rows(batch)
    paired = batch.get("paired", torch.ones(n, dtype=torch.bool)).to(mean.device)
    nll = -mean[:n]  # the SFT term: mean negative log-likelihood of each chosen reply's tokens (replayed ones too)
    chosen, rejected = mean[:n][paired], mean[n:]
    ratio = odds_ratio_loss(chosen, rejected, beta)
    odds = log_odds(chosen.detach()) - log_odds(rejected.detach())
    metrics = {"rewards/chosen": beta * chosen.detach(), "rewards/rejected": beta * rejected.detach(),
               "rewards/accuracies": (chosen.detach() > rejected.detach()).float(),
               "rewards/margins": beta * (chosen.detach() - rejected.detach()),
               "nll_loss": nll[paired].detach(), "log_odds_ratio": F.logsigmoid(odds), "log_odds_chosen": odds,
               "pairs": paired.float()}
    return nll.sum() + ratio.sum(), {k: v.sum().item() for k, v in metrics.items()}


# ---------------------------------------------------------------- KTO: single replies, thumbs up or down


def unpair(pairs: list[dict]) -> list[dict]:
    """Each preference pair as two KTO examples: its chosen reply desirable, its rejected reply undesirable."""
    return [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in pairs for side in ("chosen", "rejected")]


def tokenize_example(tokenizer, example: dict, max_length: int | None = None) -> dict:
    """Prompt and completion token ids of one KTO example (split as for DPO pairs), and its label."""
    row = tokenize_pair(tokenizer, {"prompt": example["prompt"], "chosen": example["completion"],
                                    "rejected": example["completion"]}, max_length)
    return {"prompt_ids": row["prompt_ids"], "completion_ids": row["chosen_ids"], "label": bool(example["label"])}


def collate_kto(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """A KTO batch: each prompt with its own completion, and (KL_ keys) with the previous row's completion.

    The mismatched pairs (x_i, y_(i-1)) rotate the batch's completions by one, as TRL does: they estimate
    the KL term z0 from the same replies, paired with the wrong prompts.
    """
    def as_rows(completions: list[list[int]]) -> list[dict]:
        return [{"input_ids": r["prompt_ids"] + c, "labels": [IGNORE] * len(r["prompt_ids"]) + c}
                for r, c in zip(rows, completions)]

    completions = [r["completion_ids"] for r in rows]
    batch = collate(as_rows(completions), pad_id)
    mismatched = collate(as_rows(completions[-1:] + completions[:-1]), pad_id)
    batch.update({f"KL_{k}": v for k, v in mismatched.items()})
    batch["desirable"] = torch.tensor([r["label"] for r in rows])
    return batch


def kl_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mismatched (prompt, other completion) sequences of a KTO batch, as a plain batch."""
    return {k[3:]: v for k, v in batch.items() if k.startswith("KL_")}


def kl_estimate(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: the batch mean of log pi - log ref on mismatched pairs, no gradient, at least 0."""
    return (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)


def kto_losses(policy_logps: torch.Tensor, reference_logps: torch.Tensor, desirable: torch.Tensor,
               kl: torch.Tensor, beta: float = 0.1, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-example KTO loss: lambda_D (1 - sigmoid(beta (r - z0))) if desirable, else lambda_U (1 - sigmoid(beta (z0 - r))).

    r = log pi(y|x) - log ref(y|x) is the example's log-ratio; z0 = kl, the reference point.
    """
    logratios = policy_logps - reference_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(desirable.to(logratios.device).bool(), good, bad)


def kto_loss(model: PeftModel, batch: dict[str, torch.Tensor], beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed per-example KTO loss of a batch and its metrics, summed over examples (the loop averages).

    Four forward passes: the policy on the batch (with gradients), and without gradients the policy on the
    mismatched pairs and the reference (adapter off) on both.
    """
    policy = sequence_logps(model, batch)
    mismatched = kl_batch(batch)
    with torch.no_grad():
        policy_kl = sequence_logps(model, mismatched)
    reference, reference_kl = reference_logps(model, batch), reference_logps(model, mismatched)
    kl = kl_estimate(policy_kl, reference_kl)
    desirable = batch["desirable"].to(policy.device).bool()
    losses = kto_losses(policy, reference, desirable, kl, beta, desirable_weight, undesirable_weight)
    rewards, n = beta * (policy.detach() - reference), len(losses)
    metrics = {"kl": kl.item() * n,  # one value per batch, weighted so the loop's mean per example returns it
               "rewards/chosen": rewards[desirable].mean().item() * n if desirable.any() else 0.0,
               "rewards/rejected": rewards[~desirable].mean().item() * n if (~desirable).any() else 0.0}
    return losses.sum(), metrics


def count_examples(batch: dict[str, torch.Tensor]) -> int:
    """Number of KTO examples in a collated batch."""
    return batch["input_ids"].shape[0]


# ---------------------------------------------------------------- training: labkit.sft's loop, two more losses


@dataclass
class ORPOConfig(SFTConfig):
    """An SFT run's settings plus ORPO's beta (the paper's lambda): the weight of the odds-ratio term."""

    steps: int = 10
    lr: float = 2e-4
    warmup_ratio: float = 0.1
    r: int = 8
    lora_alpha: int = 16
    max_length: int = 256
    beta: float = 0.1

    def __post_init__(self) -> None:
        """SFTConfig's checks, then beta > 0 (the odds-ratio term's weight; 0 is plain SFT on the chosen replies)."""
        from labkit.settings import POSITIVE, check_fields

        super().__post_init__()
        check_fields(self, beta=POSITIVE)


@dataclass
class KTOConfig(SFTConfig):
    """An SFT run's settings plus KTO's: beta, and the weights lambda_D and lambda_U of the two kinds of example."""

    steps: int = 10
    lr: float = 2e-4
    warmup_ratio: float = 0.1
    r: int = 8
    lora_alpha: int = 16
    max_length: int = 256
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        """SFTConfig's checks, then beta and both weights > 0 (a weight of 0 ignores that kind of example)."""
        from labkit.settings import POSITIVE, check_fields

        super().__post_init__()
        check_fields(self, beta=POSITIVE, desirable_weight=POSITIVE, undesirable_weight=POSITIVE)


def orpo_objective(beta: float = 0.1) -> Objective:
    """The ORPO objective for labkit.sft.train_loop: pairs (and replayed conversations) in, NLL + odds-ratio loss
    out, one unit per example."""
    def length(row: dict) -> int:
        return len(row["prompt_ids"]) + len(row["chosen_ids"]) if row["rejected_ids"] is None else pair_length(row)

    return Objective(name="ORPO", tokenize=tokenize_orpo, collate=collate_orpo, loss=partial(orpo_loss, beta=beta),
                     units=count_rows, length=length, loss_label="ORPO loss per example")


def kto_objective(beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Objective:
    """The KTO objective for labkit.sft.train_loop: labelled replies in, KTO loss out, one unit per reply."""
    loss = partial(kto_loss, beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    return Objective(name="KTO", tokenize=tokenize_example, collate=collate_kto, loss=loss, units=count_examples,
                     length=lambda row: len(row["prompt_ids"]) + len(row["completion_ids"]),
                     loss_label="KTO loss per reply")


def objective_for(config: ORPOConfig | KTOConfig) -> Objective:
    """The objective a config trains."""
    if isinstance(config, KTOConfig):
        return kto_objective(config.beta, config.desirable_weight, config.undesirable_weight)
    return orpo_objective(config.beta)


def train_preference(model, tokenizer, examples: list[dict], config: ORPOConfig | KTOConfig,
                     **loop_options) -> SFTResult:
    """Train a LoRA adapter with ORPO (on pairs) or KTO (on unpair(pairs)): labkit.sft.train_loop with its loss."""
    return train_loop(model, tokenizer, examples, None, config, objective_for(config), **loop_options)


def cached_preference(model, tokenizer, model_name: str, examples: list[dict], config: ORPOConfig | KTOConfig,
                      **loop_options) -> tuple[SFTResult, Path]:
    """An identical earlier ORPO/KTO run's adapter from labkit's cache, or train it now and cache it."""
    name = objective_for(config).name
    folder = cache_root() / "adapters" / f"{name.lower()}-{run_key(model_name, examples, config)}"
    expect = {"r": config.r, "target_modules": config.target_modules}
    result = cached_adapter_run(model, folder, lambda: train_preference(model, tokenizer, examples, config,
                                                                        **loop_options), expect)
    return result, folder


# ---------------------------------------------------------------- measuring


@contextmanager
def count_forwards(model):
    """Count the forward passes through a model's transformer inside the block: `with count_forwards(m) as n: ...; n[0]`."""
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    calls = [0]
    handle = causal_lm.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def ranking_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs whose chosen score is above the rejected one; an exact tie counts as half."""
    return float(((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean())
