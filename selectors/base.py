"""What selectors read and return.

Model-facing work (embedding, scoring) produces a :class:`Features` over the whole pool and
stores it as data; a selector only reads it. ``select`` is pure: arrays in, ordered pool
positions out, no model and no I/O, so it is testable on hand-made inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np


@dataclass
class Features:
    """Per-example numbers over the whole pool, in pool order.

    ``embeddings``: (N, D) float32, or None when no selector asked for them.
    ``scores``: name → (N,) float64; NaN where an example was not scored (with a reason in
    ``skipped``, name → {position: reason}).
    ``extra``: other arrays of the pass, saved in the round's features.npz, never read by a
    selector (e.g. the projected gradient features of influence selection).
    """
    embeddings: np.ndarray | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: dict[str, dict[int, str]] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)   # saved with the round only

    def require(self, selector: str, score: str | None = None) -> None:
        """Raise ValueError naming what ``selector`` needs that the feature pass did not make."""
        if self.embeddings is None:
            raise ValueError(f"{selector} needs embeddings; the feature pass computed none")
        self.require_score(selector, score)

    def require_score(self, selector: str, score: str | None) -> None:
        """Raise ValueError when ``score`` was not computed (embeddings not needed)."""
        if score is not None and score not in self.scores:
            raise ValueError(f"{selector} needs score {score!r}; the feature pass computed: "
                             f"{', '.join(sorted(self.scores)) or 'none'}")


def scored_candidates(scores: np.ndarray, candidates: np.ndarray, n: int,
                      finite: bool = False) -> tuple[np.ndarray, int]:
    """The candidates (ascending) that have a score, and how many have none.

    A score is missing where it is NaN (also where it is infinite with ``finite``). Raises
    ValueError when fewer than ``n`` candidates have one: a score-reading rule never picks an
    unscored example (the loop's :class:`~evotune.selectors.filters.ScoredFirst` fills instead).
    """
    values = scores[candidates]
    missing = ~np.isfinite(values) if finite else np.isnan(values)
    scored = candidates[~missing]
    if len(scored) < n:
        what = "a finite score" if finite else "a score"
        raise ValueError(f"cannot pick {n}: only {len(scored)} of {len(candidates)} candidates "
                         f"have {what} ({int(missing.sum())} are "
                         f"{'NaN or inf' if finite else 'NaN'})")
    return scored, int(missing.sum())


@dataclass
class Selection:
    """Chosen pool positions in pick order, per-pick numbers (name → (n,) array), counts about
    the round's candidates (e.g. how many a filter removed, and why), and per-pick text
    (name → n strings, e.g. the validation subtask that drove an influence pick)."""
    positions: np.ndarray
    numbers: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, int | float | str] = field(default_factory=dict)
    labels: dict[str, list[str]] = field(default_factory=dict)


class Selector(Protocol):
    """A selection rule.

    ``needs_embeddings`` and ``scores`` say what the feature pass must compute for it.
    ``select`` picks ``n`` of ``candidates`` (pool positions, ascending) given the already
    selected ``labeled`` positions; ``rng`` is seeded per round by the loop.
    """
    name: ClassVar[str]
    needs_embeddings: ClassVar[bool]
    scores: ClassVar[tuple[str, ...]]

    def select(self, features: Features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator) -> Selection: ...

    def state_dict(self) -> dict: ...
