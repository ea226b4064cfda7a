"""Write notebooks/08_merge_deploy.ipynb (cell ids are stable hashes of their position and kind)."""
import hashlib
import json
from pathlib import Path

PATH = Path("/work/main/notebooks/08_merge_deploy.ipynb")
cells = []


def md(text):
    cells.append(("markdown", text.strip("\n")))


def code(text):
    cells.append(("code", text.strip("\n")))


md(r"""
# 08 · Merge, export and serve: what you ship

[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/labkit-course/labkit/blob/main/notebooks/08_merge_deploy.ipynb)

05 trained a LoRA adapter that turns SmolLM2 into a ticket-triage model; 06 aligned a reply writer. None of it has left the notebook. This notebook ships it, and measures every step instead of assuming it:

1. **merge**: fold the adapter into the weights (`merge_and_unload`), prove the merged model computes the same function, see what goes wrong when you merge into a 4-bit base, save it as safetensors, and write a model card from the run's own records;
2. **adapters without merging**: three adapters on one base, switched per request, and what that saves in memory;
3. **export to GGUF**, the file llama.cpp and Ollama run, at several quantization levels, and load it back;
4. **serve it on a real inference engine** (llama.cpp's OpenAI-compatible server) over HTTP: accuracy, time to first token, tokens per second alone and under 8 concurrent requests, per quantization level;
5. **the deployment decision**: which engine when, what it costs (the articles' figures recomputed from our measured speed), an Ollama Modelfile, and the three production patterns.
""")
code("COLAB")
code(r"""
from labkit.runtime import detect

rt = detect(seed=0)
print(rt)
budget = rt.settings  # 05's SFT settings, 06's DPO settings, and this notebook's sizes
""")
code(r"""
# This notebook's sizes (CPU profile values as fallbacks until labkit.runtime.PROFILES carries these keys).
n_tickets = budget.get("deploy_tickets", 16)          # test tickets: merged vs unmerged, the 4-bit merge
n_served = budget.get("deploy_served_tickets", 16)    # test tickets sent to the server per quantization level
n_concurrent = budget.get("deploy_concurrency", 8)    # requests in flight at once in the load test
n_routed = budget.get("deploy_routed_requests", 6)    # requests routed to the three adapters in turn
reply_steps = budget.get("deploy_reply_steps", 12)    # SFT steps of the second task's adapter (cached)
print(dict(n_tickets=n_tickets, n_served=n_served, n_concurrent=n_concurrent, n_routed=n_routed,
           reply_steps=reply_steps))
""")
code(r"""
import copy
import tempfile
import time
from pathlib import Path

import torch

from labkit.data import read_jsonl
from labkit.models import load_model
from labkit.paths import data_dir
from labkit.sft import SFTConfig, cached_sft
from labkit.tickets import label_of, prompt_conversations

started = time.perf_counter()
workdir = Path(tempfile.mkdtemp(prefix="labkit-08-"))  # what we ship goes here; removed at the end
base, tokenizer = load_model(rt.model_name, dtype=rt.dtype, device=rt.device)
train, validation, test = (read_jsonl(data_dir() / f"{s}.jsonl") for s in ["train", "validation", "test"])
sft_config = SFTConfig(  # notebook 05's configuration, so this is a cache hit after 05
    steps=budget["sft_steps"], batch_size=budget["batch_size"], lr=budget["sft_lr"],
    r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
    eval_every=budget["eval_every"], warmup_ratio=0.05, seed=0,
)
sft_result, sft_dir = cached_sft(copy.deepcopy(base), tokenizer, rt.model_name, train,
                                 validation[: budget["val_examples"]], sft_config)
unmerged = sft_result.model  # the base plus 05's adapter, as peft runs it: W x + (alpha/r) B (A x)
tickets = test[:n_tickets]
golds = [label_of(ex) for ex in tickets]
conversations = prompt_conversations(tickets)
print("05's adapter:", sft_dir.name, "|", len(tickets), "test tickets for the comparisons below")
""")

