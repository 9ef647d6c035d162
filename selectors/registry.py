"""Every selector by name: the one list that config validation, ``--help-config``, the table
in docs/selectors.md and the round loop read.

Adding a selector is one file plus two lines: write ``selectors/<name>.py`` with a class shaped
like :class:`~evotune.selectors.kcenter.KCenterSelector` (see ``selectors/base.py``), add it
to :data:`SELECTORS` below and, when it has settings, name its ``Options`` as a field of
``SelectionConfig`` in ``trainer/config.py`` (a test checks the two agree). From your own launch
script, :func:`register` adds one without editing evotune (call it before the config is loaded;
its settings become a ``selection.<name>`` section all the same). docs/extending.md's "Adding a
selector or a score" walks through both.
"""

from __future__ import annotations

from evotune.selectors.base import NoOptions
from evotune.selectors.cluster_quota import ClusterQuotaSelector
from evotune.selectors.facility_location import FacilityLocationSelector
from evotune.selectors.filters import ScoredFirst, ScoreFiltered
from evotune.selectors.influence import InfluenceSelector
from evotune.selectors.kcenter import KCenterSelector
from evotune.selectors.lift import LiftSelector
from evotune.selectors.pre_experienced import PreExperiencedSelector
from evotune.selectors.random import RandomSelector
from evotune.selectors.rds import RdsSelector
from evotune.selectors.repr_filter import RepresentationFilterSelector
from evotune.selectors.weighted import WeightedSelector

# selection.selector: the rule of every round after round 0 (and of round 0 with
# selection.first_round: selector). Order = docs/selectors.md's table order.
SELECTORS: dict[str, type] = {cls.name: cls for cls in (
    KCenterSelector, RandomSelector, WeightedSelector, RepresentationFilterSelector,
    ClusterQuotaSelector, FacilityLocationSelector, InfluenceSelector, RdsSelector,
    LiftSelector)}

# selection.first_round: how round 0 is chosen. "selector" = the run's selector on the base
# model; the others are rules of their own (pre_experienced reads features of the prompts
# alone, so it can choose round 0 only).
FIRST_ROUND: dict[str, type | None] = {"random": RandomSelector, "selector": None,
                                       "pre_experienced": PreExperiencedSelector}

# What a rule without its own ``scale`` line does on many ranks (docs/selectors.md's table).
GATHERED = "rank 0: the features gathered there"

_MEMBERS = ("name", "doc", "logs", "Options", "needs_embeddings", "scores", "select",
            "state_dict")


def register(cls: type) -> type:
    """Add a selector class to :data:`SELECTORS` (e.g. from your own launch script, before
    the config is loaded); returns the class. Raises ValueError naming a missing member or a
    name that is taken."""
    missing = [m for m in _MEMBERS if m != "scores" and not hasattr(cls, m)]
    if not missing and not hasattr(cls(), "scores"):   # may be set from the options
        missing = ["scores"]
    if missing:
        raise ValueError(f"selector {cls.__name__} lacks {', '.join(missing)} (see "
                         f"selectors/base.py)")
    if cls.name in SELECTORS and SELECTORS[cls.name] is not cls:
        raise ValueError(f"a selector named {cls.name!r} is already registered "
                         f"({SELECTORS[cls.name].__name__})")
    SELECTORS[cls.name] = cls
    return cls


def option_sections() -> dict[str, type]:
    """Name → ``Options`` dataclass of every rule that has settings (the config's
    ``selection.<name>`` sections), selectors first, then the round-0 rules."""
    rules = [*SELECTORS.values(), *(c for c in FIRST_ROUND.values() if c is not None)]
    return {cls.name: cls.Options for cls in rules if cls.Options is not NoOptions}


def options_of(selection, name: str):
    """The ``Options`` instance of rule ``name`` in a ``selection`` settings object (the
    config's section; ``None``-free: a rule without settings gets ``NoOptions()``)."""
    return getattr(selection, name, None) or NoOptions()


def build(selection):
    """The round selector described by ``selection`` (the config's ``selection`` section, or
    anything with the same attributes): ``selection.selector`` with its options from
    ``selection.<name>``, then the two wrappers, by one rule each:

    - a selector that reads a score *and* measures embeddings is wrapped in
      :class:`~evotune.selectors.filters.ScoredFirst` on its first score: unscored candidates
      are never picked by the rule, and only fill a shortfall by k-center (flagged);
    - with ``selection.filter_score`` set, the result is wrapped in
      :class:`~evotune.selectors.filters.ScoreFiltered`: the selector runs over the candidates
      that pass the filter first.

    Raises ValueError naming an unknown selector (and the known ones) or a bad option.
    """
    name = selection.selector
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; known: {', '.join(sorted(SELECTORS))}")
    selector = SELECTORS[name](options_of(selection, name))
    if selector.scores and selector.needs_embeddings:
        kcenter = getattr(selection, KCenterSelector.name, None) or KCenterSelector.Options()
        chunk = kcenter.chunk_size          # the fill is k-center: its memory bound
        selector = ScoredFirst(selector, selector.scores[0], chunk)
    if selection.filter_score:
        selector = ScoreFiltered(selector, selection.filter_score, selection.filter_max,
                                 selection.filter_top_fraction,
                                 getattr(selection, "filter_keep", "highest"))
    return selector


def build_first_round(selection):
    """The selector of round 0 (``selection.first_round``); raises ValueError on an unknown
    rule."""
    how = selection.first_round
    if how not in FIRST_ROUND:
        raise ValueError(f"unknown first_round {how!r}; known: {', '.join(FIRST_ROUND)}")
    if FIRST_ROUND[how] is None:
        return build(selection)
    cls = FIRST_ROUND[how]
    return cls(options_of(selection, cls.name))
