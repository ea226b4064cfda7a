"""Checkpoints and cached adapters: written atomically with checksums, checked in full before anything is loaded.

A checkpoint or adapter that is damaged, incomplete, or from another run (another base model, rank, target
modules or objective) raises one CheckpointError naming what differs; no tensor is copied until every check
has passed, so a refused file leaves the model as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel

from labkit import LabkitError
from labkit.models import LINEAR_NAMES

CHECKSUMS = "SHA256SUMS"  # one "digest  file name" line per file, as sha256sum writes it
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "run.json")


class CheckpointError(LabkitError):
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


def verify_checksums(folder: Path, fix: str) -> None:
    """Raise a CheckpointError if a file listed in folder's SHA256SUMS is missing or differs from its digest."""
    for line in (folder / CHECKSUMS).read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: is incomplete ({name} is missing). Fix: {fix}")
        if sha256(folder / name) != digest:
            size = (folder / name).stat().st_size
            raise CheckpointError(f"{folder / name}: is damaged or truncated ({size} bytes, checksum differs from "
                                  f"the one written with it). Fix: {fix}")


def check_writable(folder: Path, fix: str = "pass an out_dir you can write to, e.g. a new folder under your home") -> None:
    """Raise a CheckpointError now, before any compute, if files cannot be written in `folder`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise CheckpointError(f"{folder}: cannot write there ({e.strerror or type(e).__name__}). Fix: {fix}") from None


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


def run_identity(model: PeftModel, objective: str) -> dict:
    """What a checkpoint must share with the run that resumes it: base model, LoRA rank and targets, objective."""
    lora = model.peft_config[model.active_adapter]
    return {"base_model": base_identity(model), "r": lora.r, "target_modules": layer_names(lora.target_modules),
            "objective": objective}


def check_same_run(found: dict, expected: dict, source: str, fix: str) -> None:
    """Raise a CheckpointError naming the first setting where `found` differs from `expected`."""
    for key, want in expected.items():
        have = found.get(key, want)
        if key == "target_modules":
            have, want = layer_names(have), layer_names(want)
        if have != want:
            raise CheckpointError(f"{source}: was written with {key}={have!r}, this run has {key}={want!r}. Fix: {fix}")


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
    """Write a checkpoint atomically (a temporary folder with checksums renamed into place), then a 'latest' pointer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".tmp-"))
    torch.save({"step": step, "adapter": adapter_state(model), "optimizer": optimizer.state_dict(),
                "history": history, "best": best, "torch_rng": torch.get_rng_state(), "run": run}, tmp / "state.pt")
    write_checksums(tmp)
    final = out_dir / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    pointer = out_dir / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, out_dir / "latest")
    for old in out_dir.glob("checkpoint-*"):  # keep only the newest
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
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
    if (folder / CHECKSUMS).is_file():
        verify_checksums(folder, fix)
    try:
        state = torch.load(folder / "state.pt", weights_only=False, map_location="cpu")
    except Exception as e:  # a truncated or foreign file raises anything from EOFError to UnpicklingError
        raise CheckpointError(f"{folder / 'state.pt'}: cannot be read ({type(e).__name__}): it is damaged or "
                              f"truncated. Fix: {fix}") from None
    needed = {"step", "adapter", "optimizer", "history", "best", "torch_rng"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise CheckpointError(f"{folder / 'state.pt'}: is not a labkit checkpoint (it lacks step, adapter, optimizer "
                              f"state). Fix: {fix}")
    if run and state.get("run"):
        check_same_run(state["run"], run, str(folder),
                       f"resume with the settings it was written with, or pass a new out_dir to start a fresh run")
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


def save_adapter(model: PeftModel, folder: Path, run: dict) -> Path:
    """Save a peft adapter, its run record (run.json) and their checksums atomically into `folder`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        (tmp / "run.json").write_text(json.dumps(run))
        write_checksums(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


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
    if (folder / CHECKSUMS).is_file():  # adapters cached before checksums existed are checked by shape alone
        verify_checksums(folder, fix)
    try:
        run = json.loads((folder / "run.json").read_text())
        check_adapter_fits(model, folder, expect)
    except CheckpointError:
        raise
    except Exception as e:  # unreadable JSON or safetensors header
        raise CheckpointError(f"{folder}: cached adapter cannot be read ({type(e).__name__}). Fix: {fix}") from None
    return run
