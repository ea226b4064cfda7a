"""Direct Preference Optimization from scratch: sequence log-probs, the DPO/IPO/hinge losses, TRL's metrics.

DPO runs on top of the SFT model: the reference is the SFT model (its adapter merged into the base), the
policy is the same model plus a fresh LoRA adapter, and the reference log-probs come from that one model
with the adapter switched off. No second copy of the model is ever held. Training is labkit.sft's loop
with the DPO loss plugged in (`train_dpo`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from tqdm.auto import tqdm

from labkit.checkpoint import CheckpointError, cached_run_record, fill_adapter
from labkit.paths import cache_root
from labkit.runtime import model_autocast
from labkit.sft import IGNORE, Objective, SFTConfig, SFTResult, collate, labelled_logits, run_key, run_record, train_loop
from labkit.store import cached

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


# ---------------------------------------------------------------- preference pairs as tokens


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(tokenizer, example: dict, max_length: int | None = None) -> dict[str, list[int]]:
    """Token ids of a pair's prompt (up to the assistant header) and of each reply, split as TRL splits them."""
    def ids(messages: list[dict], **kwargs) -> list[int]:
        return tokenizer.apply_chat_template(messages, return_dict=True, **kwargs)["input_ids"]

    prompt = ids(example["prompt"], add_generation_prompt=True)
    chosen, rejected = ids(example["prompt"] + example["chosen"]), ids(example["prompt"] + example["rejected"])
    n = min(common_prefix(prompt, chosen), common_prefix(prompt, rejected))  # where the replies start
    row = {"prompt_ids": prompt[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]}
    if max_length is not None:  # keep the start of prompt + reply, as TRL's default truncation does
        room = max(0, max_length - n)
        row = {"prompt_ids": prompt[:min(n, max_length)], "chosen_ids": row["chosen_ids"][:room],
               "rejected_ids": row["rejected_ids"][:room]}
    return row


def pair_length(row: dict) -> int:
    """Tokens in the longer of a pair's two sequences (for length-grouped batches)."""
    return len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))


