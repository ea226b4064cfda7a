"""`python -m labkit sft|dpo`: the notebooks' training loop as a command, alone or under torchrun / accelerate launch.

    python -m labkit sft --data data/train.jsonl --out runs/sft --steps 40 --checkpoint-every 10
    torchrun --nproc-per-node 2 -m labkit sft --data data/train.jsonl --config sft.yaml --out runs/sft
    accelerate launch --config_file configs/accelerate_cpu_2proc.yaml -m labkit sft --data ... --out ...

Settings are SFTConfig's (DPOConfig's for dpo) fields: their defaults, then a JSON or YAML --config file, then
flags. The run writes OUT/history.json (one record per step), OUT/checkpoint-N (if --checkpoint-every) and the
peft adapter in OUT/adapter. Running the same command again resumes from the latest checkpoint. Under a
launcher each process takes its shard of every global batch (--batch-size is the global batch) and only
process 0 writes. Bad input ends with one line on stderr and exit status 2; a lost process with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from labkit import LabkitError, distributed
from labkit.checkpoint import latest_checkpoint, save_adapter
from labkit.data import read_jsonl
from labkit.dpo import DPOConfig, train_dpo
from labkit.models import load_model
from labkit.runtime import SMOLLM2_135M, pick_device, pick_dtype
from labkit.sft import SFTConfig, train_sft

# What each command's data lines hold (lists of chat messages).
DATA_FIELDS = {"sft": ("messages",), "dpo": ("prompt", "chosen", "rejected")}


class UsageError(LabkitError):
    """The command line itself is wrong (unknown flag, missing value)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a UsageError (one line, exit status 2) instead of usage text."""

    def error(self, message: str) -> None:
        raise UsageError(f"{self.prog}: {message}. Fix: see `{self.prog} --help`")


def config_class(command: str) -> type:
    """SFTConfig for sft, DPOConfig for dpo."""
    return DPOConfig if command == "dpo" else SFTConfig


def module_names(text: str) -> str | list[str]:
    """--target-modules: 'all-linear', or comma-separated layer names ('q_proj,v_proj')."""
    return text if text == "all-linear" else text.split(",")


def flag_type(name: str, default: Any):
    """The argparse type of a config field: from its default (int, float, str), target_modules a list."""
    if name == "target_modules":
        return module_names
    if default is None or isinstance(default, int):
        return int
    return float if isinstance(default, float) else str


def parser_for(command: str) -> OneLineParser:
    """The command's flags: data, output, config file, run options, and one flag per config field."""
    parser = OneLineParser(prog=f"python -m labkit {command}", description=__doc__.split("\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", required=True, help="training examples, one JSON object per line")
    parser.add_argument("--validation", help="held-out examples in the same format (validation loss, best adapter)")
    parser.add_argument("--out", required=True, help="folder for history.json, checkpoints and the adapter")
    parser.add_argument("--config", help="a .json or .yaml file of settings (flags override it)")
    parser.add_argument("--model", default=None, help="base model: a Hub id or a local folder (default: SmolLM2-135M)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: LABKIT_THREADS)")
    parser.add_argument("--fresh", action="store_true", help="ignore checkpoints in --out and start over")
    parser.add_argument("--as-processes", type=int, default=1, metavar="N",
                        help="alone: take each global batch as N processes would (their shards accumulated), "
                             "the bit-exact reference for a run on N processes")
    if command == "dpo":
        parser.add_argument("--sft-adapter", help="an SFT adapter folder merged into the base first (the reference)")
    for f in fields(config_class(command)):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=flag_type(f.name, f.default), default=None,
                            help=f"default {f.default!r}")
    return parser


def read_config_file(path: str, command: str) -> dict:
    """The settings in a JSON or YAML file, checked against the config's field names."""
    import yaml

    text = Path(path).read_text(encoding="utf-8") if Path(path).is_file() else None
    if text is None:
        raise LabkitError(f"{path}: no such config file. Fix: check the path, or pass settings as flags")
    try:
        settings = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise LabkitError(f"{path}: is not valid {'JSON' if path.endswith('.json') else 'YAML'} "
                          f"({str(err).splitlines()[0]}). Fix: write one `name: value` per setting") from None
    if not isinstance(settings, dict):
        raise LabkitError(f"{path}: holds a {type(settings).__name__}, not settings. Fix: write `name: value` lines")
    known = {f.name for f in fields(config_class(command))}
    if unknown := sorted(set(settings) - known):
        raise LabkitError(f"{path}: {unknown[0]!r} is not a {command} setting. Fix: use some of {sorted(known)}")
    return settings


def build_config(args: argparse.Namespace, command: str):
    """The run's config: defaults, then the --config file, then flags."""
    settings = read_config_file(args.config, command) if args.config else {}
    settings |= {f.name: getattr(args, f.name) for f in fields(config_class(command)) if getattr(args, f.name) is not None}
    return config_class(command)(**settings)


