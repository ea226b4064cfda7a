"""LoRA SFT throughput, side by side in one run: labkit, TRL SFTTrainer (defaults), TRL tuned, a plain peft loop,
and the bf16 mixed-precision rows (labkit, TRL tuned with bf16=True).

Same model (SmolLM2-135M-Instruct), same batches in the same order, same LoRA config (r=8, all-linear),
same loss (mean cross-entropy over assistant tokens). Each trainer runs in its own subprocess so that
its peak RSS is its own. bf16 rows keep fp32 weights and compute under torch.autocast(bf16); TRL's defaults
are bf16 + gradient checkpointing. Writes benchmarks/RESULTS.md (--only: print the table, write nothing).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sft_throughput.py [--steps 12] [--batch 8] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def batches(tokenizer, steps: int, batch: int) -> list[list[dict]]:
    """The benchmark's data: labkit's length-grouped schedule over the training split."""
    from labkit.data import read_jsonl
    from labkit.paths import data_dir
    from labkit.sft import length_grouped_batches, tokenize_chat

    train = read_jsonl(data_dir() / "train.jsonl")
    rows = [tokenize_chat(tokenizer, ex["messages"]) for ex in train]
    schedule = length_grouped_batches([len(r["input_ids"]) for r in rows], batch, steps, seed=0)
    return [[{**rows[i], "messages": train[i]["messages"]} for i in b] for b in schedule]


def lora_model(model, r: int = 8):
    """The same LoRA init in every trainer: seed 0, r=8, alpha=16, all linear layers."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM"))


def step_flops(config, seq_lens: list[int], n_labels: int, r: int = 8) -> float:
    """FLOPs of one LoRA training step: forward + input-gradient backward through frozen GEMMs, LoRA
    weight gradients, attention, and the output head at labelled positions only."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    tokens = sum(seq_lens)
    frozen = sum(i * o for i, o in shapes)
    lora = sum(r * (i + o) for i, o in shapes)
    linear = layers * tokens * (4 * frozen + 6 * lora)  # fwd 2, bwd input 2; LoRA fwd 2 + bwd 4
    attention = layers * sum(3 * 2 * 2 * s * s * h for s in seq_lens)  # QK^T and AV, fwd + 2x bwd
    head = 2 * 2 * h * config.vocab_size * n_labels  # fwd + input-grad bwd
    return float(linear + attention + head)


def gemm_peak(n: int = 2048, reps: int = 10) -> float:
    """Measured fp32 GEMM FLOP/s on this machine (square n x n)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


# ---------------------------------------------------------------- the four trainers (one per subprocess)
# Each returns (loss per step, time.perf_counter() at the end of each step).


def run_labkit(model, tokenizer, data, amp_dtype=None):
    import torch

    from labkit.runtime import autocast
    from labkit.sft import assistant_loss, collate

    model = lora_model(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    losses, ends = [], []
    for rows in data:
        with autocast("cpu", amp_dtype):  # None: fp32, nothing changes
            loss, n = assistant_loss(model, collate(rows, tokenizer.pad_token_id))
        (loss / n).backward()
        opt.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item() / n), ends.append(time.perf_counter())
    return losses, ends


def run_plain_peft(model, tokenizer, data):
    import torch

    from labkit.sft import collate

    model = lora_model(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    losses, ends = [], []
    for rows in data:
        loss = model(**collate(rows, tokenizer.pad_token_id)).loss  # full logits, transformers' loss
        loss.backward()
        opt.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item()), ends.append(time.perf_counter())
    return losses, ends


