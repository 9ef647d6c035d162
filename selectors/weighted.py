"""Score + diversity in one greedy rule: k-center with a quality prior.

Each pick maximises ``alpha · s + (1 − alpha) · d`` over the remaining candidates, where ``s``
is the candidate's score min-max normalised over the scored candidates (computed once) and
``d`` its Euclidean distance to the nearest centre (labeled points and earlier picks) divided by
the largest such distance among the remaining candidates (recomputed every pick). ``alpha = 0``
is plain k-center (DiverseEvol), ``alpha = 1`` is top-score; ties go to the lowest pool index.
This rule is evotune's own; no reference method defines it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evotune.selectors.base import (Features, Selection, option, options_dict,
                                    require_positive, scored_candidates)
from evotune.selectors.kcenter import NearestCentre, check_inputs


def weighted_greedy(embeddings: np.ndarray, scores: np.ndarray, labeled: np.ndarray,
                    candidates: np.ndarray, n: int, alpha: float, chunk_size: int = 4096
                    ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, int]]:
    """Pick ``n`` candidates by the weighted score/diversity objective.

    Args:
        embeddings: (N, D) pool embeddings.
        scores: (N,) pool scores, higher preferred; NaN = not scored (never picked).
        labeled, candidates, n, chunk_size: as in :func:`~evotune.selectors.kcenter.kcenter_greedy`.
        alpha: weight of the score, in [0, 1].

    Returns:
        (picks, numbers, info): pool positions in pick order; per pick its ``score``,
        ``kcenter_distance`` (to the nearest centre at pick time) and ``objective``; and
        ``{"nan_scores": candidates dropped for a NaN score}``.

    Raises:
        ValueError: alpha outside [0, 1], fewer than n scored candidates, or the errors of
            :func:`~evotune.selectors.kcenter.check_inputs`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    emb = np.asarray(embeddings, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float64)
    labeled = np.asarray(labeled, dtype=np.int64)
    candidates = np.sort(np.asarray(candidates, dtype=np.int64))
    scored, n_nan = scored_candidates(scores, candidates, n, finite=True)
    info = {"nan_scores": n_nan}
    check_inputs(emb, labeled, scored, n)
    s = scores[scored]
    spread = s.max() - s.min() if len(s) else 0.0
    s_norm = (s - s.min()) / spread if spread > 0 else np.zeros_like(s)
    nearest = NearestCentre.of(emb, labeled, scored, chunk_size)
    picked = np.zeros(len(scored), dtype=bool)
    picks = np.empty(n, dtype=np.int64)
    numbers = {k: np.empty(n) for k in ("score", "kcenter_distance", "objective")}
    for k in range(n):
        d = np.sqrt(nearest.sq.astype(np.float64))
        d_max = d[~picked].max()
        if np.isinf(d_max):       # no centre yet: every candidate is infinitely far
            d_norm = np.ones_like(d)
        else:
            d_norm = d / d_max if d_max > 0 else np.zeros_like(d)
        objective = alpha * s_norm + (1.0 - alpha) * d_norm
        objective[picked] = -np.inf
        j = int(np.argmax(objective))
        picks[k] = scored[j]
        numbers["score"][k] = s[j]
        numbers["kcenter_distance"][k] = d[j]
        numbers["objective"][k] = objective[j]
        picked[j] = True
        nearest.add(j)
    return picks, numbers, info


class WeightedSelector:
    """``alpha`` · normalised score + (1 − ``alpha``) · normalised k-center distance.

    Runs on rank 0 over the gathered (N, D) embeddings (a float32 copy of the candidates' rows
    and O(N) float64 work per pick)."""
    name = "weighted"
    doc = ("greedy on `alpha · score + (1 − alpha) · distance`: the score min-max normalised "
           "over the candidates, the k-center distance divided by the largest remaining one; "
           "`alpha` 0 is k-center, 1 is top-score (`configs/ifd_mix.yaml`)")
    logs = "the score, `kcenter_distance`, `objective`"
    scale = "rank 0: the N × D embeddings (gathered) and the scores; O(N) work per pick"
    needs_embeddings = True

    @dataclass
    class Options:
        score: str = option("loss", "the score mixed with the k-center distance (higher = "
                                    "preferred)", score=True)
        alpha: float = option(0.5, "weight of the score against the k-center distance (0 = "
                                   "k-center, 1 = top score)")
        chunk_size: int = option(4096, "candidate rows per distance block (a memory bound)",
                                 safe=True)

        def check(self) -> None:
            if not 0 <= self.alpha <= 1:
                raise ValueError(f"alpha: must be in [0, 1], got {self.alpha}")
            require_positive(self, "chunk_size")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        self.scores = (self.options.score,)

    def select(self, features: Features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator) -> Selection:
        o = self.options
        features.require(self.name, o.score)
        picks, numbers, info = weighted_greedy(features.embeddings, features.scores[o.score],
                                               labeled, candidates, n, o.alpha, o.chunk_size)
        numbers[o.score] = numbers.pop("score")
        return Selection(picks, numbers, info)

    def state_dict(self) -> dict:
        return {"name": self.name, **options_dict(self.options)}
