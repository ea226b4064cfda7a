"""Where one labkit LoRA step spends its time: GEMM vs attention vs elementwise vs optimizer vs Python.

torch.profiler over --steps steps (after 2 warm-up steps) of labkit's SFT step (batch 8 of the training split,
LoRA r=8 all-linear, as benchmarks/sft_throughput.py). Op self-times are grouped by op name; the optimizer is
everything inside AdamW.step; "Python and framework" is the wall time no op accounts for (autograd engine,
module calls, peft's wrappers, dispatch). Also times AdamW's implementations (for-loop, foreach, fused).
--precision bf16 runs the step under labkit's CPU autocast (bf16 matmuls, attention in fp32); bf16-attention under
plain torch.autocast (attention in bf16 too), the comparison behind labkit's choice (benchmarks/RESULTS.md).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/profile_step.py [--steps 3] [--batch 8] [--threads 2]
        [--precision fp32|bf16|bf16-attention]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkldnn", "mkldnn")
ATTENTION = ("scaled_dot_product", "flash_attention", "_efficient_attention")


def category(op: str) -> str:
    """Which bucket an op's self time goes to."""
    if any(op.startswith(g) or g in op for g in GEMM):
        return "GEMM"
    if any(a in op for a in ATTENTION):
        return "attention"
    return "elementwise and other ops"


def precision_context(precision: str):
    """The autocast context of a precision: none (fp32), labkit's (bf16), or plain torch.autocast (bf16-attention)."""
    from contextlib import nullcontext

    from labkit.runtime import autocast

    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return autocast("cpu", torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16)


def one_step(model, opt, batch, precision: str = "fp32") -> None:
    """labkit's SFT step: forward + summed loss, backward of the mean, AdamW."""
    from labkit.sft import assistant_loss

    with record_function("forward"), precision_context(precision):
        loss, n = assistant_loss(model, batch)
    with record_function("backward"):
        (loss / n).backward()
    with record_function("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16", "bf16-attention"], default="fp32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sft_throughput import batches, lora_model

    from labkit.models import load_model
    from labkit.sft import collate

    model, tokenizer = load_model()
    model = lora_model(model)
    data = [collate(rows, tokenizer.pad_token_id) for rows in batches(tokenizer, args.steps + 2, args.batch)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4)
    model.train()
    for batch in data[:2]:
        one_step(model, opt, batch, args.precision)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for batch in data[2:]:
            one_step(model, opt, batch, args.precision)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    optimizer = next(e.cpu_time_total for e in events if e.key == "optimizer") / 1e6
    buckets = {"GEMM": 0.0, "attention": 0.0, "elementwise and other ops": 0.0}
    for e in prof.events():  # ops outside the optimizer, by self time
        if e.name in ("forward", "backward", "optimizer") or e.name.startswith("Optimizer"):
            continue
        buckets[category(e.name)] += e.self_cpu_time_total / 1e6
    in_optimizer_ops = sum(e.self_cpu_time_total for e in prof.events()
                           if e.name not in ("forward", "backward", "optimizer") and inside(e, "optimizer")) / 1e6
    buckets["elementwise and other ops"] -= in_optimizer_ops
    buckets["optimizer (AdamW.step + zero_grad)"] = optimizer
    buckets["Python and framework (not in any op)"] = wall - sum(buckets.values())
    print(f"\n{args.steps} profiled {args.precision} steps, batch {args.batch}, {torch.get_num_threads()} threads: "
          f"{wall / args.steps:.2f} s/step (profiler on)\n")
    print("| part | s/step | share |\n|---|---|---|")
    for name, seconds in buckets.items():
        print(f"| {name} | {seconds / args.steps:.3f} | {seconds / wall:.0%} |")
    print("\ntop ops by self time:")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    time_optimizers(model, trainable)


def inside(event, name: str) -> bool:
    """Whether a profiler event runs inside the record_function range `name`."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def time_optimizers(model, trainable: list[torch.Tensor], reps: int = 10) -> None:
    """Seconds per AdamW step over the LoRA parameters: for-loop (labkit's), foreach, fused."""
    for p in trainable:
        p.grad = torch.randn_like(p)
    print("\n| AdamW implementation | ms/step |\n|---|---|")
    for label, kwargs in [("for-loop (default on CPU)", {"foreach": False}), ("foreach", {"foreach": True}),
                          ("fused", {"fused": True})]:
        opt = torch.optim.AdamW(trainable, lr=1e-9, **kwargs)
        opt.step()
        start = time.perf_counter()
        for _ in range(reps):
            opt.step()
        print(f"| {label} | {(time.perf_counter() - start) / reps * 1e3:.1f} |")


if __name__ == "__main__":
    main()
