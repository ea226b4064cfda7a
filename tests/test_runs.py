"""Specifications of the course's named runs: one definition each, so every notebook finds the same cache entry."""

import pytest

import labkit.dpo
from labkit import runs
from labkit.runtime import PROFILES
from labkit.sft import run_key

# The keys of the configurations 05 and 06 trained with before they moved here (computed from the notebooks'
# former inline configs). A change to a named run's configuration changes its key, and every cached copy of it
# on learners' machines would be trained again: change these only on purpose.
# (orpo changed on purpose: it trains as many steps as reply SFT + DPO, with triage replayed as reply SFT does.)
PINNED = {
    "cpu": {"triage": "4afdb800b052976e", "reply": "0c5bc79a797b892f", "dpo": "70a4f12f6d9ec760",
            "orpo": "fa25ee4bef1d1106", "kto": "1687027a85623f71"},
    "gpu": {"triage": "95daa35764fd812c", "reply": "952ca9f6da65c323", "dpo": "1258f062b6151ac9",
            "orpo": "ffa54967bbf7c0d4", "kto": "001de23aedcde37f"},
}
CONFIGS = {"triage": runs.triage_sft_config, "reply": runs.reply_sft_config, "dpo": runs.dpo_config,
           "orpo": runs.orpo_config, "kto": runs.kto_config}


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_named_runs_keep_their_cache_keys(profile, monkeypatch):
    monkeypatch.setenv("LABKIT_DTYPE", "fp32")  # a mixed-precision run has keys of its own
    keys = {name: run_key("m", [{"x": 1}], config(PROFILES[profile])) for name, config in CONFIGS.items()}
    assert keys == PINNED[profile]


def test_reply_data_replays_as_many_triage_examples_as_replies(pairs):
    train = [{"messages": [{"role": "user", "content": str(i)}]} for i in range(100)]
    rows = runs.reply_rows(pairs, train)
    assert len(rows) == 4 * len(pairs) and rows[2 * len(pairs):] == train[: 2 * len(pairs)]
    assert rows[0]["messages"] == pairs[0]["prompt"] + pairs[0]["chosen"]


def test_orpo_data_replays_one_triage_example_per_pair(pairs):
    train = [{"messages": [{"role": "user", "content": str(i)}]} for i in range(100)]
    rows = runs.orpo_rows(pairs, train)
    assert rows[: len(pairs)] == pairs and rows[len(pairs):] == train[: len(pairs)]


def test_orpo_trains_as_many_steps_as_reply_sft_and_dpo_together():
    for budget in PROFILES.values():
        assert runs.orpo_config(budget).steps == budget["reply_sft_steps"] + budget["dpo_steps"]


def test_a_later_notebook_loads_the_dpo_run_instead_of_training_it(vocab_llama, tokenizer, pairs, monkeypatch,
                                                                   tmp_path):
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    budget = {**PROFILES["cpu"], "dpo_steps": 2, "dpo_batch_size": 2}
    first, folder, name = runs.dpo(vocab_llama(), tokenizer, "tiny", pairs, budget, plot=False, progress=False)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(labkit.dpo, "train_dpo", no_training)
    again, same_folder, same_name = runs.dpo(vocab_llama(), tokenizer, "tiny", pairs, budget)
    assert (same_folder, same_name) == (folder, name) and name == f"tiny+{folder.name}"
    assert again.history == first.history
