"""Fault injection: every mistake a learner can make with data files, checkpoints, adapters and max_length
gets one LabkitError with a one-line message (what, where, how to fix), and leaves every file as it was.

Training faults run on a tiny random Llama with SmolLM2's tokenizer, so each takes well under a second.
"""

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from labkit import LabkitError
from labkit.checkpoint import CheckpointError, load_adapter_weights, load_cached_adapter, save_adapter
from labkit.data import DataError, read_jsonl, read_lines
from labkit.dataprep import load_jsonl
from labkit.dpo import DPOConfig, dpo_objective, tokenize_pair, train_dpo
from labkit.paths import data_dir
from labkit.sft import IGNORE, SFT, SFTConfig, add_lora, keep_labelled, tokenize_chat, train_sft
from labkit.store import StoreError

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = {"messages": [{"role": "user", "content": "My invoice shows the wrong amount."},
                     {"role": "assistant", "content": "billing"}]}
CFG = SFTConfig(steps=2, batch_size=2, r=4, lora_alpha=8, max_length=256, eval_every=1, checkpoint_every=1)


def snapshot(root: Path) -> dict[str, str]:
    """SHA-256 of every file under root (or of root itself), to show a fault changed nothing."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def one_line(err: pytest.ExceptionInfo) -> str:
    """The error's message, checked to be a single line with a fix."""
    message = str(err.value)
    assert "\n" not in message and "Fix:" in message, message
    return message


def finishes(fn, seconds: float = 10.0):
    """Run fn in a thread and return its exception (or None); fail if it is still running after `seconds`."""
    outcome: list = []

    def target():
        try:
            fn()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            outcome.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still reading after {seconds} s"
    return outcome[0]


# ---------------------------------------------------------------- data files: one line, for every loader


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


FILE_FAULTS = {  # name: (make the path in tmp_path, what the message says)
    "folder": (lambda d: (d / "data.jsonl").mkdir() or d / "data.jsonl", "is a folder, not a file"),
    "missing": (lambda d: d / "trian.jsonl", "no such file"),
    "dev_zero": (lambda d: Path("/dev/zero"), "is a device or other special file"),
    "dev_urandom": (lambda d: Path("/dev/urandom"), "is a device or other special file"),
    "fifo": (lambda d: os.mkfifo(d / "stream.jsonl") or d / "stream.jsonl", "is a FIFO (named pipe)"),
    "gzip": (lambda d: (d / "f.jsonl").write_bytes(gzip.compress(jsonl([GOOD]).encode())) and d / "f.jsonl",
             "is gzip-compressed, not JSON Lines. Fix: decompress it first"),
    "utf16": (lambda d: (d / "f.jsonl").write_bytes(jsonl([GOOD]).encode("utf-16")) and d / "f.jsonl",
              "is UTF-16, not UTF-8"),
    "json_array": (lambda d: (d / "f.jsonl").write_text(json.dumps([GOOD] * 50, indent=2)) and d / "f.jsonl",
                   "is one JSON array of 50 items, not JSON Lines"),
    "json_object": (lambda d: (d / "f.jsonl").write_text(json.dumps(GOOD, indent=2)) and d / "f.jsonl",
                    "is one pretty-printed JSON object spread over several lines"),
    "deep_nesting": (lambda d: (d / "f.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n") and d / "f.jsonl",
                     "f.jsonl:1:json: nested too deeply to parse"),
    "nesting_over_limit": (lambda d: (d / "f.jsonl").write_text("[" * 70 + "]" * 70 + "\n") and d / "f.jsonl",
                           "f.jsonl:1:json: nested 70 levels deep (limit 64)"),
    "truncated_line": (lambda d: (d / "f.jsonl").write_text(jsonl([GOOD]) + '{"messages": [{"role": "us\n') and d / "f.jsonl",
                       "f.jsonl:2:json: not valid JSON"),
}


