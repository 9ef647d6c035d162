"""The round loop: prepare → for each round: choose → train and evaluate → commit → finish.

Read :func:`run` top to bottom to follow a whole run. The run's state (config, strategy, data,
model, output dir, logger, progress) is held by one :class:`Run`, whose methods are the phases.
Every rank runs the same code; model work is sharded, selection runs on rank 0 and is
broadcast (a sharded rule — k-center, rds, LIFT, weighted, DEITA's repr filter, a filter
score over k-center — selects on every rank over its own rows), and only rank 0 writes
files.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import yaml

from evotune.selectors.base import Features, Selection, Selector, ShardedSelector
from evotune.selectors.registry import build, build_first_round
from evotune.selectors.sharded import SingleProcess
from evotune.trainer.config import Config, resolve_budget
from evotune.trainer.data import (ChoiceSet, Encoded, Example, LoadReport, choice_set,
                                  encode_all, iter_examples, load_examples,
                                  resolve_template)
from evotune.trainer.engine import Strategy
from evotune.trainer.sources import input_hash
from evotune.trainer import tokens
from evotune.trainer.fit import EvalResult, TrainStats, evaluate_with_choices, train_round
from evotune.trainer.logs import (ProgressBars, RunLogger, drop_metrics_after, log, rounds_table,
                                  setup_console_logging)
from evotune.trainer.model import (build_trainable_model, check_lora_targets, export_weights,
                                   load_tokenizer, merge_adapter, reset_adapter,
                                   resolve_model_path)
from evotune.trainer.passes.features import FeaturePass, PassResult, mark_unsampled
from evotune.trainer.passes.forward import PassStats, gather_shards
from evotune.trainer.passes.streamed import RowsPart, save_parts
from evotune.trainer.selected import write_selected
from evotune.trainer.files import (fsync_tree, write_bytes_atomic, write_json_atomic,
                                   write_text_atomic)
from evotune.trainer.seeding import (capture_rng, derive_seed, restore_rng, sample_size,
                                     seeded_sample)
from evotune.trainer.state import (STATE_FILE, ResumePlan, RoundState, crash_point,
                                   last_completed_round, partial_dir, plan_resume, read_state,
                                   round_dir, write_checkpoint_manifest)
from evotune.trainer.tokens import TokenizedPool


class StartError(RuntimeError):
    """A problem found before the run touched its output dir (bad data, refused resume...)."""


def run(cfg: Config, resume: str = "auto", overwrite: bool = False) -> list[dict]:
    """Run (or resume) an active-selection run; returns the per-round summaries (rank 0; an
    empty list on the other ranks). Raises StartError on bad input or a refused resume, before
    anything in the output dir changes."""
    job = Run.prepare(cfg, resume, overwrite)       # load, check, plan the resume, restore
    for r in range(job.start_round, cfg.selection.rounds):
        t_round = time.perf_counter()
        choice = job.choose(r)                        # the current model's features → picks
        job.progress.selected += choice.new
        job.write_selection(r, choice)                # selection.jsonl
        trained = job.train_and_evaluate(r, choice.new)
        job.progress.global_step = trained.global_step
        if job.commit(r, choice, trained, t_round):   # checkpoint, exports, state.json last
            break                                     # selection.stop_when: gain too small
    return job.finish()                               # OUT/final, the rounds' table


@dataclass
class Run:
    """One run's state, in one place: what :meth:`prepare` loaded and built, and what the
    rounds have done so far. Its methods are the phases of :func:`run`, so each one's arguments
    are only what is particular to it (the round, the picks, the training's result).

    Every rank holds one and calls every method; what rank 0 alone does (selecting, writing
    files, drawing bars) is decided inside them.
    """
    cfg: Config
    strategy: Strategy        # this rank, the others, and every DeepSpeed call
    data: RunData             # the pool, the eval set, the budget, the selectors, the passes
    out: Path                 # the output dir
    model: RoundModel         # the engine being trained
    logger: RunLogger         # metrics.jsonl, TensorBoard and progress bars (rank 0)
    progress: Progress        # the picks and optimizer steps of the rounds done so far
    start_round: int          # the first round to run (after a resume: the next one)

    # ------------------------------------------------------------------------- prepare

    @classmethod
    def prepare(cls, cfg: Config, resume: str = "auto", overwrite: bool = False) -> Run:
        """Set up the ranks; load and check the data and settings; plan the resume (``resume``
        and ``overwrite`` as in :func:`~evotune.trainer.state.plan_resume`); build the model;
        open the output dir; compute the fixed models' pool losses once per run; restore the
        last complete round. Raises StartError on bad input or a refused resume."""
        strategy = Strategy(cfg)
        try:
            strategy.setup()
        except ValueError as e:                        # a setting this machine cannot honour
            raise StartError(str(e)) from e
        console = setup_console_logging(strategy.rank)
        log.info(f"evotune: {strategy.world_size} rank(s), device {strategy.device}, "
                 f"dtype {str(strategy.dtype).replace('torch.', '')} "
                 f"({strategy.precision_reason}), ZeRO-{cfg.deepspeed.zero_stage}")

        # everything that can fail on bad input happens before the output dir is touched
        data = load_data(cfg, strategy, ProgressBars(strategy.is_rank0, console))
        plan: ResumePlan = _agree(strategy, lambda: plan_resume(
            Path(cfg.output.dir), resume, overwrite, cfg, data.budget, data.pool_hash,
            strategy.world_size))
        out = plan.out_dir
        for w in plan.warnings:
            log.warning(w)
        model = RoundModel(cfg, strategy, data.model_path)
        if plan.wipe:      # the model must load before an old run is deleted for this one
            model.fresh(0)
        _agree(strategy, lambda: open_run_dir(out, plan, cfg, data))
        data.log_report(cfg)
        logger = RunLogger(out, strategy.is_rank0, cfg.output.tensorboard, console)
        if data.feature_pass.fixed:
            # The fixed models' pool losses (the reference, scoring.reference; the base model),
            # once per run: before the run's own model is restored or trained (with LoRA, on
            # the same kept module)
            data.feature_pass.prepare_fixed(model.reference_engine, logger, out,
                                            data.model_path, data.pool_hash, data.template,
                                            strategy.dtype)
            model.release()
        progress = resume_progress(plan, data, model, cfg)
        return cls(cfg, strategy, data, out, model, logger, progress, plan.start_round)

    # ------------------------------------------------------------------------- choose

    def choose(self, r: int) -> Choice:
        """Round ``r``'s new examples: round 0 by ``selection.first_round``, later rounds by the
        selector on the features of the current model. Every rank calls this; the selection
        runs on rank 0 and every rank gets it (a sharded rule selects on every rank together).
        Opens the round's folder (rank 0) first."""
        cfg, data, strategy = self.cfg, self.data, self.strategy
        if strategy.is_rank0:
            round_dir(self.out, r).mkdir(parents=True, exist_ok=True)
        labeled = np.asarray(self.progress.selected, dtype=np.int64)
        candidates = np.setdiff1d(np.arange(len(data.pool)), labeled)
        rng = np.random.default_rng(derive_seed(cfg.seed, "select", r))
        selector = data.first_selector if r == 0 else data.selector
        if r == 0 and cfg.selection.first_round == "random":
            return Choice(selector, selector.select(Features(), labeled, candidates,
                                                    data.budget[0], rng))
        t0 = time.perf_counter()
        result = PassResult(None, {}, candidates)
        measured = None                   # the rows measured, when not the whole pool
        if r == 0 and cfg.selection.first_round == "pre_experienced":
            result = data.feature_pass.run_instructions(self.model.current(r).module,
                                                        self.logger)
            result.candidates = candidates
        elif data.feature_pass.needed:
            engine = self.model.current(r)
            # selection.candidates: the round measures a seeded sample of the candidates (and
            # the selected rows, which rules such as k-center measure against)
            if sample_size(cfg.selection.candidates, len(candidates)) < len(candidates):
                candidates = seeded_sample(candidates, cfg.selection.candidates, cfg.seed,
                                           "selection-sample", r)
                measured = np.union1d(candidates, labeled)
            # Round 0 by the selector: a fresh adapter is a no-op, so these are the base
            # model's features, the same for every run on this pool (seed and budget aside):
            # cacheable when the whole pool is measured.
            key = data.feature_pass.base_cache_key(data.model_path, data.pool_hash,
                                                   data.template, strategy.dtype) \
                if r == 0 and cfg.scoring.base_cache and measured is None else None
            result = data.feature_pass.run(engine.module, self.logger, r, engine, candidates,
                                           labeled, self.out, key, measured)
        seconds = {"features": time.perf_counter() - t0}
        for name in ("reference", "base"):             # made before round 0, reported once
            made = result.stats.get(name)
            if made is not None and not made.cached:
                seconds[name] = made.seconds
        crash_point("embed", r)
        t0 = time.perf_counter()
        cands = result.candidates if result.candidates is not None else candidates
        features = result.features
        embedded = result.features is not None and result.features.embeddings is not None
        sharded = result.features is not None and result.features.positions is not None
        if sharded:
            # Sharded features: every rank selects with its own rows (same picks everywhere).
            # Rank 0 then gets the scores and skip reasons for the logs (O(N) numbers per
            # score) and the embeddings only to save them (output.save_features).
            shard = result.features
            rule = cast(ShardedSelector, selector)     # the feature pass shards only for one
            try:
                require_values(shard, rule.scores, cands, r, strategy.comm)
                selection = rule.select_sharded(shard, labeled, cands, data.budget[r], rng,
                                                strategy.comm)
            except ValueError as e:                    # raised alike on every rank
                raise StartError(f"ValueError: {e}") from e
            features = gather_shards(strategy, shard, len(data.pool), embeddings=False)
            if features is not None and measured is not None:
                mark_unsampled(features, measured)
            if cfg.output.save_features:
                self._save_features_sharded(r, features, shard)
        else:
            def select() -> Selection:
                found = result.features or Features()
                require_values(found, selector.scores, cands, r)
                return selector.select(found, labeled, cands, data.budget[r], rng)
            selection = _agree(strategy, select)
        seconds["select"] = time.perf_counter() - t0
        return Choice(selector, selection, features, result.stats, seconds, len(cands),
                      embedded, sharded)

    def write_selection(self, r: int, choice: Choice) -> None:
        """Rank 0 (a no-op on the others): ``selection.jsonl`` (one row per pick, in pick
        order, with every computed score of the pick), ``selector_state.json`` and, when
        asked, ``features.npz``."""
        if not self.strategy.is_rank0:
            return
        rdir, data = round_dir(self.out, r), self.data
        rows = []
        features, selection = choice.features, choice.selection
        for k, p in enumerate(choice.new):
            ex = data.pool[p]
            row = {"id": ex.id, "source": ex.source, "round": r, "pick_order": k,
                   "selector": choice.selector.name, "pool_index": p,
                   "tokens": len(data.pool_enc[p].input_ids)}
            row.update({name: float(v[k]) for name, v in selection.numbers.items()})
            row.update({name: v[k] for name, v in selection.labels.items()})
            if features is not None and features.positions is None:   # every computed score
                # of the pick, not only the one ranked by
                row.update({name: float(v[p]) for name, v in features.scores.items()
                            if name not in row})
            row["preview"] = ex.preview()
            rows.append(json.dumps(row, ensure_ascii=False))
        write_text_atomic(rdir / "selection.jsonl", "".join(line + "\n" for line in rows))
        write_json_atomic(rdir / "selector_state.json", choice.selector.state_dict())
        if features is not None and self.cfg.output.save_features and not choice.sharded:
            arrays = _features_arrays(features, data)
            if features.embeddings is not None:
                arrays["embeddings"] = features.embeddings.astype(np.float16)
            write_bytes_atomic(rdir / "features.npz", lambda tmp: np.savez(tmp, **arrays))

    def _save_features_sharded(self, r: int, features: Features | None,
                               shard: Features) -> None:
        """Every rank, for sharded features: the round's ``features.npz`` as
        :meth:`write_selection` writes it for gathered ones (``features``: the gathered scores
        on rank 0), its embeddings sent to rank 0 a block of rows at a time
        (``passes/streamed.py``), so no rank holds N × D; so are the shard's other per-rank
        rows (``RowsPart`` in ``extra``: influence's ``grad_train``).
        Raises OSError on every rank when rank 0 cannot write it."""
        path = round_dir(self.out, r) / "features.npz"
        n = len(self.data.pool)
        arrays = _features_arrays(features, self.data) if self.strategy.is_rank0 else None
        parts = {"embeddings": None if shard.embeddings is None else
                 RowsPart(shard.positions, shard.embeddings, n),
                 **{k: v for k, v in shard.extra.items() if isinstance(v, RowsPart)}}
        error = save_parts(self.strategy, path, arrays, parts, np.float16)
        if error is not None:
            raise OSError(f"{path}: {error}")

    # ------------------------------------------------------------------------- train, evaluate

    def train_and_evaluate(self, r: int, new: list[int]) -> Trained:
        """Train round ``r`` (on everything selected, or only the ``new`` picks when continuing
        with ``train.data_per_round: new``), then evaluate on the held-out set."""
        cfg, data, logger = self.cfg, self.data, self.logger
        engine = self.model.for_training(r)
        every = cfg.train.retrain_from_base or cfg.train.data_per_round == "all"
        global_step, stats = train_round(engine, self.strategy, cfg.train, data.pool_enc,
                                         self.progress.selected if every else new, r,
                                         self.progress.global_step, data.pad_id, logger,
                                         cfg.seed)
        trained = Trained(stats, global_step)
        ev = data.eval
        if ev is not None:
            t0 = time.perf_counter()
            with logger.progress(f"round {r}: eval", len(ev.encoded)) as advance:
                result = evaluate_with_choices(engine.module, self.strategy, ev.encoded,
                                               ev.choices, data.pad_id, cfg.eval.batch_size,
                                               advance,
                                               [ex.source.split("/")[0] for ex in ev.examples])
            trained.eval, trained.eval_seconds = result, time.perf_counter() - t0
            metrics = {"round": r, "eval/loss": result.loss}
            if result.accuracy is not None:
                metrics["eval/accuracy"] = result.accuracy
            for group, g in result.groups.items():
                metrics[f"eval/{group}/loss"] = g["loss"]
                if g["accuracy"] is not None:
                    metrics[f"eval/{group}/accuracy"] = g["accuracy"]
            logger.metrics(global_step, metrics)
        return trained

    # ------------------------------------------------------------------------- commit

    def commit(self, r: int, choice: Choice, trained: Trained, t_round: float) -> str | None:
        """Save round ``r``: the checkpoint and the exports first, ``state.json`` last (the
        round's commit point: a crash before it redoes the round, after it the round is kept).
        ``t_round``: when the round began (``time.perf_counter``). Returns why the run stops
        after this round (``selection.stop_when``), or None; every rank gets the same answer."""
        cfg, data, strategy, out, progress = (self.cfg, self.data, self.strategy, self.out,
                                              self.progress)
        rdir = round_dir(out, r)
        t0 = time.perf_counter()
        stopped = strategy.broadcast_from_rank0(
            self.stop_reason(r, trained) if strategy.is_rank0 else None)
        state = RoundState(round_idx=r, global_step=progress.global_step,
                           selected_ids=[data.pool[i].id for i in progress.selected],
                           budget=data.budget, seed=cfg.seed, config_hash=cfg.results_hash(),
                           pool_hash=data.pool_hash, world_size=strategy.world_size,
                           zero_stage=cfg.deepspeed.zero_stage, rng=capture_rng(),
                           stopped=stopped)
        strategy.save_checkpoint(self.model.engine, rdir / "checkpoint", state.to_json())
        crash_point("checkpoint", r)
        export = export_weights(self.model.engine, strategy, cfg, data.tokenizer, rdir)
        strategy.barrier()                         # every rank's shard is written
        if strategy.is_rank0:
            write_checkpoint_manifest(rdir / "checkpoint")
            fsync_tree(export)
        seconds = {**choice.seconds, "train": trained.stats.seconds,
                   **({"eval": trained.eval_seconds} if trained.eval_seconds is not None
                      else {}),
                   "save": time.perf_counter() - t0, "total": time.perf_counter() - t_round}
        if strategy.is_rank0:
            summary = self.round_summary(r, choice, trained, seconds)
            summary["stopped"] = stopped
            write_json_atomic(rdir / "summary.json", summary)
            write_selected(out, r, cfg.data.pool, data.pool)   # the chosen set as a dataset
        strategy.barrier()
        if strategy.is_rank0:
            write_json_atomic(rdir / STATE_FILE, state.to_json())
            shutil.rmtree(partial_dir(out, r), ignore_errors=True)   # the round is complete
            crash_point("state", r)
            _rebuild_rounds_jsonl(out, r)
            _prune_checkpoints(out, r, cfg.output.keep_checkpoints)
            log.info(f"round {r} done: {len(choice.new)} new, {len(progress.selected)} total, "
                     f"train loss {trained.stats.loss:.4f}"
                     + (f", eval loss {trained.eval_loss:.4f}"
                        if trained.eval_loss is not None else "")
                     + (f", eval accuracy {trained.eval.accuracy:.3f}"
                        if trained.eval is not None and trained.eval.accuracy is not None
                        else "")
                     + f", {seconds['total']:.1f}s")
            if stopped:
                log.info(f"stopping after round {r}: {stopped}")
        strategy.barrier()
        return stopped

    def stop_reason(self, r: int, trained: Trained) -> str | None:
        """``selection.stop_when``: why the run should end after round ``r``, or None. It ends
        when the held-out loss fell by less than ``min_gain`` per example added over the last
        ``window`` rounds (DiverseEvol's curves flatten after 5-6 rounds: the budget follows
        the evidence). Never after the last round (the run ends there anyway). Reads the
        earlier round's summary; rank 0."""
        rule = self.cfg.selection.stop_when
        if not rule.window or r < rule.window or r >= self.cfg.selection.rounds - 1 \
                or trained.eval_loss is None:
            return None
        before = json.loads((round_dir(self.out, r - rule.window) / "summary.json").read_text())
        if before.get("eval_loss") is None:
            return None
        added = len(self.progress.selected) - before["total_examples"]
        gain = (before["eval_loss"] - trained.eval_loss) / max(added, 1)
        if gain >= rule.min_gain:
            return None
        return (f"held-out loss {before['eval_loss']:.4f} -> {trained.eval_loss:.4f} over the "
                f"last {rule.window} round(s) and {added} added examples: {gain:.3g} per "
                f"example < selection.stop_when.min_gain {rule.min_gain:g}")

    def round_summary(self, r: int, choice: Choice, trained: Trained,
                      seconds: dict[str, float]) -> dict:
        """The round's ``summary.json`` (docs/outputs.md lists every key)."""
        cfg, data, progress = self.cfg, self.data, self.progress

        def by_source(positions):
            counts: dict[str, int] = {}
            for p in positions:
                counts[data.pool[p].source] = counts.get(data.pool[p].source, 0) + 1
            return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

        features, stats, t = choice.features, choice.stats, trained.stats
        skipped = {} if features is None else {
            name: {"count": len(why), "examples": [f"{data.pool[i].id}: {w}"
                                                   for i, w in list(why.items())[:3]]}
            for name, why in features.skipped.items()}
        ev = data.eval
        embeddings = None               # how this round's embeddings were made, if it had any
        if choice.embedded:
            embeddings = "gradient" if data.feature_pass.gradient_embeddings \
                else cfg.selection.pooling
        return {
            "round": r, "selector": choice.selector.name,
            "selection_info": choice.selection.info,
            "score_skipped": skipped, "embeddings": embeddings, "candidates": choice.candidates,
            "selected_on": None if choice.candidates is None else
            "every rank" if choice.sharded else "rank 0",
            "new_examples": len(choice.new), "total_examples": len(progress.selected),
            "new_by_source": by_source(choice.new),
            "total_by_source": by_source(progress.selected),
            "train_loss": t.loss, "train_loss_first_epoch": t.first_epoch_loss,
            "eval_loss": trained.eval_loss,
            "eval_tokens": trained.eval.tokens if trained.eval else None,
            "eval_accuracy": trained.eval.accuracy if trained.eval else None,
            "eval_choice_rows": len(ev.choices) if ev else 0,
            "eval_by_source": trained.eval.groups if trained.eval else {},
            "train_steps": t.steps, "global_step": trained.global_step,
            "tokens": {"train": t.tokens, **{name: s.tokens for name, s in stats.items()},
                       **{f"{name}_padded": s.padded_tokens for name, s in stats.items()}},
            **{f"{name}_tokens_per_s": round(s.tokens_per_s, 1) for name, s in stats.items()},
            "cached_passes": [name for name, s in stats.items() if s.cached],
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "retrain_from_base": cfg.train.retrain_from_base,
            "world_size": self.strategy.world_size,
        }

    # ------------------------------------------------------------------------- finish

    def finish(self) -> list[dict]:
        """Copy the last round's export to ``OUT/final`` (and merge if asked): the run's last
        round, or the round the stop rule ended it after; idempotent. Then print the rounds'
        table (rank 0) and release the model, the logs and the ranks. Returns the summaries
        of the complete rounds (rank 0; an empty list on the other ranks)."""
        cfg, strategy, out = self.cfg, self.strategy, self.out
        rounds = cfg.selection.rounds
        last = min(last_completed_round(out), rounds - 1) if strategy.is_rank0 else -1
        state = read_state(out, last) if strategy.is_rank0 and last >= 0 else None
        if state is not None and last < rounds - 1 and not state.stopped:
            state = None              # the run is not finished (a crash, or fewer rounds done)
        if strategy.is_rank0 and state is not None:
            _rebuild_rounds_jsonl(out, last)   # in case the run died right after state.json
            final = out / "final"
            src = round_dir(out, last)
            name = "adapter" if cfg.lora.enabled else "model"
            tmp = out / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src / name, tmp / name)
            if cfg.lora.enabled and cfg.output.save_merged:
                merge_adapter(self.data.model_path, tmp / "adapter", tmp / "merged",
                              self.data.tokenizer)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            log.info(f"final {name}: {final / name}")
        strategy.barrier()
        summaries = [] if not strategy.is_rank0 else [
            json.loads((round_dir(out, r) / "summary.json").read_text())
            for r in range(rounds) if read_state(out, r) is not None]
        log.info(f"base model loads this run: {self.model.loads}")
        if strategy.is_rank0:
            console = self.logger.console
            console.print(rounds_table(summaries))
            console.print(f"outputs: {out}  (inspect: evotune inspect {out})")
        self.logger.close()
        self.model.release()
        strategy.close()
        return summaries


