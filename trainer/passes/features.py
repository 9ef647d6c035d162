"""The feature pass: everything a round's selector reads, from the current model, over the pool.

:class:`FeaturePass` is built once per run from the config and the selector's needs
(``needs_embeddings``, ``scores``). It looks every needed score up in ``trainer/scores.py``
(with the scores they are computed from) and runs only the passes their sources need:

- ``forward`` scores and the hidden-state embedding: one batched forward pass over the pool
  (``trainer/passes/forward.py``);
- ``ifd`` scores: IFD's extra passes (``trainer/passes/ifd.py``);
- ``targets`` scores (RDS+): the target set's rows through the same model and pooling right
  after the pool (a few rows: their own small pass), then the score from both embeddings;
- ``reward``: a reward model over the pool, once per run (``trainer/passes/reward.py``);
- ``reference``: a fixed model's pool losses — the reference model's, the base model's —
  made once per run before round 0 (:meth:`FeaturePass.prepare_fixed`,
  ``trainer/passes/reference.py``);
- ``influence`` scores and gradient embeddings (``selection.embedding: gradient``): the gradient
  pass (``trainer/passes/influence.py``);
- ``derived`` scores: computed from the rest, inputs first.

A sharded rule (``select_sharded``: k-center, rds, LIFT, weighted, repr_filter, a filter
score over k-center, cluster_quota with ``kmeans: minibatch``, influence) whose scores all
come from the forward pass, IFD's passes, the targets, the reward model, the gradient pass and
derived scores with a sharded form (``linear``, ``knn_k``) gets each rank's own rows
(``Features.positions``): the target rows' embeddings (a few) or the validation gradients
reach every rank and each scores its own rows; IFD is computed on rank 0 from the forward
losses (gathered: 8 bytes a row) and its values go back to every rank, as do the reward
model's (computed once per run); ``knn_k`` passes every rank's rows past every other rank in
tiles. The forward pass and the gradient pass deal different rows to a rank: the scores of
the one whose rows do not carry the embeddings go to the ranks that hold them the way IFD's
do (O(N) numbers per score through rank 0). Everything else is gathered on rank 0; a round 0
read from or written to the base-model cache stays sharded (``cache.load_shard``).
``selection.candidates`` restricts the passes to a seeded sample of the candidates and the
selected rows.

Infinite or NaN values from the model become skips with a reason (a selector never picks them).
For Cherry's pre-experienced round 0, :meth:`FeaturePass.run_instructions` embeds the prompts
alone instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evotune.selectors.base import Features, Selector
from evotune.selectors.pre_experienced import SCORE as INSTRUCTION_PERPLEXITY
from evotune.trainer.data import IGNORE_INDEX, Encoded, Rows, lengths
from evotune.trainer.logs import ProgressBars, log
from evotune.trainer.model import resolve_model_path
from evotune.trainer.passes import cache
from evotune.trainer.passes.forward import (PassStats, compute_features, gather_shards,
                                            merge_stats)
from evotune.trainer.passes.ifd import IfdPass
from evotune.trainer.passes.influence import InfluencePass
from evotune.trainer.passes.reference import BaseLossPass, ReferencePass
from evotune.trainer.passes.reward import RewardPass
from evotune.trainer.scores import PROMPT_EMBEDDINGS, SCORES, with_inputs
from evotune.trainer.sources import input_hash
from evotune.trainer.targets import load_targets


@dataclass
class PassResult:
    """What a round's passes produced.

    ``features``: on rank 0 (None on the other ranks). ``stats``: per pass that ran
    (``features``: the forward pass; ``ifd``: IFD's extra passes; ``influence``: the gradient
    pass). ``candidates``: the pool positions the selector may pick this round (the round's
    candidates, or the gradient sample of them when the embeddings are gradients: only those
    have one; rank 0).
    """
    features: Features | None
    stats: dict[str, PassStats] = field(default_factory=dict)
    candidates: np.ndarray | None = None


def _round(r: int | None) -> str:
    return "" if r is None else f"round {r}: "


NOT_SAMPLED = "not in this round's sample (selection.candidates)"
FIXED = {"reference_loss": ReferencePass, "base_loss": BaseLossPass}   # score -> its pass


def _spread(features: Features, measured: np.ndarray, n: int) -> Features:
    """Features computed for the rows ``measured`` (in that order) as pool-sized arrays, NaN
    at the other rows."""
    out = Features()
    if features.embeddings is not None:
        out.embeddings = np.full((n, features.embeddings.shape[1]), np.nan, dtype=np.float32)
        out.embeddings[measured] = features.embeddings
    for name, values in features.scores.items():
        out.scores[name] = np.full(n, np.nan)
        out.scores[name][measured] = values
    for name, rows in features.extra.items():        # the prompts' embeddings
        out.extra[name] = np.full((n, *rows.shape[1:]), np.nan, dtype=rows.dtype)
        out.extra[name][measured] = rows
    return out


def mark_unsampled(features: Features, measured: np.ndarray) -> None:
    """The skip reason of every score's missing values outside the round's sample."""
    for name, values in features.scores.items():
        outside = np.ones(len(values), dtype=bool)
        outside[measured] = False
        why = features.skipped.setdefault(name, {})
        why.update(dict.fromkeys(np.flatnonzero(outside & np.isnan(values)).tolist(),
                                 NOT_SAMPLED))


class FeaturePass:
    """Plans and runs the passes a selector needs (see the module docstring).

    Args:
        cfg: the run's config (``selection``, ``scoring``, ``influence`` and ``data`` settings).
        selector: what the features are for: anything with ``needs_embeddings`` and ``scores``.
        pool, pool_enc: the pool's examples and their encodings (pool order).
        tokenizer, template: the run's tokenizer and training template.
        strategy: the run's :class:`~evotune.trainer.engine.Strategy`.

    Raises ValueError on a score that cannot be computed with these settings.
    """

    def __init__(self, cfg, selector: Selector, pool, pool_enc, tokenizer, template: str,
                 strategy):
        self.cfg, self.strategy, self.pool_enc = cfg, strategy, pool_enc
        self.pad_id = tokenizer.pad_token_id
        wanted = with_inputs(selector.scores, lambda name: getattr(cfg.scoring, name, None))
        of = {source: [n for n in wanted if SCORES[n].source == source]
              for source in ("forward", "ifd", "derived", "targets", "reward", "reference",
                             "influence")}
        self.reward = RewardPass(cfg.scoring.reward, pool, strategy, cfg.data.max_length,
                                 lengths(pool_enc)) if of["reward"] else None
        self._reward_everywhere: np.ndarray | None = None   # sharded runs: every rank
        # fixed models' pool losses (the reference, the base model), made once per run
        self.fixed = {name: FIXED[name](cfg, pool_enc, tokenizer, template, strategy)
                      for name in of["reference"]}
        self.targets = {name: self._load_targets(name, tokenizer, template)
                        for name in of["targets"]}
        self.derived = of["derived"]                          # inputs before their readers
        # loss_excess finds neighbours among the prompts: the forward pass pools them too
        self.prompt_embeddings = any(SCORES[n].needs_prompt_embeddings for n in wanted)
        self.needs_embeddings = selector.needs_embeddings or any(
            SCORES[n].needs_embeddings for n in wanted)
        # Gradient embeddings come from the gradient pass, not from the hidden states.
        self.gradient_embeddings = self.needs_embeddings and \
            cfg.selection.embedding == "gradient"
        self.ifd = IfdPass(cfg, of["ifd"], pool, pool_enc, tokenizer, template, strategy) \
            if of["ifd"] else None
        forward = set(of["forward"])
        if self.ifd is not None and self.ifd.needs_forward_loss:
            forward.add("loss")        # IFD's conditioned loss is the forward pass's loss
        self.forward_scores = tuple(n for n in SCORES if n in forward)    # registry order
        self.influence = InfluencePass(cfg, pool_enc, tokenizer, template, strategy) \
            if of["influence"] or self.gradient_embeddings else None
        # A sharded rule whose scores each rank can compute for its own rows: the features
        # stay on the ranks that computed them (nothing N x D on one rank) and every rank
        # selects together. Scores computed on other rows than the embeddings' (the forward
        # pass deals the pool, the gradient pass its sample) follow the embeddings: O(N)
        # numbers per score through rank 0 (``_scores_to``).
        sources = {SCORES[n].source for n in wanted}
        per_rank = {"forward", "ifd", "reward", "reference", "influence"} | \
            ({"derived"} if all(SCORES[n].sharded for n in self.derived) else set())
        if not self.gradient_embeddings:
            per_rank.add("targets")               # targets are scored on hidden states
        self.sharded = bool(getattr(selector, "sharded", False) and sources <= per_rank and (
            self.needs_embeddings or self.forward_scores or self.influence is not None))
        unsharded = [n for n in wanted if SCORES[n].source not in per_rank]
        self._gathered_why = "the rule has no sharded form" if not getattr(
            selector, "sharded", False) else \
            f"no sharded form with score {', '.join(unsharded)}" if unsharded else \
            "no sharded form without embeddings or scores"

    def _load_targets(self, name: str, tokenizer, template: str):
        """The target rows of score ``name`` (its ``targets`` file), encoded like the pool."""
        path = getattr(self.cfg.scoring, name).targets
        items, skipped = load_targets(path, tokenizer, template, self.cfg.data.max_length,
                                      self.cfg.data.on_error)
        if any(it.kind == "preference" for it in items):
            raise ValueError(f"scoring.{name}.targets: {path} holds preference pairs; give SFT "
                             f"rows or prompt-only rows")
        if skipped:
            log.warning(f"scoring.{name}.targets: {len(skipped)} rows skipped (first: "
                        f"{skipped[0][1]})")
        return items

    def where_selected(self, rule: str) -> str:
        """One line for the run's log: where rule ``rule`` selects (docs/large-pools.md)."""
        if not self.needed:
            return f"selection ({rule}): reads no model features"
        if self.sharded:
            return (f"selection ({rule}): on every rank over its own rows (nothing N × D on "
                    f"one rank)")
        return (f"selection ({rule}): on rank 0 over the features gathered there "
                f"({self._gathered_why}; "
                f"docs/large-pools.md)")

    @property
    def needed(self) -> bool:
        """False when the selector reads nothing a model computes (e.g. random)."""
        return bool(self.needs_embeddings or self.forward_scores or self.ifd or self.derived
                    or self.targets or self.reward or self.fixed or self.influence)

    @property
    def needs_optimizer_state(self) -> bool:
        """True when the pass reads Adam's moments (a resume must restore the optimizer)."""
        return self.influence is not None and self.cfg.influence.adam

    def base_cache_key(self, model_path, pool_hash: str, template: str, dtype) -> str | None:
        """The key of these features for the base model at ``model_path`` in the base-model
        cache (``trainer/passes/cache.py``), or None when they cannot be cached (gradients). A
        sharded rule's features go to and come from the cache sharded: rank 0 writes and reads
        the one whole-pool file a block of rows at a time (``streamed.py``)."""
        if self.influence is not None:
            return None
        cfg, sc = self.cfg, self.cfg.scoring
        spec = {
            "model": cache.model_fingerprint(model_path), "dtype": str(dtype),
            "attn": cfg.model.attn_implementation, "pool": pool_hash,
            "data": [cfg.data.max_examples, cfg.data.on_error, template, cfg.data.max_length],
            "pass": [cfg.selection.batch_size, cfg.selection.pooling, self.needs_embeddings,
                     list(self.forward_scores)] + ([True] if self.prompt_embeddings else []),
            "ifd": None if self.ifd is None else [
                self.ifd.variants, sc.template, sc.max_length,
                cache.model_fingerprint(resolve_model_path(sc.model)) if sc.model else None],
            "derived": {n: dataclasses.asdict(getattr(sc, n)) if hasattr(sc, n) else None
                        for n in self.derived},
            "targets": {n: [input_hash(getattr(sc, n).targets),
                            dataclasses.asdict(getattr(sc, n))] for n in self.targets},
            "reward": None if self.reward is None else [
                cache.model_fingerprint(resolve_model_path(sc.reward.model)), sc.reward.label],
            # (only when there are some: the keys of other settings stay what they were)
            **({"fixed": {name: self.fixed_key(name, model_path, pool_hash, template, dtype)
                          for name in self.fixed}} if self.fixed else {})}
        return cache.features_key(spec)

    def fixed_key(self, name: str, model_path, pool_hash: str, template: str, dtype) -> str:
        """The key of a fixed model's pool losses (``passes/reference.py``)."""
        return cache.features_key(self.fixed[name].spec(cache.model_fingerprint(model_path),
                                                        pool_hash, template, dtype))

    def prepare_fixed(self, build_engine, logger: ProgressBars, run_dir: Path | None, model_path,
                      pool_hash: str, template: str, dtype) -> None:
        """Make the fixed models' pool losses (the reference's, the base model's), once per
        run before round 0 (no-op without a score that reads them): from ``run_dir``'s copy,
        the cache, or with ``build_engine(seed)`` (an engine the caller releases afterwards).
        Every rank calls this."""
        for name, fixed in self.fixed.items():
            fixed.ensure(build_engine, logger, run_dir,
                         self.fixed_key(name, model_path, pool_hash, template, dtype))

    def run(self, model, logger: ProgressBars, r: int | None = None, engine=None,
            candidates: np.ndarray | None = None, labeled=(), run_dir: Path | None = None,
            cache_key: str | None = None, measured: np.ndarray | None = None) -> PassResult:
        """Compute the features with ``model`` (the current model; every rank calls this).

        ``r`` (the round, or None outside a run) labels the progress bars and seeds the
        gradient sample. The gradient pass also needs the DeepSpeed ``engine`` (its optimizer's
        moments), the round's ``candidates``, the ``labeled`` (selected) positions and the
        ``run_dir`` (its partial results and earlier rounds' terms). ``cache_key``: ``model``
        is the base model and these features may come from, and go to, the base-model cache
        under this key (:meth:`base_cache_key`). ``measured``: the sorted pool positions to
        compute (``selection.candidates``: the round's sample and the selected rows); the
        others get NaN, skipped as not sampled. None: the whole pool. A reward model and an
        IFD proxy score the whole pool anyway (once per run).
        """
        if cache_key is not None:
            found = self._from_cache(cache_key, r)
            if found is not None:
                return PassResult(*found, candidates)
        result = self._run(model, logger, r, engine, candidates, labeled, run_dir, measured,
                           self.sharded)
        if cache_key is not None:
            self._to_cache(cache_key, result)
        return result

    def _from_cache(self, key: str, r: int | None):
        """(features, stats) of the base model from the cache, or None on every rank (no entry,
        or a torn one). Sharded: every rank gets a shard (``cache.load_shard``); else rank 0
        the whole pool's features and the other ranks None."""
        path = f"{cache.cache_dir() / key}.npz"
        if self.sharded:
            found = cache.load_shard(key, self.strategy, len(self.pool_enc))
        else:
            found = cache.load(key) if self.strategy.is_rank0 else None
            if not self.strategy.broadcast_from_rank0(found is not None
                                                      if self.strategy.is_rank0 else None):
                return None
            found = found if found is not None else (None, {})
        if found is not None:
            log.info(f"{_round(r)}features of the base model reused from the cache ({path})")
        return found

    def _to_cache(self, key: str, result: PassResult) -> None:
        """Keep the base model's features (sharded: every rank takes part and no rank holds
        N × D). A failed write is a warning: the run has its features either way."""
        error = None
        if self.sharded:
            error = cache.save_shard(key, result.features, result.stats, self.strategy,
                                     len(self.pool_enc))
        elif result.features is not None:
            try:
                cache.save(key, result.features, result.stats)
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
        if error is not None and self.strategy.is_rank0:
            log.warning(f"base-model features not cached ({cache.cache_dir() / key}.npz): "
                        f"{error}")

    def _run(self, model, logger: ProgressBars, r, engine, candidates, labeled, run_dir, measured,
             sharded: bool) -> PassResult:
        stats: dict[str, PassStats] = {}
        features = Features() if self.strategy.is_rank0 else None
        hidden = self.needs_embeddings and not self.gradient_embeddings
        rows = np.arange(len(self.pool_enc)) if measured is None else measured
        if sharded:
            return self._run_sharded(model, logger, r, engine, candidates, labeled, run_dir,
                                     measured, rows, hidden, stats)
        if hidden or self.forward_scores or self.prompt_embeddings:
            with logger.progress(f"{_round(r)}embed pool", len(rows)) as advance:
                features, stats["features"] = compute_features(
                    model, Rows(self.pool_enc, rows), self.strategy, self.pad_id,
                    self.cfg.selection.batch_size, hidden, self.forward_scores, advance,
                    self.cfg.selection.pooling, prompt_embeddings=self.prompt_embeddings)
            if features is not None and measured is not None:
                features = _spread(features, measured, len(self.pool_enc))
        self._score_targets(model, logger, r, features, stats, False)
        self._score_reward(features, logger, r, stats)
        self._score_fixed(features, stats)
        if self.ifd is not None:
            ifd_stats = self.ifd.run(model, features, logger, r, measured)
            if ifd_stats is not None:
                stats["ifd"] = ifd_stats
        if self.influence is not None:
            if engine is None or candidates is None:
                raise ValueError("influence selection runs inside a training run only")
            found, stats["influence"] = self.influence.run(
                engine, candidates, r, logger, labeled, self.gradient_embeddings, run_dir)
            if features is not None:
                features.scores.update(found.scores)
                features.skipped.update(found.skipped)
                features.extra.update(found.extra)
                if self.gradient_embeddings:
                    features.embeddings = found.embeddings
                    candidates = np.intersect1d(candidates, found.extra["grad_sample"])
        if features is not None:
            for name in self.derived:
                features.scores[name], features.skipped[name] = SCORES[name].compute(
                    features, getattr(self.cfg.scoring, name, None))
            features.extra.pop(PROMPT_EMBEDDINGS, None)      # an input, not a result
            if measured is not None:
                mark_unsampled(features, measured)
            _warn_non_finite(features, r)
        return PassResult(features, stats, candidates)

    def _run_sharded(self, model, logger: ProgressBars, r, engine, candidates, labeled,
                     run_dir, measured, rows, hidden: bool,
                     stats: dict[str, PassStats]) -> PassResult:
        """:meth:`_run` for a sharded rule: every rank returns its own rows' features. The
        forward pass deals the (measured) pool over the ranks and the gradient pass its sample
        (and the selected rows): the scores of the pass whose rows lack the embeddings go to
        the ranks holding the embeddings' rows (hidden states: the forward pass's; gradient
        embeddings: the gradient pass's)."""
        shard = None
        if hidden or self.forward_scores or self.prompt_embeddings:
            with logger.progress(f"{_round(r)}embed pool", len(rows)) as advance:
                shard, stats["features"] = compute_features(
                    model, Rows(self.pool_enc, rows), self.strategy, self.pad_id,
                    self.cfg.selection.batch_size, hidden, self.forward_scores, advance,
                    self.cfg.selection.pooling, gather=False,
                    prompt_embeddings=self.prompt_embeddings)
            shard.positions = rows[shard.positions]   # positions of the measured rows, not 0..k
            self._score_targets(model, logger, r, shard, stats, True)
            self._score_reward(shard, logger, r, stats)
            self._score_fixed(shard, stats)
            if self.ifd is not None:
                self._ifd_sharded(model, shard, logger, r, measured, stats)
        if self.influence is not None:
            if engine is None or candidates is None:
                raise ValueError("influence selection runs inside a training run only")
            found, stats["influence"] = self.influence.run(
                engine, candidates, r, logger, labeled, self.gradient_embeddings, run_dir,
                sharded=True)        # this rank's sampled candidates (and selected rows)
            if self.gradient_embeddings:                 # only the sample has embeddings
                candidates = np.intersect1d(candidates, self.strategy.broadcast_from_rank0(
                    found.extra.get("grad_sample")))
            if shard is None:
                shard = found
                self._score_reward(shard, logger, r, stats)
                self._score_fixed(shard, stats)
            elif self.gradient_embeddings:     # the forward pass's scores to the gradient rows
                self._scores_to(shard, found, list(shard.scores))
                found.extra.update(shard.extra)
                shard = found
            else:                             # the influence scores to the forward pass's rows
                self._scores_to(found, shard, list(found.scores))
                shard.extra.update(found.extra)
        for name in self.derived:
            shard.scores[name], shard.skipped[name] = SCORES[name].compute(
                shard, getattr(self.cfg.scoring, name, None), self.strategy.comm)
        shard.extra.pop(PROMPT_EMBEDDINGS, None)                # an input, not a result
        self._warn_non_finite_shard(shard, r)
        return PassResult(shard, stats, candidates)

    def _scores_to(self, source: Features, shard: Features, names: list[str]) -> None:
        """Scores ``names`` of every rank's ``source`` rows into ``shard`` (this rank's rows of
        another pass): rank 0 gathers them (O(N) numbers per score, nothing N × D) and every
        rank gets the values and skip reasons back and keeps its own rows'."""
        whole = gather_shards(self.strategy, source, len(self.pool_enc), embeddings=False)
        self._take_rows(shard, {name: (whole.scores[name], whole.skipped.get(name, {}))
                                for name in names} if whole is not None else None)

    def _take_rows(self, shard: Features, found: dict | None) -> None:
        """Rank 0's whole-pool ``found`` (name → (values, skip reasons)) to every rank, which
        keeps its own rows' into ``shard``."""
        found = self.strategy.broadcast_from_rank0(found)
        mine = set(shard.positions.tolist())
        for name, (values, skipped) in found.items():
            shard.scores[name] = values[shard.positions]
            shard.skipped[name] = {p: why for p, why in skipped.items() if p in mine}

    def _score_reward(self, features: Features | None, logger: ProgressBars, r,
                      stats: dict[str, PassStats]) -> None:
        """The ``reward`` score: the reward pass runs once per run (sharded over the ranks,
        its values gathered on rank 0); sharded features get their rows' values (the pool's
        values go to every rank: 8 bytes a row)."""
        if self.reward is None:
            return
        reward_stats = self.reward.run(self.cfg.selection.batch_size, logger, r)
        if reward_stats is not None:
            stats["reward"] = reward_stats
            if self.reward.truncated and self.strategy.is_rank0:
                log.warning(f"scoring.reward.model: {self.reward.truncated} pool rows cut to "
                            f"data.max_length={self.cfg.data.max_length} tokens for the reward "
                            f"model")
        values = self.reward.values
        if features is not None and features.positions is not None:
            if self._reward_everywhere is None:     # once per run: the values never change
                self._reward_everywhere = self.strategy.broadcast_from_rank0(values)
            values = self._reward_everywhere[features.positions]
        if features is not None:
            features.scores["reward"] = values.copy()
            features.skipped["reward"] = {}

    def _score_fixed(self, features: Features | None, stats: dict[str, PassStats]) -> None:
        """The fixed models' scores (``reference_loss``, ``base_loss``): the values
        :meth:`prepare_fixed` made (on every rank; a shard takes its own rows'). The first
        round that reads them reports what making them cost."""
        for name, fixed in self.fixed.items():
            if fixed.values is None:
                raise ValueError(f"the {fixed.what}'s losses were not made: call "
                                 f"FeaturePass.prepare_fixed before the first round")
            made = fixed.take_stats()
            if made is not None:
                stats[fixed.stats_key] = made
            if features is None:
                continue
            values = fixed.values
            if features.positions is not None:
                values = values[features.positions]
            features.scores[name] = np.array(values, dtype=np.float64)
            features.skipped[name] = {}

    def _ifd_sharded(self, model, shard: Features, logger: ProgressBars, r, measured,
                     stats: dict[str, PassStats]) -> None:
        """The IFD scores of sharded features: every rank's forward-pass scores (8 bytes a row,
        nothing N × D) go to rank 0, IFD runs there as for gathered features, and every rank
        gets the values and skip reasons back (O(N) numbers per variant) and keeps its own
        rows': the same values as one process, bit for bit."""
        whole = gather_shards(self.strategy, shard, len(self.pool_enc), embeddings=False)
        ifd_stats = self.ifd.run(model, whole, logger, r, measured)
        if ifd_stats is not None:
            stats["ifd"] = ifd_stats
        self._take_rows(shard, {v: (whole.scores[v], whole.skipped[v])
                                for v in self.ifd.variants} if whole is not None else None)

    def _score_targets(self, model, logger: ProgressBars, r, features: Features | None,
                       stats: dict[str, PassStats], sharded: bool) -> None:
        """The ``targets`` scores (rds): the target rows through the same model and pooling,
        then each pool row's score. Sharded features: the targets' embeddings (a few rows)
        go to every rank, which scores its own rows."""
        for name, items in self.targets.items():
            with logger.progress(f"{_round(r)}embed {name} targets", len(items)) as advance:
                found, s = compute_features(model, [it.encoded for it in items], self.strategy,
                                            self.pad_id, self.cfg.selection.batch_size, True, (),
                                            advance, self.cfg.selection.pooling)
            stats["features"] = merge_stats(stats["features"], s)
            targets = found.embeddings if found is not None else None
            if sharded:
                targets = self.strategy.broadcast_from_rank0(targets)
            if features is not None:
                scores = SCORES[name].compute(features.embeddings, targets,
                                              [it.subtask for it in items],
                                              getattr(self.cfg.scoring, name))
                features.scores.update(scores)
                missing = np.flatnonzero(np.isnan(scores[name]))     # rows, then positions
                if features.positions is not None:
                    missing = features.positions[missing]
                no_embedding = dict.fromkeys(missing.tolist(), "no embedding")
                features.skipped.update({k: dict(no_embedding) for k in scores})

    def _warn_non_finite_shard(self, features: Features, r: int | None) -> None:
        """Non-finite values of this rank's rows become skips (by pool position); rank 0 warns
        with the counts of every rank."""
        found = mark_non_finite(features)
        counts = self.strategy.all_reduce_sum([found.get(n, 0) for n in sorted(features.scores)])
        if self.strategy.is_rank0:
            _warn_counts(dict(zip(sorted(features.scores), counts)), r)

    def run_instructions(self, model, logger: ProgressBars) -> PassResult:
        """Features of the prompts alone, for Cherry's pre-experienced round 0: the mean last
        hidden state over the prompt tokens (everything before the first response token) and
        the prompt's perplexity (every token after the first), as Cherry's
        ``get_perplexity_and_embedding_whole_text``.

        Returns the ``embeddings`` and the ``instruction_perplexity`` score (rank 0).
        """
        prompts = []
        for e in self.pool_enc:
            first = next(i for i, t in enumerate(e.labels) if t != IGNORE_INDEX)
            ids = e.input_ids[:max(first, 2)]            # >= 2 tokens: one is predicted
            prompts.append(Encoded(ids, list(ids), e.truncated))
        with logger.progress("round 0: embed instructions", len(prompts)) as advance:
            features, stats = compute_features(model, prompts, self.strategy, self.pad_id,
                                               self.cfg.selection.batch_size, True,
                                               ("perplexity",), advance,
                                               self.cfg.selection.pooling)
        if features is not None:
            features.scores = {INSTRUCTION_PERPLEXITY: features.scores["perplexity"]}
            _warn_non_finite(features, 0)
        return PassResult(features, {"features": stats})


