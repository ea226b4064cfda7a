"""LoRA vs QLoRA, measured: one fine-tune on a full-precision or 4-bit base, its peak memory and scores (notebook 04)."""

from __future__ import annotations

import gc
import json
import tempfile
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from labkit.data import load_split
from labkit.evaluate import generate
from labkit.layer_training import TaskBatches, make_task_batches, train_task
from labkit.measure import PeakMemory, memory_in_use
from labkit.models import resolve
from labkit.quant import bnb_4bit_config
from labkit.runtime import SMOLLM2_135M, pick_dtype
from labkit.sft import collate, labelled_logits, labelled_tokens, tokenize_chat
from labkit.tickets import FIELDS

# ---------------------------------------------------------------- loading the base


def _materialize(model: nn.Module) -> None:
    """Copy weights that still point into the memory-mapped checkpoint file into ordinary memory.

    transformers maps the safetensors file instead of reading it: untouched pages cost nothing yet,
    and after 4-bit loading the whole fp32 file stays resident as long as one tensor (the fp32
    embedding) still points into it. Copying makes resident memory equal to what the model holds.
    """
    with torch.no_grad():
        for param in model.parameters():
            if type(param).__name__ != "Params4bit":
                param.data = param.data.clone()
        for module in model.modules():
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.clone()
    gc.collect()


def _load_base(source: str, quantized: bool, device: str, dtype: torch.dtype, gradient_checkpointing: bool) -> nn.Module:
    """The frozen base for a LoRA run: full precision, or bitsandbytes 4-bit (QLoRA), in resident memory."""
    if quantized:
        model = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=bnb_4bit_config(dtype), device_map=device, dtype=dtype
        )
        # Casts norms/embeddings to fp32 and lets gradients reach the adapters; it would also turn on
        # gradient checkpointing by default, so we say explicitly whether we want it.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    if gradient_checkpointing:  # keep only each layer's input; recompute the rest during backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not device.startswith("cuda"):
        _materialize(model)
    return model


def _lora_config(r: int, lora_alpha: int, target_modules: str | list[str]) -> LoraConfig:
    """peft's LoRA adapter for both runs (no dropout)."""
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=target_modules,
                      task_type="CAUSAL_LM")


