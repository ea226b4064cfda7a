"""Measure memory: bytes in use (malloc or CUDA), the peak of a block of code, a run in a fresh process (notebook 04),
and that run's result cached by content."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from labkit import LabkitError
from labkit.store import cached, content_key, read_json


def current_rss() -> int:
    """Resident memory of this process in bytes (Linux /proc, else psutil, else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


_MALLINFO2: dict = {}


def _mallinfo2():
    """glibc's mallinfo2 function, or None (another C library, or glibc older than 2.33)."""
    if "fn" not in _MALLINFO2:

        class Mallinfo2(ctypes.Structure):  # struct mallinfo2: every field a size_t
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                "keepcost")]

        try:
            fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
            fn.restype = Mallinfo2
        except (OSError, AttributeError):
            fn = None
        _MALLINFO2["fn"] = fn
    return _MALLINFO2["fn"]


def allocated_bytes() -> int | None:
    """Bytes that C's malloc has handed out and not yet had back (glibc only, else None).

    Tensors on the CPU live in malloc'd memory, so this is the CPU's counterpart of
    torch.cuda.memory_allocated(): live allocations only, not the freed memory that the allocator
    keeps for reuse, nor memory-mapped files, nor the libraries' code.
    """
    fn = _mallinfo2()
    if fn is None:
        return None
    info = fn()
    return info.uordblks + info.hblkhd  # in use from the heap arenas + blocks given their own mmap


def memory_in_use(device: str = "cpu") -> int:
    """Bytes in use now: CUDA allocator statistics on a GPU; malloc's live bytes on a CPU (resident
    memory where malloc cannot tell)."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated()
    live = allocated_bytes()
    return current_rss() if live is None else live


class PeakMemory:
    """Peak memory of a block of code, above what was in use when it started.

    On CUDA it reads torch's allocator statistics (torch.cuda.max_memory_allocated). On CPU a
    background thread samples `memory_in_use` every `interval` seconds; torch releases the GIL
    inside its kernels, so the sampler keeps running during a forward or backward.

        with PeakMemory() as mem:
            train()
        mem.peak        # bytes above the baseline at the highest point
        mem.highest     # bytes in use at the highest point
    """

    def __init__(self, device: str = "cpu", interval: float = 0.002) -> None:
        self.device, self.interval = device, interval
        self.baseline = self.highest = 0
        self._thread = None
        self._stop = None

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = self.highest = torch.cuda.memory_allocated()
            return self
        self.baseline = self.highest = memory_in_use(self.device)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.highest = max(self.highest, memory_in_use(self.device))
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.highest = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.highest = max(self.highest, memory_in_use(self.device))

    @property
    def peak(self) -> int:
        """Bytes above the baseline at the highest point."""
        return self.highest - self.baseline


_CHILD = """
import pickle, sys, traceback
with open(sys.argv[1], "rb") as f:
    sys.path[:] = pickle.load(f)
    try:
        fn, args, kwargs = pickle.load(f)
        outcome = ("ok", fn(*args, **kwargs))
    except BaseException as err:
        outcome = ("error", repr(err), traceback.format_exc(), err)
with open(sys.argv[2], "wb") as f:
    try:
        pickle.dump(outcome, f)
    except Exception:
        pickle.dump(outcome[:3] + (None,) if outcome[0] == "error" else ("error", "unpicklable result", "", None), f)
"""


class IsolatedRunError(LabkitError):
    """The process of run_isolated died, or raised something that cannot travel back."""


def run_isolated(fn, *args, env: dict[str, str] | None = None, **kwargs):
    """Run fn(*args, **kwargs) in a fresh Python process and return its result.

    A fresh process starts with nothing allocated, so its peak memory belongs to this run alone.
    `fn` must be importable (a function defined in a module, not in a notebook cell or script);
    arguments and result travel by pickle. `env` adds environment variables for the child only.
    An exception in the child is raised again here, with the child's traceback as a note.
    """
    if getattr(fn, "__module__", None) == "__main__":
        raise LabkitError(f"run_isolated needs an importable function; {fn.__name__} is defined in __main__ "
                          "(a notebook cell or script). Move it into a module.")
    with tempfile.TemporaryDirectory(prefix="labkit-isolated-") as folder:
        request, answer = os.path.join(folder, "request.pkl"), os.path.join(folder, "answer.pkl")
        with open(request, "wb") as f:
            pickle.dump(list(sys.path), f)
            pickle.dump((fn, args, kwargs), f)
        proc = subprocess.run([sys.executable, "-c", _CHILD, request, answer], env={**os.environ, **(env or {})},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        if not os.path.exists(answer):
            raise IsolatedRunError(f"the child process exited with code {proc.returncode} before returning "
                                   f"(killed for memory?); its last output:\n{proc.stdout[-3000:]}")
        with open(answer, "rb") as f:
            outcome = pickle.load(f)
    if outcome[0] == "ok":
        return outcome[1]
    _, text, trace, err = outcome
    if isinstance(err, BaseException) and hasattr(err, "add_note"):  # Python >= 3.11
        err.add_note(f"(raised in the child process of run_isolated)\n{trace}")
        raise err
    raise IsolatedRunError(f"{getattr(fn, '__name__', fn)} failed in the child process: {text}\n{trace}") from (
        err if isinstance(err, BaseException) else None)


def call_key(fn, args: tuple, kwargs: dict) -> str:
    """A hash naming one call exactly: the function, its module's source, its arguments, the libraries' versions."""
    import importlib.metadata as md
    import inspect

    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    try:
        source = inspect.getsource(sys.modules[fn.__module__])
    except (TypeError, OSError):  # a built-in function: its version is the interpreter's
        source = sys.version
    return content_key({"fn": f"{fn.__module__}.{fn.__qualname__}", "source": source, "args": args, "kwargs": kwargs,
                        "versions": versions})


def cached_isolated_run(fn, *args, **kwargs) -> tuple[dict, Path]:
    """run_isolated(fn, ...)'s result from labkit's cache if this exact call ran before, else run and cache it.

    The key (call_key) covers the function's module source, every argument and the versions of torch, transformers,
    peft and bitsandbytes, so an edit or an upgrade measures again. Results must be JSON (numbers, text, lists, dicts);
    delete the file (returned with the result) to measure again on purpose.
    """
    from labkit.paths import cache_root

    path = cache_root() / "runs" / f"{fn.__name__}-{call_key(fn, args, kwargs)}.json"
    result = cached(path, read_json, lambda: run_isolated(fn, *args, **kwargs),
                    lambda result, tmp: tmp.write_text(json.dumps(result), encoding="utf-8"))
    return result, path
