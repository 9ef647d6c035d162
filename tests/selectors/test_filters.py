"""The loop's two wrappers: the score filter (filter-then-diversify) and the k-center fill of
unscored candidates."""

import numpy as np
import pytest

from evotune.selectors.base import Features
from evotune.selectors.filters import ScoredFirst, ScoreFiltered, score_filter
from evotune.selectors.kcenter import KCenterSelector
from evotune.selectors.weighted import WeightedSelector


def make(*args, **options):
    """A WeightedSelector with these options."""
    return WeightedSelector(WeightedSelector.Options(*args, **options))


def pool_minus(n, labeled):
    return np.array([i for i in range(n) if i not in set(labeled)])


def test_filter_then_diversify():
    scores = np.array([0.0, 0.9, 0.5, 1.2, 0.8, np.nan, 0.7])
    passed, info = score_filter(scores, [1, 2, 3, 4, 5, 6], max_value=1.0, top_fraction=0.5)
    # finite and <= 1: 1, 2, 4, 6 (scores .9 .5 .8 .7); top half by score: 1 and 4.
    assert passed.tolist() == [1, 4]
    assert info == {"nan_scores": 1, "above_max": 1, "below_top_fraction": 2, "passed": 2}


def test_filter_matches_the_rule_written_out_on_ties_and_nans():
    # Scores on a coarse grid (many ties), some NaN and inf, candidates unsorted with gaps.
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 8, 400).astype(float) / 4
    scores[rng.choice(400, 30, replace=False)] = np.nan
    scores[rng.choice(400, 5, replace=False)] = np.inf
    candidates = rng.permutation(rng.choice(400, 300, replace=False))
    for max_value, fraction in [(1.0, 0.3), (None, 0.5), (0.25, 1.0), (None, 0.0)]:
        passed, info = score_filter(scores, candidates, max_value, fraction)
        ok = [int(c) for c in candidates if np.isfinite(scores[c])
              and (max_value is None or scores[c] <= max_value)]
        # highest score first, then lowest position: the first int(len × fraction)
        ranked = sorted(ok, key=lambda c: (-scores[c], c))[:int(len(ok) * fraction)]
        assert passed.tolist() == sorted(ranked)
        assert info["passed"] == len(ranked) and info["below_top_fraction"] == len(ok) - len(ranked)


def test_filter_keeping_the_lowest_scores_is_the_rule_written_out():
    # A quality gate on a loss: keep the candidates with the LOWEST scores (ties: lowest
    # position), after the max cut; NaN and inf never pass.
    scores = np.array([0.5, 2.0, 0.5, np.nan, 1.0, np.inf, 0.1, 3.0])
    passed, info = score_filter(scores, [7, 6, 5, 4, 3, 2, 1, 0], None, 0.5, keep="lowest")
    # finite: 0 (.5), 1 (2), 2 (.5), 4 (1), 6 (.1), 7 (3); the lowest 3: 6, then 0 and 2
    assert passed.tolist() == [0, 2, 6]
    assert info == {"nan_scores": 2, "above_max": 0, "below_top_fraction": 3, "passed": 3}
    passed, _ = score_filter(scores, np.arange(8), 1.0, 0.5, keep="lowest")
    assert passed.tolist() == [0, 6]          # under 1.0: 0, 2, 4, 6 → the lowest two: 6, 0
    rng = np.random.default_rng(5)
    many = rng.integers(0, 6, 300).astype(float)
    cands = rng.permutation(300)[:200]
    passed, _ = score_filter(many, cands, None, 0.25, keep="lowest")
    assert passed.tolist() == sorted(sorted(cands.tolist(), key=lambda c: (many[c], c))[:50])
    with pytest.raises(ValueError, match="highest, lowest"):
        score_filter(many, cands, None, 0.5, keep="smallest")


