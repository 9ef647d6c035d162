"""Selector names (the config's ``selection.selector``) → classes. A plain dict, no import magic."""

from __future__ import annotations

from evotune.selectors.kcenter import KCenterSelector
from evotune.selectors.random import RandomSelector

SELECTORS = {cls.name: cls for cls in (KCenterSelector, RandomSelector)}


def build_selector(name: str, **options):
    """Instantiate the selector called ``name``; raise ValueError listing the known names."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; known: {', '.join(sorted(SELECTORS))}")
    return SELECTORS[name](**options)