md(r"""
## 1. Merge the adapter into the weights

A LoRA layer computes $y = W x + \frac{\alpha}{r} B A x$. Matrix products distribute, so that is the same as one ordinary layer with the weight

$$W' = W + \tfrac{\alpha}{r}\, B A .$$

`merge_and_unload` computes $W'$ for every adapted layer and throws away $A$ and $B$. The merged model is a plain `LlamaForCausalLM` again: no peft at inference time, no extra matrix products per token, and every engine can load it. What you give up: the adapter is no longer a separate 10-MB file you can swap (section 2), and to undo the merge you must subtract the same product again (`unmerge`).

"The same function" is a claim we can test: the logits of both models on the same prompts, and their greedy replies on the test tickets. The only differences allowed are float rounding, because $(Wx) + (BAx)$ and $(W + BA)x$ add the same numbers in a different order.
""")
code(r"""
from labkit.deploy import max_logit_gap, merged_copy
from labkit.evaluate import generate, score_triage

merged = merged_copy(unmerged)
logit_gap = max_logit_gap(unmerged, merged, tokenizer, conversations[:8])
timings = {}
for name, model in [("merged", merged), ("unmerged (peft)", unmerged)]:
    start = time.perf_counter()
    replies = generate(model, tokenizer, conversations, max_new_tokens=48)
    timings[name] = (time.perf_counter() - start, replies)
merged_replies, unmerged_replies = timings["merged"][1], timings["unmerged (peft)"][1]
identical = sum(a == b for a, b in zip(merged_replies, unmerged_replies))
lora_left = sum("lora_" in n for n, _ in merged.named_parameters())
print(f"max |logit difference| over 8 prompts: {logit_gap:.2e}")
print(f"greedy replies identical on {identical} of {len(tickets)} test tickets")
print("generation time: " + ", ".join(f"{k} {v[0]:.1f} s" for k, v in timings.items()))
print(f"parameters: merged {sum(p.numel() for p in merged.parameters()):,} (LoRA tensors left: {lora_left}), "
      f"base {sum(p.numel() for p in base.parameters()):,}")
""")
code(r"""
# Check: merging changes nothing but rounding: identical greedy replies, logits equal to float32 precision,
# and a merged model exactly the size of the base.
assert logit_gap < 1e-3, logit_gap
assert identical == len(tickets), [(a, b) for a, b in zip(merged_replies, unmerged_replies) if a != b][:3]
assert lora_left == 0 and sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())
print("merged == unmerged")
""")

md(r"""
### The 4-bit pitfall: merging into a quantized base

QLoRA (notebook 04) trains the adapter on top of a 4-bit NF4 base. To ship one file you must merge, and there are two ways:

* **merge into the original 16/32-bit base**: $W + \Delta W$, the right way, and afterwards quantize the merged model for inference if you want (section 3);
* **dequantize the 4-bit base, merge, quantize again**: $Q\big(Q(W) + \Delta W\big)$. Tempting, because the 4-bit base is what you have in memory, and wrong.

Why the second loses: NF4 stores each block of 64 weights as 16 levels scaled by the block's largest value, so neighbouring levels are about $\max|W| / 8$ apart. A LoRA update is small next to that step: re-quantizing $Q(W) + \Delta W$ snaps most weights back to the level they came from, and **the update you trained is rounded away**, unevenly, layer by layer. We measure it with 05's adapter (trained on the fp32 base) in three shipped forms: merged into fp32; the NF4 base with the adapter applied on top (what serving an unmerged QLoRA adapter computes); and the re-quantized merge. "Update kept" is the share of $\Delta W$ the shipped weights still carry, measured against the 4-bit base ($\langle W_\text{shipped} - Q(W), \Delta W\rangle / \|\Delta W\|^2$). The weights are quantized and dequantized with `labkit.quant` (bit-exact with bitsandbytes, notebook 04) and kept in fp32 so they run anywhere.
""")
code(r"""
from labkit.deploy import merge_variants
from labkit.evaluate import compare

variants = merge_variants(unmerged)
kept = variants.pop("_update_kept")
variant_replies = {"fp32 merge": merged_replies}
variant_gaps = {}
for name, model in variants.items():
    variant_gaps[name] = max_logit_gap(merged, model, tokenizer, conversations[:4])
    if name != "fp32 merge":
        variant_replies[name] = generate(model, tokenizer, conversations, max_new_tokens=48)
del variants
nf4_table = compare(variant_replies, golds)
nf4_table.insert(0, "update kept", [kept[k] for k in nf4_table.index])
nf4_table.insert(1, "max |logit diff| vs fp32 merge", [variant_gaps[k] for k in nf4_table.index])
nf4_table[["update kept", "max |logit diff| vs fp32 merge", "field_acc", "field_acc 95% CI", "exact_match",
           "json_valid"]].round(3)
""")
code(r"""
# Check: the fp32 merge is exact; re-quantizing after the merge throws away much of the update and moves the
# logits further from the trained model than serving the adapter on the 4-bit base does.
assert kept["fp32 merge"] == 1.0 and variant_gaps["fp32 merge"] < 1e-3
assert kept["NF4 merge, re-quantized"] < 0.8 * kept["NF4 base + adapter"], kept
assert variant_gaps["NF4 merge, re-quantized"] > variant_gaps["NF4 base + adapter"], variant_gaps
assert nf4_table.loc["NF4 merge, re-quantized", "field_acc"] <= nf4_table.loc["fp32 merge", "field_acc"], nf4_table
print(f"re-quantizing the merge kept {kept['NF4 merge, re-quantized']:.0%} of the trained update: merge into the "
      "full-precision base, then quantize the merged model")
""")

