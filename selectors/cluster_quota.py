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
                                    require_positive, scored_candidates)

QUOTAS = ("proportional", "equal")


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
        centroids = np.stack([x[labels == c].mean(axis=0) for c in range(m)])
        unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        cu = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        s = np.einsum("ij,ij->i", unit, cu[labels]).astype(np.float64)
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


class ClusterQuotaSelector:
    """KMeans over the round's candidates, a quota per cluster, best scores inside each.

    Needs the whole matrix: the candidates' (N, D) embeddings gathered on rank 0, a float32
    copy of them and scikit-learn's full-batch KMeans over it (N × ``n_clusters`` distances
    per iteration). MiniBatchKMeans would cut the time, not the gathered matrix, and
    would change TAGCOS's picks; it is not used."""
    name = "cluster_quota"
    doc = ("KMeans (scikit-learn, seeded) on the candidates' embeddings, `n_clusters` clusters, "
           "per-cluster quotas proportional to size (largest remainder) or equal, best scores "
           "within each cluster (or, with `pick: centroid`, the members closest in angle to the "
           "cluster centroid: TAGCOS), picked round-robin over clusters")
    logs = "the score (or `centroid_cosine`), `cluster`, `in_quota`"
    scale = ("rank 0: the N × D embeddings and scikit-learn KMeans over all the candidates (no "
             "mini-batch form here)")
    needs_embeddings = True

    @dataclass
    class Options:
        score: str = option("loss", "the score ranked inside each cluster (with pick: score)",
                            score=True)
        n_clusters: int = option(8, "KMeans clusters over the candidates")
        quota: str = option("proportional", "picks per cluster", choices=QUOTAS)
        pick: str = option("score", "inside a cluster, the best scores or the members closest "
                                    "to the centroid (TAGCOS)", choices=("score", "centroid"))
        n_init: int = option(10, "KMeans restarts (pinned: scikit-learn's default has changed "
                                 "across versions)")

        def check(self) -> None:
            require_positive(self, "n_clusters", "n_init")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        o = self.options
        if o.quota not in QUOTAS:
            raise ValueError(f"quota must be one of {', '.join(QUOTAS)}, got {o.quota!r}")
        if o.pick not in ("score", "centroid"):
            raise ValueError(f"pick must be score or centroid, got {o.pick!r}")
        self.scores = (o.score,) if o.pick == "score" else ()

    def select(self, features: Features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator) -> Selection:
        o = self.options
        features.require(self.name, o.score if o.pick == "score" else None)
        scores = features.scores[o.score] if o.pick == "score" else None
        return cluster_quota(features.embeddings, scores, candidates, n, o.n_clusters,
                             o.quota, o.n_init, random_state=int(rng.integers(2**31)))

    def state_dict(self) -> dict:
        return {"name": self.name, **options_dict(self.options)}
