"""Checkpoints and cached adapters: written atomically with checksums, checked in full before anything is loaded.

A checkpoint or adapter that is damaged, incomplete, unverifiable, or from another run (another base model, rank,
target modules, objective, setting or data) raises one CheckpointError naming what differs; no tensor is copied
until every check has passed, so a refused file leaves the model as it was. Files are written by labkit.store:
complete before they replace anything, so an interrupt leaves the previous checkpoint or adapter usable.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch
from peft import PeftModel

from labkit import store
from labkit.models import LINEAR_NAMES
from labkit.store import StoreError, remove, write_folder, write_text

CHECKSUMS = "SHA256SUMS"  # one "digest  file name" line per file, as sha256sum writes it
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "run.json")


class CheckpointError(StoreError):
    """A checkpoint, cached adapter or output folder cannot be used; the message says why and what to do."""


# ---------------------------------------------------------------- checksums and the output folder


def sha256(path: Path) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """Write SHA256SUMS for every file in `folder`."""
    lines = [f"{sha256(p)}  {p.name}\n" for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS]
    (folder / CHECKSUMS).write_text("".join(lines))


def read_checksums(folder: Path, fix: str) -> dict[str, str]:
    """The digests listed in folder's SHA256SUMS, by file name (sha256sum's text and binary lines both read)."""
    listed = {}
    for line in (folder / CHECKSUMS).read_text(encoding="utf-8", errors="replace").splitlines():
        digest, _, name = line.strip().partition(" ")
        if not line.strip():
            continue
        if len(digest) != 64 or not name.strip():
            raise CheckpointError(f"{folder / CHECKSUMS}: is not a list of SHA-256 digests ({line[:40]!r}). Fix: {fix}")
        listed[name.strip().removeprefix("*")] = digest.lower()
    return listed


def verify_checksums(folder: Path, fix: str, required: tuple[str, ...] = ()) -> None:
    """Raise a CheckpointError if a `required` file is not listed in folder's SHA256SUMS, or a listed file is
    missing or differs from its digest."""
    listed = read_checksums(folder, fix)
    if unlisted := [name for name in required if name not in listed]:
        raise CheckpointError(f"{folder}: its {CHECKSUMS} does not list {unlisted[0]}, so that file cannot be "
                              f"verified. Fix: {fix}")
    for name, digest in listed.items():
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: is incomplete ({name} is missing). Fix: {fix}")
        if sha256(folder / name) != digest:
            size = (folder / name).stat().st_size
            if reads_whole(folder / name):
                raise CheckpointError(f"{folder / name}: is not the file written with it: it is whole ({size} bytes) "
                                      f"but its checksum differs (replaced by another file?). Fix: {fix}")
            raise CheckpointError(f"{folder / name}: is damaged or truncated ({size} bytes, checksum differs from "
                                  f"the one written with it). Fix: {fix}")


def reads_whole(path: Path) -> bool:
    """Whether a file reads as a complete file of its kind (safetensors, a torch checkpoint, JSON); False if cut short."""
    try:
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            return path.stat().st_size == 8 + size + end
        if path.suffix == ".pt":
            with zipfile.ZipFile(path) as archive:
                return archive.testzip() is None
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
            return True
    except Exception:  # any failure to parse means it is not whole
        return False
    return False


def check_writable(folder: Path, fix: str = "pass an out_dir you can write to, e.g. a new folder under your home") -> None:
    """Raise a CheckpointError now, before any compute, if files cannot be written in `folder` (old leftovers removed)."""
    try:
        store.check_writable(folder, fix)
    except StoreError as e:
        raise CheckpointError(str(e)) from None


# ---------------------------------------------------------------- what a run is


def model_name(name_or_path: str) -> str:
    """The model's own name from a hub id or a local folder ('HuggingFaceTB--SmolLM2-135M' -> 'SmolLM2-135M')."""
    return str(name_or_path).rstrip("/").split("/")[-1].split("--")[-1]


