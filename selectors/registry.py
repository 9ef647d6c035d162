"""Selector names (the config's ``selection.selector``) → classes. A plain dict, no import magic."""

from __future__ import annotations

from evotune.selectors.cluster_quota import ClusterQuotaSelector
from evotune.selectors.facility_location import FacilityLocationSelector
from evotune.selectors.filters import ScoredFirst, ScoreFiltered
from evotune.selectors.influence import InfluenceSelector
from evotune.selectors.kcenter import KCenterSelector
from evotune.selectors.random import RandomSelector
from evotune.selectors.repr_filter import RepresentationFilterSelector
from evotune.selectors.weighted import WeightedSelector

SELECTORS = {cls.name: cls for cls in (KCenterSelector, RandomSelector, WeightedSelector,
                                       RepresentationFilterSelector, ClusterQuotaSelector,
                                       FacilityLocationSelector, InfluenceSelector)}


def build_selector(name: str, **options):
    """Instantiate the selector called ``name``; raise ValueError listing the known names."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; known: {', '.join(sorted(SELECTORS))}")
    return SELECTORS[name](**options)


def selector_from_config(selection):
    """The round's selector from the config section: a score-reading rule wrapped in
    :class:`ScoredFirst` (unscored candidates only fill a shortfall), then in the score filter
    when ``selection.filter_score`` is set."""
    selector = build_selector(selection.selector, **options_from_config(selection))
    if selector.scores and selector.needs_embeddings:
        selector = ScoredFirst(selector, selector.scores[0], selection.chunk_size)
    if selection.filter_score:
        selector = ScoreFiltered(selector, selection.filter_score, selection.filter_max,
                                 selection.filter_top_fraction)
    return selector


def options_from_config(selection) -> dict:
    """The constructor arguments of ``selection.selector`` taken from the config section."""
    s = selection
    return {
        "kcenter": {"chunk_size": s.chunk_size},
        "random": {},
        "weighted": {"score": s.score, "alpha": s.alpha, "chunk_size": s.chunk_size},
        "repr_filter": {"score": s.score, "threshold": s.repr_threshold},
        "cluster_quota": {"score": s.score, "n_clusters": s.n_clusters, "quota": s.quota,
                          "pick": s.cluster_pick},
        "facility_location": {"score": s.score, "weighted": s.facility_weighted},
        "influence": {},
    }[s.selector]
