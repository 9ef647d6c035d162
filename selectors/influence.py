"""Influence selection's rule (LESS, ROSE): the candidates whose gradients align best with the
target set's.

The scores come from the gradient pass (``trainer/passes/influence.py``): ``influence`` (the
aggregate over the target subtasks) and one ``influence:<subtask>`` per subtask. This rule only
ranks them: LESS keeps the global top-k (Xia et al., arXiv 2402.04333; princeton-nlp/LESS).
"""

from __future__ import annotations

import numpy as np

from evotune.selectors.base import Features, NoOptions, Selection
from evotune.selectors.sharded import top_k, values_at

SCORE = "influence"


class InfluenceSelector:
    """Top candidates by influence score (LESS: the global top-k), ties to the lowest index."""
    name = "influence"
    doc = ("LESS / ROSE: the candidates whose Adam-preconditioned LoRA gradients (projected, "
           "normalised) align best with a validation set's gradients: mean cosine per "
           "validation subtask, max over subtasks (see Influence selection)")
    logs = "`influence`, `top_subtask`, one `influence:<subtask>` per subtask"
    scale = ("sharded: each rank its own rows' projected gradients (rows × `influence.dim`) and "
             "the validation ones; a distributed top-k; rank 0 gathers the scores")
    Options = NoOptions
    needs_embeddings = False
    scores = (SCORE,)

    def __init__(self, options: NoOptions | None = None):
        self.options = options or NoOptions()

    def select(self, features: Features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator) -> Selection:
        features.require_score(self.name, SCORE)
        candidates = np.sort(np.asarray(candidates, dtype=np.int64))
        s = features.scores[SCORE][candidates]
        ok = np.isfinite(s)
        if n > ok.sum():
            raise ValueError(f"cannot pick {n}: only {int(ok.sum())} of {len(candidates)} "
                             f"candidates have an influence score")
        order = sorted(np.flatnonzero(ok), key=lambda i: (-s[i], candidates[i]))[:n]
        picks = candidates[order]
        subtasks = [k for k in features.scores if k.startswith(SCORE + ":")]
        labels = {}
        if subtasks:
            per = np.stack([features.scores[k][picks] for k in subtasks], axis=1)
            labels["top_subtask"] = [subtasks[j].split(":", 1)[1] for j in per.argmax(axis=1)]
        return Selection(picks, {SCORE: s[order]},
                         {"unscored": int((~ok).sum()), "scored": int(ok.sum())}, labels)

    sharded = True

    def select_sharded(self, shard: Features, labeled: np.ndarray, candidates: np.ndarray,
                       n: int, rng: np.random.Generator, comm) -> Selection:
        """:meth:`select` with the scores spread over ranks (every rank calls this with its
        shard of the gradient sample): the same picks, by a distributed top-k
        (``selectors/sharded.py``)."""
        shard.require_score(self.name, SCORE)
        pos = np.asarray(shard.positions, dtype=np.int64)
        here = np.isin(pos, candidates)
        s = shard.scores[SCORE][here]
        scored = comm.sum_int64(int(np.isfinite(s).sum()))
        if n > scored:
            raise ValueError(f"cannot pick {n}: only {scored} of {len(candidates)} "
                             f"candidates have an influence score")
        picks, values = top_k(np.where(np.isfinite(s), s, np.nan), pos[here], n, comm)
        subtasks = [k for k in shard.scores if k.startswith(SCORE + ":")]
        labels = {}
        if subtasks:
            per = np.stack([values_at(shard.scores[k], pos, picks, comm) for k in subtasks],
                           axis=1)
            labels["top_subtask"] = [subtasks[j].split(":", 1)[1] for j in per.argmax(axis=1)]
        return Selection(picks, {SCORE: values},
                         {"unscored": len(candidates) - scored, "scored": scored}, labels)

    def state_dict(self) -> dict:
        return {"name": self.name}
