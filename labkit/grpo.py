"""GRPO from scratch: sample a group of replies per prompt, score them with programs, learn from the relative rewards.

Group Relative Policy Optimization (Shao et al., 2024) needs no value model and, when a program can check the
answer, no reward model either. Each prompt gets k sampled replies; each reply gets a reward (here: does the
triage answer parse, are its values allowed, are its fields right); each reply's advantage is its reward
measured against its own group's mean (and divided by the group's spread). The policy then follows PPO's
clipped surrogate on every reply token, optionally held near the reference by TRL's KL estimator.

The loss follows trl.GRPOTrainer for three of its loss types, which differ only in how per-token losses are
averaged: "dapo" (TRL's default), "grpo" and "dr_grpo" (tests/test_grpo.py proves loss and gradients equal).
As in labkit.dpo, the policy is a LoRA adapter and the reference is the same model with the adapter switched off.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from tqdm.auto import tqdm

from labkit import LabkitError
from labkit.checkpoint import cached_run_record, check_writable, save_adapter
from labkit.dpo import check_fresh
from labkit.paths import cache_root
from labkit.runtime import model_autocast
from labkit.sft import SFTResult, add_lora, data_digest, lr_at
from labkit.tickets import CATEGORIES, FIELDS, LABEL_SETS, PRODUCTS, field_matches, label_of, parse_triage, to_json

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
STD_EPS = 1e-4  # TRL adds this to a group's std before dividing, so an all-equal group gives 0, not 0/0

# ---------------------------------------------------------------- rewards: programs that check a triage reply
# Every reward is reward(reply, gold) -> float, gold being the ticket's right answer (a dict) or None; rewards
# that only look at the reply ignore it.

ORDER_ID = re.compile(r"ORD-\d{5}")
LONGEST_ANSWER = len(to_json({"category": max(CATEGORIES, key=len), "priority": "medium", "sentiment": "negative",
                              "product": max(PRODUCTS, key=len), "order_id": "ORD-12345"}))


def format_reward(reply: str, gold: dict | None = None) -> float:
    """1.0 if the whole reply is one JSON object whose keys are exactly the five fields, else 0.0."""
    try:
        obj = json.loads(reply)
    except ValueError:
        return 0.0
    return float(isinstance(obj, dict) and set(obj) == set(FIELDS))


def allowed(field: str, value) -> bool:
    """Whether a field's value is allowed: in its label set, a catalogue product or null, "ORD-" + 5 digits or null."""
    if field in LABEL_SETS:
        return isinstance(value, str) and value in LABEL_SETS[field]
    if field == "product":
        return value is None or (isinstance(value, str) and value in PRODUCTS)
    if field == "order_id":
        return value is None or (isinstance(value, str) and ORDER_ID.fullmatch(value) is not None)
    return False


def schema_reward(reply: str, gold: dict | None = None) -> float:
    """Share of the five fields with an allowed value in the reply's first JSON object; extra keys count as wrong."""
    obj = parse_triage(reply)
    if obj is None:
        return 0.0
    extra = len(set(obj) - set(FIELDS))
    return sum(field in obj and allowed(field, obj[field]) for field in FIELDS) / (len(FIELDS) + extra)


def field_reward(reply: str, gold: dict) -> float:
    """Partial credit: the share of the five fields equal to the right answer's (a reply that does not parse gets 0)."""
    return sum(field_matches(parse_triage(reply), gold).values()) / len(FIELDS)


def exact_reward(reply: str, gold: dict) -> float:
    """All or nothing: 1.0 only if all five fields are right."""
    return float(all(field_matches(parse_triage(reply), gold).values()))


def length_reward(reply: str, gold: dict | None = None) -> float:
    """0 up to the longest possible answer's length, falling linearly to -1 at twice that length and beyond."""
    return -min(1.0, max(0, len(reply) - LONGEST_ANSWER) / LONGEST_ANSWER)


