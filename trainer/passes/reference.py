"""The reference model of RHO-LOSS: the base model fine-tuned on a small clean holdout.

RHO-LOSS (Mindermann et al., ICML 2022, arXiv 2206.07137) trains an "irreducible loss" model
on a small holdout drawn from the same distribution as the training data and scores each
training point by its loss under that model; a point that stays hard for a model trained on
clean data is noisy, ambiguous or off-task. evotune's reference is the run's base model with a
fresh LoRA adapter (the run's ``lora.*`` settings, even when the run itself fine-tunes every
weight) trained on ``scoring.reference.data`` (any input form ``data.pool`` reads) with the
run's template, batch sizes and optimizer, for ``scoring.reference.epochs`` at
``scoring.reference.lr``. Its mean response NLL on every pool row (nats/token, the ``loss``
score's definition) is the ``reference_loss`` score; the derived learnability scores
(``trainer/scores.py``) read it beside the current model's ``loss``.

Once per run, before round 0: the adapter is trained, the whole pool scored, and the engine
released. The values are kept

- in the run folder (``reference.npz``, with the key below): a resumed run reads them back, so
  its scores are the first start's exactly; the adapter itself is exported beside it
  (``reference/adapter``, PEFT format) when the run trained it;
- in the base-model cache (``$EVOTUNE_CACHE/features``, ``scoring.base_cache``), keyed by
  everything they depend on — the base model, the holdout's and the pool's contents, the
  encoding, the LoRA and training settings and ``scoring.reference.seed`` — but not the run's
  seed or its rank count: runs that differ only in those share one reference, trained once.
  The reference has a seed of its own for that reason: it is a fixed instrument, like a reward
  model, not part of what a run's seed varies.

Departures from RHO-LOSS, on purpose: the reference is fine-tuned from the same base model (the
paper trains a small separate model, possibly of another architecture, from scratch), and the
score is computed per SFT row from its mean response-token loss, once per run (the paper
scores each candidate batch at every step).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from evotune.selectors.base import Features
from evotune.trainer.data import Rows, encode_all, load_examples
from evotune.trainer.fit import train_round
from evotune.trainer.logs import ProgressBars, log
from evotune.trainer.model import export_weights
from evotune.trainer.passes import cache
from evotune.trainer.passes.forward import PassStats, compute_features
from evotune.trainer.sources import input_hash
from evotune.trainer.files import write_bytes_atomic
from evotune.trainer.seeding import derive_seed
from evotune.trainer.state import crash_point

SCORE = "reference_loss"


class _Quiet:
    """A run logger for the reference's training: its progress bars, named "reference: ...",
    without step metrics (``metrics.jsonl`` holds the run's own steps only)."""

    def __init__(self, logger: ProgressBars):
        self.logger = logger

    def progress(self, description: str, total: int | None):
        return self.logger.progress("reference: " + description.split(": ", 1)[-1], total)

    def metrics(self, step: int, values: dict) -> None:
        pass


class ReferencePass:
    """Trains the reference once and scores the pool with it (see the module docstring).

    :class:`BaseLossPass` is the same machinery without the training: the base model's own
    losses (``base_loss``).

    Args:
        cfg: the run's config (``scoring.reference``, ``train``, ``lora``, ``data``).
        pool_enc: the pool's encodings (pool order).
        tokenizer, template: the run's tokenizer and training template.
        strategy: the run's :class:`~evotune.trainer.engine.Strategy`.

    Raises ValueError (or DataError) when the holdout cannot be read or has no usable row.
    """

    score, file, what = SCORE, "reference.npz", "reference model"
    stats_key = "reference"              # the summary's tokens / seconds entry

    def __init__(self, cfg, pool_enc, tokenizer, template: str, strategy):
        self.cfg, self.strategy, self.pool_enc = cfg, strategy, pool_enc
        self.tokenizer, self.pad_id = tokenizer, tokenizer.pad_token_id
        self.values: np.ndarray | None = None      # (N,) on every rank, after ensure()
        self.stats: PassStats | None = None        # what making them cost, until reported
        self._load_holdout(template)

    def _load_holdout(self, template: str) -> None:
        cfg, tokenizer = self.cfg, self.tokenizer
        opts = cfg.scoring.reference
        examples, report = load_examples(opts.data, cfg.data.on_error, opts.max_examples,
                                         cfg.data.columns.mapping())
        kept, self.encoded, enc_report = encode_all(examples, tokenizer, template,
                                                    cfg.data.max_length, cfg.data.on_error)
        skipped = report.skipped + enc_report.skipped
        if not self.encoded:
            raise ValueError(f"scoring.reference.data: {opts.data}: no usable rows after "
                             f"encoding ({len(skipped)} skipped)")
        if skipped:
            log.warning(f"scoring.reference.data: {len(skipped)} rows skipped (first: "
                        f"{skipped[0][0]}: {skipped[0][1]})")
        self.rows = len(self.encoded)

    def spec(self, model_fingerprint: dict, pool_hash: str, template: str, dtype) -> dict:
        """Everything the reference's values depend on (the cache key's description)."""
        cfg = self.cfg
        train = dataclasses.asdict(cfg.train)
        for k in ("log_every", "retrain_from_base", "data_per_round"):
            train.pop(k, None)
        return {"what": "reference", "model": model_fingerprint, "dtype": str(dtype),
                "attn": cfg.model.attn_implementation, "pool": pool_hash,
                "data": [cfg.data.max_examples, cfg.data.on_error, template,
                         cfg.data.max_length, cfg.data.columns.mapping()],
                "holdout": input_hash(cfg.scoring.reference.data, cfg.data.columns.mapping()),
                "reference": dataclasses.asdict(cfg.scoring.reference),
                "lora": [cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout,
                         list(cfg.lora.target_modules)],
                "train": train, "zero3": cfg.deepspeed.zero_stage == 3,
                "batch": cfg.selection.batch_size}

    def ensure(self, build_engine, logger: ProgressBars, run_dir: Path | None, key: str) -> None:
        """Make ``self.values`` available on every rank: from the run folder's copy, else the
        cache (``scoring.base_cache``), else make them with ``build_engine(seed)`` (a fresh
        DeepSpeed engine of the base model with a LoRA adapter drawn from ``seed``; the caller
        releases it): train the reference and score the pool. Every rank calls this."""
        st = self.strategy
        found = None
        if st.is_rank0:
            found = _read(run_dir / self.file, key) if run_dir is not None else None
            where = "the run folder"
            if found is None and self.cfg.scoring.base_cache:
                entry = cache.load(key)
                if entry is not None and self.score in entry[0].scores:
                    stats = entry[1].get(self.stats_key)
                    found = (entry[0].scores[self.score], stats)
                    where = f"the cache ({cache.cache_dir() / key}.npz)"
            if found is not None:
                log.info(f"{self.what}: its pool losses reused from {where}")
        found = st.broadcast_from_rank0(found)
        if found is not None:
            self.values, self.stats = found
            if self.stats is not None and not self.stats.cached:
                self.stats = dataclasses.replace(self.stats, cached=True)
            if run_dir is not None and st.is_rank0 and not (run_dir / self.file).is_file():
                _write(run_dir / self.file, key, self.values, self.stats)
            return
        self.values, self.stats = self._make(build_engine, logger, run_dir)
        if st.is_rank0:
            if run_dir is not None:
                _write(run_dir / self.file, key, self.values, self.stats)
            if self.cfg.scoring.base_cache:
                try:
                    cache.save(key, Features(scores={self.score: self.values}),
                               {self.stats_key: self.stats})
                except OSError as e:
                    log.warning(f"{self.what}'s losses not cached "
                                f"({cache.cache_dir() / key}.npz): {type(e).__name__}: {e}")

    def _score_pool(self, engine, logger: ProgressBars) -> tuple[np.ndarray, PassStats]:
        """``engine``'s mean response loss on every pool row, on every rank."""
        st = self.strategy
        with logger.progress(f"{self.what.split()[0]}: score pool",
                             len(self.pool_enc)) as advance:
            features, scored = compute_features(
                engine.module, Rows(self.pool_enc, np.arange(len(self.pool_enc))), st,
                self.pad_id, self.cfg.selection.batch_size, False, ("loss",), advance)
        return st.broadcast_from_rank0(features.scores["loss"] if st.is_rank0 else None), scored

    def _make(self, build_engine, logger: ProgressBars, run_dir: Path | None
              ) -> tuple[np.ndarray, PassStats]:
        st, opts, start = self.strategy, self.cfg.scoring.reference, time.perf_counter()
        seed = derive_seed(opts.seed, "reference")
        engine = build_engine(seed)
        t = dataclasses.replace(self.cfg.train, epochs=opts.epochs, lr=opts.lr)
        log.info(f"reference model: LoRA on {self.rows} holdout rows of "
                 f"{opts.data}, {opts.epochs} epochs at lr {opts.lr:g}")
        # round -1: its own data order and dropout seeds, and no crash point of round 0's
        _, trained = train_round(engine, st, t, self.encoded, list(range(self.rows)), -1, 0,
                                 self.pad_id, _Quiet(logger), seed)
        if run_dir is not None:                  # the reference itself, to look at or reuse
            lora = dataclasses.replace(self.cfg, lora=dataclasses.replace(self.cfg.lora,
                                                                          enabled=True))
            export_weights(engine, st, lora, self.tokenizer, run_dir / "reference")
        crash_point("reference", 0)
        values, scored = self._score_pool(engine, logger)
        log.info(f"reference model: trained to loss {trained.loss:.4f} on its holdout; pool "
                 f"scored ({scored.tokens:,} tokens, {scored.seconds:.1f}s)")
        return values, PassStats(time.perf_counter() - start, trained.tokens + scored.tokens,
                                 trained.tokens + scored.padded_tokens)

    def take_stats(self) -> PassStats | None:
        """What making the values cost, once (the first round that reads them reports it)."""
        stats, self.stats = self.stats, None
        return stats


class BaseLossPass(ReferencePass):
    """The base model's own mean response loss on every pool row (``base_loss``), once per
    run, kept like the reference's (run folder ``base_loss.npz``, the base-model cache): the
    start of every row's loss trajectory, which ``loss_left`` compares the current loss with.
    A run whose rounds all start from this model computes it once per pool (the cache), the
    only pass it adds."""

    score, file, what = "base_loss", "base_loss.npz", "base model"
    stats_key = "base"

    def _load_holdout(self, template: str) -> None:
        pass                                               # nothing to train on

    def spec(self, model_fingerprint: dict, pool_hash: str, template: str, dtype) -> dict:
        cfg = self.cfg
        return {"what": "base_loss", "model": model_fingerprint, "dtype": str(dtype),
                "attn": cfg.model.attn_implementation, "pool": pool_hash,
                "data": [cfg.data.max_examples, cfg.data.on_error, template,
                         cfg.data.max_length, cfg.data.columns.mapping()],
                "zero3": cfg.deepspeed.zero_stage == 3, "batch": cfg.selection.batch_size}

    def _make(self, build_engine, logger: ProgressBars, run_dir: Path | None
              ) -> tuple[np.ndarray, PassStats]:
        # a fresh adapter is a no-op: the engine computes the base model's losses
        engine = build_engine(derive_seed(0, "base_loss"))
        values, scored = self._score_pool(engine, logger)
        log.info(f"base model: pool scored ({scored.tokens:,} tokens, {scored.seconds:.1f}s)")
        return values, scored


def _write(path: Path, key: str, values: np.ndarray, stats: PassStats | None) -> None:
    s = np.array([stats.seconds, stats.tokens, stats.padded_tokens] if stats else [],
                 dtype=np.float64)
    write_bytes_atomic(path, lambda tmp: np.savez(tmp, key=np.array(key), values=values,
                                                  stats=s))


def _read(path: Path, key: str) -> tuple[np.ndarray, PassStats | None] | None:
    """The run folder's reference values when they were made for ``key``, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            if str(f["key"]) != key:
                log.warning(f"{path}: made for other settings; the reference is made again")
                return None
            s = f["stats"]
            stats = PassStats(float(s[0]), int(s[1]), int(s[2])) if len(s) == 3 else None
            return f["values"], stats
    except (OSError, ValueError, KeyError) as e:
        log.warning(f"{path}: unreadable ({type(e).__name__}: {e}); the reference is made again")
        return None