# ----------------------------------------------------------------------------- the run's data

@dataclass
class EvalSet:
    """The held-out set: its examples, encodings, what was skipped, and the multiple-choice
    rows among them."""
    examples: list[Example]
    encoded: list[Encoded]
    report: LoadReport
    choices: ChoiceSet


@dataclass
class RunData:
    """Everything a run reads, loaded and checked before its output dir is touched."""
    model_path: Path
    tokenizer: Any
    template: str
    pool: Sequence[Example]             # tokens.CachedExamples: rows decoded one at a time
    pool_enc: TokenizedPool
    pool_report: LoadReport
    pool_hash: str
    eval: EvalSet | None
    budget: list[int]                   # examples added per round, round 0 first
    selector: Selector                  # the rule of the rounds after round 0
    first_selector: Selector            # the rule of round 0 (selection.first_round)
    feature_pass: FeaturePass

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def report_json(self) -> dict:
        """``data_report.json``: template, rows used, truncated and skipped, the budget."""
        def listed(skipped):
            return [{"where": w, "reason": r} for w, r in skipped]
        ev = self.eval
        return {"template": self.template, "model_path": str(self.model_path),
                "pool_rows": len(self.pool),
                "pool_truncated": int(np.asarray(self.pool_enc.truncated).sum()),
                "pool_skipped": listed(self.pool_report.skipped),
                "eval_rows": len(ev.examples) if ev else 0,
                "eval_skipped": listed(ev.report.skipped) if ev else [],
                "eval_choice_rows": len(ev.choices) if ev else 0,
                "eval_choice_skipped": listed(ev.choices.skipped) if ev else [],
                "budget": self.budget}

    def log_report(self, cfg: Config) -> None:
        truncated = int(np.asarray(self.pool_enc.truncated).sum())
        log.info(f"pool: {len(self.pool)} examples from {cfg.data.pool} (template: "
                 f"{self.template}); {truncated} truncated to max_length={cfg.data.max_length}; "
                 f"{len(self.pool_report.skipped)} skipped")
        for where, reason in self.pool_report.skipped[:5]:
            log.warning(f"skipped {where}: {reason}")
        ev = self.eval
        if ev is not None:
            log.info(f"eval: {len(ev.examples)} examples from {cfg.eval.path}; "
                     f"{len(ev.report.skipped)} skipped")
            if len(ev.choices) or ev.choices.skipped:
                log.info(f"eval accuracy: {len(ev.choices)} multiple-choice rows; "
                         f"{len(ev.choices.skipped)} skipped")
                for where, reason in ev.choices.skipped[:3]:
                    log.warning(f"eval choices: skipped {where}: {reason}")
        log.info(f"budget per round: {self.budget} = {sum(self.budget)} of {len(self.pool)} "
                 f"examples ({100 * sum(self.budget) / len(self.pool):.1f}%)")
        if len(self.budget) > 1:
            log.info(self.feature_pass.where_selected(cfg.selection.selector))