md(r"""
### Save as safetensors, and reload

`save_pretrained` writes the merged model as **safetensors**: a JSON header (names, dtypes, shapes, offsets) followed by raw tensor bytes. Unlike a pickled `.bin` it cannot run code when loaded, and it is memory-mapped, so loading is fast. The folder (config, weights, tokenizer, chat template) is what vLLM, TGI and `from_pretrained` take. We reload it and demand bit-identical logits.
""")
code(r"""
from transformers import AutoModelForCausalLM

merged_dir = workdir / "smollm2-135m-triage"
start = time.perf_counter()
merged.save_pretrained(merged_dir)
tokenizer.save_pretrained(merged_dir)
save_s = time.perf_counter() - start
start = time.perf_counter()
reloaded = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
reload_s = time.perf_counter() - start
reload_gap = max_logit_gap(merged, reloaded, tokenizer, conversations[:4])
del reloaded
MB = 1e6
merged_mb = sum(p.stat().st_size for p in merged_dir.iterdir()) / MB
adapter_mb = (sft_dir / "adapter_model.safetensors").stat().st_size / MB
print(f"saved in {save_s:.1f} s, reloaded in {reload_s:.1f} s; max |logit difference| after reload: {reload_gap}")
print(f"merged model folder {merged_mb:.0f} MB (fp32) vs the adapter alone {adapter_mb:.1f} MB")
""")
code(r"""
# Check: the reloaded model is the merged model, bit for bit; the adapter is a small fraction of a model.
assert reload_gap == 0.0, reload_gap
assert adapter_mb < 0.1 * merged_mb
print("safetensors round trip exact")
""")

md(r"""
### A model card, written from the run's own records

A model you cannot trace is a model you cannot fix. The articles' rule: *version the data, record every hyperparameter, pin the library versions, and ship a model card* (training data, intended use, evaluation with its uncertainty, known limitations). Nothing below is typed by hand: the data hashes come from the files, the configuration from `SFTConfig`, the validation loss from the adapter's `run.json`, the metrics and their 95 % bootstrap intervals from the replies above, the versions from the installed packages. The adapter's cache key is itself a hash of (model, data, configuration), so the same inputs always name the same adapter.
""")
code(r"""
from dataclasses import asdict

from IPython.display import Markdown, display

from labkit.deploy import model_card
from labkit.evaluate import bootstrap_ci, per_example
from labkit.runtime import versions

card_metrics = {f"{metric} ({len(tickets)} test tickets)": bootstrap_ci(values)
                for metric, values in per_example(merged_replies, golds).items()}
limits = [
    "trained on synthetic tickets in English from one generator (labkit.tickets): real tickets will be messier",
    f"a 135M-parameter model: re-quantizing its merged weights to NF4 keeps {kept['NF4 merge, re-quantized']:.0%} "
    "of the fine-tuning update (section 1); 4-bit GGUF files lose accuracy (section 4)",
    "answers triage only: given other requests it still writes triage JSON (notebook 06)",
]
card = model_card("smollm2-135m-triage", rt.model_name, sft_dir,
                  [data_dir() / "train.jsonl", data_dir() / "validation.jsonl"],
                  {k: v for k, v in asdict(sft_config).items() if k in ("steps", "batch_size", "lr", "r", "lora_alpha",
                                                                         "target_modules", "warmup_ratio", "seed")},
                  card_metrics, limits, {"weights": merged_dir / "model.safetensors"}, versions())
(merged_dir / "README.md").write_text(card)
display(Markdown(card))
""")
code(r"""
# Check: the card carries what reproduces and judges the model: data hashes, the configuration, metrics with CIs.
from labkit.checkpoint import sha256

assert sha256(data_dir() / "train.jsonl")[:16] in card and f"r: `{sft_config.r}`" in card
assert "95 % CI" in card and all(f"[{v[1]:.3f}, {v[2]:.3f}]" in card for v in card_metrics.values())
print("model card written to", merged_dir / "README.md")
""")

