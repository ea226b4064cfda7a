"""Ship a LoRA fine-tune: merge it (and what merging into a 4-bit base costs), hot-swap adapters, write a model card."""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch
from peft import PeftModel

from labkit import LabkitError
from labkit.checkpoint import sha256, verify_adapter
from labkit.paths import cache_root
from labkit.quant import quantize_4bit
from labkit.sft import cached_adapter_run

# ---------------------------------------------------------------- merged == unmerged


def merged_copy(model: PeftModel):
    """A plain model with the active adapter folded into its weights (W + B A alpha/r); `model` is left as it was."""
    return copy.deepcopy(model).merge_and_unload()


@torch.no_grad()
def prompt_logits(model, tokenizer, conversations: list[list[dict]]) -> torch.Tensor:
    """Next-token logits at every position of each chat prompt, concatenated (no padding: one prompt at a time)."""
    out = []
    for conversation in conversations:
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True,
                                            return_tensors="pt")["input_ids"]
        out.append(model(input_ids=ids.to(next(model.parameters()).device)).logits[0].float().cpu())
    return torch.cat(out)


def max_logit_gap(a, b, tokenizer, conversations: list[list[dict]]) -> float:
    """The largest |logit difference| between two models over every position of the prompts."""
    return (prompt_logits(a, tokenizer, conversations) - prompt_logits(b, tokenizer, conversations)).abs().max().item()


# ---------------------------------------------------------------- merging into a 4-bit base