def load_data(cfg: Config, strategy: Strategy, bars: ProgressBars | None = None
              ) -> RunData:
    """Load the tokenizer, pool and eval set, check the budget and the settings, build the
    selectors and plan the feature pass. Raises StartError naming the problem."""
    try:
        model_path = resolve_model_path(cfg.model.path)
        tokenizer = load_tokenizer(model_path)
        if cfg.lora.enabled:
            check_lora_targets(model_path, cfg.lora.target_modules)
        template = resolve_template(cfg.data.template, tokenizer)
        # rank 0 reads the pool file (its hash, and the rows when the token cache has none)
        pool_hash = _agree(strategy, lambda: input_hash(cfg.data.pool,
                                                        cfg.data.columns.mapping()))
        pool, pool_enc, pool_report = load_pool(cfg, tokenizer, template, pool_hash, strategy,
                                                bars)
        eval_set = None
        if cfg.eval.path:
            examples, encoded, report = _load(cfg.eval.path, cfg.eval.max_examples, tokenizer,
                                              template, cfg)
            eval_set = EvalSet(examples, encoded, report, choice_set(
                examples, tokenizer, template, cfg.data.max_length, cfg.data.on_error))
        budget = resolve_budget(cfg, len(pool))
        strategy.grad_accum_steps()
        selector = build(cfg.selection)
        feature_pass = FeaturePass(cfg, selector, pool, pool_enc, tokenizer, template, strategy)
        check_feasible(cfg, budget, len(pool), feature_pass)
        return RunData(model_path, tokenizer, template, pool, pool_enc, pool_report,
                       pool_hash, eval_set, budget, selector,
                       build_first_round(cfg.selection), feature_pass)
    except (ValueError, OSError, ImportError) as e:   # bad config, data, model dir or install
        raise StartError(str(e)) from e


