"""Merging LoRA task adapters from scratch (labkit.merge), proven equal to peft's `add_weighted_adapter`, and whole
models, proven equal to mergekit.

peft's `cat`, `svd` and `*_svd` combination types merge the full updates (B @ A) * scaling, as labkit's
`merge_adapters` does; its `linear`, `ties` and `dare_*` types merge the A and B factors apart, as `merge_factors`
does. Tolerances: peft's `svd` types re-factorise the merged update with a float32 SVD, so B_new @ A_new carries
float32 rounding (measured max |difference| 3e-8 to 8e-8 on updates of magnitude ~0.03); atol 1e-6 leaves room for
another CPU's BLAS and stays 1e4 times smaller than the updates. `cat` only reorders the float32 sums (3.7e-9
measured). The factor-wise types run the very same float32 operations as ours: equal bit for bit.
"""

from contextlib import contextmanager

import pytest
import torch
from peft import LoraConfig, get_peft_model

from labkit import LabkitError
from labkit.lora import randomize_adapters
from labkit.merge import (add_merged_adapter, dare, disjoint_merge, elect_sign, factorise, lora_deltas, lora_modules,
                          merge_adapters, merge_factors, merge_state_dicts, merge_tensors, merge_updates, merged_model,
                          trim)
from labkit.rank import low_rank_approximation

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTERS = ["triage", "reply"]
WEIGHTS = [0.7, 0.4]
ATOL = 1e-6  # float32 SVD / summation order, see the module docstring
FULL_RANK = 64  # the tiny Llama's hidden size: no layer's update has a higher rank