@pytest.mark.parametrize("loader", [read_jsonl, lambda path: load_jsonl(path, triage=False)],
                         ids=["read_jsonl", "load_jsonl"])
@pytest.mark.parametrize("fault", list(FILE_FAULTS))
def test_data_file_fault_gives_one_line_and_changes_nothing(tmp_path, fault, loader):
    make, says = FILE_FAULTS[fault]
    path = make(tmp_path)
    before = snapshot(tmp_path)
    err = finishes(lambda: loader(path), seconds=10)  # an endless stream must not be read at all
    assert isinstance(err, DataError) and isinstance(err, LabkitError), repr(err)
    message = str(err)
    assert "\n" not in message and "Fix:" in message and says in message, message
    assert snapshot(tmp_path) == before


def cli(*args: str, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "labkit", "validate", *args], capture_output=True, text=True,
                          timeout=120, stdin=stdin, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("fault", ["folder", "missing", "dev_zero", "fifo", "gzip", "json_array", "deep_nesting",
                                   "truncated_line"])
def test_cli_fault_exits_2_with_one_line_and_no_traceback(tmp_path, fault):
    make, says = FILE_FAULTS[fault]
    path = make(tmp_path)
    done = cli(str(path))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and says in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_cli_refuses_an_endless_pipe_on_stdin_at_once():
    with subprocess.Popen(["yes"], stdout=subprocess.PIPE) as endless:
        done = cli("/dev/stdin", stdin=endless.stdout)
        endless.kill()
    assert done.returncode == 2 and "is a FIFO (named pipe), not a regular file" in done.stderr


def test_cli_reports_a_clean_file_and_exits_0():
    done = cli(str(data_dir() / "train.jsonl"), "--triage")
    assert done.returncode == 0 and "1600 records, no problems" in done.stdout


def test_file_over_the_size_bound_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text(jsonl([GOOD] * 100))
    with pytest.raises(DataError, match=r"over the 1000 bytes limit") as err:
        read_lines(path, max_bytes=1000)
    one_line(err)


