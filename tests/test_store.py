"""Specifications of labkit.store: writes that survive an interrupt or a full disk, leftovers that the next write
removes, and the one cache path whose entries keep the names they had before it existed."""

import errno
import importlib.metadata
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from labkit import store
from labkit.checkpoint import CHECKSUMS, latest_checkpoint, load_checkpoint, run_identity, save_adapter
from labkit.data import read_jsonl
from labkit.paths import data_dir
from labkit.sft import SFTConfig, add_lora, train_sft
from labkit.store import StoreError, cached, clean_leftovers, remove, write_file, write_folder, write_text

pytestmark = pytest.mark.usefixtures("one_thread")


def leftovers(folder: Path) -> list[Path]:
    """Every `.tmp-*` name under `folder`."""
    return sorted(p for p in folder.rglob("*") if p.name.startswith(".tmp-"))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# ---------------------------------------------------------------- writes that survive


def test_a_file_is_replaced_whole(tmp_path):
    write_text(tmp_path / "f.json", "old")
    write_text(tmp_path / "f.json", "new")
    assert (tmp_path / "f.json").read_text() == "new" and leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_file_and_no_leftover(tmp_path):
    write_text(tmp_path / "f.json", "old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_file(tmp_path / "f.json", half_then_fail)
    assert (tmp_path / "f.json").read_text() == "old" and leftovers(tmp_path) == []


def test_a_folder_is_replaced_whole_and_the_old_one_removed(tmp_path):
    write_folder(tmp_path / "run", lambda tmp: (tmp / "a").write_text("old"))
    write_folder(tmp_path / "run", lambda tmp: (tmp / "b").write_text("new"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["b"] and leftovers(tmp_path) == []


def test_a_folder_is_swapped_in_even_without_an_atomic_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "exchange", lambda a, b: False)  # macOS, or a file system without renameat2
    write_folder(tmp_path / "run", lambda tmp: (tmp / "a").write_text("old"))
    write_folder(tmp_path / "run", lambda tmp: (tmp / "b").write_text("new"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["b"] and leftovers(tmp_path) == []


def test_leftovers_of_a_dead_writer_are_removed_by_the_next_write(tmp_path):
    pid = dead_pid()
    for name in (f".tmp-{pid}-{store.HOST}-abcdef-new-state", f".tmp-{pid}-{store.HOST}-012345-del-checkpoint-1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.pt").write_bytes(b"half a file")
    write_text(tmp_path / "latest", "checkpoint-2")
    assert leftovers(tmp_path) == []


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    busy = tmp_path / f".tmp-{os.getppid()}-{store.HOST}-abcdef-new-adapter"  # our parent: alive, and older than it
    busy.mkdir()
    write_text(tmp_path / "latest", "x")
    assert busy.exists()


def test_leftovers_of_labkits_older_writers_are_removed_once_older_than_this_process(tmp_path):
    for name in (".tmp-k3j9x2ab", ".latest.tmp", "0a751b722846dce86af278a3.tmp4242"):
        (tmp_path / name).write_text("half")
        os.utime(tmp_path / name, (store.STARTED - 60, store.STARTED - 60))
    assert len(clean_leftovers(tmp_path)) == 3 and list(tmp_path.iterdir()) == []


def test_a_folder_set_aside_by_a_killed_replace_is_put_back(tmp_path):
    aside = tmp_path / f".tmp-{dead_pid()}-{store.HOST}-abcdef-old-checkpoint-3"
    aside.mkdir()
    (aside / "state.pt").write_text("complete")
    clean_leftovers(tmp_path)
    assert (tmp_path / "checkpoint-3" / "state.pt").read_text() == "complete" and leftovers(tmp_path) == []


def test_a_removed_folder_is_whole_or_gone(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / "state.pt").write_text("x")
    remove(tmp_path / "checkpoint-1")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_is_named_and_leaves_the_old_file_and_no_leftover(tmp_path):
    write_text(tmp_path / "f.json", "old")

    def fill(tmp: Path) -> None:
        tmp.write_text("half")
        full_disk()

    with pytest.raises(StoreError) as err:
        write_file(tmp_path / "f.json", fill)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tmp_path}: no space left on the disk (mounted at ")
    assert "to write f.json" in message and "Fix: free space on that disk" in message
    assert (tmp_path / "f.json").read_text() == "old" and leftovers(tmp_path) == []


def test_torchs_write_failure_on_a_full_disk_is_named_as_such(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "free_bytes", lambda folder: 0)
    torch_says = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert store.is_disk_full(torch_says, tmp_path)
    monkeypatch.setattr(store, "free_bytes", lambda folder: 10 * 2**30)
    assert not store.is_disk_full(torch_says, tmp_path)  # not full: another failure, reported as torch words it


def test_safetensors_and_oserror_wordings_of_a_full_disk_are_recognised(tmp_path):
    assert store.is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert store.is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
                              tmp_path)
    assert not store.is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)


# ---------------------------------------------------------------- the one cache path


def test_cached_computes_once_then_loads(tmp_path):
    calls = []
    compute = lambda: calls.append(1) or {"answer": 42}  # noqa: E731
    save = lambda result, tmp: tmp.write_text(json.dumps(result))  # noqa: E731
    first = cached(tmp_path / "r.json", store.read_json, compute, save)
    second = cached(tmp_path / "r.json", store.read_json, compute, save)
    assert first == second == {"answer": 42} and calls == [1]


def test_cached_checks_the_folder_is_writable_before_computing(tmp_path):
    (tmp_path / "home").write_text("a file, not a folder")
    with pytest.raises(StoreError, match="home: cannot write there.*Fix: set LABKIT_HOME"):
        cached(tmp_path / "home" / "r.json", store.read_json, lambda: pytest.fail("computed first"), None)


def test_a_damaged_cached_json_names_its_file_and_the_fix(tmp_path):
    (tmp_path / "r.json").write_text("[3,")
    with pytest.raises(StoreError, match=r"r.json: cached result is not valid JSON \(line 1.*Fix: delete"):
        cached(tmp_path / "r.json", store.read_json, lambda: 1, None)


# ---------------------------------------------------------------- cache entries keep their names
# Computed with the code as it was before labkit.store existed (commit 0387178): a changed key retrains every run.

TRAIN = [{"messages": [{"role": "user", "content": "My invoice is wrong, café order 123"},
                       {"role": "assistant", "content": "{\"category\": \"billing\"}"}]},
         {"messages": [{"role": "user", "content": "App crashes"}, {"role": "assistant", "content": "bug"}]}]
PAIRS = [{"prompt": [{"role": "user", "content": "Hi, I am Ana"}], "chosen": [{"role": "assistant", "content": "Hi Ana!"}],
          "rejected": [{"role": "assistant", "content": "Hello."}]}]
NAME = "SmolLM2-135M-Instruct"
PINNED = {
    "fp32": {"sft": "836fa95abeef2fef", "sft course": "04180958b6735021", "dpo": "0db55751725ff286",
             "orpo": "b96c2fe45ae3f127", "kto": "d3b8299f79079c4a", "full_ft": "ebb5f2ee00e29056",
             "full_ft no validation": "d0132e98fd1519ec"},
    "bf16": {"sft": "9620f6ff57d9352c", "sft course": "4ee7eb6190743e08", "dpo": "e2c2c51325d715e1",
             "orpo": "e4e1f0735218d404", "kto": "742e71ff5b3e7d32", "full_ft": "61af970778b19782",
             "full_ft no validation": "a9e8bec8397bd554"},
}


def configs():
    from labkit.dpo import DPOConfig
    from labkit.full_ft import FullFTConfig
    from labkit.preference import KTOConfig, ORPOConfig

    return {
        "sft": SFTConfig(),
        "sft course": SFTConfig(steps=120, batch_size=4, lr=2e-3, eval_every=40, patience=2,
                                target_modules=["q_proj", "v_proj"]),
        "dpo": DPOConfig(steps=10, batch_size=4, lr=2e-4, beta=0.1, r=8, lora_alpha=16, warmup_ratio=0.1),
        "orpo": ORPOConfig(steps=24, lr=1e-3),
        "kto": KTOConfig(),
        "full_ft": FullFTConfig(steps=120, batch_size=4),
        "full_ft no validation": FullFTConfig(),
    }


@pytest.fixture()
def on_cpu(monkeypatch):
    """Keys as a CPU computes them (precision comes from LABKIT_DTYPE), on any machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    return monkeypatch


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_run_keys_are_the_ones_cached_runs_were_stored_under(on_cpu, dtype):
    from labkit.full_ft import full_ft_key
    from labkit.sft import run_key

    on_cpu.setenv("LABKIT_DTYPE", dtype)
    given = configs()
    keys = {kind: run_key(NAME + {"dpo": "+abc+def", "orpo": "+abc", "kto": "+abc"}.get(kind, ""),
                          PAIRS if kind in ("dpo", "orpo", "kto") else TRAIN, config)
            for kind, config in given.items() if not kind.startswith("full_ft")}
    keys["full_ft"] = full_ft_key(NAME, TRAIN, TRAIN[:1], given["full_ft"])
    keys["full_ft no validation"] = full_ft_key(NAME, TRAIN, None, given["full_ft no validation"])
    assert keys == PINNED[dtype]


def pin_versions(monkeypatch) -> None:
    """The library versions and interpreter a call key names, fixed (bitsandbytes: not installed)."""
    versions = {"torch": "2.13.0", "transformers": "5.23.0", "peft": "0.21.2"}

    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(sys, "version", "3.11.7 (pinned)")  # a built-in's "source" is the interpreter's version


def test_call_keys_are_the_ones_measured_runs_were_stored_under(monkeypatch):
    from labkit.measure import call_key

    pin_versions(monkeypatch)
    assert call_key(divmod, (17, 5), {}) == "60191bbd57501bb9"
    assert call_key(int, ("ff",), {"base": 16}) == "0e48a21aa21924df"
    assert call_key(divmod, (Path("/x"), 1.5), {"quantized": True, "cfg": {"r": 8}}) == "bb21015a4ee48cf0"


def test_verdict_keys_are_the_ones_cached_verdicts_were_stored_under():
    from labkit.judge import verdict_key

    assert verdict_key([{"role": "user", "content": "Is “café” billing? ü"}], ["yes", "no"]) == (
        "ed5ac654262c8c79a3620bf698f4625ce857047272437b7668997e47e03540e3")


def no_training(*args, **kwargs):
    pytest.fail("computed again: the cache entry was not found under its old name")


@pytest.mark.parametrize("kind", ["sft", "orpo", "kto"])
def test_a_cached_adapter_is_found_under_its_old_folder_name(kind, on_cpu, tiny_llama, tmp_path):
    from labkit import preference, sft

    on_cpu.setenv("LABKIT_DTYPE", "fp32")
    on_cpu.setenv("LABKIT_HOME", str(tmp_path))
    config = configs()[kind]
    prefix = "" if kind == "sft" else f"{kind}-"
    save_adapter(add_lora(tiny_llama(), config), tmp_path / "adapters" / f"{prefix}{PINNED['fp32'][kind]}", {"best_step": 7})
    on_cpu.setattr(sft, "train_sft", no_training)
    on_cpu.setattr(preference, "train_preference", no_training)
    if kind == "sft":
        result, folder = sft.cached_sft(tiny_llama(), None, NAME, TRAIN, None, config)
    else:
        result, folder = preference.cached_preference(tiny_llama(), None, NAME + "+abc", PAIRS, config)
    assert result.best_step == 7 and folder.name == f"{prefix}{PINNED['fp32'][kind]}"


def test_a_cached_dpo_run_is_found_under_its_old_folder_name(on_cpu, tiny_llama, tmp_path):
    from labkit import dpo

    on_cpu.setenv("LABKIT_DTYPE", "fp32")
    on_cpu.setenv("LABKIT_HOME", str(tmp_path))
    config = configs()["dpo"]
    save_adapter(add_lora(tiny_llama(), config), tmp_path / "adapters" / f"dpo-{PINNED['fp32']['dpo']}", {"best_step": 3})
    on_cpu.setattr(dpo, "train_dpo", no_training)
    result, folder = dpo.cached_dpo(add_lora(tiny_llama(), config), None, NAME + "+abc+def", PAIRS, config)
    assert result.best_step == 3 and folder.name == f"dpo-{PINNED['fp32']['dpo']}"


def test_a_cached_full_fine_tune_is_found_under_its_old_folder_name(on_cpu, tiny_llama, tmp_path):
    from labkit import full_ft

    on_cpu.setenv("LABKIT_DTYPE", "fp32")
    on_cpu.setenv("LABKIT_HOME", str(tmp_path))
    trained = full_ft.FullFTResult(tiny_llama(seed=1), [{"step": 1, "loss": 1.0}], 1, 0.5, 2.0)
    write_folder(tmp_path / "full_ft" / PINNED["fp32"]["full_ft"], lambda tmp: full_ft.save_full_ft(trained, tmp))
    on_cpu.setattr(full_ft, "train_full", no_training)
    result, folder = full_ft.cached_full_ft(tiny_llama(), None, NAME, TRAIN, TRAIN[:1], configs()["full_ft"])
    assert folder.name == PINNED["fp32"]["full_ft"] and result.best_val_loss == 0.5
    assert torch.equal(result.model.lm_head.weight, trained.model.lm_head.weight)


def test_a_measured_run_is_found_under_its_old_file_name(monkeypatch, tmp_path):
    from labkit import measure

    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    pin_versions(monkeypatch)
    write_text(tmp_path / "runs" / "divmod-60191bbd57501bb9.json", "[9, 9]")
    monkeypatch.setattr(measure, "run_isolated", no_training)
    assert measure.cached_isolated_run(divmod, 17, 5) == ([9, 9], tmp_path / "runs" / "divmod-60191bbd57501bb9.json")


@pytest.mark.parametrize("batch_size, name", [(32, "0a751b722846dce86af278a3"), (8, "ae4cf17fce5e464ccf501efc")])
def test_cached_replies_are_found_under_their_old_file_name(batch_size, name, on_cpu, vocab_llama, tokenizer, tmp_path):
    from labkit import evaluate

    on_cpu.setenv("LABKIT_DTYPE", "fp32")
    on_cpu.setenv("LABKIT_HOME", str(tmp_path))
    write_text(tmp_path / "replies" / f"{name}.json", json.dumps({"model": "m", "replies": ["from the cache"]}))
    on_cpu.setattr(evaluate, "generate", no_training)
    conversations = [[{"role": "user", "content": "Où est ma commande 42?"}]]
    replies = evaluate.cached_generate(vocab_llama(), tokenizer, conversations, 3, f"{NAME}+0123456789abcdef",
                                       progress=False, batch_size=batch_size)
    assert replies == ["from the cache"]


# ---------------------------------------------------------------- training runs that survive kill -9 and a full disk

CONFIG = SFTConfig(steps=3, batch_size=2, r=4, lora_alpha=8, max_length=128, eval_every=3, checkpoint_every=1)


@pytest.fixture(scope="module")
def examples():
    return read_jsonl(data_dir() / "train.jsonl")[:4]


def run_to_the_end(model, tokenizer, examples, out: Path) -> None:
    """What `python -m labkit sft` does: resume (or start) the run in `out`, then save its adapter."""
    result = train_sft(model, tokenizer, examples, None, CONFIG, out_dir=out, resume=True, plot=False, progress=False)
    save_adapter(result.model, out / "adapter", {"history": result.history})


def adapter_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "adapter").iterdir())}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (Linux, macOS)")
def test_kill_9_at_random_moments_leaves_no_leftover_after_the_rerun_and_the_same_adapter(vocab_llama, tokenizer,
                                                                                           examples, tmp_path):
    started = time.perf_counter()
    run_to_the_end(vocab_llama(), tokenizer, examples, tmp_path / "uninterrupted")
    one_run = time.perf_counter() - started  # to spread the kills over a whole run and its writes
    rng, seen = random.Random(0), []
    for trial in range(12):
        out = tmp_path / f"trial-{trial}"
        pid = os.fork()
        if pid == 0:  # the child writes checkpoints and the adapter, again and again, until it is killed
            try:
                while True:
                    run_to_the_end(vocab_llama(), tokenizer, examples, out)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 1.5 * one_run))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        seen.append(len(leftovers(out)) if out.exists() else 0)
        run_to_the_end(vocab_llama(), tokenizer, examples, out)  # the rerun
        assert leftovers(out) == [], f"trial {trial}"
        assert adapter_bytes(out) == adapter_bytes(tmp_path / "uninterrupted"), f"trial {trial}"
    print(f"12 kill -9 trials; .tmp-* leftovers found right after each kill: {seen}")


def test_a_full_disk_at_a_checkpoint_is_named_keeps_the_last_one_and_the_rerun_resumes(vocab_llama, tokenizer,
                                                                                        examples, tmp_path, monkeypatch):
    run_to_the_end(vocab_llama(), tokenizer, examples, tmp_path / "uninterrupted")
    out, real_save = tmp_path / "run", torch.save

    def disk_fills_at_step_2(state, path, *args, **kwargs):
        if state["step"] == 2:
            Path(path).write_bytes(b"half a checkpoint")
            full_disk()
        real_save(state, path, *args, **kwargs)

    with monkeypatch.context() as disk:
        disk.setattr(torch, "save", disk_fills_at_step_2)
        with pytest.raises(StoreError) as err:
            run_to_the_end(vocab_llama(), tokenizer, examples, out)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{out}: no space left on the disk")
    assert "to write checkpoint-2" in message and "resumes from its last checkpoint" in message
    assert leftovers(out) == [] and latest_checkpoint(out) == out / "checkpoint-1"
    model = add_lora(vocab_llama(), CONFIG)
    assert load_checkpoint(out, model, run_identity(model, "SFT"))["step"] == 1  # verified against its SHA256SUMS
    assert (out / "checkpoint-1" / CHECKSUMS).is_file()
    run_to_the_end(vocab_llama(), tokenizer, examples, out)  # space freed: the rerun resumes from checkpoint-1
    assert adapter_bytes(out) == adapter_bytes(tmp_path / "uninterrupted")
