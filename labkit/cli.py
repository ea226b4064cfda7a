"""`python -m labkit sft|dpo`: the notebooks' training loop as a command, alone or under torchrun / accelerate launch.

    python -m labkit sft --data data/train.jsonl --out runs/sft --steps 40 --checkpoint-every 10
    torchrun --nproc-per-node 2 -m labkit sft --data data/train.jsonl --config sft.yaml --out runs/sft
    accelerate launch --config_file configs/accelerate_cpu_2proc.yaml -m labkit sft --data ... --out ...

Settings are SFTConfig's (DPOConfig's for dpo) fields: their defaults, then a JSON or YAML --config file, then
flags. The run writes OUT/history.json (one record per step), OUT/checkpoint-N (if --checkpoint-every) and the
peft adapter in OUT/adapter. Running the same command again resumes from the latest checkpoint. Under a
launcher each process takes its shard of every global batch (--batch-size is the global batch) and only
process 0 writes. Every input is checked before the model loads: the data record by record (labkit.data),
the settings (SFTConfig's checks), the paths and the device. Bad input ends with one line on stderr and exit
status 2; a lost process with status 1; a bug in labkit with one line saying so (the traceback under --debug).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from labkit import LabkitError, distributed, settings
from labkit.checkpoint import latest_checkpoint, load_verified_adapter, save_adapter
from labkit.data import read_examples as read_checked
from labkit.dpo import DPOConfig, train_dpo
from labkit.models import load_model
from labkit.runtime import SMOLLM2_135M, check_device, pick_device, pick_dtype, requested_dtype
from labkit.settings import ConfigError, OneLineParser, UsageError
from labkit.sft import SFTConfig, train_sft

# What each command trains on: chat examples (messages) or preference pairs (prompt, chosen, rejected).
DATA_KIND = {"sft": "chat", "dpo": "pairs"}


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
    parser.add_argument("--debug", action="store_true", help="on an unexpected error, show its full traceback")
    if command == "dpo":
        parser.add_argument("--sft-adapter", help="an SFT adapter folder merged into the base first (the reference)")
    for f in fields(config_class(command)):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=flag_type(f.name, f.default), default=None,
                            help=f"default {f.default!r}")
    return parser


def read_config_file(path: str, command: str) -> dict:
    """The settings in a JSON or YAML file, checked against the config's field names (numbers written as text read)."""
    import yaml

    file = Path(path)
    if not file.is_file():
        what = "is a folder, not a config file" if file.is_dir() else "no such config file"
        raise LabkitError(f"{path}: {what}. Fix: check the path, or pass settings as flags")
    try:
        raw = file.read_bytes()
        text = raw.decode("utf-8-sig")
    except OSError as err:
        raise LabkitError(f"{path}: cannot be read ({err.strerror}). Fix: check the file's permissions") from None
    except UnicodeDecodeError as err:
        raise LabkitError(f"{path}: is not UTF-8 (byte {err.start} is {raw[err.start]:#04x}; Latin-1 or another "
                          "encoding?). Fix: re-save the file as UTF-8") from None
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise LabkitError(f"{path}: is not valid {'JSON' if path.endswith('.json') else 'YAML'} "
                          f"({str(err).splitlines()[0]}). Fix: write one `name: value` per setting") from None
    if not isinstance(values, dict):
        what = "nothing" if values is None else f"a {type(values).__name__}"
        raise LabkitError(f"{path}: holds {what}, not settings. Fix: write one `name: value` line per setting")
    known = {f.name: f.default for f in fields(config_class(command))}
    if unknown := [name for name in values if name not in known]:
        raise LabkitError(f"{path}: {unknown[0]!r} is not a {command} setting. Fix: use some of {sorted(known)}")
    return {name: from_text(value, flag_type(name, known[name])) for name, value in values.items()}


def from_text(value: Any, kind: Any) -> Any:
    """A value a file wrote as text, read as its flag would be: `lr: 1e-3` (a string to YAML) as a number,
    `target_modules: q_proj,v_proj` as a list; anything else as it is."""
    if isinstance(value, str) and kind is module_names:
        return module_names(value)
    if isinstance(value, str) and kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            return value  # the config's own check names it
    return value


def build_config(args: argparse.Namespace, command: str):
    """The run's config: defaults, then the --config file, then flags; a bad value names the flag or file it came from."""
    from_file = read_config_file(args.config, command) if args.config else {}
    from_flags = {f.name: getattr(args, f.name) for f in fields(config_class(command)) if getattr(args, f.name) is not None}
    try:
        return config_class(command)(**(from_file | from_flags))
    except ConfigError as err:
        names = err.name.split(" x ")  # one field, or a product of two ("steps x grad_accum")
        if len(names) == 1 and err.name in from_flags:
            raise UsageError(f"--{err.name.replace('_', '-')} {as_typed(err.value)}: must be {err.rule}") from None
        if len(names) > 1 and set(names) & set(from_flags):
            flags = " x ".join(f"--{name.replace('_', '-')}" for name in names)
            raise UsageError(f"{flags} = {err.value!r}: must be {err.rule}") from None
        raise LabkitError(f"{args.config or 'the settings'}: {err.name} = {err.value!r}: must be {err.rule}") from None