def run_trl(model, tokenizer, data, tuned: bool, bf16: bool = False):
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    flat = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for rows in data for r in rows]
    kwargs = {"bf16": bf16, "gradient_checkpointing": False} if tuned else {}
    args = SFTConfig(output_dir="/tmp/labkit-bench-trl", report_to="none", per_device_train_batch_size=len(data[0]),
                     max_steps=len(data), learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0,
                     weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, save_strategy="no", use_cpu=True,
                     seed=0, **kwargs)
    losses: list[float] = []
    ends: list[float] = []

    class Log(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class InOrder(SFTTrainer):  # the same batches in the same order as the other trainers
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(model=lora_model(model), args=args, train_dataset=Dataset.from_list(flat),
                      processing_class=tokenizer, callbacks=[Log()])
    trainer.train()
    return losses, ends


TRAINERS = {
    "labkit": run_labkit,
    "plain peft loop": run_plain_peft,
    "TRL SFTTrainer defaults": lambda m, t, d: run_trl(m, t, d, tuned=False),
    "TRL tuned (fp32, no checkpointing)": lambda m, t, d: run_trl(m, t, d, tuned=True),
    "labkit bf16 mixed": lambda m, t, d: run_labkit(m, t, d, amp_dtype=__import__("torch").bfloat16),
    "TRL tuned (bf16, no checkpointing)": lambda m, t, d: run_trl(m, t, d, tuned=True, bf16=True),
}


def worker(name: str, steps: int, batch: int) -> None:
    """Run one trainer for 1 warm-up + `steps` timed steps; print a JSON line of measurements."""
    import torch

    from labkit.models import load_model
    from labkit.runtime import detect

    detect()
    model, tokenizer = load_model()
    data = batches(tokenizer, steps + 1, batch)
    start = time.perf_counter()
    losses, ends = TRAINERS[name](model, tokenizer, data)
    timed = data[1:]
    tokens = sum(len(r["input_ids"]) for rows in timed for r in rows)
    n_labels = sum(sum(l != -100 for l in r["labels"][1:]) for rows in timed for r in rows)
    flops = sum(step_flops(model.config, [len(r["input_ids"]) for r in rows], 0) for rows in timed)
    flops += 2 * 2 * model.config.hidden_size * model.config.vocab_size * n_labels
    print(json.dumps({
        "name": name, "losses": losses, "seconds": ends[-1] - ends[0], "first_step_s": ends[0] - start,
        "tokens": tokens, "flops": flops, "threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)  # 6 steps gave 1.7x and 2.2x vs TRL tuned an hour apart
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--worker")
    ap.add_argument("--only", nargs="+", choices=list(TRAINERS), help="run only these trainers (labkit always)")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.batch)
    peak = gemm_peak()
    results = []
    names = [n for n in TRAINERS if not args.only or n == "labkit" or n in args.only]
    for name in names:
        print(f"running {name} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(args.steps),
                               "--batch", str(args.batch)], capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode or not lines:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(lines[-1]))
        r = results[-1]
        print(f"  {r['tokens'] / r['seconds']:.0f} tokens/s, peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"loss at step {args.steps + 1}: {r['losses'][-1]:.4f}", flush=True)
    write_results(results, peak, args)


def write_results(results: list[dict], peak: float, args) -> None:
    """Print and write RESULTS.md: tokens/s, speed-ups, peak RSS, loss after K steps, labkit's MFU."""
    by = {r["name"]: r for r in results}
    lab = by["labkit"]
    speed = {n: r["tokens"] / r["seconds"] for n, r in by.items()}
    ref_loss = lab["losses"][-1]
    lines = [
        "# LoRA SFT throughput on this machine",
        "",
        f"`python benchmarks/sft_throughput.py --steps {args.steps} --batch {args.batch}`: SmolLM2-135M-Instruct, "
        f"LoRA r=8 all-linear, batch {args.batch} of the training split in labkit's length-grouped order, "
        f"1 warm-up step + {args.steps} timed steps, fp32 GEMM peak measured in the same run: "
        f"{peak / 1e9:.0f} GFLOP/s ({lab['threads']} threads).",
        "",
        "| trainer | tokens/s | vs labkit | peak RSS (MB) | loss after step K | diff vs labkit |",
        "|---|---|---|---|---|---|",
    ]
    for n, r in by.items():
        diff = (r["losses"][-1] - ref_loss) / ref_loss
        lines.append(f"| {n} | {speed[n]:.0f} | {speed[n] / speed['labkit']:.2f}x | {r['peak_rss_mb']:.0f} | "
                     f"{r['losses'][-1]:.4f} | {diff:+.2%} |")
    mfu = lab["flops"] / lab["seconds"] / peak
    lines += ["", f"labkit: {lab['flops'] / lab['seconds'] / 1e9:.0f} GFLOP/s achieved = **MFU {mfu:.0%}** of the "
              "measured fp32 GEMM peak."]
    ratios = [("labkit", "TRL tuned (fp32, no checkpointing)"), ("labkit", "TRL SFTTrainer defaults"),
              ("labkit", "plain peft loop"), ("labkit bf16 mixed", "labkit"),
              ("labkit bf16 mixed", "TRL tuned (bf16, no checkpointing)"), ("labkit bf16 mixed", "TRL SFTTrainer defaults")]
    lines += [f"{a} vs {b}: {speed[a] / speed[b]:.2f}x." for a, b in ratios if a in speed and b in speed]
    text = "\n".join(lines + [""])
    print(text)
    if not args.only:
        write_section("# LoRA SFT throughput", text)


def write_section(heading: str, text: str) -> None:
    """Replace the section of benchmarks/RESULTS.md that starts with `heading` (or append it); keep the others."""
    path = HERE / "RESULTS.md"
    old = path.read_text() if path.exists() else ""
    sections = ["# " + part for part in ("\n" + old).split("\n# ")[1:]]
    sections = [sec.rstrip("\n") + "\n" for sec in sections if not sec.startswith(heading)]
    sections.append(text.strip("\n") + "\n")
    path.write_text("\n".join(sections))


if __name__ == "__main__":
    main()
