"""Seeded uniform sampling: the baseline every selector has to beat."""

from __future__ import annotations

import numpy as np

from evotune.selectors.base import Features, NoOptions, Selection


class RandomSelector:
    """Picks ``n`` candidates uniformly without replacement with the round's generator."""
    name = "random"
    doc = "seeded uniform sample of the candidates (the baseline to beat)"
    logs = "–"
    scale = "nothing measured"
    Options = NoOptions
    needs_embeddings = False
    scores = ()

    def __init__(self, options: NoOptions | None = None):
        self.options = options or NoOptions()

    def select(self, features: Features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator) -> Selection:
        if n > len(candidates):
            raise ValueError(f"cannot pick {n} of {len(candidates)} candidates")
        return Selection(np.asarray(rng.choice(candidates, size=n, replace=False), dtype=np.int64))

    def state_dict(self) -> dict:
        return {"name": self.name}