def keys_only_reward(reply: str, gold: dict | None = None) -> float:
    """A reward with a loophole: 1.0 when the reply holds a JSON object with the five keys, whatever their values."""
    obj = parse_triage(reply)
    return float(obj is not None and set(FIELDS) <= set(obj))


def loophole_share(replies: list[str]) -> float:
    """The check that catches keys_only_reward's loophole: share of replies it pays in full with values not allowed."""
    paid = [r for r in replies if keys_only_reward(r) == 1.0]
    return sum(schema_reward(r) < 1.0 for r in paid) / max(len(replies), 1)


REWARDS: dict[str, Callable[[str, dict | None], float]] = {
    "format": format_reward, "schema": schema_reward, "fields": field_reward, "exact": exact_reward,
    "length": length_reward, "keys_only": keys_only_reward,
}


def for_trl(reward: Callable[[str, dict | None], float]) -> Callable[..., list[float]]:
    """A labkit reward as a trl.GRPOTrainer reward function: completions (and the dataset's `gold` column, JSON) in."""
    def trl_reward(completions, gold=None, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        golds = [json.loads(g) if isinstance(g, str) else g for g in (gold or [None] * len(texts))]
        return [reward(text.strip(), g) for text, g in zip(texts, golds)]

    trl_reward.__name__ = reward.__name__
    return trl_reward


# ---------------------------------------------------------------- group-relative advantages


def group_advantages(rewards: torch.Tensor, k: int, scale: bool = True) -> torch.Tensor:
    """Each reward minus its group's mean (groups: k consecutive rewards), divided by the group's std + 1e-4 if scale.

    scale=True is TRL's scale_rewards="group" (the std is the sample std, n - 1); scale=False is "none" (Dr. GRPO).
    """
    groups = rewards.float().view(-1, k)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        std = groups.std(dim=1, keepdim=True) if k > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + STD_EPS)
    return centred.flatten()


def zero_signal_share(rewards: torch.Tensor, k: int) -> float:
    """Share of groups (k consecutive rewards) whose rewards are all equal: zero advantages, so no gradient."""
    groups = rewards.view(-1, k)
    return (groups == groups[:, :1]).all(dim=1).float().mean().item()


# ---------------------------------------------------------------- sampling k replies per prompt


@torch.no_grad()
def sample_tokens(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int, temperature: float,
                  generator: torch.Generator | None = None) -> list[list[int]]:
    """New token ids for each prompt, each drawn from softmax(logits / temperature), KV-cached, up to end of turn."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding: every row's next token lands in the same column
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache, live = DynamicCache(), torch.arange(len(prompts), device=device)
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()
        nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)[:, 0]
        for r, token in zip(live.tolist(), nxt.tolist()):
            out[r].append(token)
        going = nxt != eos_id
        if not going.all():  # finished rows leave the batch and the cache
            keep = going.nonzero()[:, 0]
            if len(keep) == 0:
                break
            cache.batch_select_indices(keep)
            live, nxt, mask, positions = live[keep], nxt[keep], mask[keep], positions[keep]
        ids = nxt[:, None]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        positions = positions[:, -1:] + 1
    return out


def pad_rows(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one padded (ids, mask) pair, padded on the left or on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span], mask[i, span] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


def sample_group(model, tokenizer, conversations: list[list[dict]], k: int, temperature: float = 1.0,
                 max_new_tokens: int = 64, generator: torch.Generator | None = None) -> dict:
    """k sampled replies to each chat prompt, as TRL lays them out: each prompt's k rows next to each other.

    Returns prompt_ids/prompt_mask (left-padded), completion_ids/completion_mask (right-padded, the end-of-turn
    token included), texts (the decoded replies) and prompt_index (which prompt each row answers).
    """
    if temperature <= 0:
        raise LabkitError(f"sample_group: temperature={temperature}; sampling needs temperature > 0. Fix: use e.g. 1.0")
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts for _ in range(k)]
    was_training = model.training
    model.eval()
    with model_autocast(model):
        completions = sample_tokens(model, prompts, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                    temperature, generator)
    model.train(was_training)
    prompt_ids, prompt_mask = pad_rows(prompts, tokenizer.pad_token_id, left=True)
    completion_ids, completion_mask = pad_rows(completions, tokenizer.pad_token_id, left=False)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "texts": [tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions],
            "prompt_index": torch.arange(len(conversations)).repeat_interleave(k)}


# ---------------------------------------------------------------- log-probabilities of the reply tokens


def per_token_logps(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                    completion_mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token | everything before it) of every completion token, (rows x completion length), logits / temperature.

    The output head runs only at the positions that predict completion tokens, as in TRL.
    """
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    device = causal_lm.lm_head.weight.device
    ids = torch.cat([prompt_ids, completion_ids], dim=1).to(device)
    mask = torch.cat([prompt_mask, completion_mask], dim=1).to(device)
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    n = completion_ids.shape[1]
    logits = causal_lm.lm_head(hidden[:, -n - 1:-1]).float() / temperature  # position t predicts token t + 1
    targets = completion_ids.to(device)[..., None]
    return (logits.gather(-1, targets) - logits.logsumexp(-1, keepdim=True))[..., 0]


