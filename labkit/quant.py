"""4-bit quantization from scratch (NF4, FP4, int4), bit-exact with bitsandbytes 0.50.2 on CPU (notebook 04).

A weight tensor is flattened and cut into blocks of `blocksize` values. Each block keeps its
absolute maximum (fp32) and each value becomes the index (0..15) of the nearest entry of a
16-value code in [-1, 1]. Two indices share a byte, the FIRST value in the HIGH nibble.
Double quantization then stores the fp32 absmax values themselves in 8 bits.

bitsandbytes details reproduced here (0.50.2, CPU): full blocks are scaled by x * (1/absmax), the
last partial block by x / absmax; an all-zero partial block stores absmax 1e-38 (a full one, 0);
an odd count is padded with a zero; a value on a midpoint between two code values takes the lower
one. The 8-bit absmax quantizer rounds x/absmax to a 65536-point grid before its table lookup, so
it does not always pick the nearest code value.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit import LabkitError

NF4_OFFSET = 0.9677083  # the outermost quantile: norm.ppf(0.9677083) ~ 1.848 standard deviations

# bitsandbytes' hard-coded NF4 table (functional.get_4bit_type("nf4")), for comparison.
BNB_NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


# ---------------------------------------------------------------- the 16-value codes


def nf4_code(offset: float = NF4_OFFSET) -> Tensor:
    """The NF4 code: 8 positive and 7 negative normal quantiles plus an exact zero, scaled to [-1, 1]."""
    return torch.tensor(_nf4_values(offset))


@functools.lru_cache(maxsize=8)
def _nf4_values(offset: float) -> tuple[float, ...]:
    """The 16 NF4 values for `offset` (cached: a forward pass asks for the code in every layer)."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    # Quantile levels in fp32 (as bnb's torch.linspace), quantiles in fp64 (as scipy), stored fp32.
    positive = normal.icdf(torch.linspace(offset, 0.5, 9)[:-1].double())  # 8 values
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 values
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float()
    values = values.sort().values
    code = values / values.max()
    if offset == NF4_OFFSET:
        assert code.tolist() == list(BNB_NF4_TABLE), "NF4 code differs from bitsandbytes' table"
    return tuple(code.tolist())


def fp4_code() -> Tensor:
    """bnb's FP4 (1 sign, 2 exponent, 1 mantissa bit) code, indexed by bit pattern, scaled to [-1, 1]."""
    # Bit patterns 0b000..0b111 of the magnitude: exponent 00 is subnormal (0 and 0.0625),
    # otherwise 2**(4 - e) * (1 + m/2): 01 -> 8, 12; 10 -> 4, 6; 11 -> 2, 3. Bit 3 is the sign.
    # Scaled by 1/12 this is E2M1 (0, 0.5, 1, 1.5, 2, 3, 4, 6)/6 except the subnormal: 1/192, not 1/12.
    magnitudes = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0])
    code = torch.cat([magnitudes, -magnitudes])  # the sign bit gives -0.0 at index 8
    return code / code.abs().max()


def int4_code() -> Tensor:
    """Symmetric absmax int4 for contrast: k/7 for k in -7..7 (zero twice, as bnb's "int4" table)."""
    return torch.cat([torch.arange(-7, 1), torch.arange(0, 8)]).float() / 7


def dynamic_map_signed() -> Tensor:
    """The signed 8-bit dynamic map that double quantization uses (bnb's `create_dynamic_map()`)."""
    return torch.tensor(_dynamic_map_values(), dtype=torch.float32)


@functools.lru_cache(maxsize=1)
def _dynamic_map_values() -> tuple[float, ...]:
    """The 256 sorted values of the signed dynamic map: +-(linear fractions) * 10**-6 .. 10**0, 0, 1."""
    values = [0.0, 1.0]
    for exponent in range(7):  # 10**-6 .. 10**0, with 1, 2, 4, ..., 64 linear fractions each
        boundaries = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scaled = 10 ** (exponent - 6) * means
        values += scaled.tolist() + (-scaled).tolist()
    assert len(values) == 256
    return tuple(torch.tensor(sorted(values), dtype=torch.float32).tolist())


