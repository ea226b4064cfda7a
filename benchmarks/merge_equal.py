"""Merged vs unmerged on the whole test split: the check notebook 08 runs on the CPU profile's 16 tickets, on all 200.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/merge_equal.py [n_tickets]

Loads notebook 05's adapter from labkit's cache (trains it first if it is not there), merges it with
`merge_and_unload`, and reports the largest logit difference on 8 prompts and how many greedy replies are identical.
"""

import copy
import sys
import time

from labkit.data import read_jsonl
from labkit.deploy import max_logit_gap
from labkit.evaluate import generate, score_triage
from labkit.models import load_model
from labkit.paths import data_dir
from labkit.runtime import detect
from labkit.sft import cached_sft, course_config
from labkit.tickets import label_of, prompt_conversations

n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
rt = detect(seed=0)
budget = rt.settings
base, tokenizer = load_model(rt.model_name, dtype=rt.dtype, device=rt.device)
train, validation, test = (read_jsonl(data_dir() / f"{s}.jsonl") for s in ["train", "validation", "test"])
config = course_config(budget)  # notebook 05's configuration
result, folder = cached_sft(copy.deepcopy(base), tokenizer, rt.model_name, train, validation[: budget["val_examples"]],
                            config, plot=False)
unmerged = result.model
merged = copy.deepcopy(unmerged).merge_and_unload()
tickets = test[:n]
conversations = prompt_conversations(tickets)
gap = max_logit_gap(unmerged, merged, tokenizer, conversations[:8])
replies = {}
for name, model in [("unmerged", unmerged), ("merged", merged)]:
    start = time.perf_counter()
    replies[name] = generate(model, tokenizer, conversations, max_new_tokens=48)
    print(f"{name}: {n} tickets in {time.perf_counter() - start:.0f} s, "
          f"field accuracy {score_triage(replies[name], [label_of(ex) for ex in tickets])['field_acc']:.3f}")
same = sum(a == b for a, b in zip(replies["unmerged"], replies["merged"]))
print(f"adapter {folder.name}: max |logit diff| {gap:.2e} on 8 prompts; identical greedy replies {same} of {n}")