def test_wrong_role_case_names_line_and_field(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(jsonl([{"messages": [{"role": "User", "content": "hi"}, {"role": "assistant", "content": "ok"}]}]))
    with pytest.raises(DataError) as err:
        load_jsonl(path, triage=False)
    assert one_line(err) == ("f.jsonl:1:messages[0].role: 'User' is not a known role. "
                             "Fix: use system, user or assistant")


def test_many_bad_lines_are_listed_one_per_line_and_capped_with_a_count(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"messages": [\n' * 68)
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"68 problems in {path}:" and lines[-1] == "... and 48 more"
    assert all(line.startswith(f"f.jsonl:{n}:json: not valid JSON") for n, line in enumerate(lines[1:-1], 1))


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl([GOOD, GOOD]).encode())
    assert load_jsonl(path, triage=False) == read_jsonl(path) == [GOOD, GOOD]


# ---------------------------------------------------------------- training: preflight, checkpoints, caches


@pytest.fixture(scope="module")
def examples():
    return read_jsonl(data_dir() / "train.jsonl")[:4]


@pytest.fixture(scope="module")
def small(tiny_llama, tokenizer):
    """A factory of tiny Llamas that speak SmolLM2's vocabulary."""
    return lambda **overrides: tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **overrides)


@pytest.fixture(scope="module")
def good_run(small, tokenizer, examples, tmp_path_factory):
    """A run interrupted after one step (its checkpoint) and its cached adapter: the files the faults must not touch."""
    root = tmp_path_factory.mktemp("good")
    result = train_sft(small(), tokenizer, examples, None, CFG, out_dir=root / "run", plot=False, progress=False,
                       stop_after=1)
    save_adapter(result.model, root / "cache" / "adapter", {"history": result.history})
    return root


@pytest.fixture()
def run_dir(good_run, tmp_path):
    shutil.copytree(good_run, tmp_path, dirs_exist_ok=True)
    return tmp_path / "run"


def resume(model, tokenizer, examples, run_dir, **changes):
    return train_sft(model, tokenizer, examples, None, SFTConfig(**{**CFG.__dict__, **changes}), out_dir=run_dir,
                     resume=True, plot=False, progress=False)


def test_unwritable_output_folder_fails_before_any_compute(small, tokenizer, examples, tmp_path, monkeypatch):
    from labkit import sft

    (tmp_path / "out").write_text("a file where the run folder should go")
    before = snapshot(tmp_path)
    monkeypatch.setattr(sft, "tokenize_chat", lambda *a, **k: pytest.fail("computed before the preflight"))
    with pytest.raises(CheckpointError, match=r"out/run: cannot write there \(Not a directory\)") as err:
        train_sft(small(), tokenizer, examples, None, CFG, out_dir=tmp_path / "out" / "run", plot=False, progress=False)
    one_line(err)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage, says", [
    ("truncate", "state.pt: is damaged or truncated"),
    ("empty", "state.pt: is damaged or truncated (0 bytes"),
    ("no_folder", "is missing or incomplete (no state.pt), though 'latest' points to it"),
    ("truncate_unchecked", "state.pt: cannot be read (RuntimeError): it is damaged or truncated"),
])
def test_damaged_checkpoint_is_refused_and_left_as_it_was(small, tokenizer, examples, run_dir, damage, says):
    state = run_dir / "checkpoint-1" / "state.pt"
    if damage in ("truncate", "truncate_unchecked"):
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    if damage == "truncate_unchecked":  # a checkpoint written before checksums existed
        (run_dir / "checkpoint-1" / "SHA256SUMS").unlink()
    if damage == "empty":
        state.write_bytes(b"")
    if damage == "no_folder":
        (run_dir / "latest").write_text("checkpoint-9")
    before = snapshot(run_dir.parent)
    with pytest.raises(CheckpointError, match="Fix: delete") as err:
        resume(small(), tokenizer, examples, run_dir)
    assert says in one_line(err)
    assert snapshot(run_dir.parent) == before


@pytest.mark.parametrize("changes, says", [
    ({"r": 8, "lora_alpha": 16}, "was written with r=4, this run has r=8"),
    ({"target_modules": ["q_proj", "v_proj"]}, "this run has target_modules=['q_proj', 'v_proj']"),
    ({"hidden_size": 32}, "was written with base_model='llama (2 layers, hidden 64, vocab 49152)', this run has "
                          "base_model='llama (2 layers, hidden 32, vocab 49152)'"),
    ({"lr": 1e-2}, "was written with lr=0.001, this run has lr=0.01. Fix: resume with the settings it was written "
                   "with (CLI: --lr 0.001), or start a fresh run in a new out_dir (CLI: --fresh)"),
    ({"steps": 1}, "was written with steps=2, this run has steps=1. Fix: resume with the settings it was written with "
                   "(CLI: --steps 2)"),
    ({"seed": 1}, "was written with seed=0, this run has seed=1"),
    ({"patience": 3}, "was written with patience=None, this run has patience=3. Fix: resume with the settings it was "
                      "written with (CLI: leave out --patience)"),
])
def test_checkpoint_of_another_run_is_refused_naming_what_differs(small, tokenizer, examples, run_dir, changes, says):
    model = small(hidden_size=32) if "hidden_size" in changes else small()
    config = {k: v for k, v in changes.items() if k != "hidden_size"}
    before = snapshot(run_dir.parent)
    with pytest.raises(CheckpointError, match="Fix: resume with the settings it was written with") as err:
        resume(model, tokenizer, examples, run_dir, **config)
    assert says in one_line(err)
    assert snapshot(run_dir.parent) == before