def _warn_non_finite(features: Features, r: int | None) -> None:
    _warn_counts(mark_non_finite(features), r)


def _warn_counts(counts: dict[str, int], r: int | None) -> None:
    for name, count in counts.items():
        if not count:
            continue
        log.warning(f"{_round(r)}{count} non-finite {name} values (inf/NaN from the model): "
                    f"never selected, listed in score_skipped")


def mark_non_finite(features: Features) -> dict[str, int]:
    """Turn every infinite score into NaN and give each NaN without a reason one.

    A selector never picks a NaN score, so after this every unpickable example is visible in
    ``features.skipped`` (and the round summary's ``score_skipped``) with its reason.

    Reasons are keyed by pool position (a shard's ``positions``, else the row).

    Returns:
        name → number of values newly marked (non-zero means the model produced inf/NaN).
    """
    marked = {}
    where = features.positions
    for name, values in features.scores.items():
        bad = np.flatnonzero(~np.isfinite(values))
        reasons = features.skipped.setdefault(name, {})
        new = [(int(i), int(i) if where is None else int(where[i])) for i in bad]
        new = [(i, p) for i, p in new if p not in reasons]
        for i, p in new:
            reasons[p] = f"non-finite value ({values[i]})"
        values[bad] = np.nan
        if new:
            marked[name] = len(new)
    return marked
