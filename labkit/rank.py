"""The rank of a weight update: SVD energy, best rank-r approximations, and what a rank-r adapter costs (notebook 03)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def lora_parameter_count(d_in: int, d_out: int, r: int) -> int:
    """Parameters of one LoRA adapter on a d_in -> d_out layer: A is r x d_in, B is d_out x r."""
    return r * (d_in + d_out)


def adapter_megabytes(trainable: int, bytes_per_param: int = 4) -> float:
    """Size of an adapter file in MB (1e6 bytes): fp32 by default, 2 bytes for a bf16/fp16 save."""
    return trainable * bytes_per_param / 1e6


def energy_in_top(singular_values: Tensor, r: int) -> float:
    """Share of a matrix's squared Frobenius norm held by its top-r singular values."""
    s2 = singular_values.double() ** 2
    return float(s2[:r].sum() / s2.sum())


def low_rank_approximation(matrix: Tensor, r: int) -> Tensor:
    """The best rank-r approximation of `matrix` (Eckart-Young: keep the top r singular triplets)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).to(matrix.dtype)


def rank_report(matrix: Tensor, r: int, singular_values: Tensor | None = None) -> dict:
    """What a rank-r factorisation B @ A of `matrix` keeps and costs.

    relative_error = ||M - M_r||_F / ||M||_F = sqrt(1 - energy), from the singular values alone.
    """
    s = torch.linalg.svdvals(matrix.double()) if singular_values is None else singular_values
    d_out, d_in = matrix.shape
    r = max(1, min(int(r), len(s)))
    energy = energy_in_top(s, r)
    return {
        "r": r,
        "energy": energy,
        "relative_error": math.sqrt(max(0.0, 1.0 - energy)),
        "lora_params": lora_parameter_count(d_in, d_out, r),
        "full_params": d_in * d_out,
        "param_share": lora_parameter_count(d_in, d_out, r) / (d_in * d_out),
    }


def rank_for_energy(singular_values: Tensor, energy: float) -> int:
    """The smallest r whose top-r singular values hold at least `energy` of the squared norm."""
    s2 = singular_values.double() ** 2
    cumulative = torch.cumsum(s2, 0) / s2.sum()
    index = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64)).item())
    return min(index + 1, len(s2))  # energy 1.0 may sit a rounding error above the last cumulative sum
