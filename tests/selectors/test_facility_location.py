"""Facility location: hand-made points on a line, labeled cover, lazy == plain greedy, errors."""

import numpy as np
import pytest

from evotune.selectors.base import Features
from evotune.selectors.facility_location import (FacilityLocationSelector,
                                                 facility_location_greedy, minmax_weights)


def make(*args, **options):
    """A FacilityLocationSelector with these options."""
    return FacilityLocationSelector(FacilityLocationSelector.Options(*args, **options))


NAN = float("nan")

# Cluster A (pool 0..4) around 0, cluster B (pool 5..7) around 10; pool 8 sits at A's centre.
LINE = np.array([-0.2, -0.1, 0.0, 0.1, 0.2, 9.9, 10.0, 10.1, 0.0], dtype=np.float32)[:, None]


def brute_force(emb, labeled, candidates, n, w=None):
    """Greedy straight from the definition in float64, with submodlib's euclidean kernel
    sim = exp(-d / D); returns (picks, gains)."""
    e = emb.astype(np.float64)
    sim = np.exp(-np.sqrt(((e[:, None] - e[None]) ** 2).sum(-1)) / e.shape[1])
    w = np.ones(len(candidates)) if w is None else w
    f = lambda s: sum(wi * max([sim[i, j] for j in s], default=0.0)   # noqa: E731
                      for wi, i in zip(w, candidates))
    chosen, picks, gains = list(labeled), [], []
    for _ in range(n):
        rest = [j for j in candidates if j not in picks]
        g = [f(chosen + [j]) - f(chosen) for j in rest]
        best = rest[int(np.argmax(g))]
        picks.append(best)
        gains.append(max(g))
        chosen.append(best)
    return picks, gains


def test_fixture_points_on_a_line():
    cand = np.arange(8)
    picks, gains = facility_location_greedy(LINE, [], cand, 2)
    # The centre of the bigger cluster first, then the centre of the other one.
    assert picks.tolist() == [2, 6]
    e = np.exp
    g0 = 1 + 2 * e(-0.1) + 2 * e(-0.2) + e(-9.9) + e(-10) + e(-10.1)
    g1 = 1 + 2 * e(-0.1) - (e(-10.0) + e(-9.9) + e(-10.1))   # B was covered e^-10.. by pick 2
    np.testing.assert_allclose(gains, [g0, g1], rtol=1e-5)


def test_labeled_point_already_covers_its_neighbours():
    # With pool 8 (at A's centre) labeled, A is already covered: the first pick is B's centre.
    picks, _ = facility_location_greedy(LINE, [8], np.arange(8), 1)
    assert picks.tolist() == [6]


def test_ties_go_to_the_lowest_index():
    # submodlib's heap breaks equal gains to the highest index; here to the lowest.
    emb = np.array([[-1.0], [1.0]], dtype=np.float32)
    assert facility_location_greedy(emb, [], [1, 0], 1)[0].tolist() == [0]
    dup = np.zeros((3, 2), dtype=np.float32)                  # zero gains after the first pick
    picks, gains = facility_location_greedy(dup, [], [2, 1, 0], 3)
    assert picks.tolist() == [0, 1, 2] and gains.tolist() == [3.0, 0.0, 0.0]


