"""RDS+: targeted selection by the similarity of pool examples to a few target examples.

Ivison et al., "Large-Scale Data Selection for Instruction Tuning" (arXiv 2503.01807; code
hamishivi/automated-instruction-selection, ``compute_influence_cosinesim.py`` and
``get_top_aggregated_influences.py``). The scores come from the feature pass (``rds`` and one
``rds:<subtask>`` per target subtask, ``trainer/scores.py``): each pool example's cosine to
every target example, its position-weighted mean-pooled last hidden states L2-normalised, then
the max (or mean) over each subtask's targets. This rule spends the budget round-robin over the
subtasks, each turn taking that subtask's best remaining candidate, so every target task gets
its share whatever the scale of its similarities.

As in the reference (``--aggregation_method minmax``): subtasks take turns in a fixed order
(sorted by name), each walking its own ranking (score descending, ties to the lowest pool
index); a candidate another subtask took already still uses up that subtask's turn. With one
subtask this is the plain top-n by score.

Departures: the reference embeds the pool and the targets once, with the base model; in the
loop the current model embeds both every round (``selection.first_round: selector`` with one
round is the reference's one-shot form). The reference pads nothing (batch size 1); evotune
batches and weights only real tokens, the same numbers up to fp32 summation order.
"""

from __future__ import annotations

import numpy as np

from evotune.selectors.base import Features, NoOptions, Selection
from evotune.selectors.sharded import top_k, values_at

SCORE = "rds"


def round_robin(per_subtask: np.ndarray, candidates: np.ndarray, n: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``n`` of ``candidates`` by taking turns over the columns of ``per_subtask``.

    Args:
        per_subtask: (N, S) scores, higher preferred; NaN = the subtask has no score for it
            (never picked by that subtask).
        candidates: pool positions that may be picked.
        n: picks, 0 <= n <= number of candidates some subtask has a score for.

    Returns:
        (picks in pick order, the subtask index whose turn picked each).

    Raises:
        ValueError: n larger than the candidates with a score.
    """
    candidates = np.sort(np.asarray(candidates, dtype=np.int64))
    scores = np.asarray(per_subtask, dtype=np.float64)[candidates]
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"per-subtask scores must be (N, S) with S >= 1, got {scores.shape}")
    scored = np.isfinite(scores).any(axis=1)
    if n > scored.sum():
        raise ValueError(f"cannot pick {n}: only {int(scored.sum())} of {len(candidates)} "
                         f"candidates have an rds score")
    # Each subtask's ranking: descending score, ties to the lowest pool index (a stable sort
    # of the ascending candidates on -score); unscored rows last and never taken.
    order = [np.argsort(-np.nan_to_num(scores[:, s], nan=-np.inf), kind="stable")
             for s in range(scores.shape[1])]
    usable = [int(np.isfinite(scores[:, s]).sum()) for s in range(scores.shape[1])]
    cursor = [0] * scores.shape[1]
    taken = np.zeros(len(candidates), dtype=bool)
    picks, by = [], []
    while len(picks) < n:
        for s in range(scores.shape[1]):
            if len(picks) == n:
                break
            if cursor[s] >= usable[s]:
                continue
            j = order[s][cursor[s]]
            cursor[s] += 1
            if not taken[j]:                      # a taken one spends the turn (reference)
                taken[j] = True
                picks.append(j)
                by.append(s)
    return candidates[np.asarray(picks, dtype=np.int64)], np.asarray(by, dtype=np.int64)


class RdsSelector:
    """RDS+'s rule: the candidates most similar to the target examples, round-robin over the
    target subtasks (see the module docstring)."""
    name = "rds"
    doc = ("RDS+: the candidates whose embeddings are closest (cosine) to a small set of target "
           "examples (`scoring.rds.targets`), max over each subtask's targets, taken "
           "round-robin over the subtasks so each gets its share")
    logs = "`rds`, `rds_subtask` (whose turn took it), one `rds:<subtask>` per subtask"
    scale = ("sharded: each rank scores its own rows; per subtask a distributed top-n (about 100 "
             "int64 all-reduces) and the n best rows gathered")
    Options = NoOptions
    needs_embeddings = False
    scores = (SCORE,)

    def __init__(self, options: NoOptions | None = None):
        self.options = options or NoOptions()

    def select(self, features: Features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator) -> Selection:
        features.require_score(self.name, SCORE)
        names = sorted(k for k in features.scores if k.startswith(SCORE + ":"))
        if not names:
            raise ValueError("rds needs the per-subtask scores rds:<subtask>; the feature pass "
                             "computed none")
        per_subtask = np.stack([features.scores[k] for k in names], axis=1)
        picks, by = round_robin(per_subtask, candidates, n)
        unscored = int((~np.isfinite(per_subtask[candidates]).any(axis=1)).sum())
        return Selection(picks, {SCORE: features.scores[SCORE][picks]},
                         {"subtasks": len(names), "unscored": unscored},
                         {"rds_subtask": [names[b].split(":", 1)[1] for b in by]})

    sharded = True

    def select_sharded(self, shard: Features, labeled: np.ndarray, candidates: np.ndarray,
                       n: int, rng: np.random.Generator, comm) -> Selection:
        """:meth:`select` with the scores spread over ranks (every rank calls this with its
        shard): the same picks. A subtask's turns never reach past its own n best candidates
        (each turn either picks or meets a row another subtask picked, n in all), so each
        subtask's distributed top-n (``selectors/sharded.py``) is all the round-robin reads."""
        shard.require_score(self.name, SCORE)
        names = sorted(k for k in shard.scores if k.startswith(SCORE + ":"))
        if not names:
            raise ValueError("rds needs the per-subtask scores rds:<subtask>; the feature pass "
                             "computed none")
        pos = np.asarray(shard.positions, dtype=np.int64)
        here = np.isin(pos, candidates)
        per_subtask = np.stack([shard.scores[k] for k in names], axis=1)[here]
        held = comm.sum_int64(int(here.sum()))
        if held != len(candidates):
            raise ValueError(f"the ranks' shards hold {held} of {len(candidates)} candidates")
        scored = comm.sum_int64(int(np.isfinite(per_subtask).any(axis=1).sum()))
        if n > scored:
            raise ValueError(f"cannot pick {n}: only {scored} of {len(candidates)} candidates "
                             f"have an rds score")
        best = [top_k(np.where(np.isfinite(col), col, np.nan), pos[here], n, comm)
                for col in per_subtask.T]
        # The round-robin over the union of the subtasks' top-n lists, in pool order.
        union = np.unique(np.concatenate([p for p, _ in best]))
        table = np.full((len(union), len(names)), np.nan)
        for s, (p, v) in enumerate(best):
            table[np.searchsorted(union, p), s] = v
        picked, by = round_robin(table, np.arange(len(union)), n)
        picks = union[picked]
        return Selection(picks, {SCORE: values_at(shard.scores[SCORE], pos, picks, comm)},
                         {"subtasks": len(names), "unscored": len(candidates) - scored},
                         {"rds_subtask": [names[b].split(":", 1)[1] for b in by]})

    def state_dict(self) -> dict:
        return {"name": self.name}
