"""Derived scores: knn_k distance, the Instruction-Mining linear rule, non-finite values."""

import numpy as np
import pytest

from evotune.selectors.base import Features
from evotune.selectors.derived import add_derived, knn_distance, mark_non_finite, parse_linear

KNOWN = ("loss", "length", "knn_k", "ifd_cherry")


def test_parse_linear_reads_signs_exponents_and_spacing():
    assert parse_linear("0.9*knn_k - 1.0*ifd_cherry + 8.257e-5*length", KNOWN) == {
        "knn_k": 0.9, "ifd_cherry": -1.0, "length": 8.257e-5}
    assert parse_linear("-2 * loss", KNOWN) == {"loss": -2.0}
    assert parse_linear(" .5*loss+1E2*length ", KNOWN) == {"loss": 0.5, "length": 100.0}


@pytest.mark.parametrize("text, match", [
    ("", "empty"),
    ("0.5*reward", "unknown score 'reward'"),
    ("0.5*loss 1*length", "cannot read"),          # missing operator between terms
    ("loss", "cannot read"),                       # no coefficient
    ("0.5*loss - 0.1*loss", "appears twice"),
    ("0.5*loss +", "cannot read"),
])
def test_parse_linear_errors_name_the_problem(text, match):
    with pytest.raises(ValueError, match=match):
        parse_linear(text, KNOWN)


def test_knn_distance_matches_brute_force_and_is_chunk_independent():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(57, 5)).astype(np.float32)
    full = np.sqrt(((emb[:, None, :].astype(np.float64) - emb[None]) ** 2).sum(-1))
    np.fill_diagonal(full, np.inf)
    for k in (1, 3, 6):
        expected = np.sort(full, axis=1)[:, k - 1]
        for chunk in (4, 57, 1000):
            assert knn_distance(emb, k, chunk) == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_knn_distance_hand_made_line():
    emb = np.array([[0.0], [1.0], [3.0], [7.0]], dtype=np.float32)
    assert knn_distance(emb, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_distance(emb, 2).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_knn_distance_nan_rows_are_nobodys_neighbour():
    emb = np.array([[0.0], [np.nan], [1.0], [5.0]], dtype=np.float32)
    d = knn_distance(emb, 1)
    assert np.isnan(d[1]) and d[[0, 2, 3]].tolist() == [1.0, 1.0, 4.0]
    with pytest.raises(ValueError, match="needs more than 3"):
        knn_distance(emb, 3)
    with pytest.raises(ValueError, match=">= 1"):
        knn_distance(emb, 0)


def test_linear_score_combines_terms_and_carries_skip_reasons():
    f = Features(embeddings=np.array([[0.0], [1.0], [3.0]], dtype=np.float32),
                 scores={"loss": np.array([1.0, 2.0, 3.0]),
                         "ifd_cherry": np.array([0.5, np.nan, 0.9])},
                 skipped={"ifd_cherry": {1: "empty answer"}})
    add_derived(f, {"linear"}, {"knn_k": 2.0, "ifd_cherry": -1.0, "loss": 0.5}, knn_k=1)
    assert f.scores["knn_k"].tolist() == [1.0, 1.0, 2.0]
    assert f.scores["linear"][[0, 2]].tolist() == pytest.approx([2 - 0.5 + 0.5, 4 - 0.9 + 1.5])
    assert np.isnan(f.scores["linear"][1])
    assert f.skipped["linear"] == {1: "ifd_cherry: empty answer"}


def test_knn_without_embeddings_and_linear_without_rule_fail_clearly():
    f = Features(scores={"loss": np.zeros(3)})
    with pytest.raises(ValueError, match="knn_k needs embeddings"):
        add_derived(f, {"knn_k"}, {}, knn_k=1)
    with pytest.raises(ValueError, match="needs a rule"):
        add_derived(f, {"linear"}, {}, knn_k=1)


def test_mark_non_finite_turns_inf_into_nan_with_a_reason_once():
    f = Features(scores={"loss": np.array([1.0, np.inf, np.nan, -np.inf]),
                         "ifd_cherry": np.array([np.nan, 0.5, 0.7, 0.1])},
                 skipped={"ifd_cherry": {0: "empty answer"}})
    assert mark_non_finite(f) == {"loss": 3}
    assert np.isnan(f.scores["loss"][1:]).all() and f.scores["loss"][0] == 1.0
    assert f.skipped["loss"] == {1: "non-finite value (inf)", 2: "non-finite value (nan)",
                                 3: "non-finite value (-inf)"}
    assert f.skipped["ifd_cherry"] == {0: "empty answer"}
    assert mark_non_finite(f) == {}