def base_identity(model) -> str:
    """The base model as a readable fingerprint: its name and its shape."""
    config = (model.get_base_model() if isinstance(model, PeftModel) else model).config
    name = model_name(config._name_or_path or config.model_type)
    return f"{name} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size})"


def layer_names(targets: str | list[str] | set[str] | None) -> list[str]:
    """LoRA target modules as sorted layer names ('all-linear' and 'model.layers.0.self_attn.q_proj' both resolved)."""
    if targets == "all-linear":
        return sorted(LINEAR_NAMES)
    return sorted({t.split(".")[-1] for t in ([targets] if isinstance(targets, str) else targets or [])})


RESUMABLE = ("checkpoint_every",)  # the settings a resumed run may change: they change no step's result


def run_identity(model: PeftModel, objective: str, config=None, data: dict[str, str] | None = None) -> dict:
    """What a checkpoint must share with the run that resumes it: base model, LoRA rank and targets, objective,
    and (when given) every setting of `config` but RESUMABLE ones, and the data's digests."""
    lora = model.peft_config[model.active_adapter]
    identity = {"base_model": base_identity(model), "r": lora.r, "target_modules": layer_names(lora.target_modules),
                "objective": objective}
    if config is not None:
        identity |= {k: v for k, v in asdict(config).items() if k not in identity and k not in RESUMABLE}
    return identity | (data or {})


def first_difference(found: dict, expected: dict) -> tuple[str, object, object] | None:
    """The first setting where `found` differs from `expected`, as (name, found's value, expected's); None if none."""
    for key, want in expected.items():
        have = found.get(key, want)  # a record written before a setting was recorded is not refused for it
        if key == "target_modules":
            have, want = layer_names(have), layer_names(want)
        if have != want:
            return key, have, want
    return None


def check_same_run(found: dict, expected: dict, source: str, fix: str) -> None:
    """Raise a CheckpointError naming the first setting where `found` differs from `expected`."""
    if difference := first_difference(found, expected):
        key, have, want = difference
        raise CheckpointError(f"{source}: was written with {key}={have!r}, this run has {key}={want!r}. Fix: {fix}")


def resume_hint(key: str, value: object) -> str:
    """How to resume with a checkpoint's value of `key`, on the command line."""
    if key in ("data", "validation"):
        return " (CLI: the same --data and --validation files)"
    if key == "base_model":
        return " (CLI: the same --model)"
    if key == "objective":
        return ""
    flag = f"--{key.replace('_', '-')}"
    if value is None:
        return f" (CLI: leave out {flag})"
    return f" (CLI: {flag} {','.join(value) if isinstance(value, list) else value})"


def check_weights(model, weights: dict[str, torch.Tensor], source: str) -> None:
    """Raise a CheckpointError unless `weights` has exactly the model's trainable tensors, with their shapes."""
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    fix = "load it into the base model and LoRA settings (r, target_modules) it was trained with"
    if extra := sorted(set(weights) - set(params)):
        raise CheckpointError(f"{source}: holds {len(extra)} tensor(s) this model has no place for, e.g. {extra[0]}. "
                              f"Fix: {fix}")
    if missing := sorted(trainable - set(weights)):
        raise CheckpointError(f"{source}: lacks {len(missing)} of this model's adapter tensor(s), e.g. {missing[0]}. "
                              f"Fix: {fix}")
    for name, value in weights.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise CheckpointError(f"{source}: {name} is {tuple(value.shape)} there, this model expects "
                                  f"{tuple(params[name].shape)}. Fix: {fix}")