def test_checkpoint_of_other_data_is_refused_naming_both(small, tokenizer, examples, run_dir):
    before = snapshot(run_dir.parent)
    with pytest.raises(CheckpointError) as err:
        resume(small(), tokenizer, examples[:3], run_dir)
    assert re.search(r"was written with data='4 examples, sha256 [0-9a-f]{16}', this run has data='3 examples, sha256 "
                     r"[0-9a-f]{16}'\. Fix: resume with the settings it was written with \(CLI: the same --data and "
                     r"--validation files\)", one_line(err))
    assert snapshot(run_dir.parent) == before


def test_checkpoint_of_another_run_copied_in_is_refused(small, tokenizer, examples, run_dir):
    other = run_dir.parent / "other"
    train_sft(small(), tokenizer, examples, None, SFTConfig(**{**CFG.__dict__, "seed": 1}), out_dir=other, plot=False,
              progress=False, stop_after=1)
    shutil.rmtree(run_dir)
    shutil.copytree(other, run_dir)
    with pytest.raises(CheckpointError, match="was written with seed=1, this run has seed=0"):
        resume(small(), tokenizer, examples, run_dir)


def test_a_resume_may_change_how_often_it_checkpoints(small, tokenizer, examples, run_dir):
    result = resume(small(), tokenizer, examples, run_dir, checkpoint_every=2)
    assert [h["step"] for h in result.history] == [1, 2] and (run_dir / "latest").read_text() == "checkpoint-2"


def test_sft_checkpoint_is_refused_by_a_dpo_run(small, tokenizer, run_dir):
    pairs = read_jsonl(data_dir() / "preferences_train.jsonl")[:2]
    config = DPOConfig(steps=2, batch_size=2, r=4, lora_alpha=8, checkpoint_every=1)
    before = snapshot(run_dir.parent)
    with pytest.raises(CheckpointError) as err:
        train_dpo(small(), tokenizer, pairs, None, config, out_dir=run_dir, resume=True, plot=False, progress=False)
    assert "was written with objective='SFT', this run has objective='DPO'" in one_line(err)
    assert snapshot(run_dir.parent) == before


def test_mismatching_adapter_weights_load_nothing_at_all(small):
    model = add_lora(small(), CFG)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights = {n: p.detach() + 1 for n, p in model.named_parameters() if p.requires_grad}
    last = sorted(weights)[-1]  # every other tensor fits: a partial loader would copy them first
    weights[last] = torch.zeros(8, *weights[last].shape[1:])
    with pytest.raises(CheckpointError, match=r"is \(8, .*\) there, this model expects \(\d+, \d+\)") as err:
        load_adapter_weights(model, weights)
    one_line(err)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("fault, says", [
    ("truncated", "adapter_model.safetensors: is damaged or truncated"),
    ("swapped", "adapter_model.safetensors: is not the file written with it: it is whole"),
    ("no_checksums", "cached adapter has no SHA256SUMS, so its files cannot be verified"),
    ("no_run_record", "cached adapter is incomplete (run.json is missing)"),
    ("other_base", "this model (llama (2 layers, hidden 32, vocab 49152)) expects"),
    ("other_rank", "was written with r=4, this run has r=8"),
    ("other_targets", "this run has target_modules=['q_proj']"),
])
def test_bad_cached_adapter_is_refused_and_left_as_it_was(small, run_dir, fault, says):
    folder = run_dir.parent / "cache" / "adapter"
    weights = folder / "adapter_model.safetensors"
    if fault == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    if fault == "no_run_record":
        (folder / "run.json").unlink()
    if fault == "no_checksums":
        (folder / "SHA256SUMS").unlink()
    if fault == "swapped":  # another run's adapter of the same shapes: whole, but not this one
        other = add_lora(small(), CFG)
        torch.nn.init.normal_(next(p for n, p in other.named_parameters() if "lora_B" in n))
        other.save_pretrained(run_dir.parent / "other")
        shutil.copy(run_dir.parent / "other" / "adapter_model.safetensors", weights)
    model = small(hidden_size=32) if fault == "other_base" else small()
    expect = {"other_rank": {"r": 8}, "other_targets": {"target_modules": ["q_proj"]}}.get(fault)
    before = snapshot(folder)
    with pytest.raises(CheckpointError, match=f"Fix: .*delete {folder}") as err:
        load_cached_adapter(model, folder, expect)
    assert says in one_line(err) and (fault != "swapped" or "truncated" not in str(err.value))
    assert snapshot(folder) == before
    assert not any("lora" in n for n, _ in model.named_parameters())  # the base model was not touched