def collate_pairs(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2 x len(rows) sequences: all prompt+chosen first, then all prompt+rejected.

    Labels are the reply tokens and -100 on the prompt, so a sequence's log-prob covers its reply only.
    """
    return collate([pair_sequence(r, "chosen_ids") for r in rows] + [pair_sequence(r, "rejected_ids") for r in rows],
                   pad_id)


def pair_sequence(row: dict, side: str) -> dict[str, list[int]]:
    """One side of a tokenized pair as a sequence: prompt + reply ids, labels on the reply only."""
    return {"input_ids": row["prompt_ids"] + row[side], "labels": [IGNORE] * len(row["prompt_ids"]) + row[side]}


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    """Number of preference pairs in a collated batch."""
    return batch["input_ids"].shape[0] // 2


# ---------------------------------------------------------------- log-probabilities


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the log-probabilities of each sequence's labelled (reply) tokens: one number per sequence."""
    logits, targets, keep = labelled_logits(model, batch)
    token_logps = -F.cross_entropy(logits, targets, reduction="none")
    owner = keep.nonzero()[:, 0]  # which sequence each labelled token belongs to
    return token_logps.new_zeros(keep.shape[0]).index_add(0, owner, token_logps)


@torch.no_grad()
def reference_logps(model: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sequence log-probs under the reference: the same model with its adapter switched off."""
    with model.disable_adapter():
        return sequence_logps(model, batch)


# ---------------------------------------------------------------- the losses


def preference_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float = 0.1,
                    loss_type: str = "sigmoid", chosen_tokens: torch.Tensor | None = None,
                    rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair loss from the log-ratios log pi(y|x) - log ref(y|x) of the chosen and rejected replies.

    sigmoid (DPO): -log sigmoid(beta * (chosen - rejected)); hinge: max(0, 1 - beta * (chosen - rejected));
    ipo: ((chosen / n_chosen - rejected / n_rejected) - 1 / (2 beta))^2, with log-ratios per reply token as TRL does.
    """
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    if loss_type == "hinge":
        return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))
    if loss_type == "ipo":
        gap = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        return (gap - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type={loss_type!r}: use one of {LOSS_TYPES}")


def preference_metrics(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """TRL's logged DPO metrics, per pair, from (2B,) policy and reference sequence log-probs [chosen; rejected]."""
    chosen, rejected = policy.detach().chunk(2)
    chosen_reward, rejected_reward = (beta * (policy.detach() - reference)).chunk(2)  # the implicit rewards
    return {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/accuracies": (chosen_reward > rejected_reward).float(),
        "rewards/margins": chosen_reward - rejected_reward,
        "logps/chosen": chosen,
        "logps/rejected": rejected,
    }


def dpo_loss(model: PeftModel, batch: dict[str, torch.Tensor], beta: float = 0.1,
             loss_type: str = "sigmoid") -> tuple[torch.Tensor, dict[str, float]]:
    """Summed per-pair preference loss of a batch, and TRL's metrics summed over its pairs (the loop averages)."""
    policy = sequence_logps(model, batch)
    reference = reference_logps(model, batch)
    tokens = (batch["labels"][:, 1:] != IGNORE).sum(dim=1).to(policy.device)
    chosen_lr, rejected_lr = (policy - reference).chunk(2)
    losses = preference_loss(chosen_lr, rejected_lr, beta, loss_type, *tokens.chunk(2))
    return losses.sum(), {k: v.sum().item() for k, v in preference_metrics(policy, reference, beta).items()}


# ---------------------------------------------------------------- training: labkit.sft's loop, DPO's loss


@dataclass
class DPOConfig(SFTConfig):
    """An SFT run's settings plus DPO's: beta (how far from the reference the policy may go) and the loss."""

    steps: int = 10
    lr: float = 2e-4
    warmup_ratio: float = 0.1
    r: int = 8
    lora_alpha: int = 16
    max_length: int = 256
    beta: float = 0.1
    loss_type: str = "sigmoid"

    def __post_init__(self) -> None:
        """SFTConfig's checks, then beta > 0 (beta 0 learns nothing; IPO divides by it) and a known loss."""
        from labkit.settings import POSITIVE, check_fields, one_of

        super().__post_init__()
        check_fields(self, beta=POSITIVE, loss_type=one_of(LOSS_TYPES))


def dpo_objective(beta: float = 0.1, loss_type: str = "sigmoid") -> Objective:
    """The DPO objective for labkit.sft.train_loop: pairs in, preference loss out, one unit per pair."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: use one of {LOSS_TYPES}")
    return Objective(name="DPO", tokenize=tokenize_pair, collate=collate_pairs,
                     loss=partial(dpo_loss, beta=beta, loss_type=loss_type), units=count_pairs,
                     length=pair_length, loss_label=f"{loss_type} loss per pair")


def train_dpo(model, tokenizer, pairs: list[dict], validation: list[dict] | None = None,
              config: DPOConfig | None = None, **kwargs) -> SFTResult:
    """Train a LoRA adapter with DPO on preference pairs: labkit.sft.train_loop with the preference loss."""
    config = config or DPOConfig()
    return train_loop(model, tokenizer, pairs, validation, config, dpo_objective(config.beta, config.loss_type),
                      **kwargs)


def cached_dpo(policy: PeftModel, tokenizer, model_name: str, pairs: list[dict], config: DPOConfig,
               **kwargs) -> tuple[SFTResult, Path]:
    """Train `policy` with DPO, or copy an identical earlier run's adapter into it from labkit's cache.

    Either way `policy` itself ends trained and trainable (ready for more steps or a gradient check); `model_name`
    must name its weights without the fresh adapter (the reference's name), as in labkit.sft.cached_sft.
    """
    folder = cache_root() / "adapters" / f"dpo-{run_key(model_name, pairs, config)}"

    def load(path: Path) -> SFTResult:  # verified first, then copied into the policy itself
        run = cached_run_record(policy, path, {"r": config.r, "target_modules": config.target_modules})
        check_fresh(policy, path)
        set_peft_model_state_dict(policy, load_file(path / "adapter_model.safetensors"))
        return SFTResult(policy, **run)

    result = cached(folder, load, lambda: train_dpo(policy, tokenizer, pairs, config=config, **kwargs),
                    lambda result, tmp: fill_adapter(result.model, tmp, run_record(result)), folder=True)
    return result, folder


def check_fresh(policy: PeftModel, folder: Path) -> None:
    """Raise unless every LoRA B of `policy` is zero: a cached run continues from a fresh adapter, not a trained one."""
    if any(p.any() for n, p in policy.named_parameters() if "lora_B" in n):
        raise CheckpointError(f"{folder}: the policy's adapter is already trained, so the cached run (which started "
                              "from a fresh adapter) is not its continuation. Fix: pass the policy as "
                              "labkit.sft.add_lora returned it, before any training")


# ---------------------------------------------------------------- measuring the preference shift


@torch.no_grad()
def pair_logps(model: PeftModel, tokenizer, pairs: list[dict], batch_size: int = 16, reference: bool = False,
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected sequence log-probs of every pair, under the policy or (reference=True) the reference."""
    was_training = model.training
    model.eval()
    rows = [tokenize_pair(tokenizer, p) for p in pairs]
    chosen, rejected = torch.zeros(len(rows)), torch.zeros(len(rows))
    score = partial(reference_logps, model) if reference else partial(sequence_logps, model)
    for start in tqdm(range(0, len(rows), batch_size), desc="log-probs", disable=not progress, leave=False):
        idx = list(range(start, min(start + batch_size, len(rows))))
        with model_autocast(model):
            logps = score(collate_pairs([rows[i] for i in idx], tokenizer.pad_token_id))
        chosen[idx], rejected[idx] = logps.cpu().chunk(2)
    model.train(was_training)
    return chosen, rejected


def preference_accuracy(policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
                        beta: float = 0.1) -> float:
    """Share of pairs whose implicit reward ranks chosen above rejected; an exact tie counts as half."""
    margin = beta * ((policy[0] - reference[0]) - (policy[1] - reference[1]))
    return float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())


GREETINGS = ("hi", "hello", "hey", "dear", "good morning", "good afternoon", "good evening")


def greets_by_name(reply: str, name: str) -> bool:
    """True if the reply opens with a greeting that names the customer ("Hi Maria," yes; "Hi there," or "Maria," no)."""
    opening = re.split(r"[,.!?\n]", reply.strip(), maxsplit=1)[0].lower()
    starts = any(re.match(rf"{g}\b", opening) for g in GREETINGS)
    return starts and re.search(rf"\b{re.escape(name.lower())}\b", opening) is not None


def loss_curve(deltas: torch.Tensor, beta: float, loss_type: str = "sigmoid", tokens: int = 1) -> torch.Tensor:
    """A loss as a function of the log-ratio margin delta = (chosen - rejected) log-ratio (rejected's held at 0)."""
    n = torch.full_like(deltas, float(tokens))
    return preference_loss(deltas, torch.zeros_like(deltas), beta, loss_type, n, n)


# ---------------------------------------------------------------- plots


def plot_losses(beta: float = 0.1, loss_type: str = "sigmoid", betas: tuple[float, ...] = (0.05, 0.1, 0.5),
                max_delta: float = 60.0):
    """Loss against the log-ratio margin: the chosen loss_type at `beta` (bold) and at each of `betas` (thin)."""
    import matplotlib.pyplot as plt

    deltas = torch.linspace(-max_delta, max_delta, 401)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for b in betas:
        ax.plot(deltas, loss_curve(deltas, b, loss_type), lw=1, alpha=0.6, label=f"beta={b:g}")
    ax.plot(deltas, loss_curve(deltas, beta, loss_type), lw=2.5, color="black", label=f"beta={beta:g} (chosen)")
    ax.axvline(0, color="gray", lw=0.5)
    ax.set(xlabel="log-ratio margin  (log pi/ref of chosen) - (log pi/ref of rejected)", ylabel=f"{loss_type} loss",
           title=f"{loss_type}: loss vs margin", ylim=(0, None))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_preference_metrics(history: list[dict]):
    """The implicit rewards of chosen and rejected replies, their margin and the reward accuracy, per step."""
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        left.plot(steps, [h[key] for h in history], label=key)
    left.axhline(0, color="gray", lw=0.5)
    left.set(xlabel="step", ylabel="implicit reward  beta log pi/ref", title="rewards")
    left.legend(fontsize=8)
    right.plot(steps, [h["rewards/accuracies"] for h in history], "o-", ms=3)
    right.set(xlabel="step", ylabel="share of pairs", title="rewards/accuracies (chosen > rejected)",
              ylim=(-0.05, 1.05))
    fig.tight_layout()
    return fig