CODES = {"nf4": nf4_code, "fp4": fp4_code, "int4": int4_code}


def get_code(quant_type: str) -> Tensor:
    """The 16-value code of 'nf4', 'fp4' or 'int4'."""
    if quant_type not in CODES:
        raise LabkitError(f"quant_type must be one of {sorted(CODES)}, got {quant_type!r}")
    return CODES[quant_type]()


# ---------------------------------------------------------------- 4-bit blockwise


def quantize_blockwise_4bit(x: Tensor, code: Tensor, blocksize: int = 64) -> tuple[Tensor, Tensor]:
    """Quantize `x` to packed 4-bit indices into `code`: (uint8 of shape ((n+1)//2, 1), fp32 absmax)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # bnb multiplies full blocks by 1/absmax but divides the last, partial block by its absmax.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)  # stored clamped: 1e-38 if all zero
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        scaled = torch.cat([scaled, (flat[full:] / tail_absmax).clamp(-1, 1)])
    if n % 2:
        scaled = F.pad(scaled, (0, 1))  # an odd count is padded with a zero
    order = torch.argsort(code)  # FP4 is stored by bit pattern, not sorted
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    index = order[torch.bucketize(scaled, midpoints)]  # x on a midpoint goes to the lower value
    index = index.to(torch.uint8)
    packed = (index[0::2] << 4) | index[1::2]  # first element in the high nibble
    return packed.unsqueeze(1), absmax


def dequantize_4bit(
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    shape: tuple[int, ...] | torch.Size,
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Unpack 4-bit indices, look them up in `code` and scale each block by its absmax."""
    packed = packed.reshape(-1)
    n = math.prod(shape)
    index = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n]
    values = code[index.long()]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scale).reshape(shape).to(dtype)


# ---------------------------------------------------------------- 8-bit blockwise (for absmax)


LUT_SIZE = 65536  # bnb's CPU 8-bit quantizer snaps x/absmax to a grid of 65536 points in [-1, 1]


def nearest_code_lut(code: Tensor) -> Tensor:
    """bnb's lookup table: for each of 65536 grid points in [-1, 1], the index of the nearest code value."""
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1)
    return torch.searchsorted(midpoints, grid, side="left")  # how many midpoints lie strictly below


