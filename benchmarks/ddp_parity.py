"""Issue 19's parity figures: `labkit sft` on 2 processes (torchrun, gloo) against one process, on the course data.

Three runs of the same 10 steps and global batches (SmolLM2-135M, 1 thread per process):
  two       torchrun --nproc-per-node 2 -m labkit sft ...
  one       python -m labkit sft ...                       (one forward of the whole global batch)
  one_as_2  python -m labkit sft ... --as-processes 2      (one process, each global batch as two shards, accumulated)
Prints the largest relative loss difference over the steps and the largest |logit difference| of the saved
adapters (loaded with PeftModel.from_pretrained) on 4 validation examples.

    .venv/bin/python benchmarks/ddp_parity.py [--launcher accelerate] [--out /tmp/ddp-parity]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LABKIT_THREADS": "1", "TQDM_DISABLE": "1"}
ARGS = ["-m", "labkit", "sft", "--data", str(ROOT / "data" / "train.jsonl"), "--steps", "10", "--batch-size", "4",
        "--max-length", "128", "--checkpoint-every", "5", "--device", "cpu", "--fresh"]


def run(name: str, out: Path, launcher: str) -> list[float]:
    """Train one variant into out/name; its losses per step."""
    if name == "two" and launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate_cpu_2proc.yaml"), *ARGS]
    elif name == "two":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *ARGS]
    else:
        cmd = [sys.executable, *ARGS, *(["--as-processes", "2"] if name == "one_as_2" else [])]
    subprocess.run([*cmd, "--out", str(out / name)], cwd=ROOT, env=ENV, check=True)
    return [h["loss"] for h in json.loads((out / name / "history.json").read_text())]


def logits(adapter: Path, batch: dict) -> torch.Tensor:
    """The logits of the base model with a saved adapter, loaded the way users load it."""
    from peft import PeftModel

    from labkit.models import load_model

    base, _ = load_model(device="cpu")
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--launcher", choices=["torchrun", "accelerate"], default="torchrun")
    parser.add_argument("--out", default="/tmp/ddp-parity")
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    losses = {name: run(name, out, args.launcher) for name in ("two", "one", "one_as_2")}

    from labkit.data import load_split
    from labkit.models import load_model

    _, tokenizer = load_model(device="cpu")
    texts = [tokenizer.apply_chat_template(ex["messages"], tokenize=False) for ex in load_split("validation")[:4]]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    out_logits = {name: logits(out / name / "adapter", batch) for name in losses}
    mask = batch["attention_mask"].bool()
    print(f"launcher: {args.launcher}; 10 steps, global batch 4, 2 processes vs 1, gloo, 1 thread per process")
    for ref in ("one", "one_as_2"):
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses["two"], losses[ref]))
        diff = (out_logits["two"] - out_logits[ref]).abs()[mask]
        print(f"two vs {ref:<9} losses: max relative diff {rel:.2e} (identical: {losses['two'] == losses[ref]}); "
              f"adapter logits on 4 validation examples: max |diff| {diff.max():.2e} "
              f"(largest |logit| {out_logits[ref].abs()[mask].max():.1f})")
    print("final losses:", {k: v[-1] for k, v in losses.items()})


if __name__ == "__main__":
    main()
