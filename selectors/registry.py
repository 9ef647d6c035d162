"""Selector names (the config's ``selection.selector``) → classes. A plain dict, no import magic."""

from __future__ import annotations

from evotune.selectors.kcenter import KCenterSelector
from evotune.selectors.random import RandomSelector
from evotune.selectors.weighted import WeightedSelector

SELECTORS = {cls.name: cls for cls in (KCenterSelector, RandomSelector, WeightedSelector)}


def build_selector(name: str, **options):
    """Instantiate the selector called ``name``; raise ValueError listing the known names."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; known: {', '.join(sorted(SELECTORS))}")
    return SELECTORS[name](**options)


def options_from_config(selection) -> dict:
    """The constructor arguments of ``selection.selector`` taken from the config section."""
    s = selection
    return {
        "kcenter": {"chunk_size": s.chunk_size, "filter_score": s.filter_score,
                    "filter_max": s.filter_max, "filter_top_fraction": s.filter_top_fraction},
        "random": {},
        "weighted": {"score": s.score, "alpha": s.alpha, "chunk_size": s.chunk_size},
    }[s.selector]
