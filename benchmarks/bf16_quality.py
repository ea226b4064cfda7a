"""Does bf16 mixed precision cost accuracy? Notebook 05's SFT run in fp32 and in bf16 mixed, same seed, scored.

Trains labkit.sft.SFTConfig(steps=40, batch_size=4, lr=1e-3, r=16, lora_alpha=32, eval_every=20,
warmup_ratio=0.05, seed=0) on data/train.jsonl with validation[:24] (what 05 does) once per precision
(LABKIT_DTYPE=fp32, then bf16), then scores each adapter's greedy replies on the test tickets: per-field
accuracy with 95 % bootstrap CIs, final training loss and validation losses. Nothing is cached. Writes its section
of benchmarks/RESULTS.md and the overlaid loss curves to benchmarks/bf16_quality.png.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bf16_quality.py [--test 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CONFIG = dict(steps=40, batch_size=4, lr=1e-3, r=16, lora_alpha=32, eval_every=20, warmup_ratio=0.05, seed=0)


def run(precision: str, train: list[dict], validation: list[dict], test: list[dict]) -> dict:
    """Train 05's adapter in `precision` ('fp32' or 'bf16') from seed 0; its history, replies and seconds."""
    from labkit.evaluate import generate
    from labkit.models import load_model
    from labkit.runtime import seed_everything
    from labkit.sft import SFTConfig, train_sft
    from labkit.tickets import prompt_conversations

    os.environ["LABKIT_DTYPE"] = precision
    seed_everything(0)
    model, tokenizer = load_model()
    start = time.perf_counter()
    result = train_sft(model, tokenizer, train, validation, SFTConfig(**CONFIG), plot=False, progress=False)
    trained = time.perf_counter()
    tuned = result.model.merge_and_unload()  # as 05 does: generation runs the merged model
    replies = generate(tuned, tokenizer, prompt_conversations(test), max_new_tokens=48, progress=False)
    return {"history": result.history, "best_val_loss": result.best_val_loss, "best_step": result.best_step,
            "replies": replies, "train_s": trained - start, "generate_s": time.perf_counter() - trained}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sft_throughput import write_section

    from labkit.data import load_split
    from labkit.evaluate import bootstrap_ci
    from labkit.tickets import FIELDS, field_matches, label_of, parse_triage

    train, validation, test = load_split("train"), load_split("validation")[:24], load_split("test")[: args.test]
    golds = [label_of(ex) for ex in test]
    runs = {p: run(p, train, validation, test) for p in ("fp32", "bf16")}
    os.environ.pop("LABKIT_DTYPE")

    lines = ["# bf16 mixed precision vs fp32: notebook 05's run", "",
             f"`python benchmarks/bf16_quality.py --test {args.test} --threads {args.threads}`: SFTConfig({CONFIG}), "
             f"train split, validation[:24], seed 0, scored on {len(test)} test tickets (greedy, 48 new tokens). "
             "95 % percentile-bootstrap CIs over tickets.", "",
             "| metric | fp32 | bf16 mixed |", "|---|---|---|"]
    for name, f in [("field " + f, f) for f in FIELDS] + [("mean field accuracy", None), ("exact match", "all")]:
        cells = []
        for p in ("fp32", "bf16"):
            matches = [field_matches(parse_triage(r), g) for r, g in zip(runs[p]["replies"], golds)]
            if f is None:
                values = [sum(m.values()) / len(FIELDS) for m in matches]
            elif f == "all":
                values = [float(all(m.values())) for m in matches]
            else:
                values = [float(m[f]) for m in matches]
            mean, lo, hi = bootstrap_ci(values)
            cells.append(f"{mean:.3f} [{lo:.3f}, {hi:.3f}]")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    for label, get in [("final training loss (step 40)", lambda r: f"{r['history'][-1]['loss']:.4f}"),
                       ("validation loss at steps 20, 40", lambda r: ", ".join(
                           f"{h['val_loss']:.4f}" for h in r["history"] if "val_loss" in h)),
                       ("best validation loss (step)", lambda r: f"{r['best_val_loss']:.4f} ({r['best_step']})"),
                       ("training seconds (noisy)", lambda r: f"{r['train_s']:.0f}"),
                       ("generation seconds (noisy)", lambda r: f"{r['generate_s']:.0f}")]:
        lines.append(f"| {label} | {get(runs['fp32'])} | {get(runs['bf16'])} |")
    same = sum(a == b for a, b in zip(runs["fp32"]["replies"], runs["bf16"]["replies"]))
    lines += ["", f"Identical replies fp32 vs bf16: {same}/{len(test)}. Loss curves: benchmarks/bf16_quality.png.", ""]
    text = "\n".join(lines)
    print(text)
    write_section("# bf16 mixed precision vs fp32", text)
    plot(runs)


def plot(runs: dict) -> None:
    """Training and validation loss of both runs on one figure, saved next to this script."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    for (p, r), color in zip(runs.items(), ("C0", "C1")):
        h = r["history"]
        ax.plot([x["step"] for x in h], [x["loss"] for x in h], color=color, lw=1, label=f"{p} train")
        evals = [x for x in h if "val_loss" in x]
        ax.plot([x["step"] for x in evals], [x["val_loss"] for x in evals], "o--", color=color, label=f"{p} validation")
    ax.set(xlabel="step", ylabel="loss per assistant token", yscale="log", title="05's SFT: fp32 vs bf16 mixed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "bf16_quality.png", dpi=100)


if __name__ == "__main__":
    main()
