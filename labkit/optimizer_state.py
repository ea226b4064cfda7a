"""What an optimizer keeps per parameter, measured: AdamW's fp32 moments against bitsandbytes' 8-bit ones (notebook 04).

AdamW keeps two moments per weight, m (the running mean of the gradient) and v (of its square): 8 bytes per
parameter in fp32, twice the fp32 weights themselves. bitsandbytes' AdamW8bit stores each moment as 1-byte indices
into a 256-value code book, with one fp32 absmax per block of 256 values (blockwise, like NF4 in this notebook):
about 2 bytes per parameter. Tensors smaller than `min_8bit_size` keep fp32 moments, as bitsandbytes does.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

BLOCKSIZE_8BIT = 256  # bitsandbytes' block size for 8-bit optimizer states
MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep fp32 states
CODE_BOOK_BYTES = 256 * 4  # one fp32 code book per moment, shared by every tensor


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's state tensors, counting a tensor shared between parameters once."""
    seen: dict[tuple[int, int], int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                seen[(value.data_ptr(), value.nbytes)] = value.nbytes
    return sum(seen.values())


def predicted_state_bytes(numels: Iterable[int], optimizer: str) -> int:
    """State bytes of torch's AdamW ('adamw') or bitsandbytes' AdamW8bit ('adamw8bit') for tensors of these sizes."""
    numels = list(numels)
    if optimizer == "adamw":  # exp_avg + exp_avg_sq in fp32, and a 0-d fp32 step counter per tensor
        return sum(8 * n + 4 for n in numels)
    if optimizer != "adamw8bit":
        raise ValueError(f"optimizer must be 'adamw' or 'adamw8bit', got {optimizer!r}")
    total, any_8bit = 0, False
    for n in numels:
        if n < MIN_8BIT_SIZE:
            total += 8 * n  # two fp32 moments; the step counter is a Python int
        else:
            any_8bit = True
            total += 2 * n + 2 * 4 * math.ceil(n / BLOCKSIZE_8BIT)  # two 1-byte codes + two fp32 absmax per block
    return total + (2 * CODE_BOOK_BYTES if any_8bit else 0)


def dequantize_8bit_state(codes: torch.Tensor, code_book: torch.Tensor, absmax: torch.Tensor,
                          blocksize: int = BLOCKSIZE_8BIT) -> torch.Tensor:
    """An 8-bit optimizer state back in fp32: each code's value in the code book times its block's absmax."""
    values = code_book[codes.flatten().long()]
    scale = absmax.repeat_interleave(blocksize)[: values.numel()]
    return (values * scale).view(codes.shape)


def moment_errors(adamw: torch.optim.Optimizer, adamw8bit: torch.optim.Optimizer) -> dict[str, float]:
    """Relative error (L2, over all 8-bit tensors) of AdamW8bit's stored moments against fp32 AdamW's, same gradients."""
    diffs = {"m": [0.0, 0.0], "v": [0.0, 0.0]}
    for full, small in zip(adamw.state.values(), adamw8bit.state.values()):
        if "absmax1" not in small:
            continue  # a tensor under MIN_8BIT_SIZE: fp32 moments, nothing lost
        for name, key, ref in [("m", "1", full["exp_avg"]), ("v", "2", full["exp_avg_sq"])]:
            ours = dequantize_8bit_state(small[f"state{key}"], small[f"qmap{key}"], small[f"absmax{key}"])
            diffs[name][0] += (ours - ref).pow(2).sum().item()
            diffs[name][1] += ref.pow(2).sum().item()
    return {name: math.sqrt(err / norm) for name, (err, norm) in diffs.items()}
