"""Cluster quotas: separated blobs with known answers, the rounding rule, surplus, NaN, errors;
the streamed mini-batch clustering against full KMeans where the clusters are unambiguous."""

import numpy as np
import pytest
from sklearn.cluster import KMeans

from evotune.selectors.base import Features
from evotune.selectors.cluster_quota import (ClusterQuotaSelector, cluster_quota,
                                             largest_remainder)


def make(*args, **options):
    """A ClusterQuotaSelector with these options."""
    return ClusterQuotaSelector(ClusterQuotaSelector.Options(*args, **options))


NAN = float("nan")


def blobs(sizes, seed=0):
    """Far-apart 2-D blobs, pool positions in blob order (blob b = canonical cluster b)."""
    rng = np.random.default_rng(seed)
    centres = [(0, 0), (100, 0), (0, 100), (100, 100)]
    return np.concatenate([np.asarray(centres[b]) + rng.normal(scale=0.5, size=(s, 2))
                           for b, s in enumerate(sizes)]).astype(np.float32)


# blob 0 = pool 0..5, blob 1 = 6..8, blob 2 = 9..11; the best of each blob is easy to read off.
SCORES = np.array([1, 6, 2, 5, 3, 4,   9, 7, 8,   0.5, 0.7, 0.6])


def test_fixture_proportional_round_robin():
    # Sizes 6, 3, 3 and n = 4: quotas 4·6/12 = 2, 1, 1 exactly.
    sel = cluster_quota(blobs([6, 3, 3]), SCORES, np.arange(12), 4, n_clusters=3)
    # Round-robin: best of clusters 0, 1, 2, then the second best of cluster 0.
    assert sel.positions.tolist() == [1, 6, 10, 3]
    assert sel.numbers["cluster"].tolist() == [0, 1, 2, 0]
    assert sel.numbers["score"].tolist() == [6, 9, 0.7, 5]
    assert sel.numbers["in_quota"].tolist() == [1, 1, 1, 1]
    assert sel.info == {"nan_scores": 0, "n_clusters": 3, "cluster_sizes": "6,3,3",
                        "quotas": "2,1,1", "filled": 0}


def test_proportional_largest_remainder():
    # n = 5: exact shares 2.5, 1.25, 1.25 → floors 2, 1, 1 and the spare unit to the largest
    # remainder (cluster 0).
    sel = cluster_quota(blobs([6, 3, 3]), SCORES, np.arange(12), 5, n_clusters=3)
    assert sel.info["quotas"] == "3,1,1"
    assert sel.positions.tolist() == [1, 6, 10, 3, 5]


def test_equal_remainders_go_to_the_lower_cluster_id():
    # Sizes 4, 4, 4 and n = 4: 4/3 each, equal remainders → the spare unit goes to cluster 0.
    scores = np.arange(12.0)
    sel = cluster_quota(blobs([4, 4, 4]), scores, np.arange(12), 4, n_clusters=3)
    assert sel.info["quotas"] == "2,1,1"
    assert sel.positions.tolist() == [3, 7, 11, 2]


def test_equal_quota_with_surplus_to_best_remaining():
    # Equal quotas 3, 3, 3 but clusters 1 and 2 have 2 members each: the 2 spare picks go to
    # the best remaining scores (here in cluster 0), after the quota picks, with in_quota = 0.
    scores = np.array([1, 8, 2, 7, 3, 6, 4, 5,   0.1, 0.2,   0.3, 0.4])
    sel = cluster_quota(blobs([8, 2, 2]), scores, np.arange(12), 9, n_clusters=3,
                        quota="equal")
    assert sel.info["quotas"] == "3,3,3" and sel.info["filled"] == 2
    assert sel.positions.tolist() == [1, 9, 11, 3, 8, 10, 5, 7, 6]
    assert sel.numbers["in_quota"].tolist() == [1] * 7 + [0, 0]


def test_equal_quota_fewer_picks_than_clusters():
    sel = cluster_quota(blobs([6, 3, 3]), SCORES, np.arange(12), 2, n_clusters=3,
                        quota="equal")
    assert sel.info["quotas"] == "1,1,0"
    assert sel.positions.tolist() == [1, 6]


def test_ties_in_score_go_to_the_lowest_index():
    sel = cluster_quota(blobs([3, 3]), np.ones(6), np.arange(6)[::-1], 4, n_clusters=2)
    assert sel.positions.tolist() == [0, 3, 1, 4]


@pytest.mark.parametrize("weights", [[6, 3, 3], [1, 1, 1], [5, 0, 2, 9], [1]])
@pytest.mark.parametrize("n", [0, 1, 4, 7, 12])
def test_largest_remainder_sums_to_n_and_is_within_one(weights, n):
    q = largest_remainder(n, np.array(weights))
    exact = n * np.array(weights) / sum(weights)
    assert q.sum() == n
    assert (np.floor(exact) <= q).all() and (q <= np.ceil(exact)).all()


