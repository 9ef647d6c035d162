"""What selectors read and return, and how a selector declares itself.

Model-facing work (the passes under ``trainer/passes/``) produces a :class:`Features` over the
whole pool and stores it as data; a selector only reads it. ``select`` is pure: arrays in,
ordered pool positions out, no model and no I/O, so it is testable on hand-made inputs.
Nothing under ``selectors/`` imports torch, transformers, peft, deepspeed or ``evotune.trainer``
(``tests/selectors/test_registry.py`` reads every import to keep it so).

A selector is a class with (``selectors/kcenter.py`` is the model to copy):

- ``name``: its key in ``selection.selector`` and in ``selectors/registry.py``;
- ``doc`` and ``logs``: one line each, what it picks and the numbers it logs per pick (the
  docs/selectors.md's table and ``--help-config`` are generated from them);
- ``Options``: a dataclass of its settings, every field made with :func:`option` (its doc,
  and its allowed values or bounds, checked by the config); the config reads them under
  ``selection.<name>.<field>``, from the field of ``SelectionConfig`` (``trainer/config.py``)
  that names the class. A ``check()`` method, when present, raises ValueError
  (``"field: problem"``) on an impossible combination of fields;
- ``needs_embeddings`` and ``scores``: what the feature pass must compute for it (``scores``
  may depend on the options: set it in ``__init__``);
- ``__init__(options)``, ``select(features, labeled, candidates, n, rng)`` and
  ``state_dict()`` (the settings written to the round's ``selector_state.json``);
- optionally ``scale`` (a line for docs/selectors.md on what the rule holds where on many ranks),
  and ``sharded`` with ``select_sharded`` to select with the rows spread over ranks.

What the round loop uses of a built selector is typed by the protocols at the end of this
file: :class:`Selector`, and :class:`ShardedSelector` for the sharded members.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np


def option(default: Any, doc: str, *, choices: tuple | Callable[[], tuple] | None = None,
           gt: float | None = None, ge: float | None = None, lt: float | None = None,
           le: float | None = None, score: bool = False, safe: bool = False,
           path: str | None = None):
    """A settings field with its default and a one-line doc: every field of the run config
    (``trainer/config.py``) and of a selector's or a score's ``Options`` is made with it.

    ``choices``: the allowed values (a tuple, or a function returning one, read when the config
    is checked: e.g. the registered selectors). ``gt``, ``ge``, ``lt``, ``le``: bounds of a
    number (>, >=, <, <=), checked by the config (:func:`out_of_range`). ``score=True``: the
    value names a score (the config checks it against the score registry,
    ``trainer/scores.py``). ``safe=True``: changing it leaves results unchanged (a memory bound,
    say), so a resumed run may change it, with a warning.

    ``path``: the value is a path. ``"input"``: relative to the YAML file that names it (on the
    command line, to the current directory); ``"file"`` and ``"model"`` likewise, and the
    config also checks that the input file or the local model dir (``config.json``) exists
    (``embedded:...`` is a model too); ``"output"``: always relative to the current directory.
    """
    if path not in (None, "input", "file", "model", "output"):
        raise ValueError(f"option path must be input, file, model or output, got {path!r}")
    meta = {"doc": doc, "choices": choices, "gt": gt, "ge": ge, "lt": lt, "le": le,
            "score": score, "safe": safe,
            "path": "output" if path == "output" else "input" if path else None,
            "exists": path if path in ("file", "model") else None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


_BOUNDS = {"gt": (operator.gt, ">"), "ge": (operator.ge, ">="), "lt": (operator.lt, "<"),
           "le": (operator.le, "<=")}


def out_of_range(f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with ``value`` for the bounds of field ``f`` (made with :func:`option`),
    e.g. ``"must be in [0, 1), got 1.5"``; None when it is inside them or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    bounds = {op: f.metadata[op] for op in _BOUNDS if f.metadata.get(op) is not None}
    if all(_BOUNDS[op][0](value, bound) for op, bound in bounds.items()):
        return None
    low = next(((op, b) for op, b in bounds.items() if op in ("gt", "ge")), None)
    high = next(((op, b) for op, b in bounds.items() if op in ("lt", "le")), None)
    if low and high:
        return (f"must be in {'[' if low[0] == 'ge' else '('}{low[1]}, "
                f"{high[1]}{']' if high[0] == 'le' else ')'}, got {value}")
    op, bound = low or high
    return f"must be {_BOUNDS[op][1]} {bound}, got {value}"


@dataclass
class NoOptions:
    """The ``Options`` of a selector without settings."""


def options_dict(options) -> dict:
    """The settings of an ``Options`` instance as a plain dict (for ``state_dict``)."""
    return dataclasses.asdict(options)


@dataclass
class Features:
    """Per-example numbers over the whole pool, in pool order.

    ``embeddings``: (N, D) float32, or None when no selector asked for them.
    ``scores``: name → (N,) float64; NaN where an example was not scored (with a reason in
    ``skipped``, name → {position: reason}).
    ``extra``: other arrays of the pass, saved in the round's features.npz, never read by a
    selector (e.g. the projected gradient features of influence selection).
    ``positions``: None for the whole pool; else this rank's shard (ascending pool positions):
    row k of ``embeddings`` and value k of each score belong to ``positions[k]``. Only a
    sharded rule's ``select_sharded`` gets a shard.
    """
    embeddings: np.ndarray | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: dict[str, dict[int, str]] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)   # saved with the round only
    positions: np.ndarray | None = None

    def as_one_shard(self) -> "Features":
        """The whole pool as one rank's shard (no copy of the rows): how a sharded rule's
        one-process ``select`` calls its ``select_sharded``."""
        return Features(self.embeddings, self.scores, self.skipped, self.extra,
                        np.arange(len(self.embeddings)))

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


@runtime_checkable
class Selector(Protocol):
    """A selection rule as the round loop and the feature pass use it: every class in
    ``registry.SELECTORS`` and ``registry.FIRST_ROUND``, and the two wrappers of ``filters.py``
    that :func:`~evotune.selectors.registry.build` may put around one.

    ``select`` picks ``n`` of ``candidates`` (pool positions, ascending) given the already
    selected ``labeled`` positions; ``rng`` is seeded per round by the loop. ``state_dict``:
    the settings written to the round's ``selector_state.json``. ``needs_embeddings`` and
    ``scores``: what the feature pass computes for it.

    A registered class also has ``doc``, ``logs`` and ``Options`` (the module docstring), read
    from the class by the registry and the docs; the wrappers have none of them.
    """
    name: str
    needs_embeddings: bool
    scores: tuple[str, ...]

    def select(self, features: Features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator) -> Selection: ...

    def state_dict(self) -> dict: ...


@runtime_checkable
class ShardedSelector(Selector, Protocol):
    """A rule that can also select with its rows spread over ranks.

    When ``sharded`` is true and the round's scores can be computed on every rank, the feature
    pass leaves each rank its own rows (``Features.positions``) and the loop calls
    ``select_sharded(shard, labeled, candidates, n, rng, comm)`` on every rank, with the run's
    collectives as ``comm`` (``selectors/sharded.py``); it picks what ``select`` picks on the
    whole pool (k-center: :func:`~evotune.selectors.kcenter.kcenter_sharded`). ``sharded`` may
    depend on the options (cluster_quota's ``kmeans``) or, in a wrapper, on the rule inside.
    """
    @property
    def sharded(self) -> bool: ...

    def select_sharded(self, shard: Features, labeled: np.ndarray, candidates: np.ndarray,
                       n: int, rng: np.random.Generator, comm) -> Selection: ...
