"""labkit.measure: bytes in use, PeakMemory and run_isolated (notebook 04)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from labkit import LabkitError
from labkit.measure import (
    IsolatedRunError,
    PeakMemory,
    allocated_bytes,
    cached_isolated_run,
    current_rss,
    memory_in_use,
    run_isolated,
)

MB = 1_000_000
needs_malloc_stats = pytest.mark.skipif(allocated_bytes() is None, reason="needs glibc >= 2.33 (mallinfo2)")


@pytest.fixture(autouse=True)
def quiet_garbage_collector():
    """Collect garbage left by earlier tests, then keep the collector off: a collection in the middle
    of a measurement frees unrelated memory and makes byte counts come out short."""
    import gc

    gc.collect()
    gc.disable()
    yield
    gc.enable()


def touched(n_bytes: int) -> torch.Tensor:
    """A tensor of n_bytes whose pages are all written (so they are resident, not just reserved)."""
    return torch.ones(n_bytes // 4, dtype=torch.float32)


# ---------------------------------------------------------------- bytes in use


def test_current_rss_grows_when_memory_is_touched():
    import mmap

    fresh = mmap.mmap(-1, 64 * MB)  # new pages from the kernel, not ones an earlier test freed and malloc kept
    before = current_rss()
    fresh.write(b"x" * (64 * MB))
    assert current_rss() - before > 48 * MB
    fresh.close()


@needs_malloc_stats
def test_allocated_bytes_counts_a_tensor_and_forgets_it_when_freed():
    before = allocated_bytes()
    x = touched(32 * MB)
    held = allocated_bytes() - before
    del x
    after = allocated_bytes() - before
    assert 32 * MB <= held < 33 * MB
    assert abs(after) < MB


@needs_malloc_stats
def test_allocated_bytes_ignores_memory_the_allocator_keeps_after_free():
    """Many small tensors freed: glibc may keep their pages (resident), but they are no longer allocated."""
    before = allocated_bytes()
    xs = [torch.ones(8_000) for _ in range(2_000)]  # 32 KB each: from the heap, not their own mmap
    assert allocated_bytes() - before > 60 * MB
    del xs
    assert allocated_bytes() - before < MB


@needs_malloc_stats
def test_memory_in_use_on_cpu_is_malloc_bytes():
    a, b, c = allocated_bytes(), memory_in_use("cpu"), allocated_bytes()
    assert min(a, c) - MB <= b <= max(a, c) + MB


# ---------------------------------------------------------------- PeakMemory


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory() as mem:
        x = touched(64 * MB)
        time.sleep(0.05)  # the sampler looks every 2 ms
        del x
    assert 60 * MB <= mem.peak < 80 * MB


def test_peak_memory_sees_the_highest_of_several_allocations():
    with PeakMemory() as mem:
        for size in [16, 48, 32]:
            x = touched(size * MB)
            time.sleep(0.03)
            del x
    assert 45 * MB <= mem.peak < 60 * MB


@needs_malloc_stats
def test_peak_memory_does_not_count_what_was_held_before():
    held = touched(64 * MB)
    with PeakMemory() as mem:
        time.sleep(0.02)
    assert mem.peak < MB
    assert mem.highest == mem.baseline + mem.peak >= 64 * MB
    del held


def test_peak_memory_stops_its_sampler_thread():
    with PeakMemory() as mem:
        pass
    assert not mem._thread.is_alive()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_on_cuda_reads_the_allocator_peak():
    with PeakMemory("cuda") as mem:
        x = torch.ones(16 * MB // 4, device="cuda")
        del x
    assert 16 * MB <= mem.peak < 17 * MB


# ---------------------------------------------------------------- run_isolated


def test_run_isolated_returns_child_result():
    assert run_isolated(divmod, 17, 5) == (3, 2)


def test_run_isolated_runs_in_another_process():
    assert run_isolated(os.getpid) != os.getpid()


def test_run_isolated_passes_keyword_arguments():
    assert run_isolated(int, "ff", base=16) == 255


def test_run_isolated_env_reaches_only_the_child():
    name = "LABKIT_TEST_RUN_ISOLATED"
    assert name not in os.environ
    assert run_isolated(os.getenv, name, env={name: "child only"}) == "child only"
    assert name not in os.environ


@needs_malloc_stats
def test_run_isolated_child_does_not_hold_the_parents_memory():
    parent_holds = touched(128 * MB)
    assert run_isolated(memory_in_use) < memory_in_use() - 100 * MB
    del parent_holds


def test_run_isolated_raises_the_child_exception():
    with pytest.raises(ValueError, match="invalid literal"):
        run_isolated(int, "not a number")


def test_run_isolated_reports_a_child_that_dies():
    with pytest.raises(IsolatedRunError, match="exited with code 3"):
        run_isolated(os._exit, 3)


def test_run_isolated_refuses_a_function_defined_in_main():
    def in_a_notebook_cell():
        return 1

    in_a_notebook_cell.__module__ = "__main__"
    with pytest.raises(LabkitError, match="importable"):
        run_isolated(in_a_notebook_cell)


# ---------------------------------------------------------------- cached_isolated_run


def test_a_cached_run_returns_the_first_runs_result_without_running_again(monkeypatch, tmp_path):
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    first, path = cached_isolated_run(os.getpid)  # a new process has a new pid: equal pids mean it did not run
    again, same = cached_isolated_run(os.getpid)
    assert first != os.getpid() and again == first and same == path and path.parent == tmp_path / "runs"


def test_a_cached_run_is_keyed_by_its_arguments(monkeypatch, tmp_path):
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    assert cached_isolated_run(int, "ff", base=16)[0] == 255
    assert cached_isolated_run(int, "ff", base=17)[0] == 270
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_a_damaged_cached_run_names_its_file_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    _, path = cached_isolated_run(divmod, 17, 5)
    path.write_text("[3,")
    with pytest.raises(LabkitError, match=f"{path}: cached result is not valid JSON.*Fix: delete"):
        cached_isolated_run(divmod, 17, 5)
