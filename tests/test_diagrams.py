"""labkit.course.diagrams: the teaching diagrams say what labkit's code does (shapes, counts, code values, beta)."""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from labkit import quant
from labkit.course import diagrams  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def texts(fig: Figure) -> list[str]:
    """Every string the figure shows (figure, axes, legend and tick texts), line breaks as spaces."""
    return [t.get_text().replace("\n", " ") for t in fig.findobj(Text)]


def shows(fig: Figure, *parts: str) -> bool:
    """Whether each part appears in some text of the figure."""
    return all(any(part in t for t in texts(fig)) for part in parts)


def artist(fig: Figure, gid: str):
    """The one artist drawn with this gid."""
    (found,) = fig.findobj(lambda a: a.get_gid() == gid)
    return found


def test_lora_diagram_labels_each_matrix_with_its_shape_role_and_init():
    fig = diagrams.lora_data_path()
    assert isinstance(fig, Figure)
    assert shows(fig, "576 x 576", "16 x 576", "576 x 16", "frozen", "trainable", "init: random", "init: zeros",
                 "dropout", "adapter path only", r"h = Wx + \frac{\alpha}{r}\,BAx", "= 32/16 = 2")


def test_lora_diagram_prints_the_adapter_parameter_count_for_any_size():
    fig = diagrams.lora_data_path(d_in=4096, d_out=4096, r=8, alpha=16)
    assert shows(fig, "= 65,536 parameters (trainable)", "= 16,777,216 parameters (frozen)", "0.39 % of W")
    assert 8 * (4096 + 4096) == 65_536


def test_lora_diagram_draws_matrices_in_proportion_to_their_shapes():
    fig = diagrams.lora_data_path(d_in=576, d_out=1536, r=64)
    w, a, b = (artist(fig, name) for name in "WAB")
    assert a.get_width() == pytest.approx(w.get_width())  # both d_in wide
    assert b.get_height() == pytest.approx(w.get_height())  # both d_out tall
    assert a.get_height() == pytest.approx(w.get_width() * 64 / 576)  # r of d_in
    assert b.get_width() == pytest.approx(a.get_height())  # r wide


def test_nf4_diagram_plots_exactly_the_16_values_of_labkit_quant():
    fig = diagrams.nf4_codebook_and_blocks()
    points = artist(fig, "nf4-code")
    assert len(points.get_xdata()) == 16
    assert torch.equal(torch.as_tensor(points.get_xdata(), dtype=torch.float32), quant.nf4_code())
    assert shows(fig, "exact zero (index 7)", "absmax", "divided by it, then rounded to the nearest code value")
    assert {str(i) for i in range(16)} <= set(texts(fig))


def test_blocks_panel_draws_one_absmax_pair_per_block_a_partial_last_block_included():
    weights = torch.randn(200, generator=torch.Generator().manual_seed(1)) * 0.02
    fig = diagrams.nf4_codebook_and_blocks(weights, block_size=64)
    segments = artist(fig, "absmax").get_segments()
    blocks = math.ceil(200 / 64)
    assert len(segments) == 2 * blocks
    heights = sorted(float(s[0][1]) for s in segments)
    expected = [float(weights[i : i + 64].abs().max()) for i in range(0, 200, 64)]
    assert heights == pytest.approx(sorted([-h for h in expected] + expected))


def test_blocks_panel_overlays_labkit_quants_nf4_round_trip():
    weights = torch.randn(128, generator=torch.Generator().manual_seed(2)) * 0.02
    fig = diagrams.nf4_codebook_and_blocks(weights, block_size=32)
    shown = torch.as_tensor(artist(fig, "dequantized").get_ydata())
    assert torch.equal(shown, quant.quantize_4bit(weights, "nf4", 32).dequantize())


def test_preference_flow_names_reference_policy_and_the_dpo_loss():
    fig = diagrams.preference_flow()
    assert shows(fig, "reference", "policy", "DPO", "SmolLM2-135M-Instruct", "(prompt, chosen, rejected) pairs",
                 "its adapter switched off", r"-\log\,\sigma", r"\beta", r"\log\pi(\mathrm{chosen})",
                 r"\log\mathrm{ref}(\mathrm{rejected})")


def test_preference_flow_shows_every_stage_the_course_trains():
    fig = diagrams.preference_flow()
    assert shows(fig, "SFT  (notebook 05)", "reply SFT  (06)", "DPO  (06)", "KTO  (06)", "ORPO  (06)", "no reference",
                 "triage example")


def test_preference_flow_shows_the_beta_it_was_given():
    assert shows(diagrams.preference_flow(beta=0.25), "beta = 0.25")


def test_preference_flow_default_beta_is_dpo_configs_default():
    # read from the source: importing labkit.dpo pulls in peft, too slow for this file
    tree = ast.parse((Path(diagrams.__file__).parents[1] / "dpo.py").read_text(encoding="utf-8"))
    (config,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "DPOConfig"]
    (beta,) = [n.value for n in config.body if isinstance(n, ast.AnnAssign) and n.target.id == "beta"]
    assert inspect.signature(diagrams.preference_flow).parameters["beta"].default == ast.literal_eval(beta)


def test_frozen_and_trainable_have_the_same_colours_in_both_diagrams():
    def legend_colours(fig: Figure) -> dict[str, tuple]:
        legend = fig.axes[0].get_legend()
        return {t.get_text(): tuple(h.get_facecolor()) for t, h in zip(legend.get_texts(), legend.legend_handles)}

    lora, flow = legend_colours(diagrams.lora_data_path()), legend_colours(diagrams.preference_flow())
    assert lora == flow
    assert lora["frozen"] == matplotlib.colors.to_rgba(diagrams.FROZEN)
    assert lora["trainable"] == matplotlib.colors.to_rgba(diagrams.TRAINABLE)