@pytest.mark.parametrize("seed", range(3))
def test_matches_the_definition(seed):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(25, 3)).astype(np.float32)
    labeled = rng.choice(25, 3, replace=False)
    cand = np.setdiff1d(np.arange(25), labeled)
    w = rng.random(len(cand))
    expected, exp_gains = brute_force(emb, labeled.tolist(), cand.tolist(), 6, w)
    picks, gains = facility_location_greedy(emb, labeled, cand, 6, w)
    assert picks.tolist() == expected
    np.testing.assert_allclose(gains, exp_gains, rtol=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_lazy_equals_plain_greedy(seed):
    rng = np.random.default_rng(100 + seed)
    n_pool = 300
    emb = rng.normal(size=(n_pool, 8)).astype(np.float32)
    labeled = rng.choice(n_pool, 20 * (seed % 2), replace=False)
    cand = np.setdiff1d(np.arange(n_pool), labeled)
    w = rng.random(len(cand)) if seed >= 3 else None
    lazy = facility_location_greedy(emb, labeled, cand, 60, w, lazy=True, block_size=64)
    plain = facility_location_greedy(emb, labeled, cand, 60, w, lazy=False, block_size=64)
    assert lazy[0].tolist() == plain[0].tolist()
    assert np.array_equal(lazy[1], plain[1])
    assert (np.diff(lazy[1]) <= 0).all()        # submodular: gains never grow


def test_weighted_prefers_covering_high_scores():
    # A is bigger, but all of A has the lowest score (weight 0 after min-max): B's centre first.
    scores = np.array([0, 0, 0, 0, 0, 1, 1, 1, NAN], dtype=np.float64)
    feats = Features(embeddings=LINE, scores={"s": scores})
    none = np.array([], dtype=np.int64)
    plain = make("s").select(feats, none, np.arange(9), 1,
                                                 np.random.default_rng(0))
    weighted = make("s", weighted=True).select(feats, none, np.arange(9), 1,
                                                                   np.random.default_rng(0))
    assert plain.positions.tolist() == [2] and weighted.positions.tolist() == [6]
    assert minmax_weights(np.array([3.0, 3.0])).tolist() == [1.0, 1.0]
    assert minmax_weights(np.array([1.0, 3.0, 2.0])).tolist() == [0.0, 1.0, 0.5]


def test_nan_scores_are_never_picked_and_are_counted():
    # Pool 8 sits at A's centre and would be a fine pick, but it has no score.
    scores = np.ones(9)
    scores[[2, 8]] = NAN
    sel = make("s").select(Features(embeddings=LINE, scores={"s": scores}),
                                               np.array([], np.int64), np.arange(9), 3,
                                               np.random.default_rng(0))
    assert sel.info == {"nan_scores": 2}
    assert not {2, 8} & set(sel.positions.tolist())
    assert sel.numbers["score"].tolist() == [1, 1, 1] and len(sel.numbers["gain"]) == 3
    with pytest.raises(ValueError, match="only 7 of 9 candidates have a score"):
        make("s").select(Features(embeddings=LINE, scores={"s": scores}),
                                             np.array([], np.int64), np.arange(9), 8,
                                             np.random.default_rng(0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=10), "cannot pick"),
    (dict(labeled=[0]), "overlap"),
    (dict(max_candidates=5), "filter the candidates by score first"),
    (dict(weights=-np.ones(8)), "non-negative"),
    (dict(nan_emb=True), "NaN or inf"),
])
def test_errors(kwargs, match):
    emb = LINE.copy()
    if kwargs.pop("nan_emb", False):
        emb[8, 0] = np.nan                      # a labeled row
    args = {"labeled": [8], "n": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        facility_location_greedy(emb, args.pop("labeled"), np.arange(8), args.pop("n"), **args)


def test_selector():
    scores = np.linspace(0, 1, 9)
    feats = Features(embeddings=LINE, scores={"ifd": scores})
    sel = make("ifd", weighted=False, max_candidates=100)
    assert sel.name == "facility_location" and sel.needs_embeddings and sel.scores == ("ifd",)
    assert sel.state_dict() == {"name": "facility_location", "score": "ifd", "weighted": False,
                                "max_candidates": 100}
    runs = [sel.select(feats, np.array([8]), np.arange(8), 2, np.random.default_rng(5))
            for _ in range(2)]
    # Labeled pool 8 covers A's centre: B's centre first, then an end of A (pool 0 and 4 are
    # mirror images, so it is a tie: the lower index), never pool 2, which duplicates pool 8.
    assert runs[0].positions.tolist() == runs[1].positions.tolist() == [6, 0]
    assert runs[0].positions.dtype == np.int64
    assert runs[0].numbers["score"].tolist() == [scores[6], scores[0]]
    with pytest.raises(ValueError, match="max_candidates is 3"):
        make("ifd", max_candidates=3).select(
            feats, np.array([8]), np.arange(8), 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="finite scores"):
        make("ifd", weighted=True).select(
            Features(embeddings=LINE, scores={"ifd": np.r_[np.inf, scores[1:]]}),
            np.array([8]), np.arange(8), 2, np.random.default_rng(0))