@torch.no_grad()
def reference_token_logps(model: PeftModel, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """per_token_logps under the reference: the same model with its adapter switched off."""
    with model.disable_adapter():
        return per_token_logps(model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                               batch["completion_mask"], temperature)


# ---------------------------------------------------------------- the loss


def importance_ratio(logps: torch.Tensor, old_logps: torch.Tensor) -> torch.Tensor:
    """pi(token) / pi_old(token) per token: how much the policy moved since the replies were sampled."""
    return torch.exp(logps - old_logps)


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float = 0.2,
                      epsilon_high: float | None = None) -> torch.Tensor:
    """Per-token PPO loss -min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon_high) A), A the reply's advantage."""
    ratio = importance_ratio(logps, old_logps)
    clipped = ratio.clamp(1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high))
    a = advantages.to(ratio)[:, None]
    return -torch.min(ratio * a, clipped * a)


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) TRL uses (Schulman's k3): e^d - d - 1, d = log ref - log pi."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str = "dapo",
              max_completion_length: int | None = None, num_items: int | None = None,
              num_sequences: int | None = None) -> torch.Tensor:
    """One loss from per-token losses, averaged the way each TRL loss type does.

    dapo: over every completion token of the step (num_items, default this batch's); grpo: over each reply's
    tokens, then over replies (num_sequences, default this batch's); dr_grpo: the sum over tokens divided by
    replies x max_completion_length, a constant. num_items / num_sequences let a step split into micro-batches.
    """
    mask = mask.to(per_token)
    rows = num_sequences or len(mask)
    if loss_type == "dapo":
        return (per_token * mask).sum() / max(num_items or int(mask.sum()), 1)
    if loss_type == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / rows
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise LabkitError("aggregate: loss_type='dr_grpo' divides by max_completion_length. Fix: pass it "
                              "(the max_new_tokens the replies were sampled with)")
        return (per_token * mask).sum() / (rows * max_completion_length)
    raise LabkitError(f"aggregate: loss_type={loss_type!r} is not one of {LOSS_TYPES}. Fix: pick one of them")


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logps: torch.Tensor | None = None, beta: float = 0.0, epsilon: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "dapo", max_completion_length: int | None = None,
              num_items: int | None = None, num_sequences: int | None = None,
              kl_ratio: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of a batch (clipped surrogate + beta x KL, per token, then averaged) and its metrics.

    old_logps None means the replies were sampled by this very policy (ratio 1, as TRL assumes with one
    update per batch). kl_ratio multiplies each token's KL by its importance ratio (TRL's use_bias_correction_kl,
    on by default: DeepSeek-V3.2's unbiased KL gradient; it changes the gradient even where the ratio is 1).
    Metrics are means over this batch's completion tokens: kl (the term beta weighs, when ref_logps is given)
    and clip_ratio (tokens whose ratio left the clip range in the direction the advantage pushes).
    """
    old_logps = logps.detach() if old_logps is None else old_logps
    per_token = clipped_surrogate(logps, old_logps, advantages, epsilon, epsilon_high)
    mask_f = mask.to(per_token)
    tokens = mask_f.sum().clamp(min=1)
    metrics = {}
    if beta and ref_logps is None:
        raise LabkitError(f"grpo_loss: beta={beta} needs ref_logps, the reference's per-token log-probs. Fix: pass "
                          "them (reference_token_logps), or set beta=0")
    if ref_logps is not None:
        kl = kl_k3(logps, ref_logps)
        if kl_ratio:
            kl = kl * importance_ratio(logps, old_logps)
        if beta:
            per_token = per_token + beta * kl
        metrics["kl"] = ((kl.detach() * mask_f).sum() / tokens).item()
    ratio, a = importance_ratio(logps.detach(), old_logps), advantages.to(per_token)[:, None]
    high = 1 + (epsilon if epsilon_high is None else epsilon_high)
    clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > high) & (a > 0))
    metrics["clip_ratio"] = ((clipped.to(mask_f) * mask_f).sum() / tokens).item()
    loss = aggregate(per_token, mask, loss_type, max_completion_length, num_items, num_sequences)
    return loss, metrics


# ---------------------------------------------------------------- one update and the training loop


@dataclass
class GRPOConfig:
    """Everything that defines a GRPO run (and so its cache key). Defaults are TRL's where a CPU can afford them."""

    # how long and how much per step
    steps: int = 8  # updates with freshly sampled replies
    prompts_per_step: int = 4  # distinct prompts per step; the step has prompts_per_step x k replies
    k: int = 8  # replies sampled per prompt (TRL's num_generations)
    temperature: float = 1.0  # sampling temperature; the log-probs use the same logits / temperature, as in TRL
    max_new_tokens: int = 64  # longest reply (TRL's max_completion_length)
    iterations: int = 1  # updates on each sampled batch (TRL's num_iterations): above 1 the ratio moves off 1
    micro_batch: int = 4  # replies per forward pass in the update: bounds memory (~1 MB/token at 135M), not the loss
    # the loss (TRL's names)
    loss_type: str = "dapo"  # "dapo" (TRL's default), "grpo" or "dr_grpo": how per-token losses are averaged
    beta: float = 0.0  # weight of the KL to the reference; TRL's default is 0
    epsilon: float = 0.2  # the ratio is clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # None: the same as epsilon (DAPO's paper uses 0.28)
    scale_rewards: bool = True  # divide advantages by the group's std (TRL's "group"); False: "none" (Dr. GRPO)
    rewards: tuple[str, ...] = ("format", "schema")  # names in REWARDS (or in train_grpo's `rewards` dict)
    reward_weights: tuple[float, ...] | None = None  # None: every reward weighs 1
    kl_ratio: bool = True  # weigh each token's KL by its importance ratio (TRL's use_bias_correction_kl, default on)
    log_kl: bool = True  # measure the KL to the reference every step even when beta = 0 (one more forward pass)
    # the optimizer (AdamW on the adapter) and its schedule
    lr: float = 2e-4
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # the adapter (peft's names)
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    seed: int = 0  # adapter init, prompt order and sampling

    def __post_init__(self) -> None:
        def bad(field: str, why: str, fix: str) -> LabkitError:
            return LabkitError(f"GRPOConfig.{field}={getattr(self, field)!r}: {why}. Fix: {fix}")

        if self.loss_type not in LOSS_TYPES:
            raise bad("loss_type", f"not one of {LOSS_TYPES}", "pick one of them")
        if self.k < 2:
            raise bad("k", "a group needs at least 2 replies to compare", "use k >= 2 (TRL's default is 8)")
        if self.temperature <= 0:
            raise bad("temperature", "sampling needs a temperature above 0", "use e.g. 1.0")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise bad("reward_weights", f"{len(self.reward_weights)} weights for {len(self.rewards)} rewards",
                      "give one weight per reward, or None")
        for field in ("steps", "prompts_per_step", "max_new_tokens", "iterations", "micro_batch"):
            if getattr(self, field) < 1:
                raise bad(field, "must be at least 1", "use a positive number")


