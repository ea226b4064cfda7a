"""Teaching diagrams drawn in code from labkit's own numbers, so they stay true (notebooks 03, 04, 06).

Each function returns a matplotlib Figure: the LoRA data path of one linear layer, the NF4 code with
blockwise absmax scaling, and the SFT -> preference pipeline (DPO, KTO, ORPO). Frozen weights are grey, trainable ones orange.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyBboxPatch, Patch, Rectangle

from labkit import quant

FROZEN, TRAINABLE, NEUTRAL = "#c8c8c8", "#f5a55a", "#ffffff"  # fill colours: frozen, trainable, data/ops
EDGE = "#444444"
MIN_THICKNESS = 0.1  # a matrix side is never drawn thinner than this (r = 8 of 4096 would be invisible)


# ---------------------------------------------------------------- small drawing helpers


def _box(ax, x: float, y: float, w: float, h: float, text: str, color: str = NEUTRAL, size: float = 9) -> None:
    """A rounded box centred at (x, y) with centred text."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.03,rounding_size=0.1",
                                fc=color, ec=EDGE, lw=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=size)


def _arrow(ax, start: tuple[float, float], end: tuple[float, float], text: str = "",
           offset: tuple[float, float] = (0, 0), **text_kw) -> None:
    """An arrow from start to end, with an optional label at its middle (moved by `offset`)."""
    ax.annotate("", end, start, arrowprops=dict(arrowstyle="-|>", color=EDGE, lw=1.2, shrinkA=0, shrinkB=0))
    if text:
        mid = ((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1])
        ax.text(*mid, text, **{"ha": "center", "va": "bottom", "fontsize": 8, **text_kw})


def _legend(ax, loc: str) -> None:
    """The frozen / trainable colour legend shared by the diagrams."""
    handles = [Patch(fc=FROZEN, ec=EDGE, label="frozen"), Patch(fc=TRAINABLE, ec=EDGE, label="trainable")]
    ax.legend(handles=handles, loc=loc, fontsize=9, frameon=False)


def _canvas(width: float, height: float) -> tuple[Figure, plt.Axes]:
    """A figure filled by one axis-free axes with equal aspect: one data unit per half inch."""
    fig, ax = plt.subplots(figsize=(width, height))
    fig.subplots_adjust(0, 0, 1, 1)
    ax.set(xlim=(0, 2 * width), ylim=(0, 2 * height), aspect="equal")
    ax.axis("off")
    return fig, ax


# ---------------------------------------------------------------- 1. LoRA