@pytest.fixture(scope="module")
def model(tiny_llama):
    """A tiny Llama with two rank-4 LoRA adapters on every linear layer, different alphas, random non-zero B."""
    peft_model = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                                adapter_name="triage")
    peft_model.add_adapter("reply", LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    return randomize_adapters(peft_model, seed=1)


@contextmanager
def reseeded_after_injection(model, seed: int):
    """Reseed torch's global RNG right after peft creates the merged adapter (whose initialisation draws random
    numbers), so that peft's DARE masks come from the same seed as ours."""
    inject = model.base_model.inject_adapter

    def inject_then_seed(*args, **kwargs):
        result = inject(*args, **kwargs)
        torch.manual_seed(seed)
        return result

    model.base_model.inject_adapter = inject_then_seed
    try:
        yield
    finally:
        del model.base_model.inject_adapter


def peft_merge(model, combination_type: str, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    """peft's merged adapter's update of every layer, B_new @ A_new * scaling (the adapter is removed again)."""
    with reseeded_after_injection(model, seed):
        model.add_weighted_adapter(ADAPTERS, WEIGHTS, "merged", combination_type=combination_type, **kwargs)
    try:
        return {name: layer.get_delta_weight("merged") for name, layer in lora_modules(model).items()
                if "merged" in layer.lora_A}
    finally:
        model.delete_adapter("merged")


def max_gap(ours: dict, theirs: dict) -> float:
    """The largest |difference| over every layer (both must cover the same layers)."""
    assert ours.keys() == theirs.keys()
    return max((ours[name] - theirs[name]).abs().max().item() for name in ours)


# ---------------------------------------------------------------- the pieces, on numbers

A = torch.tensor([0.5, -0.1, 0.2, -0.4])
B = torch.tensor([-0.3, 0.1, 0.2, -0.6])


def test_trim_keeps_the_density_share_of_largest_magnitudes():
    assert torch.equal(trim(A, 0.5), torch.tensor([0.5, 0.0, 0.0, -0.4]))


def test_trim_at_density_one_keeps_everything():
    assert torch.equal(trim(A, 1.0), A)


def test_trim_keeps_every_entry_tied_at_zero_so_values_do_not_change():
    assert torch.equal(trim(torch.tensor([0.0, 0.0, 0.3, 0.0]), 0.5), torch.tensor([0.0, 0.0, 0.3, 0.0]))


def test_trim_at_a_density_below_one_entry_keeps_nothing():
    assert torch.equal(trim(A, 0.1), torch.zeros(4))


def test_elect_sign_follows_the_summed_mass_and_picks_plus_on_a_tie():
    stacked = torch.stack([torch.tensor([0.5, -0.1, 0.0]), torch.tensor([-0.3, -0.2, 0.0])])
    assert torch.equal(elect_sign(stacked), torch.tensor([1.0, -1.0, 1.0]))


def test_disjoint_merge_averages_only_the_entries_that_agree_with_the_elected_sign():
    stacked = torch.stack([torch.tensor([0.5, 0.0, -0.4]), torch.tensor([-0.3, 0.0, -0.6])])
    merged = disjoint_merge(stacked, elect_sign(stacked), torch.ones(2, 1))
    assert torch.allclose(merged, torch.tensor([0.5, 0.0, -0.5]))


def test_dare_zeroes_dropped_entries_and_scales_kept_ones_by_one_over_density():
    delta = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    dropped = dare(delta, 0.25, torch.Generator().manual_seed(1))
    kept = dropped != 0
    assert torch.allclose(dropped[kept], delta[kept] / 0.25)
    assert abs(kept.float().mean().item() - 0.25) < 0.02  # 10,000 draws: one standard deviation is 0.0043


def test_dare_draws_the_same_masks_from_the_same_seed():
    delta = torch.randn(100)
    one, other = (dare(delta, 0.5, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(one, other)


def test_ties_on_four_numbers_trims_elects_and_takes_the_disjoint_mean():
    assert torch.allclose(merge_tensors([A, B], [1.0, 1.0], "ties", 0.5), torch.tensor([0.5, 0.0, 0.0, -0.5]))


def test_linear_merge_is_the_weighted_sum():
    assert torch.allclose(merge_tensors([A, B], [0.7, 0.4]), 0.7 * A + 0.4 * B)


@pytest.mark.parametrize("method, weights, density, error", [
    ("slerp", [1.0, 1.0], 1.0, "unknown"),
    ("linear", [1.0], 1.0, "one weight per update"),
    ("ties", [1.0, 1.0], 0.0, "density must be in"),
])
def test_merge_tensors_rejects_arguments_that_cannot_work(method, weights, density, error):
    with pytest.raises(LabkitError, match=error):
        merge_tensors([A, B], weights, method, density)


# ---------------------------------------------------------------- full updates: equal to peft's cat, svd, *_svd


def test_lora_deltas_are_peft_delta_weights(model):
    peft_deltas = {name: layer.get_delta_weight("reply") for name, layer in lora_modules(model).items()}
    assert max_gap(lora_deltas(model, "reply"), peft_deltas) == 0.0


def test_linear_merge_of_updates_equals_peft_cat(model):
    assert max_gap(merge_adapters(model, ADAPTERS, WEIGHTS), peft_merge(model, "cat")) < ATOL  # 3.7e-9 measured


def test_linear_merge_of_updates_equals_peft_svd_at_the_summed_rank(model):
    # two rank-4 updates add up to rank <= 8: an SVD to rank 8 loses nothing
    assert max_gap(merge_adapters(model, ADAPTERS, WEIGHTS), peft_merge(model, "svd", svd_rank=8)) < ATOL  # 3.3e-8


def test_peft_svd_at_the_adapters_rank_is_the_truncated_svd_of_our_linear_merge(model):
    ours = {name: low_rank_approximation(delta, 4) for name, delta in merge_adapters(model, ADAPTERS, WEIGHTS).items()}
    assert max_gap(ours, peft_merge(model, "svd")) < ATOL  # peft's default rank: the adapters' r = 4; 7.7e-8 measured


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_merge_of_updates_equals_peft_svd_variant_at_full_rank(model, method):
    # full rank keeps the whole merged update; full_matrices=False because peft's default (True) gives B and A
    # of different inner sizes when svd_rank exceeds a layer's smaller side (k_proj here is 32 x 64)
    ours = merge_adapters(model, ADAPTERS, WEIGHTS, method, density=0.5, generator=torch.Generator().manual_seed(0))
    theirs = peft_merge(model, f"{method}_svd", seed=0, density=0.5, svd_rank=FULL_RANK, svd_full_matrices=False)
    assert max_gap(ours, theirs) < ATOL  # ties 3.3e-8, dare_linear 5.0e-8, dare_ties 4.5e-8 measured


def test_merge_of_update_dicts_equals_the_merge_of_the_adapters(model):
    updates = [lora_deltas(model, a) for a in ADAPTERS]
    ours = merge_updates(updates, WEIGHTS, "ties", 0.5)
    assert max_gap(ours, merge_adapters(model, ADAPTERS, WEIGHTS, "ties", 0.5)) == 0.0


def test_merge_of_update_dicts_passes_a_layer_only_one_update_has_weighted():
    only_a = {"x": torch.ones(2, 2)}
    both = merge_updates([only_a | {"y": torch.ones(2)}, {"y": torch.ones(2)}], [0.5, 0.25])
    assert torch.equal(both["x"], torch.full((2, 2), 0.5)) and torch.equal(both["y"], torch.full((2,), 0.75))


def test_dare_merge_differs_with_another_seed(model):
    one = merge_adapters(model, ADAPTERS, WEIGHTS, "dare_ties", 0.5, torch.Generator().manual_seed(0))
    other = merge_adapters(model, ADAPTERS, WEIGHTS, "dare_ties", 0.5, torch.Generator().manual_seed(1))
    assert max_gap(one, other) > 1e-3


# ---------------------------------------------------------------- factors apart: equal to peft's linear, ties, dare_*


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "dare_ties"])
def test_merge_of_factors_equals_peft_method_bit_for_bit(model, method):
    ours = merge_factors(model, ADAPTERS, WEIGHTS, method, density=0.5, generator=torch.Generator().manual_seed(0))
    assert max_gap(ours, peft_merge(model, method, seed=0, density=0.5)) == 0.0


def test_peft_linear_adds_cross_terms_to_the_weighted_sum_of_updates(model):
    factors, updates = merge_factors(model, ADAPTERS, WEIGHTS), merge_adapters(model, ADAPTERS, WEIGHTS)
    layer, name = next(iter(lora_modules(model).values())), next(iter(lora_modules(model)))
    (a1, b1), (a2, b2) = [(layer.lora_A[n].weight, layer.lora_B[n].weight) for n in ADAPTERS]
    s1, s2 = (w * layer.scaling[n] for w, n in zip(WEIGHTS, ADAPTERS))
    cross = (s1 * s2) ** 0.5 * (b1 @ a2 + b2 @ a1)  # (sqrt(s1) B1 + sqrt(s2) B2)(sqrt(s1) A1 + sqrt(s2) A2) - ...
    assert torch.allclose(factors[name] - updates[name], cross, atol=ATOL)
    assert cross.norm() > 0.5 * updates[name].norm()  # not a rounding matter: as large as the update itself


def test_merging_one_adapter_gives_its_weighted_update_either_way(model):
    alone = {name: 0.7 * delta for name, delta in lora_deltas(model, "triage").items()}
    assert max_gap(merge_adapters(model, ["triage"], [0.7]), alone) < ATOL
    assert max_gap(merge_factors(model, ["triage"], [0.7]), alone) < ATOL


# ---------------------------------------------------------------- using a merge


def test_added_merged_adapter_at_full_rank_reproduces_the_merged_updates(model):
    merged = merge_adapters(model, ADAPTERS, WEIGHTS, "ties", 0.5)
    add_merged_adapter(model, merged, "ties")
    try:
        theirs = {name: layer.get_delta_weight("ties") for name, layer in lora_modules(model).items()
                  if "ties" in layer.lora_A}
        assert max_gap(merged, theirs) < ATOL
    finally:
        model.delete_adapter("ties")


def test_added_merged_adapter_at_lower_rank_keeps_the_top_singular_directions(model):
    merged = merge_adapters(model, ADAPTERS, WEIGHTS, "ties", 0.5)
    add_merged_adapter(model, merged, "ties8", rank=8)
    try:
        theirs = {name: layer.get_delta_weight("ties8") for name, layer in lora_modules(model).items()
                  if "ties8" in layer.lora_A}
        assert max_gap({n: low_rank_approximation(d, 8) for n, d in merged.items()}, theirs) < ATOL
    finally:
        model.delete_adapter("ties8")


def test_added_merged_adapter_refuses_an_existing_name(model):
    with pytest.raises(LabkitError, match="already exists"):
        add_merged_adapter(model, merge_adapters(model, ADAPTERS, WEIGHTS), "triage")


def test_merged_model_computes_what_the_merged_adapter_computes(model):
    merged = merge_adapters(model, ADAPTERS, WEIGHTS)
    plain = merged_model(model, merged)
    add_merged_adapter(model, merged, "linear", rank=8)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad(), model.disable_adapter():
            base_logits = model(ids).logits
        model.set_adapter("linear")
        with torch.no_grad():
            gap = (plain(ids).logits - model(ids).logits).abs().max().item()
            moved = (plain(ids).logits - base_logits).abs().max().item()
        assert gap < 1e-5 < moved  # fp32 logits of magnitude ~1: the merge changes them, both ways alike
    finally:
        model.set_adapter("triage")
        model.delete_adapter("linear")


def test_merged_model_leaves_the_peft_model_untouched(model):
    before = {name: layer.base_layer.weight.clone() for name, layer in lora_modules(model).items()}
    merged_model(model, merge_adapters(model, ADAPTERS, WEIGHTS))
    after = {name: layer.base_layer.weight for name, layer in lora_modules(model).items()}
    assert max_gap(before, after) == 0.0


def test_factorise_at_full_rank_gives_back_the_matrix():
    delta = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    a, b = factorise(delta, 64)
    assert a.shape == (64, 64) and b.shape == (32, 64)
    assert torch.allclose(b @ a, delta, atol=1e-5)


def test_lora_deltas_names_the_loaded_adapters_when_one_is_missing(model):
    with pytest.raises(LabkitError, match="'triage'"):
        lora_deltas(model, "greeting")


@pytest.mark.parametrize("merge", [merge_adapters, merge_factors])
def test_merging_a_misspelt_adapter_is_refused_not_skipped(model, merge):
    with pytest.raises(LabkitError, match="'replies' is not loaded"):
        merge(model, ["triage", "replies"], WEIGHTS)


def test_merging_dora_adapters_is_refused(tiny_llama):
    dora = get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(LabkitError, match="DoRA"):
        lora_deltas(dora, "default")


# ---------------------------------------------------------------- full models


def test_merge_state_dicts_adds_the_merged_task_vectors_to_the_base():
    base = {"w": torch.zeros(4), "steps": torch.tensor(3)}
    merged = merge_state_dicts(base, [{"w": A, "steps": torch.tensor(9)}, {"w": B, "steps": torch.tensor(9)}],
                               [1.0, 1.0], "ties", 0.5)
    assert torch.allclose(merged["w"], torch.tensor([0.5, 0.0, 0.0, -0.5]))
    assert merged["steps"] is base["steps"]  # integers are not task vectors: kept from the base


# ---------------------------------------------------------------- whole models: mergekit, the tool teams merge with
# mergekit's task_arithmetic is our linear merge of task vectors; its ties (normalize on, the default) is ours at
# weight 1 (with other weights the two differ by convention: mergekit elects signs after weighting and divides by the
# agreeing weights' sum, we follow peft: elect first, divide by the count). Its DARE draws its masks from its own
# random stream and rescales to keep each update's L1 norm, so DARE is compared with peft only (above).


@pytest.fixture(scope="module")
def saved_models(tiny_llama, tmp_path_factory):
    """A tiny Llama base and two fine-tunes of it (every weight nudged), saved as safetensors folders."""
    folder = tmp_path_factory.mktemp("mergekit")
    models = {}
    for name, seed in [("base", None), ("a", 1), ("b", 2)]:
        model = tiny_llama(0)
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.save_pretrained(folder / name)
        models[name] = model.state_dict()
    return folder, models


def mergekit_merge(folder, method: str, weights: list[float], density: float = 1.0) -> dict[str, torch.Tensor]:
    """mergekit's merge of folders a and b onto base, read back as a state dict."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import load_file

    parameters = lambda w: {"weight": w, "density": density} if method == "ties" else {"weight": w}  # noqa: E731
    config = MergeConfiguration.model_validate({
        "merge_method": method, "base_model": str(folder / "base"), "dtype": "float32",
        "models": [{"model": str(folder / name), "parameters": parameters(w)} for name, w in zip("ab", weights)]})
    out = folder / f"out-{method}"
    run_merge(config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return {k: v for path in sorted(out.glob("*.safetensors")) for k, v in load_file(path).items()}


@pytest.mark.parametrize("method, ours, weights, density", [("task_arithmetic", "linear", [0.7, 0.4], 1.0),
                                                            ("ties", "ties", [1.0, 1.0], 0.5)])
def test_merge_state_dicts_equals_mergekit_on_whole_models(saved_models, method, ours, weights, density):
    folder, models = saved_models
    theirs = mergekit_merge(folder, method, weights, density)
    merged = merge_state_dicts(models["base"], [models["a"], models["b"]], weights, ours, density)
    assert theirs and theirs.keys() <= merged.keys()
    assert max((merged[k] - theirs[k]).abs().max().item() for k in theirs) < 1e-6  # measured: 0.0, the same float ops
