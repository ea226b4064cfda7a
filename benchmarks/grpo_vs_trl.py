"""labkit's GRPO loop against trl.GRPOTrainer: the same short run, seconds per step and reward per step.

Both start from SmolLM2-135M-Instruct with a fresh LoRA adapter (r=8, alpha=16, all linear layers), see the same
prompts (notebook 10's: one worked example, then a training ticket), draw k replies per prompt at temperature 1,
score them with the same reward functions (labkit.grpo's format + schema, handed to TRL through `for_trl`), and
take one AdamW step per batch with the "dapo" loss, beta = 0, clip 0.2, gradient norm 1. What differs: the order
in which prompts are drawn (each loop's own sampler, same pool), the random replies themselves, and the first
step's learning rate (labkit: one warmup step at the full rate; transformers' scheduler starts that step at 0).
TRL generates with `model.generate` (no vLLM on a CPU); labkit with its own KV-cached sampler.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/grpo_vs_trl.py [--steps 8] [--prompts 4] [--k 4]
        [--max-new-tokens 48] [--lr 1e-3] [--threads 2] [--out benchmarks/grpo_vs_trl.json]

Run it on a quiet machine: both loops are compute-bound on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def examples(pool: int):
    """Notebook 10's GRPO prompts: one worked example, then the ticket; the right answer last (for `fields`)."""
    from labkit.data import read_jsonl
    from labkit.paths import data_dir
    from labkit.tickets import prompt_conversations

    train = read_jsonl(data_dir() / "train.jsonl")
    tickets = train[200: 200 + pool]
    return [{"messages": c + ex["messages"][-1:]} for c, ex in
            zip(prompt_conversations(tickets, shots=train[100:101]), tickets)]


def run_labkit(args, rows) -> dict:
    """labkit.grpo.train_grpo: per-step rewards and the seconds each step took."""
    from labkit.grpo import GRPOConfig, train_grpo
    from labkit.models import load_model

    model, tokenizer = load_model(args.model, dtype=torch.float32)
    config = GRPOConfig(steps=args.steps, prompts_per_step=args.prompts, k=args.k, max_new_tokens=args.max_new_tokens,
                        lr=args.lr, rewards=("format", "schema"), log_kl=False, micro_batch=args.prompts * args.k)
    start = time.perf_counter()
    result = train_grpo(model, tokenizer, rows, config, plot=False, progress=False)
    seconds = time.perf_counter() - start
    history = result.history
    ends = [h["seconds"] for h in history]
    return {"reward": [h["reward"] for h in history], "step_seconds": [b - a for a, b in zip([0.0] + ends, ends)],
            "total_seconds": seconds, "completion_tokens": [h["completion_tokens"] for h in history]}


def run_trl(args, rows) -> dict:
    """trl.GRPOTrainer on the same model, prompts, rewards and settings."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig as TRLGRPOConfig, GRPOTrainer

    from labkit.grpo import for_trl, format_reward, schema_reward
    from labkit.models import load_model

    model, tokenizer = load_model(args.model, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": r["messages"][:-1]} for r in rows])
    trl_args = TRLGRPOConfig(output_dir=tempfile.mkdtemp(prefix="labkit-grpo-trl-"), report_to="none", use_cpu=True,
                             bf16=False, max_steps=args.steps, per_device_train_batch_size=args.prompts * args.k,
                             num_generations=args.k, gradient_accumulation_steps=1,
                             max_completion_length=args.max_new_tokens, temperature=1.0, learning_rate=args.lr,
                             lr_scheduler_type="cosine", warmup_steps=1, beta=0.0, loss_type="dapo", epsilon=0.2,
                             max_grad_norm=1.0, logging_steps=1, save_strategy="no", seed=0, weight_decay=0.0)
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            marks.append(time.perf_counter())

    trainer = GRPOTrainer(model=model, reward_funcs=[for_trl(format_reward), for_trl(schema_reward)], args=trl_args,
                          train_dataset=data, processing_class=tokenizer, callbacks=[Clock()],
                          peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"reward": [h["reward"] for h in logs], "step_seconds": [b - a for a, b in zip([start] + marks, marks)],
            "total_seconds": seconds, "completion_tokens": [h.get("completions/mean_length") for h in logs]}


def main() -> None:
    from labkit.runtime import SMOLLM2_135M

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SMOLLM2_135M)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pool", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = examples(args.pool)
    results = {}
    for name, run in [("labkit", run_labkit), ("trl", run_trl)]:
        torch.manual_seed(0)
        results[name] = run(args, rows)
        r = results[name]
        per_step = statistics.median(r["step_seconds"])
        print(f"{name:6s} median {per_step:5.1f} s/step, {r['total_seconds']:6.1f} s in all; reward per step "
              f"{[round(x, 2) for x in r['reward']]}", flush=True)
    median = {n: statistics.median(r["step_seconds"]) for n, r in results.items()}
    print(f"TRL / labkit seconds per step (medians): {median['trl'] / median['labkit']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