def lora_data_path(d_in: int = 576, d_out: int = 576, r: int = 16, alpha: int = 32) -> Figure:
    """LoRA on one linear layer: x through frozen W and through dropout -> A -> B -> alpha/r, summed into h."""
    fig, ax = _canvas(10, 4.5)
    s = 2.8 / max(d_in, d_out)  # data units per matrix row/column: W's longer side is 2.8 units
    side = lambda n: max(n * s, MIN_THICKNESS)  # noqa: E731
    ax.text(0.2, 8.55, "LoRA forward path of one linear layer", fontsize=12, weight="bold")
    _box(ax, 1.1, 4.5, 1.4, 1.0, f"x\n({d_in})", size=10)
    ax.plot([1.8, 2.6, 2.6, 2.6], [4.5, 4.5, 6.4, 2.0], color=EDGE, lw=1.2)
    ax.plot([2.6, 2.6], [2.0, 6.4], color=EDGE, lw=1.2)
    # frozen path: W (d_out x d_in) drawn d_in wide and d_out tall
    w_w, w_h = side(d_in), side(d_out)
    _arrow(ax, (2.6, 6.4), (3.6, 6.4))
    ax.add_patch(Rectangle((3.6, 6.4 - w_h / 2), w_w, w_h, fc=FROZEN, ec=EDGE, gid="W"))
    ax.text(3.6 + w_w / 2, 6.4 + w_h / 2 + 0.15, f"W   {d_out} x {d_in}", ha="center", va="bottom", fontsize=9)
    ax.text(3.6 + w_w / 2, 6.4 - w_h / 2 - 0.15, "frozen\n(pretrained)", ha="center", va="top", fontsize=8)
    ax.plot([3.6 + w_w, 14.8, 14.8], [6.4, 6.4, 4.85], color=EDGE, lw=1.2)
    ax.text(9.0, 6.5, f"Wx  ({d_out})", ha="center", va="bottom", fontsize=8)
    # adapter path: dropout -> A (r x d_in) -> B (d_out x r) -> scale
    _arrow(ax, (2.6, 2.0), (3.3, 2.0))
    _box(ax, 4.15, 2.0, 1.5, 0.9, "dropout\n(adapter\npath only)", size=8)
    a_w, a_h = side(d_in), side(r)
    _arrow(ax, (4.9, 2.0), (5.6, 2.0))
    ax.add_patch(Rectangle((5.6, 2.0 - a_h / 2), a_w, a_h, fc=TRAINABLE, ec=EDGE, gid="A"))
    ax.text(5.6 + a_w / 2, 2.0 + a_h / 2 + 0.15, f"A   {r} x {d_in}", ha="center", va="bottom", fontsize=9)
    ax.text(5.6 + a_w / 2, 2.0 - a_h / 2 - 0.15, "trainable\ninit: random", ha="center", va="top", fontsize=8)
    b_x, b_w, b_h = 5.6 + a_w + 1.3, side(r), side(d_out)
    _arrow(ax, (5.6 + a_w, 2.0), (b_x, 2.0), f"Ax ({r})")
    ax.add_patch(Rectangle((b_x, 2.0 - b_h / 2), b_w, b_h, fc=TRAINABLE, ec=EDGE, gid="B"))
    ax.text(b_x + b_w / 2, 2.0 + b_h / 2 + 0.1, f"B   {d_out} x {r}", ha="center", va="bottom", fontsize=9)
    ax.text(b_x + b_w / 2, 2.0 - b_h / 2 - 0.1, "trainable, init: zeros", ha="center", va="top", fontsize=8)
    _arrow(ax, (b_x + b_w, 2.0), (11.6, 2.0), f"BAx ({d_out})")
    _box(ax, 12.6, 2.0, 2.0, 0.9, f"$\\times\\ \\alpha / r$\n= {alpha}/{r} = {alpha / r:g}", size=9)
    ax.plot([13.6, 14.8], [2.0, 2.0], color=EDGE, lw=1.2)
    _arrow(ax, (14.8, 2.0), (14.8, 4.15))
    # the sum and the output
    ax.add_patch(Circle((14.8, 4.5), 0.35, fc=NEUTRAL, ec=EDGE))
    ax.text(14.8, 4.5, "+", ha="center", va="center", fontsize=14)
    _arrow(ax, (15.15, 4.5), (16.0, 4.5))
    _box(ax, 17.8, 4.5, 3.4, 1.1, f"$h = Wx + \\frac{{\\alpha}}{{r}}\\,BAx$\n({d_out})", size=11)
    adapter = r * (d_in + d_out)
    ax.text(9.0, 8.6, f"W: {d_out} x {d_in} = {d_in * d_out:,} parameters (frozen)\n"
            f"adapter: r x (d_in + d_out) = {adapter:,} parameters (trainable), "
            f"{100 * adapter / (d_in * d_out):.2f} % of W\n"
            "matrices drawn to scale: rows x columns", ha="left", va="top", fontsize=9,
            bbox=dict(fc="#f7f7f7", ec="#bbbbbb", boxstyle="round,pad=0.3"))
    _legend(ax, "lower left")
    return fig


# ---------------------------------------------------------------- 2. NF4