def read_examples(path: str, command: str) -> list[dict]:
    """The examples of a JSONL file, checked to be the command's kind (chat messages for sft, pairs for dpo)."""
    records = read_jsonl(path)
    if not records:
        raise LabkitError(f"{path}: holds no examples. Fix: pass a .jsonl file with one example per line")
    need = DATA_FIELDS[command]
    for line, record in enumerate(records, 1):
        if missing := [k for k in need if not isinstance(record.get(k), list)]:
            other = next((c for c, keys in DATA_FIELDS.items()
                          if c != command and all(isinstance(record.get(k), list) for k in keys)), None)
            fix = (f"this is {other} data: run `python -m labkit {other}`" if other
                   else f"each line needs {', '.join(need)} (lists of chat messages)")
            raise LabkitError(f"{path}:{line}:{missing[0]}: missing or not a list of chat messages, which "
                              f"`labkit {command}` needs. Fix: {fix}")
    return records


def load_base(args: argparse.Namespace, device: str):
    """The base model and tokenizer on this process's device (DPO: with the SFT adapter merged in)."""
    model, tokenizer = load_model(args.model or SMOLLM2_135M, dtype=pick_dtype(device.split(":")[0]), device=device)
    if getattr(args, "sft_adapter", None):
        model = PeftModel.from_pretrained(model, args.sft_adapter).merge_and_unload()
    return model, tokenizer


def train(command: str, argv: list[str]) -> int:
    """Parse, load, train with labkit.sft.train_loop, and (process 0) save history and adapter."""
    args = parser_for(command).parse_args(argv)
    config = build_config(args, command)
    examples = read_examples(args.data, command)
    validation = read_examples(args.validation, command) if args.validation else None
    if args.threads or os.environ.get("LABKIT_THREADS"):
        torch.set_num_threads(args.threads or int(os.environ["LABKIT_THREADS"]))
    device = distributed.start(pick_device() if args.device == "auto" else args.device)
    if config.batch_size < distributed.world_size():
        raise LabkitError(f"batch_size={config.batch_size} is the global batch, shared among "
                          f"{distributed.world_size()} processes. Fix: use --batch-size {distributed.world_size()} or more")
    model, tokenizer = load_base(args, device)
    out = Path(args.out)
    options = dict(out_dir=out, resume=not args.fresh, plot=False, progress=distributed.is_main())
    with distributed.simulate(args.as_processes) if args.as_processes > 1 else nullcontext():
        if command == "dpo":
            result = train_dpo(model, tokenizer, examples, validation, config, **options)
        else:
            result = train_sft(model, tokenizer, examples, validation, config, **options)
    if distributed.is_main():
        (out / "history.json").write_text(json.dumps(result.history, indent=1))
        run = {"command": command, "config": asdict(config), "data": args.data, "processes": distributed.world_size(),
               "as_processes": args.as_processes,
               "best_step": result.best_step, "history": result.history}
        save_adapter(result.model, out / "adapter", run)
        last = result.history[-1] if result.history else {}
        print(f"{command}: {len(result.history)} steps on {distributed.world_size()} process(es), final loss "
              f"{last.get('loss', float('nan')):.4f}; adapter saved to {out / 'adapter'}")
    distributed.stop()
    return 0


class Stopped(Exception):
    """The launcher asked this process to stop (SIGTERM), usually because another process failed."""


def on_sigterm(signum: int, frame: Any) -> None:
    """Turn the launcher's SIGTERM into an exception, so the process can say where the run stopped."""
    raise Stopped()


def lost_peer_message(err: BaseException, out: str | None) -> str:
    """One line for a process whose peers died: what happened, where the last checkpoint is, how to go on."""
    last = latest_checkpoint(Path(out)) if out else None
    cause = "stopped by the launcher" if isinstance(err, Stopped) else str(err).strip().splitlines()[0][:160]
    where = f"the last checkpoint is {last}" if last else "no checkpoint was written yet"
    return (f"process {distributed.rank()} of {distributed.world_size()} lost the run ({cause}): another process "
            f"died; {where}. Fix: rerun the same command; it resumes from the latest checkpoint")


def main(command: str, argv: list[str]) -> int:
    """Run `command` (sft or dpo); a LabkitError is one line on stderr and exit status 2, a lost process status 1."""
    if distributed.launched():
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return train(command, argv)
    except LabkitError as err:
        lines = str(err).splitlines()
        more = f" (and {len(lines) - 2} more; `python -m labkit validate FILE` lists them)" if len(lines) > 2 else ""
        print(f"error: {' '.join(lines[:2])}{more}", file=sys.stderr)
        return 2
    except (Stopped, RuntimeError) as err:  # gloo/NCCL raise RuntimeError (DistBackendError) when a peer is gone
        if not distributed.launched():
            raise
        out = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"), None)
        print(f"error: {lost_peer_message(err, out)}", file=sys.stderr)
        return 1
