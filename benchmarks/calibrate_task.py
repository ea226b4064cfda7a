"""Is the running task well calibrated? Prompt-only baselines should be poor, a few CPU minutes
of LoRA SFT (a plain loop) should reach >= 85 % field accuracy on the test split.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/calibrate_task.py [--budget 180] [--n-test 200]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from peft import LoraConfig, get_peft_model

from labkit.data import read_jsonl
from labkit.evaluate import generate, score_triage
from labkit.models import load_model
from labkit.paths import data_dir
from labkit.runtime import detect
from labkit.tickets import INSTRUCTIONS, label_of, prompt_conversations as prompts

def encode(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """Token ids and labels with everything but the assistant answer masked (-100)."""
    msgs = example["messages"]
    prompt = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(msgs, return_dict=True)["input_ids"]
    return full, [-100] * len(prompt) + full[len(prompt):]


def quick_sft(model, tokenizer, train: list[dict], budget_s: float, steps: int, batch: int, lr: float):
    """A plain LoRA SFT loop that stops after `steps` steps or `budget_s` seconds."""
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    data = sorted((encode(tokenizer, ex) for ex in train[: steps * batch]), key=lambda x: len(x[0]))
    batches = [data[i:i + batch] for i in range(0, len(data), batch)]
    torch.manual_seed(0)
    order = torch.randperm(len(batches)).tolist()
    model.train()
    start, tokens, step = time.perf_counter(), 0, 0
    for step, b in enumerate(order, 1):
        width = max(len(x) for x, _ in batches[b])
        ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x, _ in batches[b]])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batches[b]])
        mask = (torch.arange(width)[None] < torch.tensor([len(x) for x, _ in batches[b]])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        tokens += int(mask.sum())
        if step % 10 == 0:
            print(f"  step {step}: loss {loss.item():.3f}, {tokens / (time.perf_counter() - start):.0f} tok/s", flush=True)
        if time.perf_counter() - start > budget_s:
            break
    return model, step, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=180.0, help="training seconds (wall clock)")
    ap.add_argument("--steps", type=int, default=72)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--skip-baselines", action="store_true")
    args = ap.parse_args()
    print(detect())
    data = data_dir()
    train, test = read_jsonl(data / "train.jsonl"), read_jsonl(data / "test.jsonl")[: args.n_test]
    golds = [label_of(ex) for ex in test]
    model, tokenizer = load_model()
    rows = []
    if not args.skip_baselines:
        for name, shots in [("zero-shot + instructions", []), ("few-shot (3) + instructions", train[:3])]:
            t0 = time.perf_counter()
            replies = generate(model, tokenizer, prompts(test, INSTRUCTIONS, shots), progress=False)
            rows.append((name, score_triage(replies, golds), time.perf_counter() - t0))
            print(rows[-1])
    model, steps, secs = quick_sft(model, tokenizer, train, args.budget, args.steps, args.batch, args.lr)
    print(f"trained {steps} steps x {args.batch} examples in {secs:.0f} s")
    t0 = time.perf_counter()
    replies = generate(model, tokenizer, [ex["messages"][:2] for ex in test], progress=False)
    rows.append((f"LoRA SFT, {steps} steps, {secs:.0f} s", score_triage(replies, golds), time.perf_counter() - t0))
    print({k: round(v, 3) for k, v in rows[-1][1].items()})
    misses = [(r, g) for r, g in zip(replies, golds) if score_triage([r], [g])["exact_match"] < 1]
    for r, g in misses[:8]:
        print(f"  got  {r}\n  want {g}")
    print(f"\n{'model':32s} {'json_valid':>10s} {'field_acc':>10s} {'exact':>7s} {'eval s':>7s}")
    for name, s, t in rows:
        print(f"{name:32s} {s['json_valid']:10.1%} {s['field_acc']:10.1%} {s['exact_match']:7.1%} {t:7.0f}")


if __name__ == "__main__":
    main()
