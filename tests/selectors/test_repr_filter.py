"""DEITA's repr filter: hand-made cases, the labeled set, ties, NaN scores, fill-ins, errors."""

import numpy as np
import pytest

from evotune.selectors.base import Features
from evotune.selectors.repr_filter import RepresentationFilterSelector, repr_filter


def make(*args, **options):
    """A RepresentationFilterSelector with these options."""
    return RepresentationFilterSelector(RepresentationFilterSelector.Options(*args, **options))


NAN = float("nan")


def f32(rows):
    return np.array(rows, dtype=np.float32)


def brute_force(emb, scores, labeled, candidates, n, threshold):
    """The walk straight from the definition, float64, one cosine at a time."""
    unit = emb.astype(np.float64) / np.linalg.norm(emb.astype(np.float64), axis=1)[:, None]
    kept, picks = list(labeled), []
    for c in sorted((c for c in candidates if not np.isnan(scores[c])),
                    key=lambda c: (-scores[c], c)):
        if len(picks) == n:
            break
        if not kept or max(unit[c] @ unit[k] for k in kept) <= threshold:
            picks.append(c)
            kept.append(c)
    return picks


def test_fixture_walk_by_score_skips_the_near_duplicate():
    emb = f32([[1, 0], [1, 0.01], [0, 1], [1, 1], [-1, 0]])
    scores = np.array([5.0, 4, 3, 2, 1])
    sel = repr_filter(emb, scores, [], [0, 1, 2, 3, 4], 3)
    # 1 is at cos 0.99995 from 0 (> 0.9): skipped; 2 is orthogonal to 0; 3 is at 45° from both.
    assert sel.positions.tolist() == [0, 2, 3]
    assert np.isnan(sel.numbers["max_cosine"][0])            # nothing to compare with yet
    np.testing.assert_allclose(sel.numbers["max_cosine"][1:], [0.0, np.sqrt(0.5)], atol=1e-6)
    assert sel.numbers["score"].tolist() == [5, 3, 2]
    assert sel.numbers["admitted"].tolist() == [1, 1, 1]
    assert sel.info == {"nan_scores": 0, "rejected_by_threshold": 1, "filled": 0,
                        "zero_embeddings": 0}


def test_labeled_example_blocks_a_similar_candidate():
    # Pool 0 is labeled (an earlier round); candidate 1 is almost parallel to it, so even with
    # the best score it is rejected. DEITA itself would always admit its first example.
    emb = f32([[0, 1], [0.1, 1], [1, 0]])
    sel = repr_filter(emb, np.array([NAN, 9.0, 1.0]), [0], [1, 2], 1)
    assert sel.positions.tolist() == [2]
    assert sel.numbers["max_cosine"].tolist() == [0.0]
    assert sel.info["rejected_by_threshold"] == 1 and sel.info["filled"] == 0


def test_threshold_is_inclusive():
    # Orthogonal vectors have cosine exactly 0: admitted at threshold 0 (<=), rejected below.
    emb = f32([[1, 0], [0, 1]])
    scores = np.array([2.0, 1.0])
    assert repr_filter(emb, scores, [], [0, 1], 2, threshold=0.0).numbers["admitted"].tolist() \
        == [1, 1]
    assert repr_filter(emb, scores, [], [0, 1], 2, threshold=-0.1).numbers["admitted"].tolist() \
        == [1, 0]


def test_ties_go_to_the_lowest_index():
    emb = f32([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0]])
    scores = np.ones(4)
    sel = repr_filter(emb, scores, [], np.array([3, 2, 1, 0]), 4)
    # Equal scores walk in index order; 3 duplicates 1, so it is rejected and only filled in.
    assert sel.positions.tolist() == [0, 1, 2, 3]
    assert sel.numbers["admitted"].tolist() == [1, 1, 1, 0]


def test_nan_scores_are_never_picked_and_are_counted():
    emb = f32([[1, 0], [0, 1], [1, 1], [-1, 0]])
    scores = np.array([NAN, 1.0, NAN, 2.0])
    sel = repr_filter(emb, scores, [], [0, 1, 2, 3], 2)
    assert sel.positions.tolist() == [3, 1]
    assert sel.info["nan_scores"] == 2
    with pytest.raises(ValueError, match="only 2 of 4 candidates have a score"):
        repr_filter(emb, scores, [], [0, 1, 2, 3], 3)