def reward_functions(config: GRPOConfig, extra: dict[str, Callable] | None = None) -> dict[str, Callable]:
    """The config's rewards by name, looked up in `extra` first, then in REWARDS."""
    table = {**REWARDS, **(extra or {})}
    missing = [name for name in config.rewards if name not in table]
    if missing:
        raise LabkitError(f"GRPOConfig.rewards names {missing}, which are not rewards. Fix: use names from "
                          f"{sorted(table)}, or pass rewards={{name: function}} to train_grpo")
    return {name: table[name] for name in config.rewards}


def score(texts: list[str], golds: list[dict | None], rewards: dict[str, Callable],
          weights: tuple[float, ...] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each reply's total reward (the weighted sum, as TRL sums its reward functions) and each reward's values."""
    each = {name: torch.tensor([float(fn(t, g)) for t, g in zip(texts, golds)]) for name, fn in rewards.items()}
    weights = weights or (1.0,) * len(rewards)
    return sum(w * v for w, v in zip(weights, each.values())), each


def policy_loss(model, batch: dict, config: GRPOConfig, num_items: int | None = None,
                num_sequences: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of a scored batch under the current policy (*_ids, *_mask, advantages, old_logps?, ref_logps?)."""
    with model_autocast(model):
        logps = per_token_logps(model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                                batch["completion_mask"], config.temperature)
    on = {key: batch[key].to(logps.device) for key in ("advantages", "completion_mask", "old_logps", "ref_logps")
          if batch.get(key) is not None}
    return grpo_loss(logps, on.get("old_logps"), on["advantages"], on["completion_mask"], on.get("ref_logps"),
                     config.beta, config.epsilon, config.epsilon_high, config.loss_type, config.max_new_tokens,
                     num_items, num_sequences, config.kl_ratio)


def grpo_step(model, optimizer: torch.optim.Optimizer, batch: dict, config: GRPOConfig) -> dict[str, float]:
    """One full update: the loss over the batch (in micro-batches), backward, gradient-norm clipping, an AdamW step."""
    tensors = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "old_logps", "ref_logps")
    n_rows, n_tokens = len(batch["completion_mask"]), int(batch["completion_mask"].sum())
    loss_sum, metrics = 0.0, {}
    for start in range(0, n_rows, config.micro_batch):
        rows = slice(start, start + config.micro_batch)
        part = {k: batch[k][rows] for k in tensors if batch.get(k) is not None}
        loss, sums = policy_loss(model, part, config, num_items=n_tokens, num_sequences=n_rows)
        loss.backward()
        loss_sum += loss.item()
        share = int(part["completion_mask"].sum()) / max(n_tokens, 1)  # metrics are token means: weigh by tokens
        for name, value in sums.items():
            metrics[name] = metrics.get(name, 0.0) + value * share
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum, "grad_norm": float(grad_norm), **metrics}