def quantize_blockwise_8bit(x: Tensor, code: Tensor, blocksize: int = 256) -> tuple[Tensor, Tensor]:
    """Quantize `x` to 8-bit indices into a sorted 256-value `code` per block, as bnb's C CPU kernel."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    padded = F.pad(flat, (0, -n % blocksize))  # zero padding cannot change a block's absmax
    absmax = padded.view(-1, blocksize).abs().amax(dim=1)
    inverse = (1.0 / absmax).repeat_interleave(blocksize)[:n]
    normed = (flat * inverse).clamp(-1, 1)
    # Not an exact nearest-value search: the value is rounded to the LUT grid first, so values
    # within ~1.5e-5 of a midpoint between two codes can go to the farther one.
    grid_index = (((normed + 1.0) * 0.5) * (LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncation
    index = nearest_code_lut(code)[grid_index.clamp(0, LUT_SIZE - 1)]
    index = torch.where((absmax == 0).repeat_interleave(blocksize)[:n], 0, index)  # all-zero block
    return index.to(torch.uint8).reshape(x.shape), absmax


def dequantize_blockwise_8bit(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int = 256) -> Tensor:
    """Look up 8-bit indices in `code` and scale each block by its absmax (fp32)."""
    n = q.numel()
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (code[q.reshape(-1).long()] * scale).reshape(q.shape)


@dataclass
class DoubleQuant:
    """Absmax values stored in 8 bits: indices, one fp32 scale per 256 of them, and the mean."""

    qabsmax: Tensor  # uint8, one per 4-bit block
    absmax2: Tensor  # fp32, one per `blocksize` absmax values
    offset: Tensor  # fp32 scalar: the mean absmax, subtracted before quantizing
    code: Tensor  # the signed dynamic map
    blocksize: int = 256


def double_quantize(absmax: Tensor, blocksize: int = 256) -> DoubleQuant:
    """Quantize fp32 absmax values: subtract their mean, then 8-bit blockwise with the dynamic map."""
    offset = absmax.mean()
    code = dynamic_map_signed()
    qabsmax, absmax2 = quantize_blockwise_8bit(absmax - offset, code, blocksize)
    return DoubleQuant(qabsmax, absmax2, offset, code, blocksize)


def double_dequantize(dq: DoubleQuant) -> Tensor:
    """The fp32 absmax values back from their 8-bit form."""
    return dequantize_blockwise_8bit(dq.qabsmax, dq.absmax2, dq.code, dq.blocksize) + dq.offset


def bits_per_parameter(blocksize: int = 64, double_quant: bool = False, nested_blocksize: int = 256) -> float:
    """Storage bits per weight: 4 for the index plus the per-block absmax overhead."""
    if not double_quant:
        return 4 + 32 / blocksize  # 4.5 at blocksize 64
    return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)  # ~4.127 at 64 / 256


# ---------------------------------------------------------------- whole tensors


@dataclass
class Quantized4bit:
    """A tensor in 4 bits: packed indices, per-block absmax (fp32, or 8-bit when double-quantized)."""

    packed: Tensor
    absmax: Tensor | DoubleQuant
    shape: torch.Size
    quant_type: str
    blocksize: int
    dtype: torch.dtype

    def absmax_fp32(self) -> Tensor:
        """The per-block scales, dequantized if they are double-quantized."""
        return double_dequantize(self.absmax) if isinstance(self.absmax, DoubleQuant) else self.absmax

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The tensor back in `dtype` (default: the original dtype)."""
        code = get_code(self.quant_type)
        absmax = self.absmax_fp32()
        return dequantize_4bit(self.packed, absmax, code, self.shape, self.blocksize, dtype or self.dtype)


def quantize_4bit(
    x: Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False
) -> Quantized4bit:
    """Quantize a tensor to 4 bits (`quant_type` 'nf4', 'fp4' or 'int4'), optionally double-quantized."""
    packed, absmax = quantize_blockwise_4bit(x, get_code(quant_type), blocksize)
    stored = double_quantize(absmax) if double_quant else absmax
    return Quantized4bit(packed, stored, x.shape, quant_type, blocksize, x.dtype)


# ---------------------------------------------------------------- a 4-bit linear layer


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in 4 bits and dequantized in each forward."""

    def __init__(
        self,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        quant_type: str = "nf4",
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = compute_dtype or linear.weight.dtype
        q = quantize_4bit(linear.weight.detach(), quant_type, blocksize, double_quant)
        self.register_buffer("weight_packed", q.packed)
        if double_quant:
            self.register_buffer("absmax", q.absmax.qabsmax)
            self.register_buffer("absmax2", q.absmax.absmax2)
            self.register_buffer("absmax_offset", q.absmax.offset)
        else:
            self.register_buffer("absmax", q.absmax)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def quantized(self) -> Quantized4bit:
        """The stored weight as a Quantized4bit."""
        absmax = self.absmax
        if self.double_quant:
            absmax = DoubleQuant(self.absmax, self.absmax2, self.absmax_offset, dynamic_map_signed())
        shape = torch.Size((self.out_features, self.in_features))
        return Quantized4bit(
            self.weight_packed, absmax, shape, self.quant_type, self.blocksize, self.compute_dtype
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight (out x in), dequantized to `dtype` (default: the compute dtype)."""
        return self.quantized().dequantize(dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x @ dequantized(W).T + b, computed in the compute dtype, returned in x's dtype."""
        weight = self.dequantize()
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), weight, bias).to(x.dtype)

    def storage_bytes(self) -> int:
        """Bytes held by the quantized weight and its scales (bias excluded)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}"
        )


def quantize_model(
    model: nn.Module,
    blocksize: int = 64,
    double_quant: bool = True,
    quant_type: str = "nf4",
    skip: tuple[str, ...] = ("lm_head",),
) -> nn.Module:
    """Replace every nn.Linear (except names in `skip`) with a frozen 4-bit NF4Linear, in place."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] not in skip
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Linear(linear, blocksize, double_quant, quant_type))
    return model