@pytest.mark.parametrize("fault, says", [
    ("no_checksums", "has no SHA256SUMS, so its files cannot be verified"),
    ("truncated", "adapter_model.safetensors: is damaged or truncated"),
])
def test_dpo_sft_adapter_is_verified_before_it_is_merged(small, run_dir, monkeypatch, fault, says):
    import argparse

    from labkit import cli

    folder = run_dir.parent / "cache" / "adapter"
    if fault == "no_checksums":
        (folder / "SHA256SUMS").unlink()
    else:
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: (small(), None))
    with pytest.raises(CheckpointError) as err:
        cli.load_base(argparse.Namespace(model=None, sft_adapter=str(folder)), "cpu")
    assert says in one_line(err) and "sha256sum" in str(err.value)


def test_unwritable_cache_fails_before_training(small, tokenizer, examples, tmp_path, monkeypatch):
    from labkit import sft

    (tmp_path / "home").write_text("not a folder")
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sft, "train_sft", lambda *a, **k: pytest.fail("trained before the preflight"))
    with pytest.raises(StoreError, match="home/adapters: cannot write there.*Fix: set LABKIT_HOME") as err:
        sft.cached_sft(small(), tokenizer, "tiny", examples, None, CFG, plot=False, progress=False)
    one_line(err)
    assert (tmp_path / "home").read_text() == "not a folder"


# ---------------------------------------------------------------- truncation: what max_length cuts


def test_dataset_with_no_labelled_token_after_truncation_is_refused(small, tokenizer, examples):
    config = SFTConfig(**{**CFG.__dict__, "max_length": 16})
    with pytest.raises(LabkitError) as err:
        train_sft(small(), tokenizer, examples, None, config, plot=False, progress=False)
    assert one_line(err) == ("train: none of the 4 examples keeps a labelled token after truncation to "
                             "max_length=16. Fix: raise max_length, or shorten the prompts")


def test_examples_that_lose_every_label_are_dropped_with_a_count_and_a_warning(small, tokenizer, examples):
    long = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "billing"}]}
    with pytest.warns(UserWarning, match=r"train: dropped 1 of 5 examples whose labels were all cut by max_length=256"):
        result = train_sft(small(), tokenizer, examples + [long], None, CFG, plot=False, progress=False)
    assert len(result.history) == CFG.steps and all(h["loss"] > 0 for h in result.history)


def test_reply_starting_with_whitespace_has_its_first_token_labelled(tokenizer):
    row = tokenize_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  Hello"}])
    labelled = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
    assert tokenizer.decode(labelled) == "\n  Hello<|im_end|>\n"  # the header's newline merged with the spaces


def over_long_chats() -> list[list[dict]]:
    """Chats around a 64-token max_length: prompts of 32 to 231 tokens (63, 64 and 65 among them), a reply cut
    short, and one starting with whitespace."""
    chats = []
    for words, reply in [(1, "billing"), (20, "billing"), (31, "billing"), (32, "billing"), (33, "billing"),
                         (34, "billing"), (40, "billing"), (3, "word " * 80), (5, "  Hello there"), (200, "x")]:
        chats.append([{"role": "user", "content": "word " * words}, {"role": "assistant", "content": reply}])
    return chats


