"""The selector registry and the rule that keeps ``selectors/`` pure."""

import ast
import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
from helpers import REPO

from evotune.selectors import registry
from evotune.selectors.base import (Features, NoOptions, Selection, Selector, ShardedSelector,
                                    option, out_of_range)
from evotune.selectors.filters import ScoredFirst, ScoreFiltered
from evotune.selectors.kcenter import KCenterSelector
from evotune.selectors.weighted import WeightedSelector

FORBIDDEN = ("evotune.trainer", "torch", "transformers", "peft", "deepspeed")


def imports_of(path):
    """Every module a file imports (absolute names; relative imports as '.name')."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append("." * node.level + (node.module or ""))
    return found


def test_selectors_import_nothing_that_runs_a_model():
    files = sorted((REPO / "selectors").glob("*.py"))
    assert len(files) >= 10
    bad = [(p.name, name) for p in files for name in imports_of(p)
           if name.startswith(".") or any(name == f or name.startswith(f + ".")
                                          for f in FORBIDDEN)]
    assert bad == []


def test_the_import_check_catches_a_forbidden_import(tmp_path):
    # The check above must be able to fail: the same reading flags these lines.
    f = tmp_path / "x.py"
    f.write_text("import torch.nn\nfrom evotune.trainer.data import X\nfrom . import y\n"
                 "def g():\n    import deepspeed\n")
    assert imports_of(f) == ["torch.nn", "evotune.trainer.data", ".", "deepspeed"]


class Section:
    """A stand-in for the config's selection section (the registry reads attributes only)."""

    def __init__(self, selector, filter_score=None, filter_max=None, filter_top_fraction=1.0,
                 **options):
        self.selector, self.first_round = selector, "selector"
        self.filter_score, self.filter_max = filter_score, filter_max
        self.filter_top_fraction = filter_top_fraction
        self.__dict__.update(options)


def test_build_reads_the_selectors_own_options_and_applies_the_wrapping_rule():
    plain = registry.build(Section("kcenter", kcenter=KCenterSelector.Options(chunk_size=8)))
    assert isinstance(plain, KCenterSelector) and plain.options.chunk_size == 8
    # reads a score and measures embeddings: the unscored fill; the fill's block is k-center's
    weighted = registry.build(Section(
        "weighted", weighted=WeightedSelector.Options("perplexity", alpha=0.25),
        kcenter=KCenterSelector.Options(chunk_size=16)))
    assert isinstance(weighted, ScoredFirst) and weighted.score == "perplexity"
    assert weighted.chunk_size == 16 and weighted.inner.options.alpha == 0.25
    # no embeddings: no fill; a filter wraps whatever the selector is
    influence = registry.build(Section("influence", filter_score="loss", filter_max=1.0))
    assert isinstance(influence, ScoreFiltered) and influence.inner.name == "influence"
    assert influence.scores == ("influence", "loss")
    with pytest.raises(ValueError, match="known: cluster_quota, facility_location, influence"):
        registry.build(Section("ifd"))


def test_every_registered_rule_declares_what_the_config_and_readme_read():
    for name, cls in {**registry.SELECTORS, "pre_experienced":
                      registry.FIRST_ROUND["pre_experienced"]}.items():
        assert cls.name == name and cls.doc and cls.logs
        assert hasattr(cls.Options, "__dataclass_fields__")
        selector = cls()                                  # defaults are a working selector
        assert selector.state_dict()["name"] == name
    assert set(registry.option_sections()) == {
        "kcenter", "weighted", "repr_filter", "cluster_quota", "facility_location", "lift",
        "pre_experienced"}


@dataclass
class _Every:
    """A toy rule: every ``step``-th candidate."""
    step: int = option(2, "take every step-th candidate")


class EveryStep:
    name, doc, logs = "every_step", "every step-th candidate", "–"
    Options = _Every
    needs_embeddings, scores = False, ()

    def __init__(self, options=None):
        self.options = options or _Every()

    def select(self, features, labeled, candidates, n, rng):
        return Selection(np.sort(candidates)[::self.options.step][:n])

    def state_dict(self):
        return {"name": self.name, "step": self.options.step}


