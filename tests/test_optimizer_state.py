"""labkit.optimizer_state: AdamW's fp32 moments against bitsandbytes' 8-bit ones."""

import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

from labkit.optimizer_state import (  # noqa: E402
    dequantize_8bit_state, moment_errors, predicted_state_bytes, state_bytes,
)

SHAPES = [(64, 96), (300, 70), (8,), (5000,)]  # 8-bit, 8-bit with a partial block, fp32 (small), 8-bit


def stepped(optimizer_cls, seed: int = 0):
    """Parameters of SHAPES with one gradient each, after one step of optimizer_cls."""
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes may say it runs without its CPU kernels
        optimizer = optimizer_cls(params, lr=1e-3)
        optimizer.step()
    return optimizer


def test_adamw_state_is_eight_bytes_per_parameter_plus_a_step_counter():
    optimizer = stepped(torch.optim.AdamW)
    assert state_bytes(optimizer) == predicted_state_bytes([torch.Size(s).numel() for s in SHAPES], "adamw")


def test_adamw8bit_state_matches_the_formula_with_shared_code_books_counted_once():
    optimizer = stepped(bnb.optim.AdamW8bit)
    assert state_bytes(optimizer) == predicted_state_bytes([torch.Size(s).numel() for s in SHAPES], "adamw8bit")


def test_adamw8bit_keeps_small_tensors_in_fp32():
    optimizer = stepped(bnb.optim.AdamW8bit)
    small = [state for p, state in optimizer.state.items() if p.numel() < 4096]
    assert small and all(state["state1"].dtype == torch.float32 and "absmax1" not in state for state in small)


def test_8bit_state_is_about_a_quarter_of_fp32_on_big_tensors():
    ratio = predicted_state_bytes([10**7], "adamw8bit") / predicted_state_bytes([10**7], "adamw")
    assert 0.25 < ratio < 0.26


def test_dequantizing_a_state_by_hand_equals_bitsandbytes():
    optimizer = stepped(bnb.optim.AdamW8bit)
    for state in optimizer.state.values():
        if "absmax1" in state:
            for key in "12":
                codes, code_book, absmax = state[f"state{key}"], state[f"qmap{key}"], state[f"absmax{key}"]
                ours = dequantize_8bit_state(codes, code_book, absmax)
                theirs = BF.dequantize_blockwise(codes, absmax=absmax, code=code_book, blocksize=256)
                assert torch.equal(ours, theirs)


def test_8bit_moments_are_within_a_few_percent_of_fp32_ones():
    errors = moment_errors(stepped(torch.optim.AdamW), stepped(bnb.optim.AdamW8bit))
    assert 0 < errors["m"] < 0.05 and 0 < errors["v"] < 0.05


def test_an_unknown_optimizer_name_says_which_are_known():
    with pytest.raises(ValueError, match="'adamw' or 'adamw8bit'"):
        predicted_state_bytes([10], "sgd")