def nf4_round_trip(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """A weight as a 4-bit NF4 model stores it: quantized blockwise and dequantized back (same shape and dtype)."""
    return quantize_4bit(weight, "nf4", blocksize).dequantize()


def lora_layers(model: PeftModel) -> dict[str, torch.nn.Module]:
    """The LoRA-wrapped linear layers of a peft model, by module name."""
    return {name: module for name, module in model.named_modules() if hasattr(module, "get_delta_weight")
            and hasattr(module, "base_layer")}


@torch.no_grad()
def merge_variants(model: PeftModel) -> dict[str, object]:
    """Three ways to ship one adapter, as plain models, and how much of each layer's update B A survives in each.

    'fp32 merge': W + dW. 'NF4 base + adapter': Q(W) + dW, computed as a merge (what serving an unmerged adapter on a
    4-bit base computes). 'NF4 merge, re-quantized': Q(Q(W) + dW), the 4-bit model you get by dequantizing, merging
    and quantizing again. Q is NF4, blocksize 64; the weights are kept dequantized in fp32 so they run anywhere.
    """
    adapter = model.active_adapter
    base_weights, deltas = {}, {}
    for name, layer in lora_layers(model).items():
        base_weights[name] = layer.base_layer.weight.detach().clone()
        deltas[name] = layer.get_delta_weight(adapter).detach()
    variants = {"fp32 merge": merged_copy(model)}
    survived = {}
    for label, requantize in [("NF4 base + adapter", False), ("NF4 merge, re-quantized", True)]:
        shipped = merged_copy(model)
        kept, total = 0.0, 0.0
        for name, weight in base_weights.items():
            quantized = nf4_round_trip(weight)
            merged = quantized + deltas[name]
            if requantize:
                merged = nf4_round_trip(merged)
            shipped.get_submodule(name.removeprefix("base_model.model.")).weight.copy_(merged)
            # the share of the update dW that the shipped weight still carries, relative to the 4-bit base
            kept += torch.sum((merged - quantized) * deltas[name]).item()
            total += torch.sum(deltas[name] ** 2).item()
        variants[label] = shipped
        survived[label] = kept / total
    variants["_update_kept"] = {"fp32 merge": 1.0, **survived}
    return variants


# ---------------------------------------------------------------- adapters side by side


def tensor_bytes(tensors) -> int:
    """Total bytes of an iterable of tensors."""
    return sum(t.numel() * t.element_size() for t in tensors)


def adapter_bytes(model: PeftModel, adapter: str) -> int:
    """Bytes of one adapter's LoRA matrices in memory."""
    return tensor_bytes(p for n, p in model.named_parameters() if f".{adapter}." in n and "lora_" in n)


def base_bytes(model) -> int:
    """Bytes of a model's weights without any adapter (what one merged copy costs)."""
    return tensor_bytes(p for n, p in model.named_parameters() if "lora_" not in n)


def load_adapters(base, folders: dict[str, str | Path]) -> PeftModel:
    """One base model with several adapters loaded by name (the first one active)."""
    if not folders:
        raise LabkitError("load_adapters needs at least one adapter folder. Fix: pass {'name': folder, ...}")
    names = list(folders)
    for name, folder in folders.items():  # every file checked against its SHA256SUMS (labkit writes one with each)
        verify_adapter(Path(folder), f"pass the folder of a complete adapter as {name!r}", checksums_required=False)
    model = PeftModel.from_pretrained(base, str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name)
    model.set_adapter(names[0])
    return model.eval()


def cached_adapter(model, key: str, train: Callable[[object], object]) -> tuple[PeftModel, Path]:
    """The adapter cached under `key` on top of `model`, or `train(model)` (an SFTResult) now, cached for next time."""
    folder = cache_root() / "adapters" / key
    return cached_adapter_run(model, folder, lambda: train(model)).model, folder


def select(model: PeftModel, adapter: str | list[str]) -> float:
    """Make `adapter` (or a list, whose updates add up) the active one; the seconds the switch took."""
    start = time.perf_counter()
    model.base_model.set_adapter(adapter)
    return time.perf_counter() - start


# ---------------------------------------------------------------- the model card


def model_card(name: str, base_model: str, adapter_dir: Path, data_files: list[Path], config: dict,
               metrics: dict[str, tuple[float, float, float]], limits: list[str], exports: dict[str, Path],
               versions: dict[str, str]) -> str:
    """A model card in Markdown, written from the run's own records: data hashes, config, metrics with CIs, files."""
    run = json.loads((adapter_dir / "run.json").read_text()) if (adapter_dir / "run.json").exists() else {}
    lines = [f"# {name}", "", f"A LoRA fine-tune of `{base_model}` for support-ticket triage into strict JSON "
             "(category, priority, sentiment, product, order_id).", "", "## Training data", ""]
    lines += [f"- `{p.name}`: {sum(1 for _ in p.open())} examples, sha256 `{sha256(p)[:16]}`" for p in data_files]
    lines += ["", "## Training configuration", "", f"- adapter: `{adapter_dir.name}` (cache key: hash of model, data "
              "and this configuration)"]
    lines += [f"- {k}: `{v}`" for k, v in config.items()]
    if run:
        lines.append(f"- best validation loss {run.get('best_val_loss', float('nan')):.4f} at step {run.get('best_step')}")
    lines += ["", "## Evaluation (test split, 95 % bootstrap CI)", "", "| metric | value | 95 % CI |", "|---|---|---|"]
    lines += [f"| {k} | {v[0]:.3f} | [{v[1]:.3f}, {v[2]:.3f}] |" for k, v in metrics.items()]
    lines += ["", "## Files", ""]
    lines += [f"- `{p.name}`: {p.stat().st_size / 1e6:.0f} MB, sha256 `{sha256(p)[:16]}`" for p in exports.values()]
    lines += ["", "## Limitations", ""] + [f"- {limit}" for limit in limits]
    lines += ["", "## Reproduce", "", f"- python {platform.python_version()}; "
              + ", ".join(f"{k} {v}" for k, v in versions.items()), "- `make test` re-runs every notebook; the "
              "adapter is re-trained only if its cache key (model, data, configuration) changes."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- Ollama and cost

OLLAMA_INSTRUCTIONS = {"FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES"}
OLLAMA_PARAMETERS = {"temperature", "stop", "num_ctx", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
                     "seed", "num_predict"}
CHATML_TEMPLATE = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                   '<|im_start|>assistant\n')


def modelfile(gguf_name: str, system: str, template: str = CHATML_TEMPLATE, stop: str = "<|im_end|>",
              num_ctx: int = 2048) -> str:
    """An Ollama Modelfile that serves a GGUF file greedily with a ChatML template and a default system prompt."""
    return (f"FROM ./{gguf_name}\n"
            f'TEMPLATE """{template}"""\n'
            f'SYSTEM """{system}"""\n'
            "PARAMETER temperature 0\n"
            f'PARAMETER stop "{stop}"\n'
            f"PARAMETER num_ctx {num_ctx}\n")


def check_modelfile(text: str, folder: Path) -> dict[str, list[str]]:
    """Parse a Modelfile as Ollama reads it; raise LabkitError (with the line) on what `ollama create` rejects."""
    found: dict[str, list[str]] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        word, _, value = line.partition(" ")
        if word.upper() not in OLLAMA_INSTRUCTIONS:
            raise LabkitError(f"Modelfile line {i}: unknown instruction {word!r}. Fix: use one of "
                              f"{sorted(OLLAMA_INSTRUCTIONS)}")
        if value.startswith('"""'):  # a multi-line value runs to the closing triple quote
            while value.count('"""') < 2 and i < len(lines):
                value += "\n" + lines[i]
                i += 1
            if value.count('"""') < 2:
                raise LabkitError(f"Modelfile: the {word} value opened with \"\"\" is never closed. Fix: end it with \"\"\"")
        if word.upper() == "PARAMETER" and value.split(" ")[0] not in OLLAMA_PARAMETERS:
            raise LabkitError(f"Modelfile line {i}: unknown parameter {value.split(' ')[0]!r}. Fix: use one of "
                              f"{sorted(OLLAMA_PARAMETERS)}")
        found.setdefault(word.upper(), []).append(value)
    if "FROM" not in found:
        raise LabkitError("Modelfile: no FROM line. Fix: start it with FROM ./model.gguf")
    source = found["FROM"][0]
    if source.startswith(("./", "/")) and not (folder / source).exists():
        raise LabkitError(f"Modelfile: FROM {source} does not exist next to the Modelfile in {folder}. Fix: copy the "
                          "GGUF file there or correct the path")
    return found


def cost_per_million_tokens(tokens_per_s: float, dollars_per_hour: float) -> float:
    """What one million generated tokens cost on a machine rented by the hour, busy all the time at this speed."""
    return dollars_per_hour / (tokens_per_s * 3600) * 1e6
