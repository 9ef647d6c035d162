"""k-center greedy: DiverseEvol's fixtures (REFERENCE §1), properties, and the departures."""

import numpy as np
import pytest

from evotune.selectors.base import Features
from evotune.selectors.kcenter import KCenterSelector, kcenter_greedy


def pool_minus(n, labeled):
    return np.array([i for i in range(n) if i not in set(labeled)])


def brute_force(emb, labeled, n):
    """Furthest-first straight from the definition, with a full N×N float64 distance matrix."""
    d = np.sqrt(((emb[:, None, :].astype(np.float64) - emb[None, :, :]) ** 2).sum(-1))
    centres, picks = list(labeled), []
    for _ in range(n):
        cand = [i for i in range(len(emb)) if i not in centres]
        nearest = [d[i, centres].min() if centres else np.inf for i in cand]
        best = cand[int(np.argmax(nearest))]
        picks.append(best)
        centres.append(best)
    return picks


def test_fixture_points_on_a_line():
    emb = np.array([0, 1, 2, 3, 10, 11, 20], dtype=np.float32)[:, None]
    picks, dists = kcenter_greedy(emb, [0], pool_minus(7, [0]), 3)
    assert picks.tolist() == [6, 4, 3]          # reference returns sorted [3, 4, 6]
    assert dists.tolist() == [20.0, 10.0, 3.0]  # 20 from 0; 10 from 0 and 20; 3 from 0


def test_fixture_tie_goes_to_lowest_index():
    emb = np.array([0, 5, -5], dtype=np.float32)[:, None]
    picks, _ = kcenter_greedy(emb, [0], [1, 2], 1)
    assert picks.tolist() == [1]


def test_fixture_random_state_0():
    emb = np.random.RandomState(0).randn(12, 4).astype(np.float32)
    picks, _ = kcenter_greedy(emb, [0, 5], pool_minus(12, [0, 5]), 4)
    assert sorted(picks.tolist()) == [2, 4, 8, 10]


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_and_is_chunk_invariant(seed):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(60, 8)).astype(np.float32)
    labeled = rng.choice(60, size=7, replace=False)
    expected = brute_force(emb, labeled.tolist(), 15)
    for chunk in (1, 4, 7, 4096):
        picks, _ = kcenter_greedy(emb, labeled, pool_minus(60, labeled), 15, chunk_size=chunk)
        assert picks.tolist() == expected


def test_distances_are_nearest_centre_at_pick_time_and_non_increasing():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(40, 3)).astype(np.float32)
    picks, dists = kcenter_greedy(emb, [0], pool_minus(40, [0]), 10)
    centres = [0]
    for p, d in zip(picks, dists):
        assert d == pytest.approx(np.linalg.norm(emb[centres] - emb[p], axis=1).min(), rel=1e-4)
        centres.append(p)
    assert all(a >= b - 1e-5 for a, b in zip(dists, dists[1:]))


