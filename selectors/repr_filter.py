"""DEITA's representation filter: best score first, skipping near-duplicates.

DEITA: Liu et al., "What Makes Good Data for Alignment?", arXiv 2312.15685; code hkust-nlp/deita.

Candidates are walked by descending score. One is admitted only if its largest cosine similarity
to everything already admitted is <= ``threshold`` (0.9 in DEITA); the walk stops at ``n``.
"Already admitted" here means the labeled set (earlier rounds) plus this round's admitted picks,
so a candidate close to something trained on before is skipped as well.

Departures from the reference implementation (hkust-nlp/deita, ``IterativeFilter.filter``), on
purpose:
- The reference starts from an empty set and always admits its first example; here the labeled
  set is in the comparison from the start, so even the best-scored candidate can be rejected.
- The reference sorts with pandas' default (unstable) sort; here ties in score go to the lowest
  pool index.
- The reference divides by the norm, so a zero embedding gives NaN similarities, every
  comparison with NaN is False and the example is admitted by accident. Here a zero vector has
  cosine 0 with everything (admitted for any threshold >= 0, and never blocks another example);
  it is counted in ``info["zero_embeddings"]``.
- The reference returns fewer than the budget when the walk runs out; here the rest is filled
  with the best-scored rejected candidates (``admitted`` = 0 for those, ``info["filled"]``).
- With ``batch_size > 1`` the reference compares a candidate with earlier members of its batch
  even when those were rejected; here the walk is strictly sequential (its batch_size=1 default).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evotune.selectors.base import (Features, Selection, option, options_dict,
                                    scored_candidates)


def _unit_rows(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Rows scaled to unit L2 norm (float32); zero rows stay zero. Also returns their count."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    zero = norms == 0
    scale = np.where(zero, 0.0, 1.0 / np.where(zero, 1.0, norms))
    return (x * scale[:, None]).astype(np.float32), int(zero.sum())


def _max_cosine(block: np.ndarray, kept: np.ndarray, chunk_size: int) -> np.ndarray:
    """Max over ``kept`` rows of the cosine with each ``block`` row (both unit rows); -inf when
    ``kept`` is empty. Computed ``chunk_size`` kept rows at a time."""
    best = np.full(len(block), -np.inf, dtype=np.float32)
    for s in range(0, len(kept), chunk_size):
        np.maximum(best, (block @ kept[s:s + chunk_size].T).max(axis=1), out=best)
    return best


def repr_filter(embeddings: np.ndarray, scores: np.ndarray, labeled: np.ndarray,
                candidates: np.ndarray, n: int, threshold: float = 0.9,
                block_size: int = 256, chunk_size: int = 4096) -> Selection:
    """Pick ``n`` of ``candidates`` by score, skipping those too similar to what is already kept.

    Args:
        embeddings: (N, D) pool embeddings (any float dtype; cosines computed in float32).
        scores: (N,) pool scores, higher = better; NaN = not scored (never picked).
        labeled: positions already selected in earlier rounds; they block similar candidates.
        candidates: positions that may be picked, disjoint from ``labeled``.
        n: number of picks, 0 <= n <= number of scored candidates.
        threshold: largest cosine similarity allowed to anything already kept (DEITA: 0.9).
        block_size: candidates compared with the kept set per matrix product. The walk is still
            one candidate at a time; at most one block is examined past the last admit.
        chunk_size: kept rows per matrix product; peak extra memory about
            block_size × chunk_size × 4 bytes beside the kept set's (len(labeled) + n) × D.

    Returns:
        A Selection in pick order: the admitted candidates (walk order), then any fill-ins.
        ``numbers``: ``score``; ``max_cosine``, the largest cosine to the labeled set and all
        earlier picks at pick time (NaN when there was nothing to compare with: no labeled
        example and first pick); ``admitted``, 1 if the pick passed the threshold, 0 if it fills
        the budget after the walk ran out. ``info``: ``nan_scores`` (candidates without a
        score), ``rejected_by_threshold`` (candidates the walk examined and rejected; fill-ins
        are counted there too), ``filled``, ``zero_embeddings`` (zero vectors among the labeled
        and scored candidates).

    Raises:
        ValueError: on non-finite embeddings (labeled or scored candidates), overlapping sets,
            wrong shapes, a NaN threshold, n out of range, or fewer scored candidates than n.
    """
    emb = np.asarray(embeddings)
    scores = np.asarray(scores, dtype=np.float64)
    labeled = np.asarray(labeled, dtype=np.int64)
    candidates = np.sort(np.asarray(candidates, dtype=np.int64))
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {emb.shape}")
    if scores.shape != (len(emb),):
        raise ValueError(f"scores must have shape ({len(emb)},), got {scores.shape}")
    if np.isnan(threshold):
        raise ValueError("threshold is NaN")
    if not 0 <= n <= len(candidates):
        raise ValueError(f"cannot pick {n} of {len(candidates)} candidates")
    if np.intersect1d(labeled, candidates).size:
        raise ValueError("labeled and candidate positions overlap")
    scored, n_nan = scored_candidates(scores, candidates, n)
    used = np.concatenate([labeled, scored])
    bad = ~np.isfinite(emb[used]).all(axis=1)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} embeddings are NaN or inf (first at pool position "
                         f"{int(used[bad][0])}); the repr filter needs finite embeddings")

    # Descending score; lexsort's last key is primary, and the stable sort leaves equal scores
    # in ascending pool order, so ties go to the lowest index.
    order = scored[np.lexsort((scored, -scores[scored]))]
    cand_unit, zero_c = _unit_rows(emb[order])
    lab_unit, zero_l = _unit_rows(emb[labeled])
    # The kept set: labeled rows first, then each pick as it is made (no N×N matrix anywhere).
    kept = np.empty((len(labeled) + n, emb.shape[1]), dtype=np.float32)
    kept[:len(labeled)] = lab_unit
    n_kept = len(labeled)

    walk_admit: list[int] = []          # indices into ``order``
    walk_cos: list[float] = []
    examined = 0
    for s in range(0, len(order), block_size):
        if len(walk_admit) == n:
            break
        block = cand_unit[s:s + block_size]
        before = _max_cosine(block, kept[:n_kept], chunk_size)   # kept before this block
        gram = block @ block.T                                   # within the block
        new: list[int] = []                                      # admitted in this block
        for k in range(len(block)):
            if len(walk_admit) == n:
                break
            examined += 1
            c = before[k]
            if new:
                c = max(c, gram[k, new].max())
            if c <= threshold:
                new.append(k)
                walk_admit.append(s + k)
                walk_cos.append(float(c))
        kept[n_kept:n_kept + len(new)] = block[new]
        n_kept += len(new)

    # Fill-ins: the walk examined every scored candidate, so the rest are rejected ones; take the
    # best of them, each compared with the labeled set and every earlier pick for the report.
    admitted = np.zeros(len(order), dtype=bool)
    admitted[walk_admit] = True
    fill = np.flatnonzero(~admitted)[:n - len(walk_admit)]
    fill_cos = []
    for j in fill:
        fill_cos.append(float(_max_cosine(cand_unit[j:j + 1], kept[:n_kept], chunk_size)[0]))
        kept[n_kept] = cand_unit[j]
        n_kept += 1

    idx = np.array(walk_admit + fill.tolist(), dtype=np.int64)
    picks = order[idx]
    max_cos = np.array(walk_cos + fill_cos, dtype=np.float64)
    max_cos[np.isneginf(max_cos)] = np.nan        # nothing to compare with: no labeled, first pick
    numbers = {"score": scores[picks],
               "max_cosine": max_cos,
               "admitted": np.r_[np.ones(len(walk_admit)), np.zeros(len(fill))]}
    info = {"nan_scores": n_nan,
            "rejected_by_threshold": examined - len(walk_admit),
            "filled": len(fill),
            "zero_embeddings": zero_c + zero_l}
    return Selection(picks, numbers, info)


class RepresentationFilterSelector:
    """DEITA's score-first, near-duplicate-skipping rule over the round's embeddings.

    Runs on rank 0 over the gathered (N, D) embeddings (unit-normalised float32 copy of the
    candidates and of the selected rows)."""
    name = "repr_filter"
    doc = ("DEITA's representation filter: candidates by descending score, each admitted only "
           "if its max cosine similarity to everything selected (earlier rounds and this one) is "
           "≤ `threshold`; if too few pass, the best rejected fill the budget (`admitted: 0`)")
    logs = "the score, `max_cosine`, `admitted`"
    scale = "rank 0: the N × D embeddings (gathered)"
    needs_embeddings = True

    @dataclass
    class Options:
        score: str = option("loss", "the score candidates are walked by (highest first)",
                            score=True)
        threshold: float = option(0.9, "admit a candidate only if its max cosine similarity to "
                                       "everything selected is at most this (DEITA: 0.9)")

        def check(self) -> None:
            if not -1 <= self.threshold <= 1:
                raise ValueError(f"threshold: a cosine similarity, must be in [-1, 1], got "
                                 f"{self.threshold}")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        self.scores = (self.options.score,)

    def select(self, features: Features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator) -> Selection:
        o = self.options
        features.require(self.name, o.score)
        return repr_filter(features.embeddings, features.scores[o.score], labeled,
                           candidates, n, float(o.threshold))

    def state_dict(self) -> dict:
        return {"name": self.name, **options_dict(self.options)}
