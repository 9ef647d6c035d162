"""Facility location by lazy greedy: Superfiltering.D's diversity step.

Superfiltering: Li et al., arXiv 2402.00530; code tianyi-lab/Superfiltering (``do_fla``).

Maximises F(S) = Σ_{i∈C} w_i · max_{j∈S∪L} sim(i, j) over the scored candidates C, where L is
the labeled set (earlier rounds): what L already covers adds nothing, so picks go to the parts
of C that neither L nor earlier picks represent. Lazy greedy gives exactly the picks of plain
greedy (the gains can only shrink as S grows, so a stale gain is an upper bound).

The similarity is the one Superfiltering gets from submodlib
(``FacilityLocationFunction(mode="dense", metric="euclidean")`` → ``euclidean_similarity`` in
submodlib's C++ helper): ``sim = exp(-d / D)``, d the Euclidean distance, D the embedding
dimension. Superfiltering feeds it L2-normalised sentence embeddings; here it gets whatever the
feature pass computed (mean-pooled hidden states, not normalised), with the same kernel.

Departures from the reference (tianyi-lab/Superfiltering ``do_fla`` on submodlib), on purpose:
- The labeled set L covers the candidates from the start (the reference is one-shot: L = ∅);
  L is not in the sum, only in the max.
- Weights w_i: 1 as in the reference, or (``weighted``) the min-max-normalised score, so that
  covering a high-scored candidate is worth more. Not in the reference.
- submodlib's heap orders (gain, index) pairs with ``std::less``, so equal gains go to the
  HIGHEST index; here they go to the lowest pool index.
- The kernel is stored as 1 − sim = -expm1(-d/D) in float32: with normalised embeddings d/D is
  ~1e-3 and sim ≈ 0.999, where float32 keeps only ~4 significant digits of 1 − sim; the
  complement keeps all of them. Gains are summed in float64.
- NaN-scored candidates are dropped before the kernel is built, as Superfiltering's IFD filter
  drops NaN (``x < upper`` is False for NaN) before facility location.
"""

from __future__ import annotations

import heapq

from dataclasses import dataclass

import numpy as np

from evotune.selectors.base import (Features, Selection, option, options_dict,
                                    scored_candidates)


def _dissimilarity(d: np.ndarray, gamma: float) -> np.ndarray:
    """1 − exp(−γ·d) in place (float32), computed as -expm1 for precision near d = 0."""
    np.multiply(d, -gamma, out=d)
    np.expm1(d, out=d)
    np.negative(d, out=d)
    return d


def _gains(t: np.ndarray, rows: np.ndarray, uncovered: np.ndarray,
           w: np.ndarray) -> np.ndarray:
    """Marginal gain of each facility in ``rows``: Σ_i w_i · max(0, uncovered_i − t[row, i]).

    ``uncovered_i`` = 1 − (best similarity of i to the chosen set). The lazy and the plain path
    both go through here, so a gain is computed the same way wherever it is computed.
    """
    return (np.maximum(uncovered[None, :] - t[rows], 0.0) * w[None, :]).sum(axis=1)


