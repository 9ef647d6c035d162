"""Cluster quotas: KMeans over the candidates, then the best scores inside each cluster.

The scored candidates are clustered (KMeans on their embeddings); the budget ``n`` is split into
per-cluster quotas, either proportional to cluster size (largest-remainder rounding) or equal;
each cluster gives its best-scored members. A cluster smaller than its quota gives all it has,
and the surplus goes to the best-scored candidates left in the other clusters.

Reference methods close to this rule:
- TAGCOS (Zhang et al., arXiv 2407.15235; ``configs/tagcos.yaml``): ``quota="proportional"``
  and ``pick="centroid"`` on per-example gradient features (``selection.embedding: gradient``)
  rather than hidden states (the proportional split is our reading of the paper). Inside a
  cluster TAGCOS runs OMP towards the cluster's mean gradient; the centroid pick takes OMP's
  first step (the member closest to the centroid), then the next-closest members.
- Cherry LLM's pre-experienced sampling (arXiv 2308.12032) also clusters, but picks inside a
  cluster by a perplexity band, not by score: :mod:`~evotune.selectors.pre_experienced`.
Both references are one-shot; here the labeled set (earlier rounds) does not enter: the
clusters and quotas are over this round's scored candidates only.

Two clusterings (``kmeans``): ``full``, scikit-learn's KMeans over the candidates gathered on
one process (the references' choice, and the default); ``minibatch``
(:func:`cluster_quota_sharded`), scikit-learn's MiniBatchKMeans fed the candidates in a seeded
random order a batch at a time, for pools whose embeddings do not fit on one rank: the rule then
selects sharded, with the same quotas and order, but mini-batch clusters (not full KMeans').

Choices where the references say nothing:
- Cluster ids are made canonical: cluster 0 holds the lowest candidate pool index, cluster 1 the
  lowest index not in cluster 0, and so on. KMeans' own labels are an arbitrary permutation; the
  canonical ids make "ties to the lower cluster id" (in the rounding) a property of the data.
- Pick order is round-robin over clusters by rank within the cluster (the best of every cluster
  in cluster-id order, then the second best of every cluster, ...), then the surplus fill-ins by
  descending score. So any prefix of the picks is spread over as many clusters as it can be,
  as a k-center order is.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from evotune.selectors.base import (Features, Selection, option, options_dict,
                                    scored_candidates)
from evotune.selectors.sharded import SingleProcess, top_k, values_at

QUOTAS = ("proportional", "equal")
KMEANS = ("full", "minibatch")


def largest_remainder(n: int, weights: np.ndarray) -> np.ndarray:
    """Split the integer ``n`` in proportion to non-negative integer ``weights`` (sum > 0).

    Each share is floor(n·w/W); the units left over go to the largest remainders, ties to the
    lower index. Integer arithmetic throughout, so equal remainders compare equal.
    """
    weights = np.asarray(weights, dtype=np.int64)
    total = int(weights.sum())
    share, rem = np.divmod(n * weights, total)
    left = n - int(share.sum())
    # Stable sort on -remainder: equal remainders stay in index order.
    share[np.argsort(-rem, kind="stable")[:left]] += 1
    return share


def canonical_labels(raw: np.ndarray) -> np.ndarray:
    """Relabel clusters by first appearance (``raw`` is in ascending pool order), dropping ids
    that no point carries (KMeans can leave a cluster empty on duplicate points)."""
    ids, first = np.unique(raw, return_index=True)
    new_id = np.empty(ids.max() + 1, dtype=np.int64)
    new_id[ids[np.argsort(first)]] = np.arange(len(ids))
    return new_id[raw]


def cluster_quota(embeddings: np.ndarray, scores: np.ndarray | None, candidates: np.ndarray,
                  n: int, n_clusters: int = 8, quota: str = "proportional", n_init: int = 10,
                  random_state: int = 0) -> Selection:
    """Pick ``n`` of ``candidates``: per-cluster quotas, best scores within each cluster.

    With ``scores=None`` the "score" inside a cluster is each member's cosine similarity to its
    cluster's centroid (the most representative members first): TAGCOS's choice inside a
    cluster is OMP towards the centroid, whose first step is exactly this member; later OMP
    steps fit the residual, here the next-closest members follow.

    Args:
        embeddings: (N, D) pool embeddings (only the scored candidates' rows are read).
        scores: (N,) pool scores, higher = better; NaN = not scored (never picked, not
            clustered).
        candidates: positions that may be picked.
        n: number of picks, 0 <= n <= number of scored candidates.
        n_clusters: KMeans clusters, clipped to the number of scored candidates.
        quota: "proportional" (to cluster size) or "equal".
        n_init: KMeans restarts (pinned: sklearn's default has changed across versions).
        random_state: KMeans seed.

    Returns:
        A Selection in round-robin order (see the module docstring), then surplus fill-ins.
        ``numbers``: ``score``; ``cluster`` (canonical id); ``in_quota``, 1 for a pick within its
        cluster's quota, 0 for a surplus fill-in. ``info``: ``nan_scores``, ``n_clusters``
        (non-empty clusters), ``cluster_sizes`` and ``quotas`` (comma-separated, by cluster id;
        quotas before capping at the cluster size), ``filled`` (surplus fill-ins).

    Raises:
        ValueError: on a bad ``quota``/``n_clusters``/``n_init``, wrong shapes, non-finite
            embeddings among the scored candidates, n out of range, or fewer scored candidates
            than n.
    """
    if quota not in QUOTAS:
        raise ValueError(f"quota must be one of {', '.join(QUOTAS)}, got {quota!r}")
    if n_clusters < 1 or n_init < 1:
        raise ValueError(f"n_clusters and n_init must be >= 1, got {n_clusters}, {n_init}")
    emb = np.asarray(embeddings)
    by_centroid = scores is None
    if by_centroid:   # every candidate with a finite embedding takes part
        scores = np.where(np.isfinite(emb).all(axis=1), 0.0, np.nan)
    scores = np.asarray(scores, dtype=np.float64)
    candidates = np.sort(np.asarray(candidates, dtype=np.int64))
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {emb.shape}")
    if scores.shape != (len(emb),):
        raise ValueError(f"scores must have shape ({len(emb)},), got {scores.shape}")
    if not 0 <= n <= len(candidates):
        raise ValueError(f"cannot pick {n} of {len(candidates)} candidates")
    scored, n_nan = scored_candidates(scores, candidates, n)
    x = np.asarray(emb[scored], dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} embeddings are NaN or inf (first at pool position "
                         f"{int(scored[bad][0])}); KMeans needs finite embeddings")
    if n == 0:
        return Selection(np.empty(0, dtype=np.int64),
                         {"score": np.empty(0), "cluster": np.empty(0), "in_quota": np.empty(0)},
                         {"nan_scores": n_nan, "n_clusters": 0, "cluster_sizes": "",
                          "quotas": "", "filled": 0})

    # Imported here: scikit-learn's import adds ~1.5 s to every process of every run.
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    k = min(n_clusters, len(scored))
    with warnings.catch_warnings():
        # Fewer distinct points than k: sklearn warns and leaves clusters empty; those are
        # dropped below and ``info["n_clusters"]`` reports the clusters actually used.
        warnings.simplefilter("ignore", ConvergenceWarning)
        raw = KMeans(n_clusters=k, n_init=n_init, random_state=random_state).fit_predict(x)
    labels = canonical_labels(raw)
    m = int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=m)
    quotas = largest_remainder(n, sizes if quota == "proportional" else np.ones(m, np.int64))
    # Proportional quotas never exceed the size (n·s/W <= s); equal ones can.
    take = np.minimum(quotas, sizes)

    # Rank of each scored candidate inside its cluster: by descending score, ties to the lowest
    # pool index (``scored`` is ascending, so a stable sort keeps that order on equal keys).
    s = scores[scored]
    if by_centroid:
        # float64: members of a tight cluster far from the origin differ in angle by less
        # than float32 resolves
        x64 = x.astype(np.float64)
        centroids = np.stack([x64[labels == c].mean(axis=0) for c in range(m)])
        s = np.einsum("ij,ij->i", _unit(x64), _unit(centroids)[labels])
    by_cluster = np.lexsort((scored, -s, labels))
    start = np.r_[0, np.cumsum(sizes)[:-1]]
    rank = np.empty(len(scored), dtype=np.int64)
    rank[by_cluster] = np.arange(len(scored)) - np.repeat(start, sizes)
    chosen = rank < take[labels]
    # Round-robin: by rank first, then cluster id.
    idx = np.flatnonzero(chosen)
    idx = idx[np.lexsort((labels[idx], rank[idx]))]
    # Surplus: best remaining scores, wherever they are.
    rest = np.flatnonzero(~chosen)
    fill = rest[np.lexsort((scored[rest], -s[rest]))][:n - len(idx)]
    idx = np.r_[idx, fill]

    picks = scored[idx]
    numbers = {"centroid_cosine" if by_centroid else "score": s[idx], "cluster": labels[idx],
               "in_quota": np.r_[np.ones(n - len(fill)), np.zeros(len(fill))]}
    info = {"nan_scores": n_nan, "n_clusters": m,
            "cluster_sizes": ",".join(map(str, sizes.tolist())),
            "quotas": ",".join(map(str, quotas.tolist())), "filled": len(fill)}
    return Selection(picks, numbers, info)


# ----------------------------------------------------------------------------- streamed, sharded

def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: uint64 → well-mixed uint64 (wrapping arithmetic)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _shuffled_blocks(emb: np.ndarray, pos: np.ndarray, ok: np.ndarray, comm, batch: int,
                     seed: int):
    """Every ``ok`` row of every rank, on rank 0, in a seeded random order, about ``batch``
    rows at a time (every rank iterates alike; rank 0 gets each block's rows, the other ranks
    None). A row's place in the order is a hash of its pool position and ``seed``, so the
    order is the same for any number of ranks and needs no O(N) permutation; block b holds the
    rows whose hash falls in the b-th of ceil(rows / batch) equal ranges of the hash."""
    where = np.flatnonzero(ok)
    keys = _mix64(pos[where].astype(np.uint64) ^ _mix64(np.array([seed], np.uint64)))
    n_blocks = max(1, -(-comm.sum_int64(len(where)) // batch))
    block = ((keys >> np.uint64(32)) * np.uint64(n_blocks)) >> np.uint64(32)
    order = np.lexsort((keys, block))
    where, keys, block = where[order], keys[order], block[order]
    bounds = np.searchsorted(block, np.arange(n_blocks + 1, dtype=np.uint64))
    for b in range(n_blocks):
        part = slice(bounds[b], bounds[b + 1])
        parts = comm.gather_rows((keys[part], pos[where[part]],
                                  np.asarray(emb[where[part]], np.float32)))
        if parts is None:
            yield None
            continue
        k = np.concatenate([q[0] for q in parts])
        p = np.concatenate([q[1] for q in parts])
        x = np.concatenate([q[2] for q in parts])
        yield x[np.lexsort((p, k))]


def _fit_streamed(emb, pos, ok, comm, k: int, dim: int, batch: int, passes: int,
                  seed: int) -> np.ndarray:
    """(k, D) float64 centres, on every rank, of scikit-learn's MiniBatchKMeans fitted on rank
    0 by ``partial_fit`` over mini-batches of ``batch`` rows in a seeded random order (a new
    one each pass, ``passes`` times over the rows): the same batches, so the same centres, for
    any number of ranks."""
    from sklearn.cluster import MiniBatchKMeans
    model = MiniBatchKMeans(n_clusters=k, batch_size=batch, n_init=1, random_state=seed) \
        if comm.rank == 0 else None
    for p in range(passes):
        held = []
        for rows in _shuffled_blocks(emb, pos, ok, comm, batch, seed + p):
            if rows is None:
                continue
            held.append(rows)
            if sum(len(r) for r in held) >= batch:
                both = np.concatenate(held)
                model.partial_fit(both[:batch])
                held = [both[batch:]]
        if model is not None and sum(len(r) for r in held):
            model.partial_fit(np.concatenate(held))      # the pass's last, smaller batch
    centres = model.cluster_centers_ if model is not None else None
    return comm.broadcast_block(centres, 0, (k, dim)).astype(np.float64)


def _blocks(emb: np.ndarray, where: np.ndarray):
    """The rows ``where`` of ``emb`` as float32 blocks of at most ``_BLOCK`` (no copy of them
    all at once), with each block's slice of ``where``."""
    for s in range(0, len(where), _BLOCK):
        yield slice(s, s + _BLOCK), np.asarray(emb[where[s: s + _BLOCK]], np.float32)


def _nearest(emb: np.ndarray, where: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """The nearest centre of each row ``where`` of ``emb`` (Euclidean, float64; ties to the
    lower centre id)."""
    c2 = np.einsum("ij,ij->i", centres, centres)
    return np.concatenate([np.argmin(c2[None, :] - 2.0 * (x.astype(np.float64) @ centres.T),
                                     axis=1) for _, x in _blocks(emb, where)]
                          or [np.zeros(0, np.int64)])


_BLOCK = 16_384


def cluster_quota_sharded(shard: Features, score: str | None, labeled: np.ndarray,
                          candidates: np.ndarray, n: int, comm, n_clusters: int = 8,
                          quota: str = "proportional", batch_size: int = 4096,
                          passes: int = 3, random_state: int = 0) -> Selection:
    """:func:`cluster_quota` with a streamed MiniBatchKMeans, over rows spread across ranks
    (every rank calls this with its shard; one process: the whole pool as one shard).

    The clustering is scikit-learn's MiniBatchKMeans (``partial_fit`` on rank 0, the rows
    streamed to it in a seeded random order, ``batch_size`` at a time, ``passes`` times: random
    mini-batches, as its ``fit`` draws, where pool order would start it on one source); its
    centres go to every rank, which labels its own rows by the nearest centre. Then, as in
    :func:`cluster_quota`: canonical cluster ids (by lowest pool position), quotas, and inside
    each cluster the best scores (or cosines to the cluster's mean, ``score=None``), each
    cluster's best found by a distributed top-k, round-robin over clusters, the surplus by a
    last distributed top-k. No rank holds more than its rows and one batch (rank 0: and the
    model). The picks do not depend on the rank count, up to float rounding: the centroid
    cosines follow the summation order of the cluster sums, and a row equidistant from two
    centres to within float64 rounding may be labelled either way. They differ from full
    KMeans' (:func:`cluster_quota`), as mini-batch centres do. ``labeled`` is unused (as in
    :func:`cluster_quota`).
    """
    pos = np.asarray(shard.positions, dtype=np.int64)
    dim = comm.max_int64(shard.embeddings.shape[1] if len(pos) else 0)
    emb = np.asarray(shard.embeddings).reshape(len(pos), dim)
    here = np.isin(pos, candidates)
    held = comm.sum_int64(int(here.sum()))
    if held != len(candidates):
        raise ValueError(f"the ranks' shards hold {held} of {len(candidates)} candidates")
    if not 0 <= n <= len(candidates):
        raise ValueError(f"cannot pick {n} of {len(candidates)} candidates")
    finite = np.concatenate([np.isfinite(emb[s: s + _BLOCK]).all(axis=1)
                             for s in range(0, len(emb), _BLOCK)] or [np.zeros(0, bool)])
    values = None if score is None else np.asarray(shard.scores[score], dtype=np.float64)
    ok = here & (finite if values is None else ~np.isnan(values))
    usable = comm.sum_int64(int(ok.sum()))
    if usable < n:
        raise ValueError(f"cannot pick {n}: only {usable} of {len(candidates)} candidates "
                         f"have a score ({len(candidates) - usable} are NaN)")
    bad = ok & ~finite
    n_bad = comm.sum_int64(int(bad.sum()))
    if n_bad:
        first = -comm.max_int64(-int(pos[bad].min()) if bad.any() else -(1 << 62))
        raise ValueError(f"{n_bad} embeddings are NaN or inf (first at pool position {first}); "
                         f"KMeans needs finite embeddings")
    name = "centroid_cosine" if score is None else "score"
    if n == 0:
        return Selection(np.empty(0, dtype=np.int64),
                         {name: np.empty(0), "cluster": np.empty(0), "in_quota": np.empty(0)},
                         {"nan_scores": len(candidates) - usable, "n_clusters": 0,
                          "cluster_sizes": "", "quotas": "", "filled": 0})
    k = min(n_clusters, usable)
    centres = _fit_streamed(emb, pos, ok, comm, k, dim, batch_size, passes, random_state)
    where = np.flatnonzero(ok)
    rows, raw = pos[where], _nearest(emb, where, centres)
    # Canonical ids: by each cluster's lowest pool position; clusters nobody is nearest to
    # are dropped.
    first = np.array([-comm.max_int64(-int(rows[raw == j].min()) if (raw == j).any()
                                      else -(1 << 62)) for j in range(k)])
    used = np.flatnonzero(first < (1 << 62))
    new_id = np.full(k, -1, dtype=np.int64)
    new_id[used[np.argsort(first[used])]] = np.arange(len(used))
    labels, m = new_id[raw], len(used)
    sizes = comm.sum_float64(np.bincount(labels, minlength=m)).astype(np.int64)
    quotas = largest_remainder(n, sizes if quota == "proportional" else np.ones(m, np.int64))
    take = np.minimum(quotas, sizes)
    if score is None:          # cosine to the cluster's mean (float64 sums over ranks)
        sums = np.zeros((m, dim))
        for part, x in _blocks(emb, where):
            np.add.at(sums, labels[part], x.astype(np.float64))
        means = comm.sum_float64(sums) / sizes[:, None]
        cu = _unit(means)
        s_rows = np.concatenate([np.einsum("ij,ij->i", _unit(x), cu[labels[part]])
                                 for part, x in _blocks(emb, where)] or [np.zeros(0)])
    else:
        s_rows = values[ok]
    best = [top_k(np.where(labels == c, s_rows, np.nan), rows, int(take[c]), comm)
            for c in range(m)]
    order = [(best[c][0][r], best[c][1][r], c) for r in range(int(take.max()))
             for c in range(m) if r < take[c]]
    chosen = np.array([p for p, _, _ in order], dtype=np.int64)
    fill_pos, fill_val = top_k(np.where(np.isin(rows, chosen), np.nan, s_rows), rows,
                               n - len(chosen), comm)
    fill_cluster = values_at(labels.astype(np.float64), rows, fill_pos, comm).astype(np.int64)
    picks = np.r_[chosen, fill_pos].astype(np.int64)
    numbers = {name: np.r_[[v for _, v, _ in order], fill_val].astype(np.float64),
               "cluster": np.r_[[c for _, _, c in order], fill_cluster].astype(np.int64),
               "in_quota": np.r_[np.ones(len(chosen)), np.zeros(len(fill_pos))]}
    info = {"nan_scores": len(candidates) - usable, "n_clusters": m,
            "cluster_sizes": ",".join(map(str, sizes.tolist())),
            "quotas": ",".join(map(str, quotas.tolist())), "filled": len(fill_pos)}
    return Selection(picks, numbers, info)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ClusterQuotaSelector:
    """KMeans over the round's candidates, a quota per cluster, best scores inside each.

    ``kmeans: full`` (the default, TAGCOS's picks) needs the whole matrix: the candidates'
    (N, D) embeddings gathered on rank 0, a float32 copy of them and scikit-learn's
    full-batch KMeans over it (N × ``n_clusters`` distances per iteration). ``kmeans:
    minibatch`` selects sharded (:func:`cluster_quota_sharded`): scikit-learn's MiniBatchKMeans
    fitted on rank 0 from the rows streamed to it in a seeded random order, a batch at a time,
    so no rank holds more than its own rows and one batch; its clusters, and so its picks, are
    not full KMeans'."""
    name = "cluster_quota"
    doc = ("KMeans (scikit-learn, seeded) on the candidates' embeddings, `n_clusters` clusters, "
           "per-cluster quotas proportional to size (largest remainder) or equal, best scores "
           "within each cluster (or, with `pick: centroid`, the members closest in angle to the "
           "cluster centroid: TAGCOS), picked round-robin over clusters")
    logs = "the score (or `centroid_cosine`), `cluster`, `in_quota`"
    scale = ("`kmeans: full`: rank 0, the N × D embeddings and scikit-learn KMeans over all the "
             "candidates; `kmeans: minibatch`: sharded, MiniBatchKMeans on rank 0 from the rows "
             "streamed to it in a seeded random order (one gather per batch of about `batch_size` "
             "rows, `passes` times), each cluster's best by a distributed top-k")
    needs_embeddings = True

    @dataclass
    class Options:
        score: str = option("loss", "the score ranked inside each cluster (with pick: score)",
                            score=True)
        n_clusters: int = option(8, "KMeans clusters over the candidates", gt=0)
        quota: str = option("proportional", "picks per cluster", choices=QUOTAS)
        pick: str = option("score", "inside a cluster, the best scores or the members closest "
                                    "to the centroid (TAGCOS)", choices=("score", "centroid"))
        n_init: int = option(10, "KMeans restarts (pinned: scikit-learn's default has changed "
                                 "across versions; kmeans: full)", gt=0)
        kmeans: str = option("full", "full: scikit-learn's KMeans over the candidates gathered "
                                     "on rank 0 (TAGCOS); minibatch: MiniBatchKMeans streamed "
                                     "a batch at a time, selecting sharded (other clusters)",
                             choices=KMEANS)
        batch_size: int = option(4096, "kmeans: minibatch: rows per partial_fit batch "
                                       "(at least n_clusters)", gt=0)
        passes: int = option(3, "kmeans: minibatch: passes over the candidates", gt=0)

        def check(self) -> None:
            if self.kmeans == "minibatch" and self.batch_size < self.n_clusters:
                raise ValueError(f"batch_size: {self.batch_size} rows cannot seed "
                                 f"{self.n_clusters} clusters; give at least n_clusters")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        o = self.options
        if o.quota not in QUOTAS:
            raise ValueError(f"quota must be one of {', '.join(QUOTAS)}, got {o.quota!r}")
        if o.pick not in ("score", "centroid"):
            raise ValueError(f"pick must be score or centroid, got {o.pick!r}")
        if o.kmeans not in KMEANS:
            raise ValueError(f"kmeans must be one of {', '.join(KMEANS)}, got {o.kmeans!r}")
        self.scores = (o.score,) if o.pick == "score" else ()
        self.sharded = o.kmeans == "minibatch"

    def select(self, features: Features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator) -> Selection:
        o = self.options
        features.require(self.name, o.score if o.pick == "score" else None)
        if self.sharded:               # one process: the whole pool as one shard
            return self.select_sharded(features.as_one_shard(), labeled,
                                       np.sort(np.asarray(candidates, np.int64)), n, rng,
                                       SingleProcess())
        scores = features.scores[o.score] if o.pick == "score" else None
        return cluster_quota(features.embeddings, scores, candidates, n, o.n_clusters,
                             o.quota, o.n_init, random_state=int(rng.integers(2**31)))

    def select_sharded(self, shard: Features, labeled: np.ndarray, candidates: np.ndarray,
                       n: int, rng: np.random.Generator, comm) -> Selection:
        """``kmeans: minibatch`` over every rank's own rows (:func:`cluster_quota_sharded`)."""
        o = self.options
        shard.require(self.name, o.score if o.pick == "score" else None)
        return cluster_quota_sharded(shard, o.score if o.pick == "score" else None, labeled,
                                     candidates, n, comm, o.n_clusters, o.quota, o.batch_size,
                                     o.passes, random_state=int(rng.integers(2**31)))

    def state_dict(self) -> dict:
        return {"name": self.name, **options_dict(self.options)}
