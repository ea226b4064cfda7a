"""labkit.rank: adapter sizes, singular-value energy and best low-rank approximations (notebook 03)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from labkit import rank as R
from labkit.lora import LoRALinear

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- counting


def test_lora_parameter_count_equals_the_layers_trainable_parameters():
    layer = LoRALinear(nn.Linear(48, 20), r=6, lora_alpha=12)
    trainable = sum(p.numel() for name, p in layer.named_parameters() if name.startswith("lora_"))
    assert R.lora_parameter_count(48, 20, 6) == trainable == 6 * (48 + 20)


def test_adapter_megabytes_counts_bytes_per_parameter():
    assert R.adapter_megabytes(1_000_000) == 4.0  # fp32
    assert R.adapter_megabytes(41_943_040, bytes_per_param=2) == pytest.approx(83.886, abs=1e-3)  # bf16


# ---------------------------------------------------------------- ranks


def random_low_rank(seed: int = 0, shape=(40, 30), rank: int = 5, noise: float = 0.01) -> torch.Tensor:
    """A rank-`rank` matrix plus a little full-rank noise."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    low_rank = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
    return low_rank + noise * torch.randn(m, n, generator=g)


def test_energy_in_top_is_the_share_of_squared_singular_values():
    s = torch.tensor([3.0, 2.0, 1.0])
    assert R.energy_in_top(s, 1) == pytest.approx(9 / 14)
    assert R.energy_in_top(s, 2) == pytest.approx(13 / 14)
    assert R.energy_in_top(s, 3) == pytest.approx(1.0)


def test_low_rank_approximation_has_rank_r_and_the_eckart_young_error():
    matrix = random_low_rank(noise=0.5)
    s = torch.linalg.svdvals(matrix.double())
    approx = R.low_rank_approximation(matrix, 4)
    assert approx.dtype == matrix.dtype and approx.shape == matrix.shape
    assert torch.linalg.matrix_rank(approx.double(), rtol=1e-6) == 4
    assert (matrix - approx).double().norm() == pytest.approx(s[4:].norm().item(), rel=1e-5)
    assert torch.allclose(R.low_rank_approximation(matrix, 30), matrix, atol=1e-5)  # full rank: exact


def test_rank_report_error_follows_from_singular_values():
    matrix = random_low_rank(noise=0.3)
    report = R.rank_report(matrix, 3)
    measured = (matrix - R.low_rank_approximation(matrix, 3)).double().norm() / matrix.double().norm()
    assert report["relative_error"] == pytest.approx(measured.item(), rel=1e-6)
    assert report["relative_error"] == pytest.approx(math.sqrt(1 - report["energy"]))
    assert report["lora_params"] == 3 * (30 + 40) and report["full_params"] == 1200
    assert report["param_share"] == pytest.approx(210 / 1200)


def test_rank_report_accepts_precomputed_singular_values_and_clamps_the_rank():
    matrix = random_low_rank()
    s = torch.linalg.svdvals(matrix.double())
    assert R.rank_report(matrix, 4, singular_values=s) == R.rank_report(matrix, 4)
    assert R.rank_report(matrix, 1000)["r"] == 30 and R.rank_report(matrix, 1000)["relative_error"] == 0.0
    assert R.rank_report(matrix, 0)["r"] == 1


def test_rank_for_energy_is_the_smallest_rank_that_reaches_it():
    s = torch.tensor([3.0, 2.0, 1.0])  # cumulative energy 9/14, 13/14, 1
    assert R.rank_for_energy(s, 0.5) == 1
    assert R.rank_for_energy(s, 9 / 14) == 1
    assert R.rank_for_energy(s, 0.7) == 2
    assert R.rank_for_energy(s, 0.95) == 3
    assert R.rank_for_energy(torch.linalg.svdvals(random_low_rank(noise=1e-3)), 0.99) == 5  # a rank-5 matrix


def test_rank_for_all_the_energy_is_the_number_of_singular_values_despite_rounding():
    # With this seed the cumulative energy ends at 1 - 1e-16, not 1: rounding must not give rank 38.
    s = torch.linalg.svdvals(torch.randn(50, 37, generator=torch.Generator().manual_seed(1)))
    assert R.rank_for_energy(s, 1.0) == 37