def near_duplicate_pair():
    """A vector and a tiny perturbation of it whose fp32 |a|²+|b|²-2ab comes out negative."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = (rng.normal(size=64) * 100).astype(np.float32)
        b = a + (rng.normal(size=64) * 1e-3).astype(np.float32)
        na, nb = np.einsum("i,i->", a, a), np.einsum("i,i->", b, b)
        if na + nb - 2.0 * (b[None] @ a[None].T)[0, 0] < 0:
            return a, b
    raise AssertionError("no negative squared distance found")


def test_near_duplicate_is_never_preferred():
    # The reference takes sqrt of the negative squared distance (NaN) and so picks the
    # near-duplicate first; clamped at 0 here, the far point is picked first.
    a, b = near_duplicate_pair()
    emb = np.stack([a, b, a + 50.0])
    picks, dists = kcenter_greedy(emb, [0], [1, 2], 2)
    assert picks.tolist() == [2, 1]
    assert np.isfinite(dists).all() and dists[1] == 0.0


def test_no_labeled_points_starts_at_lowest_candidate():
    emb = np.array([[0.0], [3.0], [9.0]], dtype=np.float32)
    picks, dists = kcenter_greedy(emb, [], [1, 2], 2)
    assert picks.tolist() == [1, 2]
    assert np.isinf(dists[0]) and dists[1] == 6.0


def test_candidates_order_does_not_matter():
    emb = np.random.default_rng(3).normal(size=(30, 5)).astype(np.float32)
    cand = pool_minus(30, [4])
    a, _ = kcenter_greedy(emb, [4], cand, 8)
    b, _ = kcenter_greedy(emb, [4], cand[::-1], 8)
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("bad, match", [
    (dict(n=5), "cannot pick"),
    (dict(labeled=[0, 1]), "overlap"),
    (dict(nan=True), "NaN or inf"),
])
def test_errors(bad, match):
    emb = np.arange(8, dtype=np.float32).reshape(4, 2)
    if bad.get("nan"):
        emb[2, 1] = np.nan
    with pytest.raises(ValueError, match=match):
        kcenter_greedy(emb, bad.get("labeled", [0]), [1, 2, 3], bad.get("n", 2))


def test_selector_wraps_greedy_and_reports_distances():
    emb = np.array([0, 1, 2, 3, 10, 11, 20], dtype=np.float32)[:, None]
    sel = KCenterSelector(chunk_size=2).select(Features(embeddings=emb), np.array([0]),
                                               pool_minus(7, [0]), 3, np.random.default_rng(0))
    assert sel.positions.tolist() == [6, 4, 3]
    assert sel.numbers["kcenter_distance"].tolist() == [20.0, 10.0, 3.0]
    with pytest.raises(ValueError, match="needs embeddings"):
        KCenterSelector().select(Features(), np.array([0]), np.array([1]), 1,
                                 np.random.default_rng(0))


def test_filter_then_diversify():
    from evotune.selectors.filters import score_filter
    scores = np.array([0.0, 0.9, 0.5, 1.2, 0.8, np.nan, 0.7])
    passed, info = score_filter(scores, [1, 2, 3, 4, 5, 6], max_value=1.0, top_fraction=0.5)
    # finite and <= 1: 1, 2, 4, 6 (scores .9 .5 .8 .7); top half by score: 1 and 4.
    assert passed.tolist() == [1, 4]
    assert info == {"nan_scores": 1, "above_max": 1, "below_top_fraction": 2, "passed": 2}


def test_any_selector_over_filtered_candidates_fills_when_too_few_pass():
    from evotune.selectors.filters import ScoreFiltered
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
    from evotune.selectors.base import Features
    from evotune.selectors.filters import ScoredFirst
    from evotune.selectors.weighted import WeightedSelector
    emb = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [20.0]], dtype=np.float32)
    scores = np.array([np.nan, 0.9, 0.1, np.nan, np.nan, np.nan])
    f = Features(embeddings=emb, scores={"loss": scores})
    sel = ScoredFirst(WeightedSelector("loss", alpha=1.0), "loss").select(
        f, np.array([0]), np.arange(1, 6), 4, np.random.default_rng(0))
    # both scored ones by score, then k-center over 3, 4, 5 from centres {0, 1, 2}: 5 (18 away),
    # then 4 (9 from both 2 and 5; 3 is 8 from 2)
    assert sel.positions.tolist() == [1, 2, 5, 4]
    assert sel.numbers["scored"].tolist() == [1, 1, 0, 0]
    assert sel.info["unscored_fill"] == 2 and sel.info["nan_scores"] == 0
    assert sel.numbers["kcenter_distance"][2:].tolist() == [18.0, 9.0]
    # enough scored candidates: the rule alone, unchanged
    plain = ScoredFirst(WeightedSelector("loss", alpha=1.0), "loss").select(
        f, np.array([0]), np.arange(1, 6), 2, np.random.default_rng(0))
    assert plain.positions.tolist() == [1, 2] and "scored" not in plain.numbers