def _warm_up(source: str, quantized: bool, device: str, dtype: torch.dtype, gradient_checkpointing: bool, r: int,
             lora_alpha: int, target_modules: str | list[str]) -> None:
    """One training step of the same pipeline on a one-layer random copy of the model, then drop it.

    The first load, forward, backward and optimizer step import modules lazily and set up kernel
    caches; on a CPU the matrix-multiply library also keeps work buffers sized by the largest
    matrices it has seen (the vocabulary head). Tens of MB that belong to the runtime, not to the
    run; the one-layer model has the real layer and head shapes, so after it they are in the baseline.
    """
    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = 1
    with tempfile.TemporaryDirectory() as folder:
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        model = _load_base(folder, quantized, device, dtype, gradient_checkpointing)
    model = get_peft_model(model, _lora_config(r, lora_alpha, target_modules))
    ids = torch.randint(0, config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0)).to(device)
    train_task(model, TaskBatches([{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]))
    del model
    gc.collect()


# ---------------------------------------------------------------- one run


def finetune_run(
    quantized: bool,
    *,
    model_name: str | None = None,
    steps: int = 6,
    batch_size: int = 8,
    micro_batch: int | None = None,
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: str | list[str] = "all-linear",
    lr: float = 2e-3,
    gradient_checkpointing: bool = False,
    n_val: int = 32,
    n_show: int = 2,
    max_new_tokens: int = 48,
    device: str = "cpu",
    threads: int | None = None,
    seed: int = 0,
) -> dict:
    """One LoRA fine-tune of the course model on the triage task, with its memory measured.

    quantized=True loads the base with bitsandbytes in 4 bits (QLoRA: NF4 + double quantization,
    compute in fp32 on CPU, bf16/fp16 on GPU); False keeps it in full precision. Both then get the
    same peft LoRA adapter, batches, steps and learning rate. Meant to run in a fresh process
    (labkit.measure.run_isolated) so that `peak_bytes` counts this run only: the highest memory
    during training above the baseline (libraries imported and warmed up on a tiny model, data
    tokenized, nothing of the model loaded yet): weights, adapters, gradients, optimizer state,
    activations. On CUDA both are torch's allocator statistics. Evaluation: `answer_metrics` on the
    first `n_val` validation tickets (loss per answer token, field accuracy), and `n_show` replies.
    """
    if threads:
        torch.set_num_threads(threads)
    dtype = pick_dtype(device)
    source = resolve(model_name or SMOLLM2_135M)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _warm_up(source, quantized, device, dtype, gradient_checkpointing, r, lora_alpha, target_modules)

    # Batches first (a one-parameter stand-in tells make_task_batches the device), so that the
    # tokenizer's Python objects are in the baseline too.
    on_device = nn.Linear(1, 1).to(device)
    train = load_split("train")
    data = make_task_batches(on_device, tokenizer, train, batch_size, steps, seed=seed, micro_batch=micro_batch)
    val = load_split("validation")[:n_val]
    del train
    gc.collect()

    baseline = memory_in_use(device)
    started = time.perf_counter()
    model = _load_base(source, quantized, device, dtype, gradient_checkpointing)
    load_s = time.perf_counter() - started
    weights = memory_in_use(device) - baseline
    torch.manual_seed(seed)
    model = get_peft_model(model, _lora_config(r, lora_alpha, target_modules))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with PeakMemory(device) as mem:
        history = train_task(model, data, lr=lr, seed=seed)
    peak = mem.highest - baseline

    evaluated = time.perf_counter()
    metrics = answer_metrics(model, tokenizer, val)
    replies = generate(model, tokenizer, [ex["messages"][:2] for ex in val[:n_show]],
                       max_new_tokens=max_new_tokens, batch_size=max(n_show, 1), progress=False) if n_show else []
    eval_s = time.perf_counter() - evaluated
    widths = [b["input_ids"].shape[1] for b in data.batches]
    labelled = sum(labelled_tokens(b) for b in data.batches)
    train_s = history[-1]["seconds"]
    return {
        "method": "qlora" if quantized else "lora",
        "weights_bytes": int(weights),
        "peak_bytes": int(peak),
        "trainable": trainable,
        "history": history,
        "val_loss": metrics.pop("loss"),
        "scores": metrics,
        "replies": replies,
        "load_s": load_s,
        "train_s": train_s,
        "s_per_step": train_s / len(history),
        "eval_s": eval_s,
        "max_width": max(widths),
        "mean_width": sum(widths) / len(widths),
        "micro_batch": data.batches[0]["input_ids"].shape[0],
        "answer_share": labelled / data.tokens,
        "total_s": time.perf_counter() - started,
    }


# ---------------------------------------------------------------- scoring without generating


def field_token_positions(tokenizer, messages: list[dict]) -> dict[str, list[int]]:
    """Per triage field, the positions of the tokens that spell its value in the tokenized conversation.

    The value is the JSON text after `"field": ` (a quoted string or null) plus the character that
    closes it (`,` or `}`), so a model that would run on past the value does not count as right.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    answer = messages[-1]["content"]
    start = text.rindex(answer)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    positions = {}
    for field, value in json.loads(answer).items():
        key = f'"{field}": '
        rendered = key + json.dumps(value)
        begin = start + answer.index(rendered) + len(key)
        end = start + answer.index(rendered) + len(rendered) + 1  # + the closing , or }
        positions[field] = [t for t, (a, b) in enumerate(offsets) if a < end and b > begin and t > 0]
    return positions


@torch.no_grad()
def answer_metrics(model: nn.Module, tokenizer, examples: list[dict], batch_size: int = 16) -> dict:
    """Validation loss per answer token and per-field accuracy, from one teacher-forced forward pass.

    A field counts as right when greedy decoding, given the conversation and the gold answer up to
    that field, would write exactly its gold value: the argmax at every one of its token positions
    is the gold token. It needs no generation loop, so it is cheap enough for many examples; once a
    model has learned the JSON format it equals the field accuracy of greedy generation, except
    where generation went wrong earlier in the same answer.
    """
    device = next(model.parameters()).device
    rows = [tokenize_chat(tokenizer, ex["messages"]) for ex in examples]
    fields = [field_token_positions(tokenizer, ex["messages"]) for ex in examples]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    was_training = model.training
    model.eval()
    loss_sum, n_tokens = 0.0, 0
    right = {f: 0 for f in FIELDS}
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in idx], tokenizer.pad_token_id).items()}
        logits, targets, keep = labelled_logits(model, batch)
        loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        n_tokens += int(keep.sum())
        predicted = torch.full_like(keep, -1, dtype=torch.long)  # the argmax where there is a label
        predicted[keep] = logits.argmax(dim=-1)
        for row, i in enumerate(idx):
            for field in FIELDS:
                where = torch.tensor(fields[i][field], device=device)
                right[field] += bool((predicted[row, where - 1] == batch["input_ids"][row, where]).all())
    model.train(was_training)
    n = max(len(examples), 1)
    out = {"loss": loss_sum / max(n_tokens, 1), "field_acc": sum(right.values()) / (n * len(FIELDS))}
    out.update({f"acc_{f}": right[f] / n for f in FIELDS})
    return out