def test_nan_scores_are_neither_clustered_nor_picked():
    scores = SCORES.copy()
    scores[[1, 6, 7]] = NAN          # the best of cluster 0 and two of cluster 1
    sel = cluster_quota(blobs([6, 3, 3]), scores, np.arange(12), 4, n_clusters=3)
    assert sel.info["nan_scores"] == 3 and sel.info["cluster_sizes"] == "5,1,3"
    # Quotas on sizes 5, 1, 3 (n = 4): 20/9, 4/9, 12/9 → 2, 0, 1 + the spare unit to cluster 1.
    assert sel.info["quotas"] == "2,1,1"
    assert sel.positions.tolist() == [3, 8, 10, 5]
    with pytest.raises(ValueError, match="only 9 of 12 candidates have a score"):
        cluster_quota(blobs([6, 3, 3]), scores, np.arange(12), 10)


def test_n_clusters_clipped_and_duplicates_leave_no_empty_cluster():
    emb = np.zeros((5, 2), dtype=np.float32)
    emb[3:] = 1.0                       # two distinct points only
    sel = cluster_quota(emb, np.arange(5.0), np.arange(5), 3, n_clusters=50)
    assert sel.info["n_clusters"] == 2 and sel.info["cluster_sizes"] == "3,2"
    # Sizes 3, 2 and n = 3: shares 1.8, 1.2 → 2, 1.
    assert sel.info["quotas"] == "2,1" and sel.positions.tolist() == [2, 4, 1]


@pytest.mark.parametrize("seed", range(3))
def test_random_data_quota_picks_are_each_clusters_top(seed):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(60, 5)).astype(np.float32)
    scores = rng.normal(size=60)
    cand = np.sort(rng.choice(60, 45, replace=False))
    sel = cluster_quota(emb, scores, cand, 13, n_clusters=4, random_state=seed)
    pos, cl = sel.positions, sel.numbers["cluster"]
    assert len(set(pos.tolist())) == 13 and set(pos.tolist()) <= set(cand.tolist())
    quotas = [int(q) for q in sel.info["quotas"].split(",")]
    assert sum(quotas) == 13 and sel.info["filled"] == 0
    for c, q in enumerate(quotas):
        assert (cl == c).sum() == q
    # Same partition as a plain KMeans with that seed; in each part the picks are its top scores.
    raw = KMeans(n_clusters=4, n_init=10, random_state=seed).fit_predict(emb[cand])
    for part in range(4):
        members = cand[raw == part]
        picked = [p for p in pos if p in members]
        top = sorted(members, key=lambda p: -scores[p])[:len(picked)]
        assert sorted(picked) == sorted(top)
        assert len(set(cl[np.isin(pos, members)])) <= 1
    again = cluster_quota(emb, scores, cand, 13, n_clusters=4, random_state=seed)
    assert again.positions.tolist() == pos.tolist()


@pytest.mark.parametrize("kwargs, match", [
    (dict(quota="sqrt"), "quota must be one of"),
    (dict(n_clusters=0), "must be >= 1"),
    (dict(n=13), "cannot pick"),
    (dict(nan_emb=True), "NaN or inf"),
])
def test_errors(kwargs, match):
    emb = blobs([6, 3, 3])
    if kwargs.pop("nan_emb", False):
        emb[4, 0] = np.inf
    with pytest.raises(ValueError, match=match):
        cluster_quota(emb, SCORES, np.arange(12), **{"n": 4, **kwargs})


def test_selector_seeds_kmeans_from_rng():
    feats = Features(embeddings=blobs([6, 3, 3]), scores={"ifd": SCORES})
    sel = make("ifd", n_clusters=3)
    assert sel.name == "cluster_quota" and sel.needs_embeddings and sel.scores == ("ifd",)
    assert sel.state_dict() == {"name": "cluster_quota", "score": "ifd", "n_clusters": 3,
                                "quota": "proportional", "n_init": 10, "pick": "score",
                                "kmeans": "full", "batch_size": 4096, "passes": 3}
    assert not sel.sharded and make("ifd", kmeans="minibatch").sharded
    a = sel.select(feats, np.array([], np.int64), np.arange(12), 4, np.random.default_rng(7))
    b = sel.select(feats, np.array([], np.int64), np.arange(12), 4, np.random.default_rng(7))
    assert a.positions.tolist() == b.positions.tolist() == [1, 6, 10, 3]
    assert a.positions.dtype == np.int64
    with pytest.raises(ValueError, match="quota must be one of"):
        make("ifd", quota="Equal")
    with pytest.raises(ValueError, match="needs score 'loss'"):
        make("loss").select(feats, np.array([0]), np.arange(1, 12), 1,
                                            np.random.default_rng(0))


def test_random_data_is_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    feats = Features(embeddings=rng.normal(size=(50, 4)).astype(np.float32),
                     scores={"s": rng.normal(size=50)})
    sel = make("s", n_clusters=5)
    runs = [sel.select(feats, np.array([], np.int64), np.arange(50), 10,
                       np.random.default_rng(3)).positions.tolist() for _ in range(2)]
    assert runs[0] == runs[1]