md(r"""
## 2. Adapters without merging: one base, many tasks

Merging is right when one model serves one task. When several tasks (or customers) share a base model, keep the adapters separate: the base is loaded once, each adapter adds a few MB, and every request picks its adapter. That is what the articles' logistics case did: one Llama 3 8B served by vLLM with task adapters for classification, invoice parsing and routing, hot-swapped per request type, "without multiplying infrastructure costs".

We put three adapters on one SmolLM2:

* **triage**: 05's SFT adapter;
* **reply**: a second small task, writing a short reply to the customer, trained here on the preference prompts' replies (both the chosen and the rejected ones, as 06's reference was), cached;
* **dpo**: 06's DPO recipe on top of *reply* (greet the customer by name), cached. It was trained with the reply adapter merged into its base, so it is selected **together with** reply: adapters are additive weight updates, $W + \Delta W_\text{reply} + \Delta W_\text{dpo}$, and peft sums every active adapter's output.

peft keeps every loaded adapter's $A$ and $B$ in memory; `set_adapter` only changes which ones the forward pass uses, so a switch is a flag flip, not a load. (vLLM goes further and mixes requests for different adapters in one batch; with peft, one selection applies to a whole forward pass.)
""")
code(r"""
from labkit.deploy import cached_adapter, load_adapters, select
from labkit.dpo import DPOConfig, greets_by_name, train_dpo
from labkit.sft import run_key

pairs = read_jsonl(data_dir() / "preferences_train.jsonl")
heldout = read_jsonl(data_dir() / "preferences_test.jsonl")
reply_rows = [{"messages": p["prompt"] + p[side]} for p in pairs for side in ("chosen", "rejected")]
reply_config = SFTConfig(steps=reply_steps, batch_size=budget["dpo_batch_size"], lr=1e-3, r=8, lora_alpha=16,
                         warmup_ratio=0.0, seed=0)
reply_result, reply_dir = cached_sft(copy.deepcopy(base), tokenizer, rt.model_name, reply_rows, None, reply_config,
                                     plot=False)
reply_base = reply_result.model.merge_and_unload()  # DPO's reference: the reply writer, merged
dpo_config = DPOConfig(steps=budget["dpo_steps"], batch_size=budget["dpo_batch_size"], lr=budget["dpo_lr"],
                       beta=budget["dpo_beta"], loss_type="sigmoid", r=8, lora_alpha=16, warmup_ratio=0.1, seed=0)
_, dpo_dir = cached_adapter(reply_base, run_key(f"{rt.model_name}+{reply_dir.name}", pairs, dpo_config),
                            lambda model: train_dpo(model, tokenizer, pairs, config=dpo_config, plot=False))
del reply_result, reply_base

start = time.perf_counter()
server_model = load_adapters(copy.deepcopy(base), {"triage": sft_dir, "reply": reply_dir, "dpo": dpo_dir})
load_s = time.perf_counter() - start
print(f"one base + 3 adapters loaded from disk in {load_s:.2f} s; adapters: {list(server_model.peft_config)}")
""")
code(r"""
import pandas as pd

routes = {"triage": "triage", "reply": "reply", "dpo": ["reply", "dpo"]}
reply_prompts = [p["prompt"] for p in heldout]
requests_log = []
for i in range(n_routed):
    task = list(routes)[i % 3]
    prompt = conversations[i] if task == "triage" else reply_prompts[i]
    switch_s = select(server_model, routes[task])
    start = time.perf_counter()
    text = generate(server_model, tokenizer, [prompt], max_new_tokens=40, progress=False)[0]
    requests_log.append({"adapter": task, "switch ms": 1e3 * switch_s,
                         "generate ms": 1e3 * (time.perf_counter() - start), "reply": text,
                         "greets by name": greets_by_name(text, heldout[i]["customer_name"]) if task != "triage" else None})
pd.set_option("display.max_colwidth", 100)
pd.DataFrame(requests_log).round(2)
""")
code(r"""
from labkit.deploy import adapter_bytes, base_bytes

MB = 1e6
one_base = base_bytes(server_model)
each = {name: adapter_bytes(server_model, name) for name in server_model.peft_config}
print(f"base {one_base / MB:.0f} MB; adapters: " + ", ".join(f"{k} {v / MB:.1f} MB" for k, v in each.items()))
print(f"3 tasks as one base + 3 adapters: {(one_base + sum(each.values())) / MB:.0f} MB; "
      f"as 3 merged models: {3 * one_base / MB:.0f} MB")
switch_ms = sorted(r["switch ms"] for r in requests_log)
print(f"median switch {switch_ms[len(switch_ms) // 2]:.2f} ms vs median request "
      f"{sorted(r['generate ms'] for r in requests_log)[len(requests_log) // 2]:.0f} ms")
""")
code(r"""
# Check: each request got its adapter's behaviour (triage JSON equal to the merged model's reply on that ticket,
# prose from the reply adapters), a switch costs a tiny fraction of a request, and 3 adapters cost far less
# memory than 3 merged models.
for i, r in enumerate(requests_log):
    if r["adapter"] == "triage":
        assert r["reply"] == merged_replies[i], (r, merged_replies[i])
    else:
        assert not r["reply"].startswith("{"), r
assert max(r["switch ms"] for r in requests_log) < 0.1 * min(r["generate ms"] for r in requests_log)
assert one_base + sum(each.values()) < 0.4 * 3 * one_base
print("one base, three behaviours, chosen per request")
""")