# ---------------------------------------------------------------- checkpoints of a training run


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable (adapter) weights."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out_dir: Path, step: int, model, optimizer, history: list[dict], best: dict,
                    run: dict | None = None) -> Path:
    """Write a checkpoint whole (a folder with checksums that takes its place in one step), then point 'latest' to it."""
    state = {"step": step, "adapter": adapter_state(model), "optimizer": optimizer.state_dict(), "history": history,
             "best": best, "torch_rng": torch.get_rng_state(), "run": run}

    def fill(folder: Path) -> None:
        torch.save(state, folder / "state.pt")
        write_checksums(folder)

    final = write_folder(Path(out_dir) / f"checkpoint-{step}", fill)
    write_text(Path(out_dir) / "latest", final.name)
    for old in Path(out_dir).glob("checkpoint-*"):  # keep only the newest, deleted only once 'latest' has moved on
        if old != final:
            remove(old)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint folder that 'latest' points to, if any."""
    pointer = out_dir / "latest"
    if not pointer.exists():
        return None
    path = out_dir / pointer.read_text().strip()
    return path if (path / "state.pt").exists() else None


def load_checkpoint(out_dir: Path, model, run: dict | None = None) -> dict | None:
    """The latest checkpoint's state, verified complete and matching `model` and `run`; None if there is none."""
    if not (out_dir / "latest").exists():
        return None
    folder = out_dir / (out_dir / "latest").read_text().strip()
    fix = f"delete {out_dir} to start over, or resume from the folder of the run that wrote it"
    if not (folder / "state.pt").is_file():
        raise CheckpointError(f"{folder}: is missing or incomplete (no state.pt), though 'latest' points to it. Fix: {fix}")
    if (folder / CHECKSUMS).is_file():  # checkpoints written before checksums existed are checked by reading them
        verify_checksums(folder, fix, ("state.pt",))
    try:
        state = torch.load(folder / "state.pt", weights_only=False, map_location="cpu")
    except Exception as e:  # a truncated or foreign file raises anything from EOFError to UnpicklingError
        raise CheckpointError(f"{folder / 'state.pt'}: cannot be read ({type(e).__name__}): it is damaged or "
                              f"truncated. Fix: {fix}") from None
    needed = {"step", "adapter", "optimizer", "history", "best", "torch_rng"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise CheckpointError(f"{folder / 'state.pt'}: is not a labkit checkpoint (it lacks step, adapter, optimizer "
                              f"state). Fix: {fix}")
    if run and state.get("run") and (difference := first_difference(state["run"], run)):
        key, have, want = difference
        raise CheckpointError(f"{folder}: was written with {key}={have!r}, this run has {key}={want!r}. Fix: resume "
                              f"with the settings it was written with{resume_hint(key, have)}, or start a fresh run "
                              f"in a new out_dir (CLI: --fresh)")
    check_weights(model, state["adapter"], str(folder))
    saved = sum(len(group["params"]) for group in state["optimizer"]["param_groups"])
    if saved != sum(1 for p in model.parameters() if p.requires_grad):
        raise CheckpointError(f"{folder}: its optimizer state covers {saved} tensors, this model trains "
                              f"{sum(1 for p in model.parameters() if p.requires_grad)}. Fix: {fix}")
    return state


def load_adapter_weights(model: PeftModel, weights: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter weights into the model's trainable parameters, after checking every name and shape."""
    check_weights(model, weights, "the saved adapter weights")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


# ---------------------------------------------------------------- cached adapters


def fill_adapter(model: PeftModel, folder: Path, run: dict) -> None:
    """Write a peft adapter, its run record (run.json) and their checksums into the (new, empty) `folder`."""
    model.save_pretrained(folder)
    (folder / "run.json").write_text(json.dumps(run))
    write_checksums(folder)


def save_adapter(model: PeftModel, folder: Path, run: dict) -> Path:
    """Save a peft adapter, its run record and their checksums into `folder`, replacing the old one only when complete."""
    return write_folder(folder, lambda tmp: fill_adapter(model, tmp, run))


def check_adapter_fits(model, folder: Path, expect: dict | None = None) -> None:
    """Raise a CheckpointError unless the adapter in `folder` fits `model` (and `expect`: r, target_modules)."""
    from safetensors import safe_open

    fix = f"load it with the base model and settings it was trained with, or delete {folder} to retrain"
    config = json.loads((folder / "adapter_config.json").read_text())
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    ours, theirs = base.config._name_or_path, config.get("base_model_name_or_path")
    if ours and theirs and model_name(ours) != model_name(theirs):
        raise CheckpointError(f"{folder}: was trained on base_model={model_name(theirs)!r}, this model is "
                              f"{model_name(ours)!r}. Fix: {fix}")
    check_same_run(config, expect or {}, str(folder), fix)
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            where, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
            if kind not in ("A.weight", "B.weight"):
                continue
            try:
                layer = base.get_submodule(where)
            except AttributeError:
                raise CheckpointError(f"{folder}: adapts {where}, which this model ({base_identity(base)}) does not "
                                      f"have. Fix: {fix}") from None
            want = (config["r"], layer.in_features) if kind == "A.weight" else (layer.out_features, config["r"])
            if shape != want:
                raise CheckpointError(f"{folder}: {key} is {shape} there, this model ({base_identity(base)}) expects "
                                      f"{want}. Fix: {fix}")


def verify_adapter(folder: Path, fix: str, checksums_required: bool = True) -> None:
    """Raise a CheckpointError unless `folder` holds a peft adapter whose files match its SHA256SUMS."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: {'is a file, not' if folder.exists() else 'there is no'} adapter folder "
                              f"there. Fix: {fix}")
    for name in ADAPTER_FILES[:2]:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: adapter is incomplete ({name} is missing). Fix: {fix}")
    if (folder / CHECKSUMS).is_file():
        verify_checksums(folder, fix, ADAPTER_FILES[:2])
    elif checksums_required:
        raise CheckpointError(f"{folder}: has no {CHECKSUMS}, so its files cannot be verified (copied without it?). "
                              f"Fix: {fix}")


def load_verified_adapter(model, folder: str | Path) -> PeftModel:
    """The peft adapter in `folder` on top of `model`, after its checksums and its fit to the model are verified."""
    folder = Path(folder)
    fix = (f"pass an adapter folder labkit wrote (e.g. the adapter/ of `python -m labkit sft`); for one you trust, "
           f"write its checksums with `cd {folder} && sha256sum {' '.join(ADAPTER_FILES[:2])} > {CHECKSUMS}`")
    verify_adapter(folder, fix)
    try:
        check_adapter_fits(model, folder)
    except CheckpointError:
        raise
    except Exception as e:  # unreadable JSON or safetensors header
        raise CheckpointError(f"{folder}: adapter cannot be read ({type(e).__name__}). Fix: {fix}") from None
    return PeftModel.from_pretrained(model, folder)


def load_cached_adapter(model, folder: Path, expect: dict | None = None) -> tuple[PeftModel, dict] | None:
    """The adapter and run record cached in `folder` on top of `model`, verified first; None if nothing is cached."""
    if (run := cached_run_record(model, folder, expect)) is None:
        return None
    return PeftModel.from_pretrained(model, folder), run


def cached_run_record(model, folder: Path, expect: dict | None = None) -> dict | None:
    """The run record of the adapter cached in `folder` once it is verified complete and fitting `model`; None if absent."""
    if not folder.exists():
        return None
    fix = f"delete {folder}; the next run retrains and caches it again"
    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: cached adapter is incomplete ({name} is missing). Fix: {fix}")
    if not (folder / CHECKSUMS).is_file():  # without it another run's weights of the same shapes would load unnoticed
        raise CheckpointError(f"{folder}: cached adapter has no {CHECKSUMS}, so its files cannot be verified. Fix: {fix}")
    verify_checksums(folder, fix, ADAPTER_FILES)
    try:
        run = json.loads((folder / "run.json").read_text())
        check_adapter_fits(model, folder, expect)
    except CheckpointError:
        raise
    except Exception as e:  # unreadable JSON or safetensors header
        raise CheckpointError(f"{folder}: cached adapter cannot be read ({type(e).__name__}). Fix: {fix}") from None
    return run