def test_register_adds_a_selector_and_refuses_a_clash_or_a_missing_member(monkeypatch):
    monkeypatch.setattr(registry, "SELECTORS", dict(registry.SELECTORS))
    registry.register(EveryStep)
    assert registry.option_sections()["every_step"] is _Every
    sel = registry.build(Section("every_step", every_step=_Every(step=3)))
    assert sel.select(Features(), np.array([]), np.arange(10), 3, None).positions.tolist() \
        == [0, 3, 6]

    class Impostor(EveryStep):
        name = "kcenter"
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Impostor)

    class Half:
        name, Options = "half", NoOptions
    with pytest.raises(ValueError, match="lacks doc, logs, needs_embeddings, select, state_dict"):
        registry.register(Half)


@dataclass
class _Bounded:
    half_open: float = option(0.5, "in [0, 1)", ge=0, lt=1)
    positive: int = option(1, "> 0", gt=0)
    at_most: float = option(0.0, "<= 2", le=2)
    below: float = option(0.0, "< -1", lt=-1)
    maybe: Optional[float] = option(None, "> 0 when set", gt=0)
    free: float = option(0.0, "no bounds")


def test_out_of_range_reads_the_bounds_in_a_fields_metadata():
    f = {x.name: x for x in dataclasses.fields(_Bounded)}
    assert out_of_range(f["half_open"], 0) is None and out_of_range(f["half_open"], 0.999) is None
    assert out_of_range(f["half_open"], 1) == "must be in [0, 1), got 1"
    assert out_of_range(f["half_open"], -0.1) == "must be in [0, 1), got -0.1"
    assert out_of_range(f["positive"], 0) == "must be > 0, got 0"
    assert out_of_range(f["positive"], 1) is None
    assert out_of_range(f["at_most"], 2) is None
    assert out_of_range(f["at_most"], 2.5) == "must be <= 2, got 2.5"
    assert out_of_range(f["below"], -1) == "must be < -1, got -1"
    assert out_of_range(f["maybe"], None) is None and out_of_range(f["maybe"], -3.0) == \
        "must be > 0, got -3.0"
    assert out_of_range(f["free"], -1e300) is None
    with pytest.raises(ValueError, match="option path must be"):
        option("", "a path of another kind", path="somewhere")


def test_every_rule_and_wrapper_has_what_the_loop_calls():
    """The protocols the loop types its selectors with (selectors/base.py) hold for every rule
    the registry knows and for the wrappers; the rules with a sharded form, listed by hand from
    their files, are the ones that match ShardedSelector."""
    rules = [cls() for cls in (*registry.SELECTORS.values(),
                               *(c for c in registry.FIRST_ROUND.values() if c is not None))]
    assert all(isinstance(rule, Selector) for rule in rules)
    assert sorted(r.name for r in rules if isinstance(r, ShardedSelector)) == [
        "cluster_quota", "influence", "kcenter", "lift", "rds", "repr_filter", "weighted"]
    location = registry.SELECTORS["facility_location"].Options()
    filtered = registry.build(Section("facility_location", filter_score="loss", filter_max=1.0,
                                      facility_location=location))
    filled = registry.build(Section("weighted",
                                    weighted=WeightedSelector.Options("perplexity")))
    for wrapper in (filtered, filled):
        assert isinstance(wrapper, (ScoreFiltered, ScoredFirst))
        assert isinstance(wrapper, ShardedSelector)
    # a wrapper is sharded exactly when the rule inside is
    assert not filtered.sharded and filled.sharded
    # the check can fail: a rule without state_dict is not a Selector
    assert not isinstance(NoStateDict(), Selector)


class NoStateDict:
    name, needs_embeddings, scores = "every_step", False, ()

    def select(self, features, labeled, candidates, n, rng):
        return Selection(np.sort(candidates)[:n])