def check_feasible(cfg: Config, budget: list[int], pool_size: int,
                   feature_pass: FeaturePass) -> None:
    """Settings that pass the config checks but could only fail after a whole pass, checked
    against the pool and the budget now. Raises StartError naming the key."""
    s = cfg.selection
    rounds = [r for r in range(s.rounds) if r > 0 or s.first_round == "selector"]
    for r in rounds:
        unselected = pool_size - sum(budget[:r])
        candidates = sample_size(s.candidates, unselected)
        if candidates < budget[r]:
            raise StartError(f"selection.candidates: round {r} measures {candidates} of its "
                             f"{unselected} candidates but must pick {budget[r]}; raise "
                             f"selection.candidates")
        if feature_pass.influence is not None:
            sampled = sample_size(cfg.influence.candidates, candidates)
            if sampled < budget[r]:
                raise StartError(f"influence.candidates: round {r} takes gradients of {sampled} "
                                 f"of its {candidates} candidates but must pick {budget[r]}; "
                                 f"raise influence.candidates")
        if s.selector == "facility_location" and s.filter_max is None:
            most = int(candidates * s.filter_top_fraction)
            limit = s.facility_location.max_candidates
            if most > limit:
                raise StartError(f"selection.facility_location.max_candidates: round {r} has "
                                 f"{most} candidates (a dense {most}x{most} kernel) over the "
                                 f"limit {limit}; raise it, or filter first "
                                 f"(selection.filter_score with filter_top_fraction)")
    if "knn_k" in feature_pass.derived and cfg.scoring.knn_k.k >= pool_size:
        raise StartError(f"scoring.knn_k.k: {cfg.scoring.knn_k.k} neighbours need more than "
                         f"{cfg.scoring.knn_k.k} pool rows; the pool has {pool_size}")