md(r"""
## 3. Export to GGUF

**GGUF** is llama.cpp's single-file format, and what Ollama, LM Studio and llama.cpp's server load. One file holds everything the engine needs: a header of key/value metadata (architecture, layer count, head counts, RoPE base, the tokenizer's vocabulary and merges, the chat template) and then every tensor, each stored at its own type. The types that matter:

| type | bits per weight | how | typical use |
|---|---|---|---|
| F32 / F16 | 32 / 16 | plain floats | reference, conversion source |
| Q8_0 | 8.5 | blocks of 32 int8 values + one f16 scale | near-lossless, half of F16 |
| Q4_0 | 4.5 | blocks of 32 4-bit values + one f16 scale | the simplest 4-bit |
| Q4_K_M | ~4.9 | "k-quants": super-blocks of 256 with 6-bit sub-block scales; the sensitive tensors (parts of attention V and FFN down) at 6 bits | the usual default for 7B+ models |

Norm weights stay F32 at every level (they are tiny and sensitive). `labkit.export` writes F32, F16, Q8_0 and Q4_0 itself with the `gguf` package (the library llama.cpp's own converter uses); Q4_K_M comes from llama.cpp's quantizer (`llama_cpp.llama_model_quantize`) when the engine is installed.

One detail decides whether the file works: **RoPE layout**. Hugging Face's Llama rotates the first half of each head's dimensions against the second half; llama.cpp rotates interleaved pairs (0,1), (2,3), ... The converter therefore reorders the rows of $W_q$ and $W_k$ (`labkit.export.permute_rows`) and the loader undoes it. Get it wrong and the file loads without complaint and generates nonsense. Every exported file is cached under a hash of the merged weights, so a re-run reuses it.
""")
code(r"""
from labkit.export import cached_gguf, load_gguf_model, weights_digest
from labkit.serve import check_engine

engine_ok = check_engine()  # prints what to install and returns False if llama.cpp is missing (CI: an error)
levels = ["F16", "Q8_0", "Q4_0"] + (["Q4_K_M"] if engine_ok else [])
start = time.perf_counter()
files = {level: cached_gguf(merged, tokenizer, level, name="smollm2-135m-triage") for level in levels}
n_weights = sum(p.numel() for p in merged.parameters())
for level, path in files.items():
    print(f"{level:7s} {path.stat().st_size / MB:6.0f} MB  {8 * path.stat().st_size / n_weights:5.2f} bits/weight  {path.name}")
print(f"({time.perf_counter() - start:.1f} s; cached under {files['F16'].parent})")
""")
md(r"""
**Round trip.** transformers can read GGUF too (it dequantizes to torch tensors). If the export is right, loading the F16 file gives exactly the merged model with its weights rounded to float16: not "close", but equal bit for bit, which also proves the $W_q$/$W_k$ permutation is undone correctly. Against the fp32 merged model the only difference left is that rounding.
""")
code(r"""
start = time.perf_counter()
from_gguf = load_gguf_model(files["F16"])
gguf_load_s = time.perf_counter() - start
rounded = copy.deepcopy(merged)
with torch.no_grad():
    for p in rounded.parameters():
        if p.ndim == 2:  # the file keeps norms in F32, matrices in F16
            p.copy_(p.half().float())
gguf_state = from_gguf.state_dict()
same_weights = all(torch.equal(value, gguf_state[name]) for name, value in rounded.state_dict().items())
gguf_gap = max_logit_gap(merged, from_gguf, tokenizer, conversations[:4])
rounding_gap = max_logit_gap(merged, rounded, tokenizer, conversations[:4])
del rounded, from_gguf
print(f"loaded the F16 GGUF in {gguf_load_s:.0f} s; weights equal to the fp16-rounded merged model: {same_weights}")
print(f"max |logit difference| vs the fp32 merged model: GGUF F16 {gguf_gap:.2e}, torch fp16 rounding {rounding_gap:.2e}")
""")
code(r"""
# Check: the F16 file holds exactly the merged weights rounded to float16, so its logits differ from the merged
# model's by float16 rounding and nothing else; each quantization level is smaller than the last.
assert same_weights and gguf_gap == rounding_gap and gguf_gap < 0.1, (same_weights, gguf_gap, rounding_gap)
sizes = [files[level].stat().st_size for level in ["F16", "Q8_0", "Q4_0"]]
assert sizes[0] > sizes[1] > sizes[2] and sizes[0] < 0.55 * merged_mb * MB
print("GGUF export verified")
""")

