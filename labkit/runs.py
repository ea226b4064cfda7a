"""The course's named runs: every run a later notebook reuses is defined here once and loaded by name.

A cached run is found by the hash of its base weights' name, its data and its configuration
(labkit.sft.run_key). A notebook that rebuilt an earlier notebook's configuration by hand would retrain the
moment one copy drifted, so 06, 07, 08 and 10 call these functions instead of copying 05's and 06's settings
(tests/test_runs.py pins the keys; tests/test_notebooks.py fails on a hand copy in a notebook).

    triage SFT (05) -> reply SFT (06, the DPO reference) -> DPO (06)
                   \\-> ORPO (06, from the SFT model)      \\-> KTO (06, from the reference)
    Reply SFT and ORPO replay triage examples in the same share, so every preference method keeps triage alike.
"""

from __future__ import annotations

from pathlib import Path

from labkit.dpo import DPOConfig, cached_dpo
from labkit.preference import KTOConfig, ORPOConfig, cached_preference, unpair
from labkit.sft import SFTConfig, SFTResult, add_lora, cached_sft, course_config


def triage_sft_config(budget: dict) -> SFTConfig:
    """05's main run: the triage adapter every later notebook starts from."""
    return course_config(budget)


def reply_sft_config(budget: dict) -> SFTConfig:
    """06's reply SFT: the SFT model taught to write customer replies (DPO's reference)."""
    return SFTConfig(steps=budget["reply_sft_steps"], batch_size=budget["dpo_batch_size"], lr=1e-3, r=8,
                     lora_alpha=16, warmup_ratio=0.0, seed=0)


def dpo_config(budget: dict) -> DPOConfig:
    """06's DPO run on the reference."""
    return DPOConfig(steps=budget["dpo_steps"], batch_size=budget["dpo_batch_size"], lr=budget["dpo_lr"],
                     beta=budget["dpo_beta"], loss_type="sigmoid", r=8, lora_alpha=16, warmup_ratio=0.1, seed=0)


def orpo_config(budget: dict) -> ORPOConfig:
    """06's ORPO run: SFT and preference in one loss, from the triage SFT model, for as many steps as the two
    stages it replaces (reply SFT + DPO) together."""
    return ORPOConfig(steps=budget["reply_sft_steps"] + budget["dpo_steps"], batch_size=budget["dpo_batch_size"],
                      lr=budget["orpo_lr"],
                      beta=budget["orpo_beta"], r=8, lora_alpha=16, warmup_ratio=0.1, seed=0)


def kto_config(budget: dict) -> KTOConfig:
    """06's KTO run: thumbs up/down on single replies, from the reference."""
    return KTOConfig(steps=budget["kto_steps"], batch_size=2 * budget["dpo_batch_size"], lr=budget["kto_lr"],
                     beta=budget["kto_beta"], r=8, lora_alpha=16, warmup_ratio=0.1, seed=0)


def reply_rows(pairs: list[dict], train: list[dict]) -> list[dict]:
    """Reply SFT's data: both replies of every pair, plus as many triage examples replayed so triage is kept."""
    rows = [{"messages": p["prompt"] + p[side]} for p in pairs for side in ("chosen", "rejected")]
    return rows + train[: len(rows)]


def orpo_rows(pairs: list[dict], train: list[dict]) -> list[dict]:
    """ORPO's data: every pair, plus triage examples replayed as reply SFT replays them (one per reply it imitates).

    Reply SFT imitates both replies of a pair and replays one triage example for each; ORPO's SFT term imitates
    the chosen reply only, so one triage example per pair keeps the same share of triage in what is imitated.
    """
    return pairs + train[: len(pairs)]


def triage_sft(base, tokenizer, model_name: str, train: list[dict], validation: list[dict], budget: dict,
               **train_kwargs) -> tuple[SFTResult, Path, str]:
    """05's triage run on `base` (a cache hit after 05): its result, folder, and the name of its weights."""
    result, folder = cached_sft(base, tokenizer, model_name, train, validation[: budget["val_examples"]],
                                triage_sft_config(budget), **train_kwargs)
    return result, folder, f"{model_name}+{folder.name}"


def reply_sft(sft_model, tokenizer, sft_name: str, pairs: list[dict], train: list[dict], budget: dict,
              **train_kwargs) -> tuple[SFTResult, Path, str]:
    """06's reply SFT on the merged triage model named `sft_name`: result, folder, name of its weights."""
    result, folder = cached_sft(sft_model, tokenizer, sft_name, reply_rows(pairs, train), None,
                                reply_sft_config(budget), **train_kwargs)
    return result, folder, f"{sft_name}+{folder.name}"


def dpo(reference, tokenizer, reference_name: str, pairs: list[dict], budget: dict,
        **train_kwargs) -> tuple[SFTResult, Path, str]:
    """06's DPO run: a fresh adapter on the merged reference, trained or loaded from the cache."""
    config = dpo_config(budget)
    result, folder = cached_dpo(add_lora(reference, config), tokenizer, reference_name, pairs, config, **train_kwargs)
    return result, folder, f"{reference_name}+{folder.name}"


def orpo(sft_model, tokenizer, sft_name: str, pairs: list[dict], train: list[dict], budget: dict,
         **train_kwargs) -> tuple[SFTResult, Path, str]:
    """06's ORPO run on the merged triage model, on the pairs with triage replayed (`orpo_rows`)."""
    result, folder = cached_preference(sft_model, tokenizer, sft_name, orpo_rows(pairs, train), orpo_config(budget),
                                       **train_kwargs)
    return result, folder, f"{sft_name}+{folder.name}"


def kto(reference, tokenizer, reference_name: str, pairs: list[dict], budget: dict,
        **train_kwargs) -> tuple[SFTResult, Path, str]:
    """06's KTO run on the merged reference, from the pairs split into single thumbs-up/down replies."""
    result, folder = cached_preference(reference, tokenizer, reference_name, unpair(pairs), kto_config(budget),
                                       **train_kwargs)
    return result, folder, f"{reference_name}+{folder.name}"