def load_pool(cfg: Config, tokenizer, template: str, pool_hash: str, strategy: Strategy,
              bars: ProgressBars | None = None
              ) -> tuple[tokens.CachedExamples, TokenizedPool, LoadReport]:
    """The pool's rows and their encodings from the token cache (``trainer/tokens.py``), which
    rank 0 builds first when it has no entry for these inputs (reading the pool file once, a
    batch of rows at a time: the pool is never a list of rows, on any rank). Every
    rank then maps the cache: the rows are decoded one at a time where they are read (ids,
    sources, previews for the logs, a reward model's text), never held as a list."""
    d = cfg.data
    where = tokens.tokens_dir() / tokens.cache_key(pool_hash, d.pool, tokenizer, template,
                                                   d.max_length, d.on_error, d.max_examples)

    def ensure() -> None:
        if (where / "meta.json").is_file():
            log.info(f"pool tokens: reused from the cache ({where})")
            return
        report = LoadReport()                  # filled as the rows are read
        examples = iter_examples(d.pool, d.on_error, d.max_examples, d.columns.mapping(),
                                 report)
        with (bars or ProgressBars(False, None)).progress("tokenise pool", None) as advance:
            tokens.build(where, examples, tokenizer, template, d.max_length, d.on_error, advance,
                         load_skipped=report.skipped)
        log.info(f"pool tokens: cached in {where}")
    _agree(strategy, ensure)
    kept, encoded, report = tokens.open_cached(where)
    if not len(kept):
        raise StartError(f"{cfg.data.pool}: no usable rows after encoding "
                         f"({len(report.skipped)} skipped)")
    return kept, encoded, report


