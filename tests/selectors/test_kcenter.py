"""k-center greedy: DiverseEvol's fixtures (from OFA-Sys/DiverseEvol's rule), properties, and the
departures."""

import numpy as np
import pytest

from evotune.selectors.base import Features
from evotune.selectors.kcenter import KCenterSelector, kcenter_greedy


def make(*args, **options):
    """A KCenterSelector with these options."""
    return KCenterSelector(KCenterSelector.Options(*args, **options))


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
    sel = make(chunk_size=2).select(Features(embeddings=emb), np.array([0]),
                                               pool_minus(7, [0]), 3, np.random.default_rng(0))
    assert sel.positions.tolist() == [6, 4, 3]
    assert sel.numbers["kcenter_distance"].tolist() == [20.0, 10.0, 3.0]
    with pytest.raises(ValueError, match="needs embeddings"):
        KCenterSelector().select(Features(), np.array([0]), np.array([1]), 1,
                                 np.random.default_rng(0))