# ---------------------------------------------------------------- the same recipe in bitsandbytes


def bnb_4bit_config(compute_dtype: torch.dtype = torch.float32, double_quant: bool = True, quant_type: str = "nf4"):
    """The QLoRA recipe for transformers: NF4 weights, double-quantized absmax, compute in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


# ---------------------------------------------------------------- errors and code usage


def blockwise_normalized(weight: Tensor, blocksize: int = 64) -> Tensor:
    """Each value divided by its block's absmax: what the 4-bit code has to represent, in [-1, 1].

    Full blocks only: a trailing partial block is left out (its absmax comes from fewer values).
    """
    flat = weight.detach().reshape(-1).float()
    n = flat.numel() - flat.numel() % blocksize
    blocks = flat[:n].view(-1, blocksize)
    return (blocks / blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)).reshape(-1)


def quantization_error(weight: Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False) -> dict:
    """Quantize and dequantize one tensor; squared error, squared norm, relative error and storage bits."""
    w = weight.detach().float()
    q = quantize_4bit(w, quant_type, blocksize, double_quant)
    sq_error = float((q.dequantize(torch.float32) - w).double().pow(2).sum())
    sq_norm = float(w.double().pow(2).sum())
    return {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "double_quant": double_quant,
        "relative_error": math.sqrt(sq_error / sq_norm) if sq_norm else 0.0,  # all zeros: stored exactly
        "rmse": math.sqrt(sq_error / w.numel()),
        "bits": bits_per_parameter(blocksize, double_quant),
        "sq_error": sq_error,
        "sq_norm": sq_norm,
        "n": w.numel(),
    }


def model_quantization_error(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64,
                             double_quant: bool = False, skip: tuple[str, ...] = ("lm_head",),
                             layers=None) -> dict:
    """Quantization error over the linear weights of a model: sqrt(sum of squared errors / sum of squares).

    `layers`: decoder layer indices to include (default: all).
    """
    wanted = None if layers is None else {int(i) for i in layers}
    sq_error = sq_norm = 0.0
    n = 0
    for name, module in model.named_modules():
        match = re.search(r"\.layers\.(\d+)\.", name)
        if wanted is not None and (match is None or int(match.group(1)) not in wanted):
            continue
        if isinstance(module, nn.Linear) and name.split(".")[-1] not in skip:
            one = quantization_error(module.weight, quant_type, blocksize, double_quant)
            sq_error, sq_norm, n = sq_error + one["sq_error"], sq_norm + one["sq_norm"], n + one["n"]
    if not n:
        raise LabkitError("The model has no nn.Linear weights to quantize (already quantized?).")
    return {"quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant, "weights": n,
            "relative_error": math.sqrt(sq_error / sq_norm), "rmse": math.sqrt(sq_error / n),
            "bits": bits_per_parameter(blocksize, double_quant)}


def code_usage(weight: Tensor, quant_type: str = "nf4", blocksize: int = 64) -> Tensor:
    """Share of a tensor's values that land on each of the code's 16 values (sorted by value)."""
    code = get_code(quant_type)
    packed, _ = quantize_blockwise_4bit(weight.detach().float(), code, blocksize)
    index = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 0x0F], dim=1).reshape(-1)[: weight.numel()]
    counts = torch.bincount(index.long(), minlength=16).double()
    # Report by value, not by bit pattern (FP4 stores its values out of order; int4 has zero twice).
    values = code.tolist()
    by_value: dict[float, float] = {}
    for i, v in enumerate(values):
        by_value[abs(v) if v == 0 else v] = by_value.get(abs(v) if v == 0 else v, 0.0) + float(counts[i])
    ordered = torch.tensor([by_value[v] for v in sorted(by_value)], dtype=torch.float64)
    return ordered / ordered.sum()


def usage_entropy(shares: Tensor) -> float:
    """Entropy in bits of how often each code value is used (4.0 = all 16 equally often)."""
    p = shares[shares > 0].double()
    return float(-(p * p.log2()).sum())