def facility_location_greedy(embeddings: np.ndarray, labeled: np.ndarray, candidates: np.ndarray,
                             n: int, weights: np.ndarray | None = None, lazy: bool = True,
                             max_candidates: int = 20000,
                             block_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``n`` of ``candidates`` greedily for facility location with ``labeled`` as cover.

    Args:
        embeddings: (N, D) pool embeddings (any float dtype; distances via sklearn, float32
            inputs upcast to float64 in chunks).
        labeled: positions that already cover (earlier rounds), disjoint from ``candidates``.
        candidates: the ground set C, both what may be picked and what must be covered.
        n: number of picks, 0 <= n <= len(candidates).
        weights: (len(candidates),) non-negative weights in ascending-candidate order; None = 1.
        lazy: lazy greedy (priority queue of stale gains); False = plain greedy, every gain
            recomputed each step (for tests; same picks).
        max_candidates: largest |C| accepted; the kernel is a dense |C|×|C| float32 matrix
            (1.6 GB at 20,000).
        block_size: candidate rows per block when computing gains or the cover by L.

    Returns:
        (picks, gains): pool positions in pick order, and each pick's marginal gain
        (weighted similarity units) when it was picked.

    Raises:
        ValueError: on non-finite embeddings, overlapping sets, bad weights, n out of range or
            more than ``max_candidates`` candidates.
    """
    emb = np.asarray(embeddings)
    labeled = np.asarray(labeled, dtype=np.int64)
    candidates = np.sort(np.asarray(candidates, dtype=np.int64))
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {emb.shape}")
    if not 0 <= n <= len(candidates):
        raise ValueError(f"cannot pick {n} of {len(candidates)} candidates")
    if len(candidates) > max_candidates:
        raise ValueError(f"facility location over {len(candidates)} candidates needs a dense "
                         f"{len(candidates)}×{len(candidates)} kernel; max_candidates is "
                         f"{max_candidates}: filter the candidates by score first (e.g. keep "
                         f"the top ones, as Superfiltering.D does) or raise "
                         f"selection.facility_location.max_candidates")
    if np.intersect1d(labeled, candidates).size:
        raise ValueError("labeled and candidate positions overlap")
    w = np.ones(len(candidates)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(candidates),) or not (np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError(f"weights must be {len(candidates)} finite non-negative numbers")
    used = np.concatenate([labeled, candidates])
    bad = ~np.isfinite(emb[used]).all(axis=1)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} embeddings are NaN or inf (first at pool position "
                         f"{int(used[bad][0])}); facility location needs finite embeddings")
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty(0)

    # Imported here: scikit-learn's import adds ~1.5 s to every process of every run.
    from sklearn.metrics.pairwise import euclidean_distances

    gamma = 1.0 / emb.shape[1]                 # submodlib: gamma = 1 / dimension
    x = np.asarray(emb[candidates], dtype=np.float32)
    # Row j = facility j, column i = the candidate it covers. Only rows are read, so the
    # result does not depend on the kernel being bit-exactly symmetric.
    t = _dissimilarity(euclidean_distances(x), gamma)
    # 1 − best similarity to L; 1 (similarity 0) where nothing covers yet, as submodlib starts.
    uncovered = np.ones(len(candidates))
    if len(labeled):
        lab = np.asarray(emb[labeled], dtype=np.float32)
        for s in range(0, len(x), block_size):
            d = euclidean_distances(x[s:s + block_size], lab).min(axis=1)
            uncovered[s:s + block_size] = _dissimilarity(d, gamma)

    rows = np.arange(len(candidates))
    gain = np.concatenate([_gains(t, rows[s:s + block_size], uncovered, w)
                           for s in range(0, len(rows), block_size)])
    picked = np.zeros(len(candidates), dtype=bool)
    picks = np.empty(n, dtype=np.int64)
    gains = np.empty(n)
    if lazy:
        # (−bound, index): the heap's minimum is the largest bound, ties to the lowest index.
        # fresh[j] = the step whose state j's bound was computed in; a fresh top is exact and
        # beats every other bound, so it is the plain-greedy choice (ties included).
        heap = [(-g, j) for j, g in enumerate(gain.tolist())]
        heapq.heapify(heap)
        fresh = np.zeros(len(candidates), dtype=np.int64)
    for k in range(n):
        if lazy:
            while True:
                neg, j = heapq.heappop(heap)
                if fresh[j] == k:
                    break
                g = float(_gains(t, rows[j:j + 1], uncovered, w)[0])
                fresh[j] = k
                heapq.heappush(heap, (-g, j))
            g = -neg
        else:
            if k:
                gain = np.concatenate([_gains(t, rows[s:s + block_size], uncovered, w)
                                       for s in range(0, len(rows), block_size)])
            gain[picked] = -np.inf
            j = int(np.argmax(gain))            # first maximum: lowest index
            g = float(gain[j])
        picked[j] = True
        picks[k], gains[k] = candidates[j], g
        np.minimum(uncovered, t[j], out=uncovered)
    return picks, gains


def minmax_weights(s: np.ndarray) -> np.ndarray:
    """Scores mapped linearly to [0, 1] (min → 0, max → 1); all equal → all 1.

    The lowest-scored candidate gets weight 0: still pickable, but covering it is worth nothing.
    """
    lo, hi = float(s.min()), float(s.max())
    return np.ones(len(s)) if hi == lo else (s - lo) / (hi - lo)


class FacilityLocationSelector:
    """Superfiltering.D's facility location over the scored candidates, labeled set as cover.

    Needs the whole matrix: the (N, D) embeddings on rank 0 and a dense candidates² float32
    kernel (1.6 GB at 20,000 candidates; ``max_candidates`` is checked before the first pass)."""
    name = "facility_location"
    doc = ("Superfiltering.D: lazy greedy maximisation of facility location, similarity "
           "`exp(−d / D)` on Euclidean distance (submodlib's dense euclidean kernel), the "
           "selected set counting as coverage; optionally weighted by the normalised score")
    logs = "the score, `gain`"
    scale = ("rank 0: a dense candidates² float32 kernel (`max_candidates`: 1.6 GB at 20,000), "
             "checked at start")
    needs_embeddings = True

    @dataclass
    class Options:
        score: str = option("loss", "candidates without this score are left out; with "
                                    "`weighted`, coverage is weighted by it", score=True)
        weighted: bool = option(False, "weight coverage by the normalised score")
        max_candidates: int = option(20000, "largest candidate set accepted: the kernel is a "
                                            "dense candidates² float32 matrix (1.6 GB at 20,000)",
                                     gt=0)

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        self.scores = (self.options.score,)

    def select(self, features: Features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator) -> Selection:
        o = self.options
        features.require(self.name, o.score)
        scores = np.asarray(features.scores[o.score], dtype=np.float64)
        if scores.shape != (len(features.embeddings),):
            raise ValueError(f"score {o.score!r} has shape {scores.shape}; expected "
                             f"({len(features.embeddings)},), one per pool example")
        candidates = np.sort(np.asarray(candidates, dtype=np.int64))
        if not 0 <= n <= len(candidates):
            raise ValueError(f"cannot pick {n} of {len(candidates)} candidates")
        scored, n_nan = scored_candidates(scores, candidates, n)
        weights = None
        if o.weighted:
            if not np.isfinite(scores[scored]).all():
                raise ValueError(f"weighted facility location needs finite scores; "
                                 f"{o.score!r} has ±inf among the candidates")
            weights = minmax_weights(scores[scored])
        picks, gains = facility_location_greedy(features.embeddings, labeled, scored, n,
                                                weights, max_candidates=o.max_candidates)
        return Selection(picks, {"score": scores[picks], "gain": gains},
                         {"nan_scores": n_nan})

    def state_dict(self) -> dict:
        return {"name": self.name, **options_dict(self.options)}
