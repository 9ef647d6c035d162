"""Config loading: every preset loads, bad input names the key, budgets, overrides, paths."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from evotune.selectors import registry as selector_registry
from evotune.selectors.base import Selection, option
from evotune.trainer import config as config_module
from evotune.trainer import scores as score_registry
from evotune.trainer.config import (Config, ConfigError, ScoringConfig, SelectionConfig,
                                    config_from_dict, describe, load_config, parse_override,
                                    resolve_budget, result_keys, safe_keys)
from evotune.trainer.data import load_examples

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(p for ext in ("yaml", "yml") for p in CONFIGS.rglob(f"*.{ext}"))


@pytest.fixture
def pool(tmp_path) -> Path:
    """A one-row pool file, so that a config validates."""
    p = tmp_path / "pool.jsonl"
    p.write_text('{"instruction": "Say hi.", "output": "Hi."}\n')
    return p


def load(pool: Path, *overrides: str) -> Config:
    return load_config(None, [f"data.pool={pool}", *overrides])


def config_error(pool: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(pool, *overrides)
    return str(e.value)


def write_yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- presets

def test_presets_exist():
    assert PRESETS, f"no YAML presets found under {CONFIGS}"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_preset_loads_from_any_cwd_and_its_budget_fits_its_pool(preset, tmp_path,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)  # presets must not depend on where the launcher runs
    cfg = load_config(preset)
    assert Path(cfg.data.pool).is_file()
    if cfg.eval.path:
        assert Path(cfg.eval.path).is_file()
    examples, _ = load_examples(cfg.data.pool, cfg.data.on_error, cfg.data.max_examples)
    budget = resolve_budget(cfg, len(examples))
    assert len(budget) == cfg.selection.rounds


# ----------------------------------------------------------------------------- unknown keys

def test_unknown_top_level_section_in_yaml_is_named(tmp_path, pool):
    path = write_yaml(tmp_path / "c.yaml", f"data:\n  pool: {pool}\ntrainer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="'trainer'"):
        load_config(path)


def test_unknown_nested_key_in_yaml_is_named(tmp_path, pool):
    path = write_yaml(tmp_path / "c.yaml", f"data:\n  pool: {pool}\ntrain:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"'train\.learning_rate'"):
        load_config(path)


@pytest.mark.parametrize("override, key", [
    ("train.lrr=0.1", "'train.lrr'"),
    ("trainer.lr=0.1", "'trainer.lr'"),
    ("train.lr.peak=0.1", "'train.lr.peak'"),   # a value is not a section
])
def test_unknown_override_key_is_named(pool, override, key):
    assert key in config_error(pool, override)


# ----------------------------------------------------------------------------- wrong types

@pytest.mark.parametrize("override, key", [
    ("train.lr=abc", "train.lr"),
    ("selection.rounds=2.5", "selection.rounds"),
    ("lora.enabled=yes-please", "lora.enabled"),
    ("seed=true", "seed"),
    ("lora.target_modules=q_proj", "lora.target_modules"),
    ("lora.target_modules=[q_proj, 3]", "lora.target_modules[1]"),
    ("selection.init_size=abc", "selection.init_size"),
    ("selection.per_round=[4, abc]", "selection.per_round"),
    ("train=3", "train"),
])
def test_wrong_type_names_the_key(pool, override, key):
    message = config_error(pool, override)
    assert message.startswith(f"{key}:"), message


# ----------------------------------------------------------------------------- impossible values

@pytest.mark.parametrize("overrides, key", [
    (["selection.per_round=0"], "selection.per_round"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.lr=-1e-4"], "train.lr"),
    (["lora.dropout=1.5"], "lora.dropout"),
    (["train.warmup_ratio=1.0"], "train.warmup_ratio"),
    (["data.max_length=4"], "data.max_length"),
    (["selection.init_size=1.5"], "selection.init_size"),
    (["selection.init_size=0"], "selection.init_size"),
    (["selection.rounds=3", "selection.per_round=[4]"], "selection.per_round"),
    (["selection.rounds=3", "selection.per_round=[4, 0]"], "selection.per_round[1]"),
    (["selection.rounds=3", "selection.per_round=[4, 1.5]"], "selection.per_round[1]"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["selection.selector=best"], "selection.selector"),
    (["lora.target_modules=[]"], "lora.target_modules"),
    (["data.pool="], "data.pool"),
    (["scoring.linear.rule=0.5*bogus"], "scoring.linear.rule"),
    (["scoring.linear.rule=0.5*loss 2*length"], "scoring.linear.rule"),
    (["scoring.linear.rule=1*linear"], "scoring.linear.rule"),
    (["selection.selector=weighted", "selection.weighted.score=linear"], "scoring.linear.rule"),
    (["selection.filter_score=linear"], "scoring.linear.rule"),
    (["scoring.knn_k.k=0"], "scoring.knn_k.k"),
    (["selection.first_round=kmeans"], "selection.first_round"),
    (["selection.pre_experienced.n_clusters=0"], "selection.pre_experienced.n_clusters"),
    (["selection.pre_experienced.low=80"], "selection.pre_experienced.up"),
    (["selection.weighted.alpha=1.5"], "selection.weighted.alpha"),
    (["selection.weighted.score=bogus"], "selection.weighted.score"),
    (["selection.repr_filter.threshold=2"], "selection.repr_filter.threshold"),
    (["selection.cluster_quota.quota=most"], "selection.cluster_quota.quota"),
    (["selection.cluster_quota.n_clusters=0"], "selection.cluster_quota.n_clusters"),
    (["selection.kcenter.chunk_size=0"], "selection.kcenter.chunk_size"),
    (["selection.facility_location.max_candidates=0"],
     "selection.facility_location.max_candidates"),
    (["selection.stop_when.window=-1"], "selection.stop_when.window"),
    (["selection.stop_when.window=2"], "selection.stop_when.window"),      # no eval set
    (["selection.stop_when.min_gain=-0.1"], "selection.stop_when.min_gain"),
    (["selection.selector=rds"], "scoring.rds.targets"),
    (["scoring.rds.targets=/no/such/file.jsonl"], "scoring.rds.targets"),
    (["selection.pooling=max"], "selection.pooling"),
    (["train.max_grad_norm=.inf"], "train.max_grad_norm"),
    (["train.weight_decay=.nan"], "train.weight_decay"),
    (["influence.beta=.inf"], "influence.beta"),
    (["selection.filter_max=.nan"], "selection.filter_max"),
    (["train.lr=.nan"], "train.lr"),
    (["output.dir="], "output.dir"),
    (["output.dir=/"], "output.dir"),
    (["output.dir=~"], "output.dir"),
    (["scoring.template=alpaca"], "scoring.template"),
    (["influence.checkpoints=all", "influence.candidates=0.5"], "influence.checkpoints"),
    (["influence.candidates=0"], "influence.candidates"),
    (["influence.label_smoothing=0.5"], "influence.label_smoothing"),
    (["selection.selector=influence"], "influence.validation"),
])
def test_impossible_value_names_the_key(pool, overrides, key):
    message = config_error(pool, *overrides)
    assert message.startswith(f"{key}:"), message


def test_per_round_list_length_error_gives_both_lengths(pool):
    message = config_error(pool, "selection.rounds=4", "selection.per_round=[4, 4]")
    assert "2 entries" in message and "needs 3" in message


def test_empty_target_modules_is_fine_without_lora(pool):
    assert load(pool, "lora.enabled=false", "lora.target_modules=[]").lora.target_modules == []


@pytest.mark.parametrize("key", ["data.pool", "eval.path"])
def test_missing_data_file_names_key_and_path(pool, tmp_path, key):
    missing = tmp_path / "nowhere" / "rows.jsonl"
    message = config_error(pool, f"{key}={missing}")
    assert message.startswith(f"{key}:") and str(missing) in message


def test_missing_yaml_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write_yaml(tmp_path / "c.yaml", "- train\n- lr\n"))


# ----------------------------------------------------------------------------- budget

def budget_config(pool: Path, rounds: int, init_size, per_round) -> Config:
    per = json.dumps(per_round)
    return load(pool, f"selection.rounds={rounds}", f"selection.init_size={init_size}",
                f"selection.per_round={per}")


def test_budget_in_counts(pool):
    assert resolve_budget(budget_config(pool, 3, 24, 10), 100) == [24, 10, 10]


def test_budget_as_fractions_rounds_down(pool):
    # 0.1 * 95 = 9.5 -> 9; 0.05 * 95 = 4.75 -> 4
    assert resolve_budget(budget_config(pool, 3, 0.1, 0.05), 95) == [9, 4, 4]


def test_budget_tiny_fraction_is_at_least_one(pool):
    # 0.01 * 50 = 0.5 -> at least 1 example
    assert resolve_budget(budget_config(pool, 2, 0.01, 0.01), 50) == [1, 1]


def test_budget_fraction_of_exact_count_is_not_lost_to_float_rounding(pool):
    # 29% of 100 rows is 29 rows, although 0.29 * 100 == 28.999999999999996 in floating point.
    assert resolve_budget(budget_config(pool, 2, 0.29, 0.57), 100) == [29, 57]


def test_budget_schedule_list_mixes_counts_and_fractions(pool):
    # round 0: 2; then 5, 0.25 * 40 = 10, 3
    assert resolve_budget(budget_config(pool, 4, 2, [5, 0.25, 3]), 40) == [2, 5, 10, 3]


def test_budget_single_round_has_no_later_rounds(pool):
    assert resolve_budget(budget_config(pool, 1, 7, []), 10) == [7]


def test_budget_equal_to_pool_is_accepted(pool):
    assert resolve_budget(budget_config(pool, 3, 24, 24), 72) == [24, 24, 24]


def test_budget_larger_than_pool_names_selection_and_the_numbers(pool):
    cfg = budget_config(pool, 3, 24, 24)
    with pytest.raises(ConfigError) as e:
        resolve_budget(cfg, 50)
    message = str(e.value)
    assert message.startswith("selection")
    assert "24 + 24 + 24 = 72" in message and "50" in message


# ----------------------------------------------------------------------------- overrides

@pytest.mark.parametrize("text, key, value", [
    ("train.lr=1e-4", "train.lr", 1e-4),
    ("train.lr=2.0e-4", "train.lr", 2e-4),
    ("selection.rounds=5", "selection.rounds", 5),
    ("selection.per_round=[1,2]", "selection.per_round", [1, 2]),
    ("selection.per_round=[0.5, 3]", "selection.per_round", [0.5, 3]),
    ("lora.enabled=false", "lora.enabled", False),
    ("lora.enabled=true", "lora.enabled", True),
    ("output.dir=runs/a=b", "output.dir", "runs/a=b"),
    ("data.pool=", "data.pool", ""),
])
def test_parse_override_reads_yaml_values(text, key, value):
    parsed_key, parsed = parse_override(text)
    assert parsed_key == key
    assert parsed == value and type(parsed) is type(value)


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="train.lr"):
        parse_override("train.lr")


def test_overrides_reach_the_config_with_their_types(pool):
    cfg = load(pool, "train.lr=1e-4", "selection.rounds=3", "selection.per_round=[1,2]",
               "lora.enabled=false")
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.selection.per_round == [1, 2]
    assert cfg.lora.enabled is False


def test_yaml_float_without_dot_is_a_float(tmp_path, pool):
    # YAML 1.1 reads 1e-4 as the string "1e-4"
    cfg = load_config(write_yaml(tmp_path / "c.yaml", f"data:\n  pool: {pool}\ntrain:\n  lr: 1e-4\n"))
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)


def test_override_wins_over_yaml(tmp_path, pool):
    path = write_yaml(tmp_path / "c.yaml", f"data:\n  pool: {pool}\ntrain:\n  lr: 0.1\n")
    assert load_config(path, ["train.lr=0.2"]).train.lr == 0.2


# ----------------------------------------------------------------------------- relative paths

def test_relative_paths_in_yaml_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    conf_dir = tmp_path / "conf"
    write_yaml(conf_dir / "data" / "pool.jsonl", '{"instruction": "a", "output": "b"}\n')
    write_yaml(conf_dir / "data" / "eval.jsonl", '{"instruction": "c", "output": "d"}\n')
    path = write_yaml(conf_dir / "run.yaml", "data:\n  pool: data/pool.jsonl\n"
                      "eval:\n  path: data/eval.jsonl\noutput:\n  dir: runs/x\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    base = conf_dir.resolve()
    assert cfg.data.pool == str(base / "data" / "pool.jsonl")
    assert cfg.eval.path == str(base / "data" / "eval.jsonl")
    # Outputs are not inputs: output.dir is relative to where the run is started.
    assert cfg.output.dir == str(elsewhere.resolve() / "runs" / "x")


def test_relative_model_path_in_yaml_resolves_against_the_yaml_folder(tmp_path, monkeypatch,
                                                                      pool):
    conf_dir = tmp_path / "conf"
    path = write_yaml(conf_dir / "run.yaml", f"data:\n  pool: {pool}\nmodel:\n  path: models/tiny\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(path).model.path == str(conf_dir.resolve() / "models" / "tiny")


def test_embedded_model_spec_is_not_treated_as_a_path(tmp_path, pool):
    path = write_yaml(tmp_path / "run.yaml",
                      f"data:\n  pool: {pool}\nmodel:\n  path: embedded:smollm2-135m-instruct\n")
    assert load_config(path).model.path == "embedded:smollm2-135m-instruct"


def test_relative_paths_on_the_command_line_resolve_against_cwd(tmp_path, monkeypatch):
    conf_dir, cwd = tmp_path / "conf", tmp_path / "cwd"
    write_yaml(cwd / "pool.jsonl", '{"instruction": "a", "output": "b"}\n')
    write_yaml(conf_dir / "pool.jsonl", '{"instruction": "a", "output": "b"}\n')  # a decoy
    path = write_yaml(conf_dir / "run.yaml", "output:\n  dir: runs/from-yaml\n")
    monkeypatch.chdir(cwd)
    cfg = load_config(path, ["data.pool=pool.jsonl", "output.dir=runs/cli"])
    assert cfg.data.pool == str(cwd.resolve() / "pool.jsonl")
    assert cfg.output.dir == str(cwd.resolve() / "runs" / "cli")


def test_absolute_path_in_yaml_is_kept(tmp_path, pool):
    path = write_yaml(tmp_path / "conf" / "run.yaml", f"data:\n  pool: {pool}\n")
    assert load_config(path).data.pool == str(pool)


# ----------------------------------------------------------------------------- hash, docs, round trip

def test_results_hash_changes_with_a_result_key_only(pool, tmp_path):
    base = load(pool).results_hash()
    assert load(pool, "train.lr=1e-3").results_hash() != base
    assert load(pool, "seed=1").results_hash() != base
    assert load(pool, "train.log_every=10").results_hash() == base
    assert load(pool, f"output.dir={tmp_path / 'elsewhere'}").results_hash() == base


def test_safe_keys_are_real_keys_and_disjoint_from_result_keys():
    keys = set(Config().flat())
    safe = safe_keys()
    assert safe <= keys and result_keys() == keys - safe
    assert "train.lr" in result_keys() and "train.log_every" not in result_keys()
    # memory bounds of a selector's or a score's own options are declared safe where they live
    assert {"selection.kcenter.chunk_size", "selection.weighted.chunk_size",
            "scoring.knn_k.chunk_size", "selection.rounds", "output.dir"} <= safe
    assert {"selection.weighted.alpha", "scoring.linear.rule"} <= result_keys()


# ----------------------------------------------------------------------------- declared sections

def _rule_sections(base: type) -> dict[str, type]:
    """The fields of ``base`` that hold a rule's or a score's options (declared outside this
    module), in order."""
    hints = typing.get_type_hints(base)
    return {f.name: hints[f.name] for f in dataclasses.fields(base)
            if dataclasses.is_dataclass(hints[f.name])
            and hints[f.name].__module__ != config_module.__name__}


def _built_in(sections: dict[str, type]) -> dict[str, type]:
    return {name: options for name, options in sections.items()
            if options.__module__.startswith("evotune.")}


def test_the_config_declares_the_settings_of_every_rule_and_score_in_registry_order():
    """SelectionConfig and ScoringConfig name each built-in rule's and score's options as a
    field (so an IDE and a type checker see ``cfg.selection.kcenter.chunk_size``): a rule or a
    score with settings added to its registry but not here fails, as does a stale field."""
    assert list(_rule_sections(SelectionConfig).items()) == list(
        _built_in(selector_registry.option_sections()).items())
    assert list(_rule_sections(ScoringConfig).items()) == list(
        _built_in(score_registry.option_sections()).items())
    assert "kcenter" in _rule_sections(SelectionConfig)       # the check can see a section
    cfg = Config()
    assert type(cfg.selection) is SelectionConfig and type(cfg.scoring) is ScoringConfig
    assert cfg.selection.kcenter.chunk_size == 4096 and cfg.scoring.knn_k.k == 6


@dataclass
class _EveryOptions:
    step: int = option(2, "take every step-th candidate", gt=0, le=5)


class _Every:
    """A rule registered from outside evotune, with settings."""
    name, doc, logs, Options = "every", "every step-th candidate", "–", _EveryOptions
    needs_embeddings, scores = False, ()

    def __init__(self, options=None):
        self.options = options or _EveryOptions()

    def select(self, features, labeled, candidates, n, rng):
        return Selection(np.sort(candidates)[::self.options.step][:n])

    def state_dict(self):
        return {"name": self.name}


def test_a_rule_registered_from_outside_brings_its_settings_section(pool, monkeypatch):
    monkeypatch.setattr(selector_registry, "SELECTORS", dict(selector_registry.SELECTORS))
    selector_registry.register(_Every)
    cfg = load(pool, "selection.selector=every", "selection.every.step=3")
    assert cfg.selection.every == _EveryOptions(step=3) and isinstance(cfg.selection,
                                                                      SelectionConfig)
    assert cfg.flat()["selection.every.step"] == 3 and "selection.every.step" in result_keys()
    assert "[selection.every]  settings of the every selector" in describe()
    assert config_error(pool, "selection.every.step=6") == \
        "selection.every.step: must be in (0, 5], got 6"


def test_a_registered_rule_named_like_a_setting_is_refused(monkeypatch):
    class Rounds(_Every):
        name = "rounds"
    monkeypatch.setattr(selector_registry, "SELECTORS", dict(selector_registry.SELECTORS))
    selector_registry.register(Rounds)
    with pytest.raises(ValueError, match="selector 'rounds' has the name of a SelectionConfig"):
        Config()


# ----------------------------------------------------------------------------- bounds

@pytest.mark.parametrize("override, message", [
    ("train.lr=0", "train.lr: must be > 0, got 0.0"),
    ("lora.r=0", "lora.r: must be > 0, got 0"),
    ("train.weight_decay=-0.5", "train.weight_decay: must be >= 0, got -0.5"),
    ("data.max_length=7", "data.max_length: must be >= 8, got 7"),
    ("lora.dropout=1", "lora.dropout: must be in [0, 1), got 1.0"),
    ("influence.label_smoothing=0.5", "influence.label_smoothing: must be in [0, 0.5), got 0.5"),
    ("selection.filter_top_fraction=0", "selection.filter_top_fraction: must be in (0, 1], "
                                        "got 0.0"),
    ("selection.weighted.alpha=-0.25", "selection.weighted.alpha: must be in [0, 1], got -0.25"),
    ("selection.lift.keep=1.5", "selection.lift.keep: must be in (0, 1], got 1.5"),
    ("scoring.loss_excess.block_mb=0", "scoring.loss_excess.block_mb: must be > 0, got 0"),
])
def test_a_value_outside_its_bounds_is_refused_with_them(pool, override, message):
    assert config_error(pool, override) == message


def test_values_on_a_closed_bound_are_accepted(pool):
    cfg = load(pool, "lora.dropout=0", "train.warmup_ratio=0", "selection.filter_top_fraction=1",
               "selection.weighted.alpha=1", "selection.repr_filter.threshold=-1",
               "data.max_length=8", "output.keep_checkpoints=0")
    assert (cfg.lora.dropout, cfg.selection.weighted.alpha, cfg.data.max_length) == (0, 1, 8)


@pytest.mark.parametrize("key", ["scoring.model", "influence.reference_model",
                                 "scoring.reward.model"])
def test_a_model_path_must_be_a_local_model_dir_or_embedded(pool, tmp_path, key):
    bare = tmp_path / "bare"
    bare.mkdir()
    assert config_error(pool, f"{key}={bare}") == \
        f"{key}: {bare} is not a local model directory (no config.json); hub ids cannot be " \
        f"downloaded here"
    (bare / "config.json").write_text("{}")
    assert load(pool, f"{key}={bare}").flat()[key] == str(bare)
    assert load(pool, f"{key}=embedded:smollm2-135m-instruct").flat()[key] == \
        "embedded:smollm2-135m-instruct"


# ----------------------------------------------------------------------------- earlier versions

@pytest.mark.parametrize("old", ["selection.score", "selection.alpha", "selection.chunk_size"])
def test_a_flat_key_of_an_earlier_version_is_an_unknown_key(pool, old, tmp_path):
    """Keys that have since become a rule's own setting (``selection.weighted.alpha``) are
    refused like any unknown key, in an override, a YAML file and a saved run config."""
    assert config_error(pool, f"{old}=1").startswith(f"unknown config key '{old}'")
    section, key = old.split(".")
    path = write_yaml(tmp_path / "old.yaml", f"data:\n  pool: {pool}\n{section}:\n  {key}: 1\n")
    with pytest.raises(ConfigError, match=f"unknown config key '{old}'"):
        load_config(path)
    saved = load(pool).to_dict()
    saved["selection"][key] = 1
    with pytest.raises(ConfigError, match=f"unknown config key '{old}'"):
        config_from_dict(saved)


def test_describe_mentions_every_key():
    text = describe()
    missing = [key for key in Config().flat() if f"  {key}: " not in text]
    assert not missing


def test_config_round_trips_through_its_dict(pool, tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text('{"instruction": "c", "output": "d"}\n')
    cfg = load(pool, f"eval.path={eval_file}", "train.lr=3e-4", "selection.rounds=3",
               "selection.init_size=0.25", "selection.per_round=[2, 0.5]",
               "lora.target_modules=[q_proj]", "deepspeed.zero_stage=2", "seed=9")
    saved = json.loads(json.dumps(cfg.to_dict()))     # as in a run's config.json
    again = load_config(None, [], base=saved)
    assert again.to_dict() == cfg.to_dict()
    assert again.results_hash() == cfg.results_hash()


def test_overrides_apply_on_top_of_a_base(pool):
    cfg = load(pool, "train.lr=3e-4")
    changed = load_config(None, ["train.lr=1e-3"], base=cfg.to_dict())
    before, after = cfg.flat(), changed.flat()
    assert {k for k in before if before[k] != after[k]} == {"train.lr"}
    assert after["train.lr"] == 1e-3


def test_unknown_key_suggests_the_closest_one():
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        load_config(None, ["train.lrr=1", "data.pool=x"])


def test_output_dirs_that_hold_the_pool_the_code_or_the_user_are_refused(pool, monkeypatch,
                                                                          tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for value, why in ((".", "the current directory"), (str(pool.parent), "holds the pool"),
                       (str(Path.home()), "the home directory"),
                       (str(Path(__file__).resolve().parents[2]), "holds evotune's code")):
        with pytest.raises(ConfigError, match=why):
            load(pool, f"output.dir={value}")
    assert load(pool, "output.dir=runs/x").output.dir == str(work / "runs" / "x")
