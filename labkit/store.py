"""Writes that survive, and the one cache path.

Every file or folder labkit keeps (checkpoints, cached adapters and runs, replies, exports, the judge) is written
whole under a temporary name next to its place, flushed to the disk, then renamed over the old one: an interrupt
at any moment (Ctrl-C, kill -9, a full disk) leaves either the old version or the new one, complete. What a killed
write leaves behind (`.tmp-*` names) is removed by the next write to the same folder. `cached` returns a result an
identical earlier run stored, or computes and stores it; `content_key` names it.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from labkit import LabkitError

T = TypeVar("T")

HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]  # a shared cache may have writers on other machines
STARTED = time.time()  # a leftover of labkit's older writers (no pid in its name) older than this is stale
# .tmp-<pid>-<host>-<random>-<role>-<name>: role new = being written, old = set aside while replaced, del = being deleted
TEMPORARY = re.compile(r"^\.tmp-(\d+)-([0-9a-f]{6})-[0-9a-f]{6}-(new|old|del)-(.+)$")
# what labkit's earlier writers named their temporaries: .tmp-* (checkpoints, adapters, full_ft, GGUF exports),
# .latest.tmp, the judge's .<file>.XXXXXXXX.tmp and <file>.sha256 -> <file>.tmp, cached JSON's <name>.tmp<pid>
OLDER_TEMPORARY = re.compile(r"^\.tmp-|^\.latest\.tmp$|^\..+\.gguf\.\w{8}\.tmp$|\.gguf\.tmp$|\.tmp\d+$")
FOREIGN_STALE_S = 3600  # a leftover of another machine's writer counts as stale after an hour without change


class StoreError(LabkitError):
    """A file or folder cannot be written or read back (no space, no permission, damaged); the message says what to do."""


# ---------------------------------------------------------------- keys


def content_key(parts: Any, length: int = 16, ensure_ascii: bool = True) -> str:
    """The name of a stored result: the first `length` hex digits of the SHA-256 of `parts` as key-sorted JSON."""
    blob = json.dumps(parts, sort_keys=True, default=repr, ensure_ascii=ensure_ascii)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


# ---------------------------------------------------------------- leftovers of killed writes


def temporary(path: Path, role: str = "new") -> Path:
    """A free name next to `path` for its next version (role 'new'), its old one set aside ('old') or deleted ('del')."""
    return path.with_name(f".tmp-{os.getpid()}-{HOST}-{secrets.token_hex(3)}-{role}-{path.name}")


def process_start(pid: int) -> float | None:
    """When process `pid` started, in seconds since the epoch (Linux's /proc); None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def writer_alive(pid: int, host: str, leftover: Path) -> bool:
    """Whether the process named in `leftover` may still be writing it (never guessed dead while it could be alive)."""
    changed = leftover.lstat().st_mtime
    if host != HOST:  # another machine's process: judged by age alone
        return time.time() - changed < FOREIGN_STALE_S
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    started = process_start(pid)
    return started is None or started <= changed + 2  # a process started after the leftover reuses a dead one's pid


def clean_leftovers(folder: Path) -> list[Path]:
    """Remove what killed writes left in `folder`; a folder set aside whose replacement never came in is put back."""
    removed = []
    try:
        names = [entry.name for entry in os.scandir(folder)]
    except OSError:
        return removed
    for name in names:
        path, match = folder / name, TEMPORARY.match(name)
        try:
            if match:
                if writer_alive(int(match[1]), match[2], path):
                    continue
                if match[3] == "old" and not (folder / match[4]).exists():
                    os.rename(path, folder / match[4])  # killed between setting it aside and renaming the new one in
                    continue
            elif not (OLDER_TEMPORARY.search(name) and path.lstat().st_mtime < STARTED):
                continue
            delete(path)
            removed.append(path)
        except OSError:  # another process cleaned it first
            continue
    return removed


def delete(path: Path) -> None:
    """Remove a file or a folder tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove(path: Path) -> None:
    """Delete a file or folder so that an interrupt leaves it whole or gone (renamed to a leftover first)."""
    doomed = temporary(path, "del")
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    delete(doomed)


# ---------------------------------------------------------------- writes that survive


def sync(path: Path) -> None:
    """Flush a file, or every file of a folder tree and the folders themselves, to the disk."""
    if not path.is_dir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for root, _, files in os.walk(path):
        for name in files:
            sync(Path(root) / name)
        sync_folder(Path(root))


def sync_folder(folder: Path) -> None:
    """Flush a folder's list of names (a rename in it) to the disk, where the system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and Windows) cannot sync a folder
        pass
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux's renameat2 with RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_folder(new: Path, folder: Path) -> Path | None:
    """Put folder `new` in `folder`'s place; returns where the old version now is (to delete), None if there was none."""
    try:
        os.rename(new, folder)
        return None
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
            raise
    if exchange(new, folder):
        return new
    aside = temporary(folder, "old")  # without an atomic swap: old aside, new in (clean_leftovers undoes a kill between)
    os.rename(folder, aside)
    os.rename(new, folder)
    return aside


def is_disk_full(err: BaseException | None, folder: Path) -> bool:
    """Whether an error (or one it wraps) means the disk holding `folder` is full: ENOSPC, however the library words it."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err):  # safetensors: "I/O error: No space left on device (os error 28)"
            return True
        if "inline_container.cc" in str(err):  # torch.save says only "[enforce fail at inline_container.cc:672] .
            return free_bytes(folder) < 2**20  # unexpected pos 704 vs 598": ask the disk itself
        err = err.__cause__ or err.__context__
    return False


def free_bytes(folder: Path) -> int:
    """Bytes free on the disk that holds `folder`."""
    return shutil.disk_usage(mount_point(folder)).free


def mount_point(path: Path) -> Path:
    """The mount point of the disk that holds `path` (or would hold it)."""
    path = path.absolute()
    while not path.exists() or not os.path.ismount(path):
        if path.parent == path:
            return path
        path = path.parent
    return path


def disk_full(path: Path) -> StoreError:
    """The one-line error for a write to `path` that ran out of space."""
    return StoreError(f"{path.parent}: no space left on the disk (mounted at {mount_point(path.parent)}) to write "
                      f"{path.name}; what it would replace is untouched and the partial copy was removed. Fix: free "
                      f"space on that disk (or point LABKIT_HOME or the output folder to another one), then run "
                      f"again: a training run resumes from its last checkpoint")


def write_file(path: str | Path, fill: Callable[[Path], object]) -> Path:
    """Write file `path` whole or not at all: `fill(tmp)` writes a temporary file beside it, which then replaces it."""
    path = Path(path)
    tmp = temporary(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(path.parent)
        fill(tmp)
        sync(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        full = is_disk_full(err, path.parent)  # asked before the partial copy is deleted
        delete(tmp)
        if full:
            raise disk_full(path) from None
        raise
    sync_folder(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write a UTF-8 text file whole or not at all."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_folder(folder: str | Path, fill: Callable[[Path], object]) -> Path:
    """Write `folder` whole or not at all: `fill(tmp)` fills a new folder beside it, which then takes its place."""
    folder = Path(folder)
    tmp = temporary(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(folder.parent)
        tmp.mkdir()
        fill(tmp)
        sync(tmp)
        old = replace_folder(tmp, folder)
    except BaseException as err:
        full = is_disk_full(err, folder.parent)
        delete(tmp)
        if full:
            raise disk_full(folder) from None
        raise
    sync_folder(folder.parent)
    if old is not None:
        delete(old)
    return folder


def check_writable(folder: Path, fix: str = "pass an out_dir you can write to, e.g. a new folder under your home") -> None:
    """Raise a StoreError now, before any compute, if files cannot be written in `folder`; clear old leftovers there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        clean_leftovers(folder)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise StoreError(f"{folder}: cannot write there ({e.strerror or type(e).__name__}). Fix: {fix}") from None


# ---------------------------------------------------------------- the one cache path


def read_json(path: Path) -> Any:
    """A stored JSON file's content; a damaged one is a StoreError that names it and says to delete it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: cached result is not valid JSON (line {e.lineno}: {e.msg}). Fix: delete {path}; "
                         "the next run computes it again") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise StoreError(f"{path}: cached result cannot be read ({type(e).__name__}). Fix: delete {path}; the next "
                         "run computes it again") from None


def cached(path: str | Path, load: Callable[[Path], T], compute: Callable[[], T], save: Callable[[T, Path], object],
           folder: bool = False) -> T:
    """What an identical earlier run stored at `path` (`load` verifies it), or `compute()`'s result, stored there whole.

    `save(result, tmp)` writes the result into a temporary file (a folder if `folder`) that then takes `path`'s place,
    so a cache entry is complete or absent. The folder is checked writable before computing: a run is never lost.
    """
    path = Path(path)
    if path.exists():
        return load(path)
    check_writable(path.parent, "set LABKIT_HOME to a folder you can write to")
    result = compute()
    (write_folder if folder else write_file)(path, lambda tmp: save(result, tmp))
    return result

