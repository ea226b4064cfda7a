"""`python -m labkit`: make sure the course model is available; `python -m labkit validate FILE`: check a data file.

Any LabkitError ends the command with its one-line message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from labkit import LabkitError


def validate(argv: list[str]) -> int:
    """Check a JSONL data file line by line; print a summary, or each problem as file:line:field: what. Fix: how."""
    from labkit.dataprep import load_jsonl

    parser = argparse.ArgumentParser(prog="python -m labkit validate", description=validate.__doc__)
    parser.add_argument("file", help="the .jsonl file to check")
    parser.add_argument("--triage", action="store_true", help="also check each answer against the ticket schema")
    args = parser.parse_args(argv)
    records = load_jsonl(args.file, triage=args.triage)
    print(f"{args.file}: {len(records)} records, no problems")
    return 0


def sft(argv: list[str]) -> int:
    """Train a LoRA adapter with SFT on a JSONL file (labkit.cli; also under torchrun / accelerate launch)."""
    from labkit.cli import main as train

    return train("sft", argv)


def dpo(argv: list[str]) -> int:
    """Train a LoRA adapter with DPO on a JSONL file of preference pairs (labkit.cli)."""
    from labkit.cli import main as train

    return train("dpo", argv)


COMMANDS = {"validate": validate, "sft": sft, "dpo": dpo}


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand (validate), or with none the model check of labkit.models.main."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        from labkit.models import main as model_check

        return model_check()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except LabkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
