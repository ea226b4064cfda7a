"""Greedy generation throughput on the test tickets: labkit's `generate` vs transformers' `model.generate`.

The prompts are 05's: `prompt_conversations(test)`, greedy, up to --max-new-tokens each. Rows:
`model.generate` one prompt at a time (the reference replies), `model.generate` batched with left padding
(finished rows keep computing pad tokens), labkit's `generate` (length-sorted batches, KV cache, finished rows
leave the batch), and labkit's `generate` under bf16 autocast (mixed precision; compared, not required equal).
Tokens/s counts generated tokens up to and including end of turn. Writes its section of benchmarks/RESULTS.md.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generate_throughput.py [--limit 200] [--batch 32]
        [--max-new-tokens 48] [--adapter PATH] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def reference_replies(model, tokenizer, conversations, max_new_tokens: int, batch: int) -> tuple[list[list[int]], float, float]:
    """Token ids from `model.generate` (batch 1 if batch == 1, else left-padded batches), wall and CPU seconds."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    out: list[list[int]] = []
    start, cpu = time.perf_counter(), time.process_time()
    for b in range(0, len(texts), batch):
        enc = tokenizer(texts[b : b + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row in gen[:, enc["input_ids"].shape[1] :].tolist():
            out.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    return out, time.perf_counter() - start, time.process_time() - cpu


def labkit_replies(model, tokenizer, conversations, max_new_tokens: int, batch: int) -> tuple[list[list[int]], float, float]:
    """Token ids from labkit's batched greedy decoding (what `labkit.evaluate.generate` runs), wall and CPU seconds."""
    from labkit.evaluate import greedy_batch
    from labkit.runtime import model_autocast

    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=True)["input_ids"]
               for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad(), model_autocast(model):
        for b in range(0, len(order), batch):
            idx = order[b : b + batch]
            for i, row in zip(idx, greedy_batch(model, [prompts[i] for i in idx], max_new_tokens,
                                                tokenizer.eos_token_id, tokenizer.pad_token_id)):
                out[i] = row
    return out, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--adapter", help="a saved LoRA adapter folder to generate with (default: the base model)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("LABKIT_THREADS", 2)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from labkit.data import load_split
    from labkit.models import load_model
    from labkit.tickets import prompt_conversations

    model, tokenizer = load_model()
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
    conversations = prompt_conversations(load_split("test")[: args.limit])
    n, k = len(conversations), args.max_new_tokens
    runs = {}
    os.environ["LABKIT_DTYPE"] = "fp32"
    with torch.no_grad():
        runs["model.generate, batch 1"] = reference_replies(model, tokenizer, conversations, k, 1)
        print("model.generate batch 1 done", flush=True)
        runs[f"model.generate, batch {args.batch}"] = reference_replies(model, tokenizer, conversations, k, args.batch)
        print("model.generate batched done", flush=True)
    runs[f"labkit generate, batch {args.batch}"] = labkit_replies(model, tokenizer, conversations, k, args.batch)
    os.environ["LABKIT_DTYPE"] = "bf16"
    runs[f"labkit generate, batch {args.batch}, bf16 autocast"] = labkit_replies(model, tokenizer, conversations, k,
                                                                                 args.batch)
    os.environ.pop("LABKIT_DTYPE")

    ref, base_s, base_cpu = runs["model.generate, batch 1"]
    base_speed, base_cpu_speed = sum(map(len, ref)) / base_s, sum(map(len, ref)) / base_cpu
    lines = [
        "",
        "# Greedy generation throughput",
        "",
        f"`python benchmarks/generate_throughput.py --limit {args.limit} --batch {args.batch} --max-new-tokens {k}"
        f"{' --adapter ' + args.adapter if args.adapter else ''}`: {n} test-ticket prompts (05's), "
        f"{'adapter ' + args.adapter if args.adapter else 'base SmolLM2-135M-Instruct'}, "
        f"{torch.get_num_threads()} threads. Identical = same token ids as `model.generate` at batch 1. CPU seconds "
        "(process time, all threads) are less distorted than wall seconds when other jobs share the machine.",
        "",
        "| method | wall s | CPU s | tokens | tokens/s (wall) | vs batch 1 (wall) | vs batch 1 (CPU) | identical replies |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (tokens, seconds, cpu) in runs.items():
        count = sum(map(len, tokens))
        same = sum(a == b for a, b in zip(tokens, ref))
        lines.append(f"| {name} | {seconds:.1f} | {cpu:.1f} | {count} | {count / seconds:.0f} | "
                     f"{count / seconds / base_speed:.2f}x | {count / cpu / base_cpu_speed:.2f}x | {same}/{n} |")
    text = "\n".join(lines) + "\n"
    print(text)
    from sft_throughput import write_section

    write_section("# Greedy generation throughput", text)


if __name__ == "__main__":
    main()
