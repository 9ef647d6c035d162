"""The weighted score/diversity rule on hand-made inputs."""

import numpy as np
import pytest

from evotune.selectors.base import Features
from evotune.selectors.kcenter import kcenter_greedy
from evotune.selectors.weighted import WeightedSelector, weighted_greedy


def make(*args, **options):
    """A WeightedSelector with these options."""
    return WeightedSelector(WeightedSelector.Options(*args, **options))


# Points on a line; position 0 is labeled. Scores prefer the points near 0.
EMB = np.array([0, 1, 2, 3, 10, 11, 20], dtype=np.float32)[:, None]
SCORES = np.array([0.0, 9.0, 8.0, 7.0, 2.0, 1.0, 0.0])
CAND = np.arange(1, 7)


def test_alpha_0_is_kcenter():
    picks, numbers, _ = weighted_greedy(EMB, SCORES, [0], CAND, 3, alpha=0.0)
    assert picks.tolist() == kcenter_greedy(EMB, [0], CAND, 3)[0].tolist() == [6, 4, 3]
    assert numbers["kcenter_distance"].tolist() == [20.0, 10.0, 3.0]


def test_alpha_1_is_top_score():
    picks, numbers, _ = weighted_greedy(EMB, SCORES, [0], CAND, 3, alpha=1.0)
    assert picks.tolist() == [1, 2, 3]
    assert numbers["score"].tolist() == [9.0, 8.0, 7.0]


def test_alpha_half_trades_score_for_distance():
    # Scores normalise to (s - 0) / 9; distances to d / max d. First pick: point 6 has
    # 0.5·0 + 0.5·1 = 0.5, point 1 has 0.5·1 + 0.5·(1/20) = 0.525 → point 1. Then from centres
    # {0, 1}: point 6 (d 19/19) 0.5, point 2 (8/9, d 1/19) ≈ 0.471 → point 6.
    picks, numbers, _ = weighted_greedy(EMB, SCORES, [0], CAND, 2, alpha=0.5)
    assert picks.tolist() == [1, 6]
    assert numbers["objective"][0] == pytest.approx(0.5 + 0.5 / 20)


def test_nan_scores_are_never_picked_and_counted():
    scores = SCORES.copy()
    scores[6] = np.nan
    picks, _, info = weighted_greedy(EMB, scores, [0], CAND, 5, alpha=0.0)
    assert 6 not in picks.tolist() and info == {"nan_scores": 1}
    with pytest.raises(ValueError, match="finite score"):
        weighted_greedy(EMB, scores, [0], CAND, 6, alpha=0.0)


def test_ties_go_to_the_lowest_index_and_constant_scores_are_fine():
    emb = np.array([[0.0], [5.0], [-5.0]], dtype=np.float32)
    picks, _, _ = weighted_greedy(emb, np.ones(3), [0], [1, 2], 1, alpha=0.5)
    assert picks.tolist() == [1]


def test_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        weighted_greedy(EMB, SCORES, [0], CAND, 1, alpha=1.5)


def test_selector_logs_the_score_under_its_name():
    sel = make("loss", alpha=1.0).select(
        Features(embeddings=EMB, scores={"loss": SCORES}), np.array([0]), CAND, 2,
        np.random.default_rng(0))
    assert sel.positions.tolist() == [1, 2]
    assert sel.numbers["loss"].tolist() == [9.0, 8.0] and "score" not in sel.numbers
    assert sel.info == {"nan_scores": 0}