md(r"""
## 4. Serve it on a real inference engine

`llama-cpp-python` wraps llama.cpp (C/C++, CPU-first, also CUDA and Metal) and ships an **OpenAI-compatible HTTP server**: the same `/v1/chat/completions` API as a managed service, so client code does not change when you move between them. We start it on 127.0.0.1 on a free port for each GGUF file, send the test tickets over HTTP (greedy, streamed, so the **time to first token** can be measured), then send `n_concurrent` requests at once, and shut it down (`with Server(...)` stops it even if a cell fails).

What is measured per quantization level (llama.cpp on one CPU thread, see the comment in the next cell): per-field accuracy of the served replies with the course's own triage metrics, against the in-notebook merged model on the same tickets; TTFT (prompt processing); decode tokens/s of a single request (batch 1); aggregate tokens/s with 8 requests in flight; the server's resident memory.

If llama.cpp is not installed here, the cells below print what to install and skip (set `LABKIT_REQUIRE_ENGINE=1`, as CI does, to make that an error instead).
""")
code(r"""
from labkit.serve import Server, chat, chat_many, summarize

# Two CPU settings, both learned the hard way on the course's 2-core test machine:
# * threads: llama.cpp's threads wait for each other by spinning at every step; if one is descheduled (another job
#   on the machine) all of them stall, and decoding fell from ~25 tokens/s to below 1. One thread is the safe choice
#   on a shared machine; on a dedicated one give it every core.
# * n_batch: llama-cpp-python 0.3.36 crashed (segmentation fault) evaluating multi-token prompt batches of the
#   quantized files on an AVX512/AMX CPU; a batch of 1 token works. It slows the prompt (time to first token), the
#   same for every level, so the comparison stays fair. Raise it on your machine if it does not crash there.
engine_threads, engine_batch = (1, 1) if rt.device == "cpu" else (rt.threads, 512)
if engine_ok:
    with Server(files["F16"], threads=engine_threads, n_batch=engine_batch) as server:
        print("started:", " ".join(server.command()[1:]), f"\nanswering after {server.startup_s:.1f} s")
        first = chat(server.url, conversations[0])
        print(f"POST {server.url}/v1/chat/completions -> {first.text!r}")
        print(f"TTFT {first.ttft * 1e3:.0f} ms, {first.tokens} tokens in {first.seconds:.2f} s")
""")
code(r"""
served_tickets = conversations[:n_served]
served_golds = golds[:n_served]
# the in-notebook model at batch 1, for speed (the same tickets, one at a time)
start = time.perf_counter()
local_batch1 = [generate(merged, tokenizer, [c], max_new_tokens=48, progress=False)[0] for c in served_tickets[:8]]
local_tokens = sum(len(tokenizer(r)["input_ids"]) + 1 for r in local_batch1)
local_tok_s = local_tokens / (time.perf_counter() - start)
served = {}
if engine_ok:
    for level, path in files.items():
        with Server(path, threads=engine_threads, n_batch=engine_batch) as server:
            replies, wall = chat_many(server.url, served_tickets, concurrency=1)
            burst, burst_wall = chat_many(server.url, served_tickets[:n_concurrent], concurrency=n_concurrent)
            served[level] = {"replies": [r.text for r in replies], "batch 1": summarize(replies, wall),
                             "concurrent": summarize(burst, burst_wall), "rss MB": server.rss() / MB,
                             "file MB": path.stat().st_size / MB}
        print(f"{level}: done")
""")
code(r"""
import matplotlib.pyplot as plt

if engine_ok:
    serve_table = compare({"transformers fp32 (in notebook)": merged_replies[:n_served],
                           **{f"llama.cpp {k}": v["replies"] for k, v in served.items()}}, served_golds)
    serve_table.insert(0, "file MB", [merged_mb] + [v["file MB"] for v in served.values()])
    serve_table.insert(1, "same reply as in-notebook", [1.0] + [
        sum(a == b for a, b in zip(v["replies"], merged_replies)) / n_served for v in served.values()])
    serve_table["TTFT ms"] = [float("nan")] + [1e3 * v["batch 1"]["ttft_s"] for v in served.values()]
    serve_table["tok/s batch 1"] = [local_tok_s] + [v["batch 1"]["decode_tok_s"] for v in served.values()]
    serve_table[f"tok/s {n_concurrent} concurrent"] = [float("nan")] + [
        v["concurrent"]["throughput_tok_s"] for v in served.values()]
    serve_table[f"TTFT ms {n_concurrent} concurrent"] = [float("nan")] + [
        1e3 * v["concurrent"]["ttft_s"] for v in served.values()]
    serve_table["server RSS MB"] = [float("nan")] + [v["rss MB"] for v in served.values()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    names = list(serve_table.index)
    axes[0].barh(names, serve_table["field_acc"], xerr=[serve_table["field_acc"] - [c[0] for c in serve_table["_field_acc_ci"]],
                                                          [c[1] for c in serve_table["_field_acc_ci"]] - serve_table["field_acc"]])
    axes[0].set(xlabel="per-field accuracy (95 % CI)", xlim=(0, 1))
    axes[1].barh(names, serve_table["tok/s batch 1"])
    axes[1].set(xlabel="decode tokens/s, batch 1")
    axes[1].set_yticklabels([])
    fig.tight_layout()
    plt.show()
    display(serve_table[["file MB", "field_acc", "field_acc 95% CI", "json_valid", "same reply as in-notebook", "TTFT ms",
                         "tok/s batch 1", f"tok/s {n_concurrent} concurrent", f"TTFT ms {n_concurrent} concurrent",
                         "server RSS MB"]].round(3))
""")
md(r"""
How to read it:

* **F16 is the same model**: its replies match the in-notebook model's on (nearly) every ticket and its accuracy lies inside the in-notebook model's confidence interval. Q8_0 stays close. At 4 bits expect a 135M model to degrade (the course's first measurements found 4-bit replies identical on 1 of 5 prompts, some gibberish): its weights have no redundancy to spare, so small rounding errors change greedy choices and the replies drift; read the table for what happened on this run. Bigger models tolerate 4 bits far better; that is why Q4_K_M is the usual default for 7B+ models, and why you **measure your own model at the level you ship**, never assume.
* **Speed** comes from the C++ kernels and smaller weights: decoding one token reads every weight once, so fewer bytes per weight means more tokens per second on a memory-bound CPU.
* **Concurrency**: llama-cpp-python's server handles one request at a time, so 8 concurrent requests mostly wait in line: aggregate throughput stays near batch 1 while the time to first token grows with the queue. Engines built for serving (vLLM, TGI, llama.cpp's own `llama-server` with `--parallel`) use **continuous batching**: requests join and leave a running batch every step, so 8 requests cost little more than one (section 5).
""")
code(r"""
# Check: the served F16 model is the in-notebook model: the same replies on at least 90 % of the tickets and a
# per-field accuracy inside its confidence interval; llama.cpp decodes faster than transformers at batch 1;
# smaller files decode at least as fast as F16.
if engine_ok:
    lo, hi = serve_table.loc["transformers fp32 (in notebook)", "_field_acc_ci"]
    f16 = serve_table.loc["llama.cpp F16"]
    assert f16["same reply as in-notebook"] >= 0.9 and lo <= f16["field_acc"] <= hi, f16
    assert f16["tok/s batch 1"] > local_tok_s, (f16["tok/s batch 1"], local_tok_s)
    assert served["Q8_0"]["batch 1"]["decode_tok_s"] > 0.8 * served["F16"]["batch 1"]["decode_tok_s"]
    assert all(v["concurrent"]["ttft_s"] >= v["batch 1"]["ttft_s"] for v in served.values())
    print("served == in-notebook at F16; quantization trades accuracy for speed and size, measured")
else:
    print("serving skipped: llama.cpp is not installed here")
""")

