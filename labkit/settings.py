"""Every setting labkit reads, checked where it enters: a bad value is one line saying what to set instead.

The environment variables, each parsed here once:

    LABKIT_THREADS   torch threads per process: a whole number >= 1 (unset: every core)
    LABKIT_DTYPE     precision: fp32 or bf16 (unset: the course default for this machine)
    LABKIT_PROFILE   the course budget: cpu or gpu (unset: gpu on CUDA, else cpu)
    LABKIT_HOME      labkit's cache folder (unset: ~/.cache/labkit)
    LABKIT_DATA      the course data folder, holding train.jsonl (unset: found next to the code or the notebooks)
    yes/no flags     LABKIT_REQUIRE_ENGINE, LABKIT_OFFLINE, HF_HUB_OFFLINE, ...: 1/true/yes/on or 0/false/no/off

The values of the training configurations (labkit.sft.SFTConfig and its subclasses) are checked with the rules
below, when a config is built: one line naming the field, its value and the accepted range. The command line's
flags are parsed by OneLineParser: a usage error is one line too.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
from pathlib import Path
from typing import Callable

from labkit import LabkitError

YES = ("1", "true", "yes", "on")
MAX_THREADS = 1024  # more torch threads than this is a typo (a 2-core laptop runs the course on 2)
NO = ("0", "false", "no", "off")


class SettingError(LabkitError):
    """An environment variable labkit reads holds a value it cannot use."""


def raw(name: str) -> str | None:
    """The variable's value without surrounding spaces, or None when it is unset or blank."""
    value = os.environ.get(name, "").strip()
    return value or None


def whole_number(name: str, minimum: int = 1, maximum: int = 2**31 - 1) -> int | None:
    """The variable as an integer from minimum to maximum, or None when unset."""
    value = raw(name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or not minimum <= number <= maximum:
        raise SettingError(f"{name}={value!r} is not a whole number from {minimum} to {maximum}; set it to one "
                           f"(e.g. {name}={max(minimum, 2)}) or unset it.")
    return number


def choice(name: str, choices: tuple[str, ...] | list[str], what: str) -> str | None:
    """The variable (lowercased) if it is one of `choices`, None when unset; `what` names the kind of value."""
    value = raw(name)
    if value is None:
        return None
    if value.lower() not in choices:
        raise SettingError(f"{name}={value.lower()!r} is not {what}; set it to one of {list(choices)} or unset it.")
    return value.lower()


def flag(name: str) -> bool:
    """A yes/no variable: True for 1/true/yes/on, False for 0/false/no/off or unset."""
    value = raw(name)
    if value is None or value.lower() in NO:
        return False
    if value.lower() in YES:
        return True
    raise SettingError(f"{name}={value!r} is not yes or no; set it to 1 (or true, yes, on), 0 (or false, no, off), "
                       "or unset it.")


def threads() -> int | None:
    """LABKIT_THREADS: torch threads per process, or None when unset."""
    return whole_number("LABKIT_THREADS", 1, MAX_THREADS)


def home() -> Path:
    """LABKIT_HOME: where labkit keeps converted models and trained adapters (default ~/.cache/labkit)."""
    value = raw("LABKIT_HOME")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "labkit"


def data_folder() -> Path | None:
    """LABKIT_DATA: the data folder it names (checked to hold train.jsonl), or None when unset."""
    value = raw("LABKIT_DATA")
    if value is None:
        return None
    folder = Path(value).expanduser()
    if not (folder / "train.jsonl").is_file():
        what = "is not a folder" if not folder.is_dir() else "holds no train.jsonl"
        raise SettingError(f"LABKIT_DATA={value!r} {what}; set it to the course's data/ folder "
                           "(the one with train.jsonl) or unset it.")
    return folder


# ---------------------------------------------------------------- configuration values (SFTConfig, DPOConfig, ...)

MAX_INT = 2**31 - 1  # a bound for counts and sizes: beyond it a value is a typo, not a plan
MAX_MICRO_BATCHES = 10**7  # steps x grad_accum: the training schedule is planned up front, one entry each

Rule = Callable[[object], "str | None"]  # None when the value is fine, else what it must be


class ConfigError(LabkitError):
    """A configuration value no run can use: the message names the setting, its value and the accepted range."""

    def __init__(self, owner: str, name: str, value: object, rule: str) -> None:
        self.owner, self.name, self.value, self.rule = owner, name, value, rule
        super().__init__(f"{owner}.{name} = {value!r}: must be {rule}")


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(low: int, high: int = MAX_INT, optional: bool = False) -> Rule:
    """A rule: an integer from low to high (or None when optional)."""
    def rule(value: object) -> str | None:
        if (value is None and optional) or (_is_integer(value) and low <= value <= high):
            return None
        span = f">= {low}" if high == MAX_INT and not (_is_integer(value) and value > high) else f"from {low} to {high:,}"
        return f"an integer {span}" + (" or None" if optional else "")
    return rule


def number(low: float, high: float = math.inf, low_open: bool = True, high_open: bool = False) -> Rule:
    """A rule: a finite real number above low (or at least low) and below high (or at most high)."""
    if math.isinf(high):
        span = f"{'>' if low_open else '>='} {low:g}"
    else:
        span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def rule(value: object) -> str | None:
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            above = value > low if low_open else value >= low
            below = value < high if high_open else value <= high
            if above and below:
                return None
        return f"a finite number {span}"
    return rule


def one_of(choices: tuple[str, ...] | list[str]) -> Rule:
    """A rule: one of the given strings."""
    return lambda value: None if isinstance(value, str) and value in choices else f"one of {list(choices)}"


def layer_names(value: object) -> str | None:
    """A rule for target_modules: 'all-linear', or a non-empty list of layer names (checked against the model later)."""
    if value == "all-linear" or (isinstance(value, (list, tuple)) and value
                                 and all(isinstance(v, str) and v.strip() for v in value)):
        return None
    return "'all-linear' or a non-empty list of layer names such as ['q_proj', 'v_proj']"


POSITIVE = number(0)  # a finite number > 0
NON_NEGATIVE = number(0, low_open=False)  # a finite number >= 0
FRACTION = number(0, 1, low_open=False, high_open=True)  # a share in [0, 1)


def check_fields(config: object, **rules: Rule) -> None:
    """Raise a ConfigError for the first of `config`'s fields that breaks its rule."""
    for name, rule in rules.items():
        value = getattr(config, name)
        if (broken := rule(value)) is not None:
            raise ConfigError(type(config).__name__, name, value, broken)


def check_schedule(config: object) -> None:
    """Raise a ConfigError if steps x grad_accum micro-batches are more than a run can plan up front."""
    planned = config.steps * config.grad_accum  # type: ignore[attr-defined]
    if planned > MAX_MICRO_BATCHES:
        raise ConfigError(type(config).__name__, "steps x grad_accum", planned,
                          f"at most {MAX_MICRO_BATCHES:,} micro-batches in all")


# ---------------------------------------------------------------- the command line's flags


class UsageError(LabkitError):
    """The command line itself is wrong (unknown flag, missing or bad value)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a UsageError (one line, exit status 2) instead of usage text."""

    def error(self, message: str) -> None:
        raise UsageError(f"{self.prog}: {message}. Fix: see `{self.prog} --help`")