def test_sft_keeps_and_drops_the_same_rows_as_trl(tokenizer, small):
    from datasets import Dataset
    from trl.trainer.sft_trainer import SFTConfig as TRLConfig, SFTTrainer

    chats = over_long_chats()
    data = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:], "index": i} for i, c in enumerate(chats)])
    args = TRLConfig(output_dir="/tmp/labkit-trl-trunc", report_to="none", bf16=False, use_cpu=True, max_length=64)
    trainer = SFTTrainer(model=small(), args=args, train_dataset=data, processing_class=tokenizer)
    rows = [dict(tokenize_chat(tokenizer, c, 64), index=i) for i, c in enumerate(chats)]
    with pytest.warns(UserWarning, match="dropped"):
        ours = keep_labelled(rows, SFT, tokenizer.pad_token_id, 64, "train")
    theirs = trainer.train_dataset
    assert 0 < len(ours) < len(chats)
    assert [r["index"] for r in ours] == theirs["index"]
    assert [r["input_ids"] for r in ours] == theirs["input_ids"]
    assert [r["labels"] for r in ours] == theirs["labels"]


def test_dpo_keeps_and_drops_the_same_pairs_as_trl(tokenizer, small):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig as TRLDPOConfig, DPOTrainer

    chats = over_long_chats()
    pairs = [{"prompt": c[:-1], "chosen": c[-1:], "rejected": [{"role": "assistant", "content": "shipping"}],
              "index": i} for i, c in enumerate(chats)]
    args = TRLDPOConfig(output_dir="/tmp/labkit-trl-dpo-trunc", report_to="none", bf16=False, use_cpu=True,
                        gradient_checkpointing=False, max_length=64)
    trainer = DPOTrainer(model=small(), args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = [dict(tokenize_pair(tokenizer, p, 64), index=p["index"]) for p in pairs]
    with pytest.warns(UserWarning, match="dropped"):
        ours = keep_labelled(rows, dpo_objective(), tokenizer.pad_token_id, 64, "train")
    theirs = trainer.train_dataset
    assert 0 < len(ours) < len(pairs)
    assert [r["index"] for r in ours] == theirs["index"]
    assert [r["prompt_ids"] for r in ours] == theirs["prompt_ids"]
    batch = trainer.data_collator([theirs[i] for i in range(len(theirs))])  # TRL truncates in its collator
    from labkit.dpo import collate_pairs

    mine = collate_pairs(ours, tokenizer.pad_token_id)
    assert torch.equal(batch["input_ids"], mine["input_ids"])
    assert torch.equal(batch["completion_mask"].bool(), mine["labels"] != IGNORE)


# ---------------------------------------------------------------- records the validator once let through


@pytest.mark.parametrize("message, says", [
    ({"role": {"name": "user"}, "content": "hi"}, "f.jsonl:1:messages[0].role: is an object, not a string"),
    ({"role": "user", "content": None}, "f.jsonl:1:messages[0].content: is null, not a string"),
    ("hi", "f.jsonl:1:messages[0]: is a string, not a message"),
])
def test_cli_validate_names_a_bad_message_instead_of_crashing(tmp_path, message, says):
    path = tmp_path / "f.jsonl"
    path.write_text(jsonl([{"messages": [message, {"role": "assistant", "content": "ok"}]}]))
    done = cli(str(path))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and says in done.stderr, done.stderr


def test_a_huge_example_is_refused_by_its_length_before_any_tokenizing(tmp_path):
    from labkit.data import read_examples

    path = tmp_path / "f.jsonl"
    path.write_text(jsonl([GOOD, {"messages": [{"role": "user", "content": "x" * 5_000_000}, GOOD["messages"][1]]}]))
    with pytest.raises(DataError) as err:  # read_examples has no tokenizer: the length alone refuses it
        read_examples(path, "chat", max_length=256)
    assert one_line(err).startswith("f.jsonl:2:messages: holds 5,000,007 characters, more than max_length=256 tokens")