def test_fill_in_when_the_walk_runs_out():
    # Four nearly parallel vectors: the walk admits only the best; the budget is filled with the
    # next best scores, each reported against everything picked before it.
    emb = f32([[1, 0], [1, 0.01], [1, 0.02], [1, 0.03]])
    scores = np.array([1.0, 4, 3, 2])
    sel = repr_filter(emb, scores, [], [0, 1, 2, 3], 3)
    assert sel.positions.tolist() == [1, 2, 3]
    assert sel.numbers["admitted"].tolist() == [1, 0, 0]
    assert sel.info["filled"] == 2 and sel.info["rejected_by_threshold"] == 3
    assert np.isnan(sel.numbers["max_cosine"][0])
    assert (sel.numbers["max_cosine"][1:] > 0.999).all()


def test_zero_embedding_has_cosine_zero():
    # DEITA divides by the norm (NaN) and admits by accident; here cosine 0, and it is counted.
    emb = f32([[1, 0], [0, 0], [1, 0]])
    sel = repr_filter(emb, np.array([3.0, 2, 1]), [], [0, 1, 2], 2)
    assert sel.positions.tolist() == [0, 1]
    assert sel.numbers["max_cosine"][1] == 0.0
    assert sel.info["zero_embeddings"] == 1


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_and_is_block_invariant(seed):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(80, 16)).astype(np.float32)
    scores = rng.normal(size=80)
    scores[rng.choice(80, 5, replace=False)] = NAN
    labeled = rng.choice(80, 6, replace=False)
    cand = np.setdiff1d(np.arange(80), labeled)
    expected = brute_force(emb, scores, labeled, cand, 12, 0.5)
    assert len(expected) == 12          # the walk fills the budget: no fill-ins in this case
    for block, chunk in ((1, 1), (3, 2), (256, 4096)):
        sel = repr_filter(emb, scores, labeled, cand, 12, 0.5, block_size=block,
                          chunk_size=chunk)
        assert sel.positions.tolist() == expected
        assert (sel.numbers["max_cosine"] <= 0.5).all()
        # The walk stops at the last admit: everything scored better than it was examined.
        walked = sum(1 for c in cand if not np.isnan(scores[c])
                     and (-scores[c], c) <= (-scores[expected[-1]], expected[-1]))
        assert sel.info["rejected_by_threshold"] == walked - 12 > 0


@pytest.mark.parametrize("bad, match", [
    (dict(n=5), "cannot pick"),
    (dict(labeled=[0, 1]), "overlap"),
    (dict(nan_emb=True), "NaN or inf"),
    (dict(scores=np.ones(3)), "scores must have shape"),
    (dict(threshold=NAN), "threshold is NaN"),
])
def test_errors(bad, match):
    emb = np.arange(8, dtype=np.float32).reshape(4, 2)
    if bad.get("nan_emb"):
        emb[2, 1] = np.nan
    with pytest.raises(ValueError, match=match):
        repr_filter(emb, bad.get("scores", np.arange(4.0)), bad.get("labeled", [0]), [1, 2, 3],
                    bad.get("n", 2), bad.get("threshold", 0.9))


def test_unscored_candidate_may_have_a_bad_embedding():
    # A candidate that was not scored is never compared with anything.
    emb = f32([[1, 0], [np.nan, 0], [0, 1]])
    sel = repr_filter(emb, np.array([1.0, NAN, 2.0]), [], [0, 1, 2], 2)
    assert sel.positions.tolist() == [2, 0]


def test_selector():
    emb = f32([[1, 0], [1, 0.01], [0, 1], [1, 1], [-1, 0]])
    feats = Features(embeddings=emb, scores={"ifd": np.array([5.0, 4, 3, 2, 1])})
    sel_a = make("ifd", threshold=0.9)
    assert sel_a.name == "repr_filter" and sel_a.needs_embeddings and sel_a.scores == ("ifd",)
    assert sel_a.state_dict() == {"name": "repr_filter", "score": "ifd", "threshold": 0.9}
    a = sel_a.select(feats, np.array([], dtype=np.int64), np.arange(5), 3,
                     np.random.default_rng(0))
    b = sel_a.select(feats, np.array([], dtype=np.int64), np.arange(5), 3,
                     np.random.default_rng(0))
    assert a.positions.tolist() == b.positions.tolist() == [0, 2, 3]
    assert a.positions.dtype == np.int64
    with pytest.raises(ValueError, match="needs score 'loss'; the feature pass computed: ifd"):
        make("loss").select(feats, np.array([0]), np.array([1]), 1,
                                                    np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs embeddings"):
        sel_a.select(Features(scores=feats.scores), np.array([0]), np.array([1]), 1,
                     np.random.default_rng(0))
