"""Which CPU training budget learns every field of the running task? A small measured sweep.

Each configuration (steps x batch x lr; LoRA r=16 on all linear layers) trains a fresh adapter with
labkit.sft.train_sft, then greedy replies are scored on the test split and on the hand-written
out-of-distribution set (data/ood_tickets.jsonl): JSON validity, per-field accuracy, exact match (95 %
bootstrap CIs for the chosen rows), training wall time, tokens/s. Timings depend on the machine's load:
compare configurations by steps x batch (examples seen) and rescale wall time by tokens/s.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/budget_sweep.py 80x4x2e-3 120x4x2e-3 [--n-test 200] [--log F]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/budget_sweep.py --baseline --splits ood   # the prompt baseline
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from labkit.data import load_split, read_jsonl
from labkit.evaluate import bootstrap_ci, generate, per_example, score_triage
from labkit.models import load_model
from labkit.paths import data_dir
from labkit.runtime import detect
from labkit.sft import SFTConfig, train_sft
from labkit.tickets import FIELDS, INSTRUCTIONS, SYSTEM_PROMPT, balanced_shots, label_of, prompt_conversations


def score(model, tokenizer, examples: list[dict], system: str, shots: list[dict] = ()) -> dict:
    """Scores (JSON validity, per-field accuracy, exact match, 95 % CIs) of greedy replies on examples."""
    replies = generate(model, tokenizer, prompt_conversations(examples, system, shots), progress=False)
    golds = [label_of(ex) for ex in examples]
    scores = score_triage(replies, golds)
    for metric, values in per_example(replies, golds).items():
        scores[f"{metric}_ci"] = bootstrap_ci(values)[1:]
    return scores


def row(name: str, split: str, s: dict, extra: str = "") -> str:
    """One line of the table."""
    fields = " ".join(f"{s[f'acc_{f}']:.3f}" for f in FIELDS)
    lo, hi = s["exact_match_ci"]
    return (f"{name:<22} {split:<5} json {s['json_valid']:.3f}  fields {fields}  exact {s['exact_match']:.3f} "
            f"[{lo:.2f}, {hi:.2f}] {extra}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="*", help="STEPSxBATCHxLR, e.g. 120x4x2e-3 (none: only --baseline)")
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--val", type=int, default=24, help="validation examples for best-checkpoint selection")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--warmup", type=float, default=0.05)
    ap.add_argument("--baseline", action="store_true", help="also score the prompt baseline (instructions + 5 balanced shots)")
    ap.add_argument("--log", default=None, help="append one JSON line per result here")
    ap.add_argument("--splits", nargs="+", default=["test", "ood"], choices=["test", "ood"], help="which sets to score")
    args = ap.parse_args()
    rt = detect()
    print(rt, f"\ndata {data_dir()}", flush=True)
    train, validation = load_split("train"), load_split("validation")[: args.val]
    sets = {"test": load_split("test")[: args.n_test], "ood": read_jsonl(data_dir() / "ood_tickets.jsonl")}
    sets = {name: examples for name, examples in sets.items() if name in args.splits}
    print("columns: " + " ".join(FIELDS), flush=True)
    results = []
    if args.baseline:
        model, tokenizer = load_model(rt.model_name, rt.dtype, rt.device)
        for split, examples in sets.items():
            s = score(model, tokenizer, examples, INSTRUCTIONS, balanced_shots(train, 5))
            results.append({"name": "prompt baseline", "split": split, **s})
            print(row("prompt baseline", split, s), flush=True)
            if args.log:
                with open(args.log, "a") as f:
                    f.write(json.dumps(results[-1]) + "\n")
    for spec in args.configs:
        steps, batch, lr = spec.split("x")
        config = SFTConfig(steps=int(steps), batch_size=int(batch), lr=float(lr), r=args.r, lora_alpha=2 * args.r,
                           warmup_ratio=args.warmup, eval_every=max(1, int(steps) // 2))
        model, tokenizer = load_model(rt.model_name, rt.dtype, rt.device)
        start = time.perf_counter()
        result = train_sft(model, tokenizer, train, validation, config, plot=False, progress=False)
        wall = time.perf_counter() - start
        extra = f"train {wall:.0f}s {result.tokens_per_s:.0f} tok/s best step {result.best_step}"
        for split, examples in sets.items():
            s = score(result.model, tokenizer, examples, SYSTEM_PROMPT)
            results.append({"name": spec, "split": split, "train_s": wall, "tokens_per_s": result.tokens_per_s,
                            "best_step": result.best_step, **s})
            print(row(spec, split, s, extra), flush=True)
            if args.log:
                with open(args.log, "a") as f:
                    f.write(json.dumps(results[-1]) + "\n")


if __name__ == "__main__":
    main()