def _load(path, limit, tokenizer, template, cfg):
    examples, report = load_examples(path, cfg.data.on_error, limit, cfg.data.columns.mapping())
    kept, encoded, enc_report = encode_all(examples, tokenizer, template, cfg.data.max_length,
                                           cfg.data.on_error)
    report.skipped += enc_report.skipped
    if not kept:
        raise StartError(f"{path}: no usable rows after encoding ({len(report.skipped)} skipped)")
    return kept, encoded, report


def _agree(strategy: Strategy, fn):
    """Run ``fn`` on rank 0 and give every rank its result, or raise its error on every rank
    (no rank is left waiting in a collective). Bad input (StartError, ValueError, OSError)
    becomes a StartError everywhere; anything else is re-raised on rank 0 with its traceback
    and reported on the other ranks."""
    result, failure = None, None
    if strategy.is_rank0:
        try:
            result = ("ok", fn())
        except (StartError, ValueError, OSError) as e:
            result = ("error", f"{type(e).__name__}: {e}")
        except Exception as e:                         # a bug: stop everywhere, keep the trace
            result, failure = ("crash", f"{type(e).__name__}: {e}"), e
    status, value = strategy.broadcast_from_rank0(result)
    if failure is not None:
        raise failure
    if status == "error":
        raise StartError(value)
    if status == "crash":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def open_run_dir(out: Path, plan: ResumePlan, cfg: Config, data: RunData) -> None:
    """Rank 0: clear what the resume plan says, then write the run's config (with the output
    dir it really uses) and data report, and drop metric lines of rounds to be redone."""
    plan.apply()
    saved = cfg.to_dict()
    saved["output"]["dir"] = str(out)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
    write_json_atomic(out / "config.json", saved)
    write_json_atomic(out / "data_report.json", data.report_json())
    drop_metrics_after(out, plan.start_round - 1)