def test_any_selector_over_filtered_candidates_fills_when_too_few_pass():
    emb = np.array([0, 1, 2, 3, 10, 11, 20], dtype=np.float32)[:, None]
    scores = np.array([0.0, 5.0, 5.0, 5.0, 1.0, 1.0, 1.0])
    sel = ScoreFiltered(KCenterSelector(), "loss", max_value=None, top_fraction=0.5)
    out = sel.select(Features(embeddings=emb, scores={"loss": scores}), np.array([0]),
                     pool_minus(7, [0]), 4, np.random.default_rng(0))
    # The top half of the 6 candidates by score: 1, 2, 3. k-center among them from centre 0:
    # 3 (3 away), then 1 and 2 are both 1 from a centre → lowest index 1, then 2. Only 3 pass
    # for 4 picks: one fill-in by k-center over the others, 6 (17 from centre 3).
    assert out.positions.tolist() == [3, 1, 2, 6]
    assert out.numbers["passed_filter"].tolist() == [1, 1, 1, 0]
    assert out.numbers["kcenter_distance"].tolist() == [3.0, 1.0, 1.0, 17.0]
    assert out.info["filled"] == 1 and out.info["passed"] == 3
    assert sel.scores == ("loss",) and sel.name == "kcenter"
    assert sel.state_dict()["filter_top_fraction"] == 0.5


def test_scored_first_fills_a_shortfall_by_kcenter_over_the_unscored():
    emb = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [20.0]], dtype=np.float32)
    scores = np.array([np.nan, 0.9, 0.1, np.nan, np.nan, np.nan])
    f = Features(embeddings=emb, scores={"loss": scores})
    sel = ScoredFirst(make("loss", alpha=1.0), "loss").select(
        f, np.array([0]), np.arange(1, 6), 4, np.random.default_rng(0))
    # both scored ones by score, then k-center over 3, 4, 5 from centres {0, 1, 2}: 5 (18 away),
    # then 4 (9 from both 2 and 5; 3 is 8 from 2)
    assert sel.positions.tolist() == [1, 2, 5, 4]
    assert sel.numbers["scored"].tolist() == [1, 1, 0, 0]
    assert sel.info["unscored_fill"] == 2 and sel.info["nan_scores"] == 0
    assert sel.numbers["kcenter_distance"][2:].tolist() == [18.0, 9.0]
    # enough scored candidates: the rule alone, unchanged
    plain = ScoredFirst(make("loss", alpha=1.0), "loss").select(
        f, np.array([0]), np.arange(1, 6), 2, np.random.default_rng(0))
    assert plain.positions.tolist() == [1, 2] and "scored" not in plain.numbers


def test_a_filter_fill_keeps_the_unscored_fill_flags_and_counts():
    """The filter's fill part may itself be partly k-center fill of unscored candidates: its
    `scored: 0` flags and its `unscored_fill` count must reach the round's logs."""
    emb = np.array([[0.0], [1.0], [2.0], [3.0], [10.0], [11.0], [20.0]], dtype=np.float32)
    scores = np.array([0.0, 5.0, 4.0, np.nan, 1.0, np.nan, np.nan])
    f = Features(embeddings=emb, scores={"s": scores})
    inner = ScoredFirst(make("s", alpha=1.0), "s")
    sel = ScoreFiltered(inner, "s", max_value=None, top_fraction=0.5).select(
        f, np.array([0]), np.arange(1, 7), 5, np.random.default_rng(0))
    # passed: the top half of the 3 scored candidates = 1 (score 5); the rest from the others:
    # 2 and 4 by score, then the unscored 3, 5, 6 by k-center from {0, 1, 2, 4}: 6 (10 from
    # 10.0), then 3 and 5 are both 1 away: the lower index, 3
    assert sel.positions.tolist() == [1, 2, 4, 6, 3]
    assert sel.numbers["passed_filter"].tolist() == [1, 0, 0, 0, 0]
    assert sel.numbers["scored"].tolist() == [1, 1, 1, 0, 0]
    assert sel.info["unscored_fill"] == 2 and sel.info["filled"] == 4