def nf4_codebook_and_blocks(weights: torch.Tensor | None = None, block_size: int = 64) -> Figure:
    """NF4's 16 code values (normal quantiles in [-1, 1]) and blockwise absmax scaling of a weight vector."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.3), gridspec_kw={"width_ratios": [1, 1.2]})
    _nf4_code_panel(left)
    if weights is None:
        weights = torch.randn(256, generator=torch.Generator().manual_seed(0)) * 0.02
    _absmax_panel(right, torch.as_tensor(weights).detach().reshape(-1).float(), block_size)
    fig.text(0.5, 0.01, "each block stores one absmax (scale); values are divided by it, "
             "then rounded to the nearest code value", ha="center", va="bottom", fontsize=9.5, style="italic")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def _nf4_code_panel(ax) -> None:
    """The 16 NF4 values on a number line, over the normal density they are quantiles of."""
    code = quant.nf4_code()
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(quant.NF4_OFFSET)))  # code 1.0 = z sigmas
    density = lambda v: torch.exp(-0.5 * (z * torch.as_tensor(v)) ** 2)  # noqa: E731  (peak scaled to 1)
    grid = torch.linspace(-1, 1, 401)
    ax.fill_between(grid, 0, density(grid), color="#cfe0f3", label=f"normal density (code 1.0 = {z:.3f} sigma)")
    ax.vlines(code, 0, density(code), color=["#d62728" if v == 0 else "#6c8ebf" for v in code.tolist()], lw=0.8)
    ax.plot(code, torch.zeros(16), "o", color="#1f4e8c", ms=5, gid="nf4-code", label="the 16 NF4 values")
    ax.plot([0.0], [0.0], "D", color="#d62728", ms=7, zorder=3)
    zero = code.tolist().index(0.0)
    ax.text(0, 1.03, f"exact zero (index {zero})", ha="center", va="bottom", fontsize=8, color="#d62728")
    for i, v in enumerate(code.tolist()):  # staggered: the values crowd near 0
        ax.text(v, -0.07 - 0.08 * (i % 2), str(i), ha="center", va="top", fontsize=7.5)
    ax.text(-1.05, -0.275, "index:", fontsize=7.5, ha="left", va="bottom", color="#555555")
    ax.set(xlim=(-1.1, 1.1), ylim=(-0.32, 1.45), yticks=[], xlabel="code value (weight / block absmax)",
           title="NF4 code: quantiles of a normal, denser near 0")
    ax.legend(loc="upper left", fontsize=8, frameon=False)


def _absmax_panel(ax, w: torch.Tensor, block_size: int) -> None:
    """A weight vector in blocks: each block's +-absmax, and its values after labkit.quant's NF4 round trip."""
    q = quant.quantize_4bit(w, "nf4", block_size)
    absmax, n = q.absmax_fp32(), w.numel()
    starts = [b * block_size - 0.5 for b in range(len(absmax))]
    ends = [min(s + block_size, n - 0.5) for s in starts]
    for b, (s, e) in enumerate(zip(starts, ends)):
        ax.axvspan(s, e, color="#eef2f7" if b % 2 else "#fbf3e8", lw=0)
    ax.hlines(torch.cat([absmax, -absmax]), starts * 2, ends * 2, color="#d62728", lw=1.5, gid="absmax",
              label="block's +-absmax")
    ax.plot(w, ".", color="#1f4e8c", ms=3.5, label="weight", gid="weights")
    ax.plot(q.dequantize(), "x", color="#e67e22", ms=3, mew=0.8, label="after NF4 round trip", gid="dequantized")
    top = float(absmax.max()) or 1.0  # all zeros: any scale will do
    for s, e, a in zip(starts, ends, absmax.tolist()):
        if e - s >= 0.09 * n:  # a label fits in blocks at least ~0.45 inch wide
            ax.text((s + e) / 2, 1.12 * top, f"absmax\n{a:.3f}", ha="center", va="bottom", fontsize=7.5)
    ax.set(xlim=(-0.5, n - 0.5), ylim=(-1.75 * top, 1.5 * top), xlabel="weight index",
           title=f"blockwise absmax: {len(absmax)} blocks of {block_size}")
    ax.legend(loc="lower center", ncol=3, fontsize=8, frameon=False)


# ---------------------------------------------------------------- 3. SFT -> DPO


DPO_LOSS = (r"$\mathrm{loss} = -\log\,\sigma\left(\beta\,\left[\left(\log\pi(\mathrm{chosen}) - \log\mathrm{ref}"
            r"(\mathrm{chosen})\right) - \left(\log\pi(\mathrm{rejected}) - \log\mathrm{ref}(\mathrm{rejected})"
            r"\right)\right]\right)$")


def preference_flow(beta: float = 0.1) -> Figure:
    """Notebooks 05-06: base -> SFT -> reply SFT (the reference) -> DPO and KTO; ORPO from the SFT model directly."""
    fig, ax = _canvas(12, 6.5)  # beta's default is labkit.dpo.DPOConfig.beta (not imported: peft is slow)
    ax.text(0.2, 12.4, "From SFT to preferences in labkit (notebooks 05-06)", fontsize=12, weight="bold")
    _box(ax, 2.6, 10.3, 4.2, 1.1, "base model\nSmolLM2-135M-Instruct", FROZEN)
    _box(ax, 2.6, 7.9, 4.2, 1.5, "SFT  (notebook 05)\nLoRA on ticket triage:\nonly the adapter trains", TRAINABLE)
    _box(ax, 2.6, 5.5, 4.2, 1.3, "SFT model\nadapter merged into\nthe base weights", FROZEN)
    _arrow(ax, (2.6, 9.75), (2.6, 8.65))
    _arrow(ax, (2.6, 7.15), (2.6, 6.15))
    _box(ax, 8.3, 7.9, 4.4, 1.5, "reply SFT  (06)\nboth replies of each pair\n+ as many triage examples", TRAINABLE,
         size=8.5)
    _box(ax, 8.3, 5.5, 4.4, 1.3, "reference\nreply adapter merged:\nwrites replies", FROZEN, size=8.5)
    _arrow(ax, (4.7, 5.8), (6.1, 7.4))
    _arrow(ax, (8.3, 7.15), (8.3, 6.15))
    _box(ax, 15.2, 11.1, 5.0, 0.8, "(prompt, chosen, rejected) pairs", size=8.5)
    _box(ax, 15.2, 8.9, 5.8, 1.9, f"DPO  (06), beta = {beta:g}\npolicy = reference + a new LoRA\n(trainable, "
         "B = 0: starts equal);\nreference = the policy with\nits adapter switched off", TRAINABLE, size=8)
    _box(ax, 15.2, 5.5, 5.8, 1.5, "KTO  (06)\nthe pairs' replies, one by one,\nthumbs up or down; "
         "same reference", TRAINABLE, size=8)
    _box(ax, 15.2, 2.3, 5.8, 1.5, "ORPO  (06)\nthe pairs + one triage example\nper pair, replayed; no reference", TRAINABLE, size=8)
    _arrow(ax, (15.2, 10.7), (15.2, 9.85))
    _arrow(ax, (10.5, 5.7), (12.3, 8.3))
    _arrow(ax, (10.5, 5.5), (12.3, 5.5))
    _arrow(ax, (2.6, 4.85), (12.3, 2.3))
    for y, name in [(8.9, "DPO"), (5.5, "KTO"), (2.3, "ORPO")]:
        _box(ax, 21.6, y, 3.8, 1.2, f"{name} model\n(start + {name} adapter)", size=8.5)
        _arrow(ax, (18.1, y), (19.7, y))
    ax.text(12.0, 0.75, DPO_LOSS, ha="center", va="center", fontsize=10.5)
    ax.text(12.0, 0.1, r"DPO's loss. $\pi$: the policy, ref: the reference; each log-prob is summed over the reply's "
            "tokens", ha="center", va="center", fontsize=8.5, color="#555555")
    _legend(ax, "upper right")
    return fig