def prompt_batches(n: int, per_step: int, steps: int, seed: int) -> list[list[int]]:
    """Which examples each step samples from: shuffled epochs, cut into steps of per_step prompts."""
    rng, order = random.Random(seed), []
    while len(order) < per_step * steps:
        epoch = list(range(n))
        rng.shuffle(epoch)
        order += epoch
    return [order[s * per_step:(s + 1) * per_step] for s in range(steps)]


def prompt_and_gold(example: dict) -> tuple[list[dict], dict | None]:
    """A chat example's prompt (every message before the answer) and its right answer (None if it has none)."""
    messages = example["messages"]
    if messages[-1]["role"] == "assistant":
        return messages[:-1], label_of(example)
    return messages, None


def train_grpo(model, tokenizer, train: list[dict], config: GRPOConfig | None = None,
               rewards: dict[str, Callable] | None = None, plot: bool | Callable[[list[dict]], None] = True,
               progress: bool = True) -> SFTResult:
    """Train a LoRA adapter with GRPO on chat prompts: sample k replies each, score them, update, repeat.

    `rewards` adds reward functions by name to REWARDS (config.rewards picks among them). `plot`: True shows a
    live figure of rewards, zero-signal share and KL in a notebook; a function is called with the history after
    every step instead. The history logs per step: reward (the weighted total's mean), reward/<name>, zero_signal
    (share of groups whose total rewards are all equal) and zero_signal/<name> (the same for each reward alone),
    kl, loss, clip_ratio, grad_norm, completion_tokens (mean per reply), lr, seconds (since the start).
    """
    config = config or GRPOConfig()
    funcs = reward_functions(config, rewards)
    if not train:
        raise LabkitError("train_grpo: no training examples. Fix: pass chat examples ({'messages': [...]})")
    torch.manual_seed(config.seed)
    model = model if isinstance(model, PeftModel) else add_lora(model, config)
    prompts, golds = zip(*(prompt_and_gold(ex) for ex in train))
    schedule = prompt_batches(len(train), config.prompts_per_step, config.steps, config.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.seed)
    live = (RewardPlot() if plot is True else plot) if plot else None
    history: list[dict] = []
    started = time.perf_counter()
    for step in tqdm(range(config.steps), desc="GRPO", disable=not progress):
        lr = lr_at(step, config.lr, config.steps, config.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # 1. sample: k replies to each of this step's prompts
        idx = schedule[step]
        batch = sample_group(model, tokenizer, [prompts[i] for i in idx], config.k, config.temperature,
                             config.max_new_tokens, generator)
        # 2. score: every reward function on every reply, summed with the weights
        row_golds = [golds[idx[j]] for j in batch["prompt_index"].tolist()]
        total, each = score(batch["texts"], row_golds, funcs, config.reward_weights)
        # 3. advantages: each reward against its own group's
        batch["advantages"] = group_advantages(total, config.k, config.scale_rewards)
        # 4. log-probs that stay fixed during the updates: the sampling policy's (if several updates), the reference's
        with torch.no_grad(), model_autocast(model):
            if config.iterations > 1:
                batch["old_logps"] = per_token_logps(model, batch["prompt_ids"], batch["prompt_mask"],
                                                     batch["completion_ids"], batch["completion_mask"],
                                                     config.temperature)
            if config.beta or config.log_kl:
                batch["ref_logps"] = reference_token_logps(model, batch, config.temperature)
        # 5. update: iterations full steps on the same replies
        model.train()
        for _ in range(config.iterations):
            metrics = grpo_step(model, optimizer, batch, config)
        record = {"step": step + 1, "reward": total.mean().item(), "reward_std": total.std().item(),
                  **{f"reward/{name}": v.mean().item() for name, v in each.items()},
                  "zero_signal": zero_signal_share(total, config.k),
                  **{f"zero_signal/{name}": zero_signal_share(v, config.k) for name, v in each.items()},
                  "completion_tokens": batch["completion_mask"].sum(1).float().mean().item(), "lr": lr,
                  "seconds": time.perf_counter() - started, **metrics}
        history.append(record)
        if live:
            (live.update if isinstance(live, RewardPlot) else live)(history)
    model.eval()
    result = SFTResult(model, history)
    result.tokens_per_s = sum(h["completion_tokens"] for h in history) * config.prompts_per_step * config.k / max(
        time.perf_counter() - started, 1e-9)
    return result


# ---------------------------------------------------------------- cached runs


def reward_digest(rewards: dict[str, Callable]) -> dict[str, str]:
    """A short hash of each reward function's source code (its name if the source cannot be read)."""
    def source(fn: Callable) -> str:
        try:
            return inspect.getsource(fn)
        except (OSError, TypeError):
            return getattr(fn, "__qualname__", repr(fn))

    return {name: hashlib.sha256(source(fn).encode()).hexdigest()[:12] for name, fn in rewards.items()}


def grpo_key(model_name: str, train: list[dict], config: GRPOConfig, rewards: dict[str, Callable]) -> str:
    """The cache key of a GRPO run: hash of (starting weights' name, prompts, config, the rewards' code)."""
    key = {"model": model_name, "data": data_digest(train), "config": asdict(config),
           "rewards": reward_digest(rewards)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cached_grpo(policy, tokenizer, model_name: str, train: list[dict], config: GRPOConfig,
                rewards: dict[str, Callable] | None = None, **kwargs) -> tuple[SFTResult, Path]:
    """Train `policy` with GRPO, or copy an identical earlier run's adapter into it from labkit's cache.

    As labkit.dpo.cached_dpo: `policy` is a fresh adapter (add_lora) or a plain model (one is added, seeded),
    and `model_name` names its weights without that adapter. `kwargs` go to train_grpo (plot, progress).
    """
    torch.manual_seed(config.seed)
    policy = policy if isinstance(policy, PeftModel) else add_lora(policy, config)
    funcs = reward_functions(config, rewards)
    folder = cache_root() / "adapters" / f"grpo-{grpo_key(model_name, train, config, funcs)}"
    if (run := cached_run_record(policy, folder, {"r": config.r, "target_modules": config.target_modules})) is not None:
        check_fresh(policy, folder)
        set_peft_model_state_dict(policy, load_file(folder / "adapter_model.safetensors"))
        policy.eval()
        return SFTResult(policy, **run), folder
    check_writable(folder.parent, "set LABKIT_HOME to a folder you can write to")  # before training: never lose a run
    result = train_grpo(policy, tokenizer, train, config, rewards, **kwargs)
    run = {k: getattr(result, k) for k in ("history", "best_step", "best_val_loss", "stopped_early", "tokens_per_s")}
    save_adapter(result.model, folder, run)
    return result, folder


# ---------------------------------------------------------------- plots


def plot_rewards(history: list[dict], title: str = "GRPO"):
    """Per step: the rewards (total and each), the share of zero-signal groups, and the KL to the reference."""
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(11, 3))
    left.plot(steps, [h["reward"] for h in history], "o-", ms=3, color="black", label="total")
    for key in (sorted(k for k in history[0] if k.startswith("reward/")) if history else []):
        left.plot(steps, [h[key] for h in history], lw=1, label=key.removeprefix("reward/"))
    left.set(xlabel="step", ylabel="mean reward", title=f"{title}: rewards")
    left.legend(fontsize=8)
    middle.plot(steps, [h["zero_signal"] for h in history], "o-", ms=3, color="black", label="total")
    for key in (sorted(k for k in history[0] if k.startswith("zero_signal/")) if history else []):
        middle.plot(steps, [h[key] for h in history], lw=1, label=key.removeprefix("zero_signal/"))
    middle.legend(fontsize=8)
    middle.set(xlabel="step", ylabel="share of groups", title="zero signal (all k rewards equal)", ylim=(-0.05, 1.05))
    if history and "kl" in history[0]:
        right.plot(steps, [h["kl"] for h in history], "o-", ms=3, color="C4")
    right.set(xlabel="step", ylabel="KL per token (k3)", title="KL to the reference")
    fig.tight_layout()
    return fig


class RewardPlot:
    """plot_rewards' figure, updated in place through one display handle while training (in a notebook only)."""

    def __init__(self, title: str = "GRPO") -> None:
        self.handle, self.title = None, title

    def update(self, history: list[dict]) -> None:
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            return
        if get_ipython() is None:
            return
        import matplotlib.pyplot as plt

        fig = plot_rewards(history, self.title)
        if self.handle is None:
            self.handle = display(fig, display_id=True)
        else:
            self.handle.update(fig)
        plt.close(fig)