# ----------------------------------------------------------------------------- the model

class RoundModel:
    """The model being trained, as a DeepSpeed engine; the one place engines are built.

    A fresh engine is the base weights with a new adapter seeded for its round (so a redone
    round starts from the same weights). With ``train.retrain_from_base`` every round trains a
    fresh engine (DiverseEvol); otherwise training continues on the previous round's engine,
    optimizer state included.

    With LoRA the base model is loaded once per run: the base weights never change, so a
    fresh engine is the same module with its adapter re-drawn
    (:func:`~evotune.trainer.model.reset_adapter`; under ZeRO-3 gathered, re-drawn and
    partitioned again) and a new optimizer. Full fine-tuning changes every weight: it loads
    again for every fresh engine. Under ZeRO-3 the base model is built partitioned
    (``deepspeed.zero.Init``) and stays so.
    """

    def __init__(self, cfg: Config, strategy: Strategy, model_path: Path):
        self.cfg, self.strategy, self.model_path = cfg, strategy, model_path
        self.engine = None
        self._untrained: int | None = None       # built fresh for this round, not trained yet
        self._module = None                      # the kept base model with its adapter
        self.loads = 0                           # base-model loads so far (the log says)

    def fresh(self, r: int, seed: int | None = None):
        """A fresh engine for round ``r``: the base weights with a new adapter drawn from the
        round's seed (or ``seed``)."""
        self.release()
        seed = derive_seed(self.cfg.seed, "init", r) if seed is None else seed
        module = self._module
        if module is None:
            zero3 = self.strategy.ds_config() if self.cfg.deepspeed.zero_stage == 3 else None
            module = build_trainable_model(self.cfg, self.model_path, self.strategy.dtype, seed,
                                           zero3)
            self.loads += 1
            if self.cfg.lora.enabled:
                self._module = module
        else:
            reset_adapter(module, seed)
        self.engine = self.strategy.prepare(module)
        self._untrained = r
        return self.engine

    def reference_engine(self, seed: int):
        """An engine for the reference model (``passes/reference.py``): the base model with a
        LoRA adapter drawn from ``seed`` — the kept module's own adapter when the run trains
        LoRA, else a LoRA copy of the base model loaded for it (the ``lora.*`` settings).
        :meth:`release` frees it; the next round builds its own engine."""
        if self.cfg.lora.enabled:
            engine = self.fresh(0, seed)
            self._untrained = None
            return engine
        self.release()
        cfg = dataclasses.replace(self.cfg, lora=dataclasses.replace(self.cfg.lora,
                                                                     enabled=True))
        zero3 = self.strategy.ds_config() if cfg.deepspeed.zero_stage == 3 else None
        module = build_trainable_model(cfg, self.model_path, self.strategy.dtype, seed, zero3)
        self.loads += 1
        self.engine = self.strategy.prepare(module)
        self._untrained = None
        return self.engine

    def restore(self, out: Path, state: RoundState, optimizer: bool) -> None:
        """The model after round ``state.round_idx``, from its checkpoint (with the optimizer's
        state when it is needed: continuing to train, or reading Adam's moments)."""
        self.fresh(0)
        self.strategy.load_checkpoint(self.engine, round_dir(out, state.round_idx) / "checkpoint",
                                      optimizer=optimizer)
        self._untrained = None

    def current(self, r: int):
        """The model that chooses round ``r``: the one trained last, or, in round 0, the fresh
        base model that round 0 will then train."""
        return self.engine if self.engine is not None else self.fresh(r)

    def for_training(self, r: int):
        """The engine round ``r`` trains (see the class docstring)."""
        if self.engine is None or (self.cfg.train.retrain_from_base and self._untrained != r):
            self.fresh(r)
        self._untrained = None
        return self.engine

    def release(self) -> None:
        Strategy.release(self.engine)
        self.engine = None