md(r"""
## 5. The deployment decision

| engine | runs on | strengths | use it when |
|---|---|---|---|
| **vLLM** | NVIDIA/AMD GPUs | PagedAttention, continuous batching, many LoRA adapters per batch, OpenAI API | production GPU serving at high concurrency |
| **TGI** (Hugging Face Text Generation Inference) | GPUs (also Gaudi, Inferentia) | continuous batching, multi-LoRA, Hugging Face Hub integration | you live in the Hugging Face ecosystem / Inference Endpoints |
| **Ollama** | laptop/desktop CPU or GPU | one command, GGUF, model registry | development, local testing, offline and edge use |
| **llama.cpp** (`llama-server`, `llama-cpp-python`) | CPU, Apple Metal, CUDA | GGUF quantization down to 2-8 bits, tiny footprint | CPU or edge serving, small models, no GPU |
| **CTranslate2** | CPU and GPU | int8 inference, fast Transformer kernels | CPU serving of encoder-decoder and small decoder models |
| **managed API** (Bedrock, Vertex AI, Azure AI Foundry, OpenAI fine-tuning) | provider | no infrastructure, pay per token | low or spiky volume, no ML ops team |

vLLM, TGI and Ollama do not install on this CPU-only machine. On a GPU box, the same merged folder and GGUF file serve like this:

```bash
# vLLM: the merged model, or the base plus adapters chosen per request by name (OpenAI API on :8000)
pip install vllm
vllm serve ./smollm2-135m-triage --max-model-len 2048
vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora --lora-modules triage=./adapters/triage reply=./adapters/reply
# TGI (Docker): the merged folder mounted into the container
docker run --gpus all -p 8080:80 -v $PWD:/data ghcr.io/huggingface/text-generation-inference:latest --model-id /data/smollm2-135m-triage
# Ollama: the GGUF file and the Modelfile written below
ollama create triage -f Modelfile && ollama run triage "My order ORD-12345 never arrived!"
# llama.cpp (what this notebook ran)
python -m llama_cpp.server --model smollm2-135m-triage-Q8_0.gguf --host 127.0.0.1 --port 8000
```

**What it costs.** The articles price GPU time at about \$2/hour for an A100 (\$1.50-3.50 from the rental providers), and tell of a logistics company whose GPT-4 API bill had reached \$18,000 a month before it moved to a fine-tuned Llama 3 8B on vLLM. An hour-priced server costs the same whether it is busy or idle, so its cost per token is price / throughput. Below, that formula with the throughput we measured on this machine (a 2-core CPU serving a 135M model); put in your own engine's measured tokens/s at the concurrency you expect.
""")
code(r"""
from labkit.deploy import cost_per_million_tokens

if engine_ok:
    speed = {f"{level} batch 1": v["batch 1"]["throughput_tok_s"] for level, v in served.items()}
    speed.update({f"{level} x{n_concurrent}": v["concurrent"]["throughput_tok_s"] for level, v in served.items()})
else:  # without the engine: the in-notebook model's measured speed
    speed = {"transformers fp32 batch 1": local_tok_s}
tokens_per_ticket = sum(len(tokenizer(r)["input_ids"]) + 1 for r in merged_replies) / len(merged_replies)
rows = []
for name, tok_s in speed.items():
    tickets_month = tok_s / tokens_per_ticket * 3600 * 730
    rows.append({"served as": name, "tokens/s": tok_s,
                 **{f"$/1M tokens at ${p}/h": cost_per_million_tokens(tok_s, p) for p in (1.5, 2.0, 3.5)},
                 "tickets/month per server": tickets_month,
                 "servers for 10M tickets/month": 10e6 / tickets_month})
cost_table = pd.DataFrame(rows).set_index("served as")
print(f"{tokens_per_ticket:.1f} generated tokens per triage reply; one server running all month at $2/h costs "
      f"${2.0 * 730:,.0f}, vs the articles' $18,000/month API bill")
cost_table.round(2)
""")
code(r"""
# Check: the cost formula is the articles' arithmetic: $2/h at 1,000 tokens/s is $0.56 per million tokens,
# and a faster server is cheaper per token.
assert abs(cost_per_million_tokens(1000, 2.0) - 2.0 / 3.6) < 1e-9
col = "$/1M tokens at $2.0/h"
assert (cost_table[col].rank() == cost_table["tokens/s"].rank(ascending=False)).all()
print("cost per token = price per hour / tokens per hour")
""")

