"""Greedy k-center (furthest-first) selection, with DiverseEvol's semantics.

DiverseEvol: Wu et al., "Self-Evolved Diverse Data Sampling for Efficient Instruction Tuning",
arXiv 2311.08182; code OFA-Sys/DiverseEvol.

All labeled points are the initial centres. Each pick is the candidate furthest (Euclidean) from
its nearest centre; it then becomes a centre. Ties go to the lowest pool index.

Departures from the reference implementation (OFA-Sys/DiverseEvol), on purpose:
- The reference builds an N×N distance matrix. Here one vector holds each candidate's squared
  distance to its nearest centre (O(N) memory, beside one float32 copy of the candidates'
  embeddings) and is updated after each pick; the initial
  distances to the labeled set are computed in blocks of ``chunk_size`` candidates. Same picks.
- The reference computes ``sqrt(|a|²+|b|²−2ab)`` without a clamp, so in fp32 a near-duplicate
  can get a negative squared distance → NaN → that point is picked first. Squared distances are
  clamped at 0 here, so a near-duplicate is never preferred.
- The reference returns the new indices sorted; the pick order is kept here, with each pick's
  distance to its nearest centre at pick time.
- With no labeled point at all the reference is undefined; here the first pick is the lowest
  candidate index (every distance is +inf, ties to the lowest index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evotune.selectors.base import (Features, Selection, option, options_dict,
                                    require_positive)


class NearestCentre:
    """Each candidate's squared Euclidean distance to its nearest centre (O(N) memory).

    Starts with the labeled points as centres, measured in blocks of ``chunk_size`` candidates;
    ``add(j)`` makes candidate ``j`` a centre. Squared distances are ``|a|²+|b|²−2ab`` in
    float32, clamped at 0 (see the module docstring). +inf where there is no centre yet.
    """

    def __init__(self, emb: np.ndarray, labeled: np.ndarray, candidates: np.ndarray,
                 chunk_size: int):
        self.cand = emb[candidates]
        self.norms = np.einsum("ij,ij->i", self.cand, self.cand)
        self.sq = np.full(len(candidates), np.inf, dtype=np.float32)
        if not len(labeled):
            return
        lab = emb[labeled]
        lab_norms = np.einsum("ij,ij->i", lab, lab)
        for s in range(0, len(candidates), chunk_size):
            block = slice(s, s + chunk_size)
            for t in range(0, len(labeled), chunk_size):
                c = slice(t, t + chunk_size)
                d = self.norms[block, None] + lab_norms[None, c] - 2.0 * (self.cand[block] @ lab[c].T)
                np.minimum(self.sq[block], np.maximum(d, 0.0).min(axis=1), out=self.sq[block])

    def add(self, j: int) -> None:
        d = np.maximum(self.norms + self.norms[j] - 2.0 * (self.cand @ self.cand[j]), 0.0)
        np.minimum(self.sq, d, out=self.sq)


def check_inputs(emb: np.ndarray, labeled: np.ndarray, candidates: np.ndarray, n: int) -> None:
    """Raise ValueError on a bad shape, overlapping sets, n out of range or non-finite rows."""
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {emb.shape}")
    if not 0 <= n <= len(candidates):
        raise ValueError(f"cannot pick {n} of {len(candidates)} candidates")
    if np.intersect1d(labeled, candidates).size:
        raise ValueError("labeled and candidate positions overlap")
    used = np.concatenate([labeled, candidates])
    bad = ~np.isfinite(emb[used]).all(axis=1)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} embeddings are NaN or inf (first at pool position "
                         f"{int(used[bad][0])}); selection needs finite embeddings")


def kcenter_greedy(embeddings: np.ndarray, labeled: np.ndarray, candidates: np.ndarray, n: int,
                   chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``n`` of ``candidates`` by greedy k-center over ``embeddings``.

    Args:
        embeddings: (N, D) pool embeddings (any float dtype; computed in float32).
        labeled: positions of the initial centres (the already selected examples).
        candidates: positions that may be picked, disjoint from ``labeled``.
        n: number of picks, 0 <= n <= len(candidates).
        chunk_size: candidate rows per block when measuring distances to the labeled set; peak
            extra memory is about chunk_size × min(len(labeled), chunk_size) × 4 bytes.

    Returns:
        (picks, distances): pool positions in pick order, and each pick's Euclidean distance to
        its nearest centre when it was picked.

    Raises:
        ValueError: on non-finite embeddings, overlapping sets or n out of range.
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    labeled = np.asarray(labeled, dtype=np.int64)
    # Sorting makes "first maximum" in argmax mean "lowest pool index" on ties.
    candidates = np.sort(np.asarray(candidates, dtype=np.int64))
    check_inputs(emb, labeled, candidates, n)
    nearest = NearestCentre(emb, labeled, candidates, chunk_size)
    picks = np.empty(n, dtype=np.int64)
    dists = np.empty(n, dtype=np.float64)
    for k in range(n):
        j = int(np.argmax(nearest.sq))
        picks[k] = candidates[j]
        dists[k] = float(np.sqrt(nearest.sq[j]))
        nearest.add(j)
        nearest.sq[j] = -np.inf   # picked: never the maximum again
    return picks, dists


class KCenterSelector:
    """DiverseEvol's diversity rule over the current model's embeddings."""
    name = "kcenter"
    doc = ("DiverseEvol's greedy k-center: the candidate furthest (Euclidean, current-model "
           "embedding) from everything selected so far, one at a time.")
    logs = "`kcenter_distance`"
    needs_embeddings = True
    scores = ()

    @dataclass
    class Options:
        chunk_size: int = option(4096, "candidate rows per distance block (a memory bound; also "
                                       "the block of the k-center fill of unscored candidates)",
                                 safe=True)

        def check(self) -> None:
            require_positive(self, "chunk_size")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def select(self, features: Features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator) -> Selection:
        features.require(self.name)
        picks, dists = kcenter_greedy(features.embeddings, labeled, candidates, n,
                                      self.options.chunk_size)
        return Selection(picks, {"kcenter_distance": dists})

    def state_dict(self) -> dict:
        return {"name": self.name, **options_dict(self.options)}