def verify_restored(model: RoundModel, strategy: Strategy, cfg: Config, out: Path,
                    r: int) -> None:
    """A LoRA checkpoint is loaded non-strictly (it leaves the frozen base weights out), so a
    renamed parameter (a peft upgrade, another target list) would resume from a fresh adapter
    without a word. The round's adapter export holds the same weights: they must match.
    Collective; raises StartError on every rank when they do not."""
    if not cfg.lora.enabled:
        return                       # full fine-tuning checkpoints load strictly
    state = strategy.trainable_state_dict(model.engine)

    def check():
        import torch
        from peft import get_peft_model_state_dict
        from safetensors.torch import load_file
        export = round_dir(out, r) / "adapter" / "adapter_model.safetensors"
        saved = load_file(str(export))
        mine = get_peft_model_state_dict(model.engine.module, state_dict=state)
        differ = sorted(k for k in set(saved) | set(mine) if k not in saved or k not in mine
                        or not torch.equal(saved[k].float(), mine[k].float()))
        if differ:
            raise StartError(f"resume refused: the checkpoint of round {r} did not restore the "
                             f"adapter ({len(differ)} tensors differ from {export}, e.g. "
                             f"{differ[0]}; were parameters renamed, by a peft upgrade or "
                             f"another lora.target_modules?)")
    _agree(strategy, check)


@dataclass
class Progress:
    """What the run has done so far: the selected pool positions (in selection order) and the
    optimizer steps taken."""
    selected: list[int] = field(default_factory=list)
    global_step: int = 0


def resume_progress(plan: ResumePlan, data: RunData, model: RoundModel, cfg: Config
                    ) -> Progress:
    """The progress of the last complete round (and its model and RNG states), or a fresh
    start. Raises StartError when the selected ids are no longer in the pool."""
    state = plan.state
    if state is None or plan.start_round >= cfg.selection.rounds:
        return Progress()
    id_to_pos = {ex_id: i for i, ex_id in enumerate(data.pool.ids())}
    missing = [i for i in state.selected_ids if i not in id_to_pos]
    if missing:
        raise StartError(f"{len(missing)} selected ids are not in the pool (e.g. "
                         f"{missing[0]!r}); the pool changed since the run started")
    # The model after the last complete round: needed for the next round's features and,
    # when continuing, as the starting point of training (optimizer state included).
    out = plan.out_dir
    model.restore(out, state, optimizer=not cfg.train.retrain_from_base
                  or data.feature_pass.needs_optimizer_state)
    verify_restored(model, model.strategy, cfg, out, state.round_idx)
    restore_rng(state.rng)
    progress = Progress([id_to_pos[i] for i in state.selected_ids], state.global_step)
    log.info(f"resumed after round {state.round_idx} (global step {progress.global_step}, "
             f"{len(progress.selected)} examples selected)")
    return progress


# ----------------------------------------------------------------------------- a round

@dataclass
class Choice:
    """A round's picks and how they were made."""
    selector: Selector
    selection: Selection
    features: Features | None = None
    stats: dict[str, PassStats] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    candidates: int | None = None     # how many the selector chose from (None: round 0 random)
    embedded: bool = False            # the round measured embeddings
    sharded: bool = False             # every rank selected over its own rows

    @property
    def new(self) -> list[int]:
        return [int(p) for p in self.selection.positions]


def require_values(features: Features, scores: tuple[str, ...], candidates: np.ndarray,
                   r: int, comm=None) -> None:
    """Refuse (ValueError) a round whose selector ranks or filters by a score that no candidate
    has a value for: its picks would all be fill-ins, chosen by another rule than the one asked
    for (e.g. the reference IFD templates on a pool of chat rows). Sharded features
    (``features.positions``): every rank calls this with its shard and the run's ``comm``."""
    comm = comm or SingleProcess()
    for name in scores:
        values = features.scores.get(name)
        if values is None or not len(candidates):
            continue
        rows = candidates if features.positions is None else \
            np.flatnonzero(np.isin(features.positions, candidates))
        if comm.sum_int64(int(np.isfinite(values[rows]).sum())):
            continue
        why = features.skipped.get(name, {})
        where = candidates if features.positions is None else features.positions[rows]
        found = [why[int(i)] for i in where if int(i) in why][:1]
        example = next((e for part in comm.all_gather_rows(found) for e in part),
                       "no reason recorded")
        raise ValueError(f"round {r}: score {name!r} has no value for any of the "
                         f"{len(candidates)} candidates (e.g. {example}); the selector depends "
                         f"on it, so the round would be all fill-ins: fix the data or the score "
                         f"settings, or choose another score")




def _features_arrays(features: Features, data: RunData) -> dict[str, np.ndarray]:
    """``features.npz`` but the embeddings: the pool's ids, ``score_<name>``, the extras."""
    return {"ids": np.array(data.pool.ids()),
            **{f"score_{k}": v for k, v in features.scores.items()}, **features.extra}




@dataclass
class Trained:
    """A round's training and held-out evaluation (None without an eval set)."""
    stats: TrainStats
    global_step: int
    eval: EvalResult | None = None
    eval_seconds: float | None = None

    @property
    def eval_loss(self) -> float | None:
        return self.eval.loss if self.eval is not None else None




def _rebuild_rounds_jsonl(out: Path, last: int) -> None:
    """rounds.jsonl from the summaries of rounds 0..last (never appended to, so a redone
    round cannot appear twice)."""
    lines = [json.dumps(json.loads((round_dir(out, r) / "summary.json").read_text()))
             for r in range(last + 1)]
    write_text_atomic(out / "rounds.jsonl", "".join(line + "\n" for line in lines))


def _prune_checkpoints(out: Path, last: int, keep: int) -> None:
    if keep <= 0:
        return
    for r in range(last - keep + 1):
        shutil.rmtree(round_dir(out, r) / "checkpoint", ignore_errors=True)