def as_typed(value: Any) -> str:
    """A flag's value as it was typed: 'nan', '0', 'q_proj,v_proj'."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def read_examples(path: str, command: str, max_length: int | None = None) -> list[dict]:
    """The examples of a JSONL file, each checked to be the command's kind (chat for sft, pairs for dpo) and to fit."""
    return read_checked(path, DATA_KIND[command], max_length)


def check_paths(args: argparse.Namespace, command: str) -> None:
    """Refuse, before any compute, paths the run could not write or read: --out, its files, the SFT adapter."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise LabkitError(f"--out {out}: is a file, not a folder. Fix: choose another --out, or move that file")
    for name, kind in (("history.json", "file"), ("adapter", "folder")):
        taken = out / name
        if taken.exists() and (taken.is_dir() if kind == "file" else not taken.is_dir()):
            raise LabkitError(f"{taken}: is a {'folder' if kind == 'file' else 'file'} where the run writes its "
                              f"{name} {kind}. Fix: move or delete it, or choose another --out")
    adapter = getattr(args, "sft_adapter", None)
    if adapter is not None:
        folder = Path(adapter)
        if not folder.exists():
            raise LabkitError(f"--sft-adapter {adapter}: no such folder. Fix: pass the folder an SFT run saved its "
                              "adapter in (e.g. runs/sft/adapter)")
        if not (folder / "adapter_config.json").is_file():
            what = "is a file, not an adapter folder" if folder.is_file() else "holds no adapter_config.json"
            raise LabkitError(f"--sft-adapter {adapter}: {what}. Fix: pass the folder an SFT run saved its adapter in "
                              "(the one with adapter_config.json)")


def check_run_options(args: argparse.Namespace) -> None:
    """Refuse run options no run can use: --threads and --as-processes must be whole numbers >= 1."""
    for flag, value in (("--threads", args.threads), ("--as-processes", args.as_processes)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: must be an integer >= 1")


def check_target_modules(model, target_modules: str | list[str]) -> None:
    """Refuse layer names the model does not have, listing the ones it has (before peft fails on them)."""
    if target_modules == "all-linear":
        return
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and name})
    if unknown := [name for name in target_modules if name not in linear]:
        raise LabkitError(f"target_modules: {unknown[0]!r} is not a layer of this model. Fix: use 'all-linear' or "
                          f"some of {linear}")


def load_base(args: argparse.Namespace, device: str):
    """The base model and tokenizer on this process's device (DPO: with the SFT adapter merged in)."""
    model, tokenizer = load_model(args.model or SMOLLM2_135M, dtype=pick_dtype(device.split(":")[0]), device=device)
    if getattr(args, "sft_adapter", None):
        model = load_verified_adapter(model, args.sft_adapter).merge_and_unload()  # its checksums checked first
    return model, tokenizer


def train(command: str, argv: list[str]) -> int:
    """Parse, load, train with labkit.sft.train_loop, and (process 0) save history and adapter."""
    args = parser_for(command).parse_args(argv)
    check_run_options(args)
    requested_dtype()  # LABKIT_DTYPE is read mid-run on a CPU: check it now, with LABKIT_THREADS below
    config = build_config(args, command)
    check_paths(args, command)
    examples = read_examples(args.data, command, config.max_length)
    validation = read_examples(args.validation, command, config.max_length) if args.validation else None
    if threads := args.threads or settings.threads():
        torch.set_num_threads(threads)
    device = distributed.start(check_device(pick_device() if args.device == "auto" else args.device))
    shares = max(distributed.world_size(), args.as_processes)
    if config.batch_size < shares:
        raise LabkitError(f"batch_size={config.batch_size} is the global batch, shared among {shares} processes. "
                          f"Fix: use --batch-size {shares} or more")
    model, tokenizer = load_base(args, device)
    check_target_modules(model, config.target_modules)
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
    """Run `command` (sft or dpo); a lost process is one line and status 1. A LabkitError (bad input) goes up to
    labkit.__main__, which prints it as one line with status 2."""
    if distributed.launched():
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return train(command, argv)
    except (MemoryError, torch.cuda.OutOfMemoryError) as err:
        what = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise LabkitError(f"out of memory while training ({what}). Fix: lower --batch-size or --max-length "
                          "(raise --grad-accum to keep the batch)") from None
    except (Stopped, RuntimeError) as err:  # gloo/NCCL raise RuntimeError (DistBackendError) when a peer is gone
        if not distributed.launched():
            raise
        out = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"), None)
        print(f"error: {lost_peer_message(err, out)}", file=sys.stderr)
        return 1
