"""Where the code runs: device, dtype, threads, seed and the course profile."""

from __future__ import annotations

import os
import platform
import random
from dataclasses import dataclass, field

import numpy as np
import torch

SMOLLM2_135M = "HuggingFaceTB/SmolLM2-135M-Instruct"

# A profile sizes the course to the hardware: which model and how many steps.
PROFILES: dict[str, dict] = {
    "cpu": {
        "model": SMOLLM2_135M,
        "batch_size": 4,
        "sft_steps": 40,
        "sft_lr": 1e-3,
        "eval_every": 20,
        "val_examples": 24,
        "baseline_examples": 20,
        "eval_examples": 200,
        "overfit_steps": 20,
        "dpo_steps": 40,
        "decide_examples": 16,
    },
    "gpu": {
        "model": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        "batch_size": 16,
        "sft_steps": 300,
        "sft_lr": 2e-4,
        "eval_every": 50,
        "val_examples": 200,
        "baseline_examples": 200,
        "eval_examples": 200,
        "overfit_steps": 60,
        "dpo_steps": 200,
        "decide_examples": 100,
    },
}


def pick_device() -> str:
    """The best available device: 'cuda', 'mps' or 'cpu'."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, capability: tuple[int, int] | None = None) -> torch.dtype:
    """Training dtype for a device: bf16 on CUDA >= 8.0, fp16 on older CUDA, else fp32."""
    if device == "cuda":
        if capability is None:
            capability = torch.cuda.get_device_capability()
        # T4 (7.5) reports bf16 as "supported" but emulates it slowly: check the capability.
        return torch.bfloat16 if capability >= (8, 0) else torch.float16
    return torch.float32


def pick_profile(device: str) -> str:
    """'gpu' on CUDA, else 'cpu'; the LABKIT_PROFILE environment variable overrides."""
    chosen = os.environ.get("LABKIT_PROFILE", "").strip().lower()
    if chosen:
        if chosen not in PROFILES:
            from labkit import LabkitError

            raise LabkitError(
                f"LABKIT_PROFILE={chosen!r} is not a profile; use one of {sorted(PROFILES)}."
            )
        return chosen
    return "gpu" if device == "cuda" else "cpu"


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (all devices) in one call."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Runtime:
    """What this machine gives the course: device, dtype, threads and profile settings."""

    device: str
    dtype: torch.dtype
    threads: int
    profile: str
    settings: dict = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.settings["model"]

    def __str__(self) -> str:
        gpu = ""
        if self.device == "cuda":
            gpu = f" ({torch.cuda.get_device_name()}, cc {'.'.join(map(str, torch.cuda.get_device_capability()))})"
        lines = [
            f"device   {self.device}{gpu}",
            f"dtype    {str(self.dtype).replace('torch.', '')}",
            f"threads  {self.threads}",
            f"profile  {self.profile}  (model {self.model_name}; set LABKIT_PROFILE to override)",
            f"python   {platform.python_version()}   torch {torch.__version__}",
        ]
        return "\n".join(lines)


def detect(seed: int | None = 0) -> Runtime:
    """Detect the runtime, set torch's thread count and (optionally) seed everything."""
    device = pick_device()
    threads = int(os.environ.get("LABKIT_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    if seed is not None:
        seed_everything(seed)
    profile = pick_profile(device)
    return Runtime(device, pick_dtype(device), threads, profile, dict(PROFILES[profile]))


def versions() -> dict[str, str]:
    """Versions of the libraries the course depends on (missing ones say so)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ["torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate"]:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
