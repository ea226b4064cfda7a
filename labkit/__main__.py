"""`python -m labkit`: make sure the course model is available; `python -m labkit validate FILE`: check a data file;
`python -m labkit sft|dpo ...`: train (labkit.cli).

Exit status: 0 done; 2 bad input (a LabkitError: one line on stderr saying what, where and how to fix it;
`validate` lists every problem of the file, one per line); 1 anything else, which is a bug in labkit: one line
saying so and where to report it, the full traceback only with --debug. Never a traceback otherwise.
"""

from __future__ import annotations

import re
import sys
import traceback
from pathlib import Path

from labkit import LabkitError


def validate(argv: list[str]) -> int:
    """Check a JSONL data file line by line; print a summary, or each problem as file:line:field: what. Fix: how."""
    from labkit.dataprep import load_jsonl
    from labkit.settings import OneLineParser, UsageError

    parser = OneLineParser(prog="python -m labkit validate", description=validate.__doc__)
    parser.add_argument("file", help="the .jsonl file to check")
    parser.add_argument("--triage", action="store_true", help="also check each answer against the ticket schema")
    parser.add_argument("--max-length", type=int, default=None, metavar="TOKENS",
                        help="also refuse examples too long to fit in this many tokens (a run's max_length)")
    parser.add_argument("--debug", action="store_true", help="on an unexpected error, show its full traceback")
    args = parser.parse_args(argv)
    if args.max_length is not None and args.max_length < 1:
        raise UsageError(f"--max-length {args.max_length}: must be an integer >= 1")
    records = load_jsonl(args.file, triage=args.triage, max_length=args.max_length)
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


def error_line(err: LabkitError) -> str:
    """A LabkitError as one line: its message, or the first of its problems and how many more there are."""
    lines = str(err).splitlines() or [type(err).__name__]
    counted = re.match(r"(\d+) problems in ", lines[0])
    if not counted or len(lines) < 2:
        return "error: " + " ".join(line.strip() for line in lines)
    more = int(counted[1]) - 1
    return f"error: {lines[0]} {lines[1]} (and {more} more; `python -m labkit validate FILE` lists them)"


def bug_line(err: BaseException) -> str:
    """An unexpected exception as one line: what it was and where, that it is a bug, and what to do about it."""
    from labkit.course.colab import REPO_URL

    frames = traceback.extract_tb(err.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    what = (str(err).strip().splitlines() or ["(no message)"])[0][:200]
    return (f"error: unexpected {type(err).__name__}{where}: {what}. This is a bug in labkit, not in your input. "
            f"Fix: rerun with --debug to see the traceback, and report it at {REPO_URL}/issues")


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand (validate, sft, dpo), or with none the model check of labkit.models.main."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        from labkit.models import main as model_check

        return model_check()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except LabkitError as err:
        print(f"error: {err}" if argv[0] == "validate" else error_line(err), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted. Fix: rerun the same command; a run resumes from its latest checkpoint",
              file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - anything else is a bug: one line, the traceback only with --debug
        if "--debug" in argv:
            raise
        print(bug_line(err), file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