def test_centroid_pick_takes_the_most_central_members_without_a_score():
    # two directions; within each, the member closest in angle to the cluster mean goes first
    emb = np.array([[1.0, 0.1], [1.0, 0.0], [1.0, -0.3], [0.0, 1.0], [0.1, 1.0], [-0.4, 1.0]],
                   dtype=np.float32)


    emb = np.concatenate([emb, np.full((1, 2), np.nan, dtype=np.float32)])   # unscored row
    sel = make("loss", n_clusters=2, quota="equal", pick="centroid").select(
        Features(embeddings=emb), np.array([], dtype=np.int64), np.arange(7), 2,
        np.random.default_rng(0))
    assert sorted(sel.positions.tolist()) == [1, 3]   # means (1, -0.07) and (-0.1, 1)
    assert "centroid_cosine" in sel.numbers and sel.info["nan_scores"] == 1
    assert make("loss", pick="centroid").scores == ()


# ----------------------------------------------------------------------------- kmeans: minibatch

class Spy:
    """One process's collectives, recording the rows rank 0 receives per gather."""
    from evotune.selectors.sharded import SingleProcess as _base
    rank, world_size = 0, 1

    def __init__(self):
        self.gathered = []

    def __getattr__(self, name):
        return getattr(self._base(), name)

    def gather_rows(self, rows):
        self.gathered.append(len(rows[0]))
        return [rows]


@pytest.mark.parametrize("batch_size", [8, 16, 4096])
@pytest.mark.parametrize("pick", ["score", "centroid"])
@pytest.mark.parametrize("quota", ["proportional", "equal"])
def test_minibatch_on_separated_blobs_picks_what_full_kmeans_picks(batch_size, pick, quota):
    """Where the clusters are unambiguous (four far-apart blobs), the streamed mini-batch
    clustering finds full KMeans' clusters, so the quotas, picks, order and logged numbers are
    the full rule's; NaN scores are neither clustered nor picked; a small budget with equal
    quotas exercises the surplus fill."""
    emb = blobs([30, 20, 10, 40], seed=3)
    order = np.random.default_rng(4).permutation(len(emb))     # blobs interleaved in the pool
    emb = emb[order]
    scores = np.random.default_rng(5).normal(size=len(emb))
    scores[[3, 50, 77]] = NAN
    cand = np.setdiff1d(np.arange(len(emb)), [0, 1, 2, 60])
    for n in (4, 21, 60):
        full = make("s", n_clusters=4, pick=pick, quota=quota).select(
            Features(emb, {"s": scores}), np.array([0, 1, 2, 60]), cand, n,
            np.random.default_rng(6))
        mini = make("s", n_clusters=4, pick=pick, quota=quota, kmeans="minibatch",
                    batch_size=batch_size).select(
            Features(emb, {"s": scores}), np.array([0, 1, 2, 60]), cand, n,
            np.random.default_rng(6))
        assert mini.positions.tolist() == full.positions.tolist(), n
        assert mini.info == full.info, n
        for key, values in full.numbers.items():
            assert mini.numbers[key] == pytest.approx(values, rel=1e-6), (n, key)
        assert mini.positions.dtype == np.int64


def test_minibatch_streams_a_batch_at_a_time_in_a_seeded_order():
    """Rank 0 receives the rows a block at a time (about batch_size rows, never the pool),
    ``passes`` times; the seed decides the order, so the same rng draw picks the same rows."""
    from evotune.selectors.cluster_quota import cluster_quota_sharded
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(1000, 4)).astype(np.float32)
    feats = Features(emb, {"s": rng.normal(size=1000)}, positions=np.arange(1000))
    spy = Spy()
    sel = cluster_quota_sharded(feats, "s", np.array([], np.int64), np.arange(1000), 30, spy,
                                n_clusters=5, batch_size=64, passes=2, random_state=9)
    assert sum(spy.gathered) == 2 * 1000 and len(spy.gathered) == 2 * 16   # ceil(1000 / 64)
    assert max(spy.gathered) < 3 * 64
    again = cluster_quota_sharded(feats, "s", np.array([], np.int64), np.arange(1000), 30,
                                  Spy(), n_clusters=5, batch_size=64, passes=2, random_state=9)
    assert again.positions.tolist() == sel.positions.tolist()
    assert sum(map(int, sel.info["quotas"].split(","))) == 30 and sel.info["n_clusters"] == 5


@pytest.mark.parametrize("case, match", [
    ("too_many", "cannot pick 12: only 11 of 12 candidates have a score"),
    ("inf_embedding", "1 embeddings are NaN or inf .first at pool position 4."),
    ("small_batch", "batch_size: 2 rows cannot seed 3 clusters"),
])
def test_minibatch_errors(case, match):
    emb, scores = blobs([6, 3, 3]), SCORES.copy()
    if case == "inf_embedding":
        emb[4, 0] = np.inf
    if case == "too_many":
        scores[5] = NAN
    options = {"n_clusters": 3, "kmeans": "minibatch", "batch_size": 2 if case == "small_batch"
               else 4}
    with pytest.raises(ValueError, match=match):
        rule = make("s", **options)
        rule.options.check()
        rule.select(Features(emb, {"s": scores}), np.array([], np.int64), np.arange(12),
                    12 if case == "too_many" else 4, np.random.default_rng(0))
