"""Data parallelism: shards, the process group, and 2 CPU processes (gloo) training exactly as one process does."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from labkit import distributed
from labkit.distributed import (ShardError, all_sum, backend_for, data_parallel, fsdp_plan, fully_sharded, rank,
                                shard, world_size)

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LABKIT_THREADS": "1", "TQDM_DISABLE": "1"}
ARGS = ["--steps", "6", "--batch-size", "4", "--max-length", "128", "--checkpoint-every", "3", "--lr", "5e-3"]


def test_shards_split_a_batch_into_contiguous_parts_that_cover_it():
    batch = [7, 3, 9, 1, 4]
    parts = [shard(batch, r, 2) for r in range(2)]
    assert parts == [[7, 3], [9, 1, 4]]


def test_alone_a_shard_is_the_whole_batch():
    batch = [5, 2, 8]
    assert shard(batch) is batch


def test_a_batch_smaller_than_the_processes_is_refused():
    with pytest.raises(ShardError, match="batch_size >= 4"):
        shard([1, 2], 1, 4)


def test_simulating_processes_runs_every_shard_in_turn():
    with distributed.simulate(2):
        assert distributed.my_shards([4, 5, 6, 7]) == [[4, 5], [6, 7]]
    assert distributed.my_shards([4, 5, 6, 7]) == [[4, 5, 6, 7]]


def test_gloo_between_cpu_processes_and_nccl_between_gpus():
    assert (backend_for("cpu"), backend_for("cuda"), backend_for("cuda:1")) == ("gloo", "nccl", "nccl")


def test_without_a_launcher_there_is_one_process_and_no_wrapper(tiny_llama):
    model = tiny_llama()
    assert (world_size(), rank(), all_sum([1.5, 2.0])) == (1, 0, [1.5, 2.0])
    assert data_parallel(model, lambda m, b: (0, {})) is None and fully_sharded(model, lambda m, b: (0, {})) is None


def test_fsdp_shards_each_decoder_layer_with_bf16_weights_and_fp32_gradients_on_gpu(tiny_llama):
    model = tiny_llama(num_hidden_layers=3)
    plan = fsdp_plan(model, "cuda:0")
    assert plan["layers"] == list(model.model.layers) and plan["reshard_after_forward"]
    assert (plan["mesh"], plan["backend"]) == ("cuda", "nccl")
    assert (plan["mp_policy"].param_dtype, plan["mp_policy"].reduce_dtype) == (torch.bfloat16, torch.float32)


def test_fsdp_on_cpu_keeps_fp32_and_uses_gloo(tiny_llama):
    plan = fsdp_plan(tiny_llama(), "cpu")
    assert (plan["mesh"], plan["backend"], plan["mp_policy"].param_dtype) == ("cpu", "gloo", None)


# ---------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A small random Llama with SmolLM2's tokenizer in a folder, and 16 course examples."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from labkit.data import load_split, write_jsonl
    from labkit.models import resolve

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 pad_token_id=2)).save_pretrained(folder / "model")
    AutoTokenizer.from_pretrained(resolve()).save_pretrained(folder / "model")
    write_jsonl(folder / "train.jsonl", load_split("train")[:16])
    return folder


def sft_command(setup: Path, out: Path, processes: int) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return [*(launcher if processes > 1 else [sys.executable]), "-m", "labkit", "sft", "--data",
            str(setup / "train.jsonl"), "--model", str(setup / "model"), "--out", str(out), *ARGS]


def losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "history.json").read_text())]


@pytest.fixture(scope="module")
def one_and_two(tiny_setup):
    """The same 6-step run on one process and on two (torchrun, gloo)."""
    for n in (1, 2):
        subprocess.run(sft_command(tiny_setup, tiny_setup / f"p{n}", n), cwd=ROOT, env=ENV, check=True,
                       capture_output=True, timeout=600)
    return tiny_setup / "p1", tiny_setup / "p2"


def test_two_processes_log_the_losses_of_one(one_and_two):
    one, two = (losses(out) for out in one_and_two)
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, rel=1e-5)


@pytest.fixture(scope="module")
def one_playing_two(tiny_setup):
    """The same 6-step run on one process that takes each global batch as two processes would."""
    out = tiny_setup / "p1x2"
    subprocess.run([*sft_command(tiny_setup, out, 1), "--as-processes", "2"], cwd=ROOT, env=ENV, check=True,
                   capture_output=True, timeout=600)
    return out


def test_two_processes_are_bit_identical_to_one_that_accumulates_their_shards(one_and_two, one_playing_two):
    from safetensors.torch import load_file

    assert losses(one_and_two[1]) == losses(one_playing_two)
    two, one = (load_file(out / "adapter" / "adapter_model.safetensors") for out in (one_and_two[1], one_playing_two))
    assert all(torch.equal(two[name], one[name]) for name in one)


def test_two_processes_save_the_adapter_of_one(one_and_two):
    from safetensors.torch import load_file

    one, two = (load_file(out / "adapter" / "adapter_model.safetensors") for out in one_and_two)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6)


def worker(parent: int, rank_: int) -> int | None:
    """The pid of the child of `parent` (or of its children) that torchrun started as RANK=rank_."""
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == parent and f"RANK={rank_}".encode() in environ and b"LOCAL_RANK=" + str(rank_).encode() in environ:
            return pid
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc (Linux)")
def test_a_killed_process_stops_the_run_and_the_rerun_resumes_to_the_same_loss(tiny_setup, one_and_two):
    out = tiny_setup / "killed"
    run = subprocess.Popen(sft_command(tiny_setup, out, 2), cwd=ROOT, env=ENV, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed, deadline = False, time.monotonic() + 600
    while run.poll() is None and not killed and time.monotonic() < deadline:
        if (out / "latest").exists() and (out / "latest").read_text() == "checkpoint-3":
            pid = worker(run.pid, 1)
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed = True
        time.sleep(0.02)
    _, stderr = run.communicate(timeout=600)
    assert killed and run.returncode != 0
    ours = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert ours and "rerun the same command" in ours[0] and "checkpoint-3" in ours[0]
    assert not (out / "adapter").exists()
    subprocess.run(sft_command(tiny_setup, out, 2), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=600)
    assert losses(out)[-1] == pytest.approx(losses(one_and_two[1])[-1], rel=1e-6)


FSDP_SCRIPT = """
import json, sys, torch
from labkit import distributed
from labkit.data import read_jsonl
from labkit.models import load_model
from labkit.sft import SFTConfig, train_sft
torch.set_num_threads(1)
distributed.start("cpu")
if distributed.active():
    distributed.data_parallel = distributed.fully_sharded  # the same loop, the model sharded (ZeRO-3)
model, tokenizer = load_model(sys.argv[1])
config = SFTConfig(steps=4, batch_size=4, max_length=128, lr=5e-3)
result = train_sft(model, tokenizer, read_jsonl(sys.argv[2]), config=config, plot=False, progress=False)
if distributed.is_main():
    print(json.dumps([h["loss"] for h in result.history]))
distributed.stop()
"""


def test_fsdp_on_two_cpu_processes_logs_the_losses_of_one(tiny_setup):
    script = tiny_setup / "fsdp_run.py"
    script.write_text(FSDP_SCRIPT)
    args = [str(script), str(tiny_setup / "model"), str(tiny_setup / "train.jsonl")]
    one, two = (subprocess.run([*launcher, *args], cwd=ROOT, env=ENV, check=True, capture_output=True, text=True,
                               timeout=600).stdout.strip().splitlines()[-1]
                for launcher in ([sys.executable], [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node=2"]))
    assert json.loads(two) == pytest.approx(json.loads(one), rel=1e-5)
