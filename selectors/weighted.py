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
                                    scored_candidates)
from evotune.selectors.kcenter import (accelerator, add_pick, check_inputs,
                                       sharded_centres)
from evotune.selectors.sharded import SingleProcess, global_max


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
    check_inputs(emb, labeled, scored, n)
    picks, numbers = weighted_sharded(emb[scored], scored, scores[scored], emb[labeled], n,
                                      alpha, SingleProcess(), chunk_size)
    return picks, numbers, {"nan_scores": n_nan}


def weighted_sharded(cand: np.ndarray, positions: np.ndarray, scores: np.ndarray,
                     labeled: np.ndarray, n: int, alpha: float, comm, chunk_size: int = 4096,
                     device=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The weighted greedy with the scored candidates spread over ranks; every rank calls this
    with its own: ``cand`` (rows) at pool ``positions`` (ascending) with finite ``scores``,
    and ``labeled``, its part of the initial centres' rows.

    Each candidate's objective is computed by the rank that holds it from its own distance
    (:class:`~evotune.selectors.kcenter.NearestCentre`, as k-center) and three numbers every
    rank agrees on exactly (the scores' minimum and maximum, once; the largest remaining
    distance, each pick), so it is the one-process objective bit for bit. A pick is four
    collectives: the largest remaining distance, the largest objective and the lowest
    position holding it (int64 all-reduces), and the broadcast of the picked row. Each
    pick's score and distance stay with its owner until one gather at the end. Returns
    (picks, numbers) on every rank; raises ValueError (alike everywhere) when fewer than
    ``n`` candidates are held in all. ``device``: as k-center's
    (:func:`~evotune.selectors.kcenter.kcenter_sharded`), the rows and distances kept on a
    torch device and updated there; the objectives (O(rows) a pick) on the host."""
    positions = np.asarray(positions, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    held, nearest = sharded_centres(cand, positions, labeled, comm, chunk_size, device)
    total = comm.sum_int64(len(positions))
    if not 0 <= n <= total:
        raise ValueError(f"cannot pick {n} of {total} candidates")
    lo, hi = -global_max(-s, comm), global_max(s, comm)
    spread = hi - lo if total else 0.0
    s_norm = (s - lo) / spread if spread > 0 else np.zeros_like(s)
    picked = np.zeros(len(positions), dtype=bool)
    picks = np.empty(n, dtype=np.int64)
    objectives = np.empty(n)
    mine: list[tuple[int, float, float]] = []         # (pick number, score, distance)
    for k in range(n):
        d = np.sqrt(nearest.distances().astype(np.float64))
        d_max = global_max(d[~picked], comm)
        if np.isinf(d_max):       # no centre yet: every candidate is infinitely far
            d_norm = np.ones_like(d)
        else:
            d_norm = d / d_max if d_max > 0 else np.zeros_like(d)
        objective = alpha * s_norm + (1.0 - alpha) * d_norm
        objective[picked] = -np.inf
        best = global_max(objective, comm)
        j = int(np.argmax(objective)) if len(objective) else -1      # first max: lowest here
        at = int(positions[j]) if j >= 0 and objective[j] == best and not picked[j] else \
            np.iinfo(np.int64).max
        position = -comm.max_int64(-at)
        here = at == position
        if here:
            picked[j] = True
            mine.append((k, s[j], d[j]))
        add_pick(nearest, held, position, j if here else None, comm)
        picks[k], objectives[k] = position, best
    found = np.concatenate(comm.all_gather_rows(np.array(mine, dtype=np.float64).reshape(-1, 3)))
    numbers = {"score": np.empty(n), "kcenter_distance": np.empty(n), "objective": objectives}
    order = found[:, 0].astype(np.int64)
    numbers["score"][order], numbers["kcenter_distance"][order] = found[:, 1], found[:, 2]
    return picks, numbers


class WeightedSelector:
    """``alpha`` · normalised score + (1 − ``alpha``) · normalised k-center distance.

    One process: a float32 copy of the candidates' rows and O(N) float64 work per pick.
    Sharded (:meth:`select_sharded`, with any score): each rank its own rows
    and O(rows) work per pick, four collectives per pick."""
    name = "weighted"
    doc = ("greedy on `alpha · score + (1 − alpha) · distance`: the score min-max normalised "
           "over the candidates, the k-center distance divided by the largest remaining one; "
           "`alpha` 0 is k-center, 1 is top-score (`configs/ifd_mix.yaml`)")
    logs = "the score, `kcenter_distance`, `objective`"
    scale = ("sharded with any score (a derived score you register without a sharded form: "
             "rank 0, gathered): each rank keeps its own rows and 4 bytes per candidate (a GPU "
             "run: in the device's memory, computed there); a pick is 4 collectives")
    needs_embeddings = True

    @dataclass
    class Options:
        score: str = option("loss", "the score mixed with the k-center distance (higher = "
                                    "preferred)", score=True)
        alpha: float = option(0.5, "weight of the score against the k-center distance (0 = "
                                   "k-center, 1 = top score)", ge=0, le=1)
        chunk_size: int = option(4096, "candidate rows per distance block (a memory bound)",
                                 gt=0, safe=True)

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

    sharded = True

    def select_sharded(self, shard: Features, labeled: np.ndarray, candidates: np.ndarray,
                       n: int, rng: np.random.Generator, comm) -> Selection:
        """:meth:`select` with the embeddings and scores spread over ranks (every rank calls
        this with its shard): :func:`weighted_sharded`, the same picks and numbers. Bad input
        raises the same ValueError on every rank."""
        o = self.options
        shard.require(self.name, o.score)
        pos = np.asarray(shard.positions, dtype=np.int64)
        dim = comm.max_int64(shard.embeddings.shape[1] if len(pos) else 0)
        emb = np.asarray(shard.embeddings, dtype=np.float32).reshape(len(pos), dim)
        values = np.asarray(shard.scores[o.score], dtype=np.float64)
        is_cand, is_lab = np.isin(pos, candidates), np.isin(pos, labeled)
        scored = is_cand & np.isfinite(values)
        bad = ~np.isfinite(emb[scored | is_lab]).all(axis=1)
        first_bad = int(pos[scored | is_lab][bad][0]) if bad.any() else -1
        found = np.stack(comm.all_gather_rows(np.array(       # agreed before the picks begin
            [int(is_cand.sum()), int(scored.sum()), int(is_lab.sum()), int(bad.sum()),
             first_bad])))
        held, n_scored = int(found[:, 0].sum()), int(found[:, 1].sum())
        if held != len(candidates) or found[:, 2].sum() != len(labeled):
            raise ValueError(f"the ranks' shards hold {held} of {len(candidates)} candidates "
                             f"and {int(found[:, 2].sum())} of {len(labeled)} selected rows")
        if n_scored < n:
            raise ValueError(f"cannot pick {n}: only {n_scored} of {len(candidates)} candidates "
                             f"have a finite score ({held - n_scored} are NaN or inf)")
        if np.intersect1d(labeled, candidates).size:
            raise ValueError("labeled and candidate positions overlap")
        if found[:, 3].sum():
            first = min(int(f) for f in found[:, 4] if f >= 0)
            raise ValueError(f"{int(found[:, 3].sum())} embeddings are NaN or inf (first at pool "
                             f"position {first}); selection needs finite embeddings")
        picks, numbers = weighted_sharded(emb[scored], pos[scored], values[scored], emb[is_lab],
                                          n, o.alpha, comm, o.chunk_size, accelerator(comm))
        numbers[o.score] = numbers.pop("score")
        return Selection(picks, numbers, {"nan_scores": held - n_scored})

    def state_dict(self) -> dict:
        return {"name": self.name, **options_dict(self.options)}