md(r"""
### An Ollama Modelfile for the exported file

Ollama packages a GGUF file with its prompt template, default system prompt and sampling parameters in a **Modelfile**. The template is written in Go's template language; ours spells out SmolLM2's ChatML turns. Ollama is not installed here, so `labkit.deploy.check_modelfile` parses the file the way `ollama create` does (known instructions and parameters, closed triple quotes, a FROM file that exists) and we check that the template produces the same prompt text as the model's own chat template.
""")
code(r"""
import shutil

from labkit.deploy import check_modelfile, modelfile
from labkit.tickets import SYSTEM_PROMPT

ship = "Q8_0"  # the smallest level that kept the in-notebook model's accuracy above
shutil.copy(files[ship], workdir / files[ship].name)
(workdir / "Modelfile").write_text(modelfile(files[ship].name, SYSTEM_PROMPT))
parsed = check_modelfile((workdir / "Modelfile").read_text(), workdir)
print((workdir / "Modelfile").read_text())
# the Go template, rendered by hand for one conversation: {{ range .Messages }} ... {{ end }}
rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conversations[0]) + "<|im_start|>assistant\n"
expected = tokenizer.apply_chat_template(conversations[0], tokenize=False, add_generation_prompt=True)
print("template renders the chat template's prompt:", rendered == expected)
""")
code(r"""
# Check: the Modelfile parses, points at the exported file, is greedy, and its template is the model's chat format.
assert parsed["FROM"] == [f"./{files[ship].name}"] and "temperature 0" in parsed["PARAMETER"]
assert rendered == expected, (rendered, expected)
print("Modelfile ready: ollama create triage -f", workdir / "Modelfile")
""")

md(r"""
### Three production patterns

The articles describe three ways teams put fine-tuned models into production:

1. **Managed cloud fine-tuning**: training data in a bucket, a provider's fine-tuning API (Bedrock, Vertex AI, Azure AI Foundry, OpenAI at \$5-25 per million training tokens), a managed endpoint. No GPUs to run; you pay per token and accept the provider's models and limits. Best for teams without ML infrastructure and for small or spiky volume.
2. **Self-hosted training + serving**: train a LoRA adapter on a rented GPU, merge, serve with vLLM (what this course does, end to end). You own the weights, the latency and the cost curve; you also own the on-call. Best at steady volume, where an hour-priced server is busy enough to beat per-token prices (the table above).
3. **Continuous fine-tuning**: production logs -> data pipeline -> periodic (e.g. weekly) retrain -> A/B test -> gradual rollout. The model keeps up with the data; it needs the eval harness (05, 07) as an automatic gate, and versioning, so every deployed model can be traced and rolled back.

**Versioning and reproducibility** make patterns 2 and 3 safe: hash the data (the model card above does), record the full configuration and seed, pin library versions (`requirements-lock.txt`), keep adapters and merged weights in a registry (Hugging Face Hub, MLflow) under a version that names the data and config, and ship the model card with every model. In this course, the adapter cache key is exactly that: a hash of model, data and configuration.
""")
code(r"""
shutil.rmtree(workdir)  # the merged folder, card and Modelfile were for this session; the GGUF files stay cached
print(f"notebook ran in {time.perf_counter() - started:.0f} s")
""")
md(r"""
## What you have now

* proof that a merged adapter is the same model (identical replies, logits equal to rounding), and a measured reason never to merge into a 4-bit base;
* a safetensors folder with a model card written from the run's own records;
* three adapters on one base, switched per request for a fraction of a millisecond, at a fraction of the memory of three merged models;
* GGUF files at F16, Q8_0 and 4 bits, written by `labkit.export` and verified bit for bit;
* the model served over an OpenAI-compatible API by llama.cpp, with accuracy, time to first token and throughput per quantization level, and the cost arithmetic that turns tokens/s into dollars;
* the commands for vLLM, TGI and Ollama, and the three production patterns.
""")


def cell_id(i: int, kind: str) -> str:
    return hashlib.sha1(f"08-{i}-{kind}".encode()).hexdigest()[:8]


def lines(text: str) -> list[str]:
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + [parts[-1]]


nb_cells = []
for i, (kind, text) in enumerate(cells):
    cell = {"cell_type": kind, "id": cell_id(i, kind), "metadata": {}, "source": lines(text)}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    nb_cells.append(cell)
template = json.loads(Path("/work/main/notebooks/05_sft.ipynb").read_text())
nb = {"cells": nb_cells, "metadata": template["metadata"], "nbformat": template["nbformat"],
      "nbformat_minor": template["nbformat_minor"]}
PATH.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
from labkit.colab import write_colab_cell  # noqa: E402

write_colab_cell(PATH)
print("wrote", PATH, len(nb_cells), "cells")
