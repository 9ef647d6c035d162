"""The round loop: resume → for each round: features → select → log → train → eval → save.

Read :func:`run` top to bottom to follow a whole run. Every rank runs the same code; model
work is sharded, selection runs on rank 0 and is broadcast, and only rank 0 writes files.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

from evotune.selectors.base import Features, Selection
from evotune.selectors.derived import mark_non_finite
from evotune.selectors.features import FeaturePass
from evotune.selectors.pre_experienced import PreExperiencedSelector
from evotune.selectors.random import RandomSelector
from evotune.selectors.registry import selector_from_config
from evotune.trainer.config import Config, resolve_budget
from evotune.trainer.data import choice_set, encode_all, load_examples, resolve_template
from evotune.trainer.engine import Strategy
from evotune.trainer.fit import evaluate_with_choices, train_round
from evotune.trainer.logs import RunLogger, drop_metrics_after, log, rounds_table, setup_console_logging
from evotune.trainer.model import (build_trainable_model, check_lora_targets, export_weights,
                                   load_model, load_tokenizer, resolve_model_path)
from evotune.trainer.state import (STATE_FILE, RoundState, capture_rng, crash_point, derive_seed,
                                   file_hash,
                                   plan_resume, read_state, restore_rng, round_dir,
                                   write_json_atomic, write_text_atomic)


class StartError(RuntimeError):
    """A problem found before the run touched its output dir (bad data, refused resume...)."""


def _agree(strategy: Strategy, fn):
    """Run ``fn`` on rank 0 and give every rank its result, or raise its error on every rank."""
    result = None
    if strategy.is_rank0:
        try:
            result = ("ok", fn())
        except (StartError, ValueError, FileNotFoundError) as e:
            result = ("error", f"{type(e).__name__}: {e}")
    status, value = strategy.broadcast_from_rank0(result)
    if status == "error":
        raise StartError(value)
    return value


def run(cfg: Config, resume: str = "auto", overwrite: bool = False) -> list[dict]:
    """Run (or resume) an active-selection run; returns the per-round summaries."""
    strategy = Strategy(cfg)
    try:
        strategy.setup()
    except ValueError as e:                            # a setting this machine cannot honour
        raise StartError(str(e)) from e
    console = setup_console_logging(strategy.rank)
    log.info(f"evotune: {strategy.world_size} rank(s), device {strategy.device}, "
             f"dtype {str(strategy.dtype).replace('torch.', '')}, ZeRO-{cfg.deepspeed.zero_stage}")

    # ---- everything that can fail on bad input happens before the output dir is touched
    try:
        model_path = resolve_model_path(cfg.model.path)
        tokenizer = load_tokenizer(model_path)
        if cfg.lora.enabled:
            check_lora_targets(model_path, cfg.lora.target_modules)
        template = resolve_template(cfg.data.template, tokenizer)
        pool, pool_enc, pool_report = _load(cfg.data.pool, cfg.data.max_examples, tokenizer,
                                            template, cfg)
        eval_set = _load(cfg.eval.path, cfg.eval.max_examples, tokenizer, template, cfg) \
            if cfg.eval.path else None
        choices = choice_set(eval_set[0], tokenizer, template, cfg.data.max_length,
                             cfg.data.on_error) if eval_set else None
        budget = resolve_budget(cfg, len(pool))
        strategy.grad_accum_steps()
        selector = selector_from_config(cfg.selection)
        feature_pass = FeaturePass(cfg, selector, pool, pool_enc, tokenizer, template, strategy)
    except (ValueError, OSError, ImportError) as e:   # bad config, data, model dir or install
        raise StartError(str(e)) from e
    pool_hash = file_hash(Path(cfg.data.pool))
    out = Path(cfg.output.dir)
    plan = _agree(strategy, lambda: plan_resume(out, resume, overwrite, cfg, budget, pool_hash,
                                                strategy.world_size))
    out = plan.out_dir
    cfg.output.dir = str(out)
    for w in plan.warnings:
        log.warning(w)

    if strategy.is_rank0:
        plan.apply()
        write_text_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_json_atomic(out / "config.json", cfg.to_dict())
        write_json_atomic(out / "data_report.json", {
            "template": template, "model_path": str(model_path),
            "pool_rows": len(pool), "pool_truncated": sum(e.truncated for e in pool_enc),
            "pool_skipped": [{"where": w, "reason": r} for w, r in pool_report.skipped],
            "eval_rows": len(eval_set[0]) if eval_set else 0,
            "eval_skipped": [{"where": w, "reason": r} for w, r in eval_set[2].skipped]
            if eval_set else [],
            "eval_choice_rows": len(choices) if choices else 0,
            "eval_choice_skipped": [{"where": w, "reason": r} for w, r in choices.skipped]
            if choices else [], "budget": budget})
        drop_metrics_after(out, plan.start_round - 1)
    strategy.barrier()
    _report_data(pool, pool_enc, pool_report, eval_set, choices, budget, template, cfg)

    logger = RunLogger(out, strategy.is_rank0, cfg.output.tensorboard, console)
    id_to_pos = {ex.id: i for i, ex in enumerate(pool)}
    pad_id = tokenizer.pad_token_id

    engine = None
    state: RoundState | None = plan.state
    selected: list[int] = []
    global_step = 0
    if state is not None and plan.start_round < cfg.selection.rounds:
        missing = [i for i in state.selected_ids if i not in id_to_pos]
        if missing:
            raise StartError(f"{len(missing)} selected ids are not in the pool (e.g. "
                             f"{missing[0]!r}); the pool changed since the run started")
        selected = [id_to_pos[i] for i in state.selected_ids]
        global_step = state.global_step
        # The model after the last complete round: needed for the next round's features and,
        # when continuing, as the starting point of training (optimizer state included).
        engine = strategy.prepare(build_trainable_model(cfg, model_path, strategy.dtype,
                                                        derive_seed(cfg.seed, "init", 0)))
        strategy.load_checkpoint(engine, round_dir(out, state.round_idx) / "checkpoint",
                                 optimizer=not cfg.train.retrain_from_base
                                 or feature_pass.needs_optimizer_state)
        restore_rng(state.rng)
        log.info(f"resumed after round {state.round_idx} (global step {global_step}, "
                 f"{len(selected)} examples selected)")

    for r in range(plan.start_round, cfg.selection.rounds):
        t_round = time.perf_counter()
        rdir = round_dir(out, r)
        if strategy.is_rank0:
            rdir.mkdir(parents=True, exist_ok=True)
        seconds: dict[str, float] = {}

        # ---- select
        candidates = np.setdiff1d(np.arange(len(pool)), np.asarray(selected, dtype=np.int64))
        rng = np.random.default_rng(derive_seed(cfg.seed, "select", r))
        features, pass_stats = None, {}
        fresh_engine = False
        if r == 0 and cfg.selection.first_round == "random":
            round_selector = RandomSelector()
            selection = round_selector.select(Features(), np.array([], dtype=np.int64),
                                              candidates, budget[0], rng)
        else:
            round_selector = selector
            t0 = time.perf_counter()
            if r == 0:      # round 0 chosen by the base model: build the model round 0 trains
                engine = strategy.prepare(build_trainable_model(
                    cfg, model_path, strategy.dtype, derive_seed(cfg.seed, "init", 0)))
                fresh_engine = True
            if r == 0 and cfg.selection.first_round == "pre_experienced":
                round_selector = PreExperiencedSelector(cfg.selection.first_round_clusters)
                features, pass_stats = feature_pass.run_instructions(engine.module, logger)
            elif feature_pass.needed:
                weight, history = _checkpoint_weights(out, r, cfg)
                features, pass_stats = feature_pass.run(engine.module, logger, r, engine,
                                                        candidates, np.asarray(selected),
                                                        _partial_dir(out, r), weight, history)
                if feature_pass.gradient_embeddings and features is not None:
                    # only the sampled candidates have a gradient embedding
                    candidates = np.intersect1d(candidates, features.extra["grad_sample"])
            if features is not None:
                for name, count in mark_non_finite(features).items():
                    log.warning(f"round {r}: {count} non-finite {name} values (inf/NaN from "
                                f"the model): never selected, listed in score_skipped")
            seconds["features"] = time.perf_counter() - t0
            crash_point("embed", r)
            t0 = time.perf_counter()
            selection = _agree(strategy, lambda: round_selector.select(
                features or Features(), np.asarray(selected, dtype=np.int64), candidates,
                budget[r], rng))
            seconds["select"] = time.perf_counter() - t0
        new = [int(p) for p in selection.positions]
        selected += new
        if strategy.is_rank0:
            if features is not None and "influence_terms" in features.extra:
                # its own file (read back by later rounds), not a second copy in features.npz
                terms = {k: features.extra.pop(k) for k in
                         ("influence_terms", "influence_weight", "influence_subtasks")}
                np.savez(rdir / "influence_terms.npz", **terms)
            _write_selection(rdir, r, round_selector, selection, pool, pool_enc, features,
                             cfg.output.save_features)

        # ---- train
        if engine is None or (cfg.train.retrain_from_base and not fresh_engine):
            Strategy.release(engine)
            engine = strategy.prepare(build_trainable_model(
                cfg, model_path, strategy.dtype, derive_seed(cfg.seed, "init", r)))
        train_on = selected if (cfg.train.retrain_from_base or cfg.train.data_per_round == "all") \
            else new
        global_step, train_stats = train_round(engine, strategy, pool_enc, train_on, r,
                                               global_step, pad_id, logger, cfg.seed)
        seconds["train"] = train_stats.seconds

        # ---- evaluate
        eval_loss = eval_tokens = eval_accuracy = None
        if eval_set is not None:
            t0 = time.perf_counter()
            with logger.progress(f"round {r}: eval", len(eval_set[1])) as advance:
                eval_loss, eval_tokens, eval_accuracy = evaluate_with_choices(
                    engine.module, strategy, eval_set[1], choices, pad_id, cfg.eval.batch_size,
                    advance)
            seconds["eval"] = time.perf_counter() - t0
            logger.metrics(global_step, {"round": r, "eval/loss": eval_loss,
                                         **({"eval/accuracy": eval_accuracy} if choices else {})})

        # ---- save: checkpoint and exports first, state.json last (the round's commit point)
        t0 = time.perf_counter()
        state = RoundState(round_idx=r, global_step=global_step,
                           selected_ids=[pool[i].id for i in selected], budget=budget,
                           seed=cfg.seed, config_hash=cfg.results_hash(), pool_hash=pool_hash,
                           world_size=strategy.world_size, zero_stage=cfg.deepspeed.zero_stage,
                           rng=capture_rng())
        strategy.save_checkpoint(engine, rdir / "checkpoint", state.to_json())
        crash_point("checkpoint", r)
        export_weights(engine, strategy, cfg, tokenizer, rdir)
        seconds["save"] = time.perf_counter() - t0
        seconds["total"] = time.perf_counter() - t_round
        if strategy.is_rank0:
            summary = _summary(r, round_selector.name, selection.info, new, selected, pool,
                               train_stats, eval_loss, eval_tokens, pass_stats, seconds,
                               global_step, cfg, strategy, features,
                               (eval_accuracy, len(choices) if choices else 0))
            write_json_atomic(rdir / "summary.json", summary)
        strategy.barrier()
        if strategy.is_rank0:
            write_json_atomic(rdir / STATE_FILE, state.to_json())
            shutil.rmtree(_partial_dir(out, r), ignore_errors=True)   # the round is complete
            crash_point("state", r)
            _rebuild_rounds_jsonl(out, r)
            _prune_checkpoints(out, r, cfg.output.keep_checkpoints)
            log.info(f"round {r} done: {len(new)} new, {len(selected)} total, train loss "
                     f"{train_stats.loss:.4f}" + (f", eval loss {eval_loss:.4f}"
                                                  if eval_loss is not None else "")
                     + (f", eval accuracy {eval_accuracy:.3f}" if eval_accuracy is not None
                        else "")
                     + f", {seconds['total']:.1f}s")
        strategy.barrier()

    summaries = _finish(out, cfg, strategy, model_path, tokenizer)
    if strategy.is_rank0:
        console.print(rounds_table(summaries))
        console.print(f"outputs: {out}  (inspect: python launch/inspect_rounds.py {out})")
    logger.close()
    Strategy.release(engine)
    strategy.barrier()
    return summaries


# ----------------------------------------------------------------------------- helpers

def _load(path, limit, tokenizer, template, cfg):
    examples, report = load_examples(path, cfg.data.on_error, limit)
    kept, encoded, enc_report = encode_all(examples, tokenizer, template, cfg.data.max_length,
                                           cfg.data.on_error)
    report.skipped += enc_report.skipped
    if not kept:
        raise StartError(f"{path}: no usable rows after encoding ({len(report.skipped)} skipped)")
    return kept, encoded, report


def _report_data(pool, pool_enc, report, eval_set, choices, budget, template, cfg) -> None:
    truncated = sum(e.truncated for e in pool_enc)
    log.info(f"pool: {len(pool)} examples from {cfg.data.pool} (template: {template}); "
             f"{truncated} truncated to max_length={cfg.data.max_length}; "
             f"{len(report.skipped)} skipped")
    for where, reason in report.skipped[:5]:
        log.warning(f"skipped {where}: {reason}")
    if eval_set is not None:
        log.info(f"eval: {len(eval_set[0])} examples from {cfg.eval.path}; "
                 f"{len(eval_set[2].skipped)} skipped")
    if choices is not None and (len(choices) or choices.skipped):
        log.info(f"eval accuracy: {len(choices)} multiple-choice rows; "
                 f"{len(choices.skipped)} skipped")
        for where, reason in choices.skipped[:3]:
            log.warning(f"eval choices: skipped {where}: {reason}")
    log.info(f"budget per round: {budget} = {sum(budget)} of {len(pool)} examples "
             f"({100 * sum(budget) / len(pool):.1f}%)")


def _write_selection(rdir: Path, r: int, selector, selection: Selection, pool, pool_enc,
                     features: Features | None, save_features: bool) -> None:
    rows = []
    for k, p in enumerate(selection.positions):
        p = int(p)
        row = {"id": pool[p].id, "source": pool[p].source, "round": r, "pick_order": k,
               "selector": selector.name, "pool_index": p, "tokens": len(pool_enc[p].input_ids)}
        row.update({name: float(v[k]) for name, v in selection.numbers.items()})
        row.update({name: v[k] for name, v in selection.labels.items()})
        if features is not None:   # every computed score of the pick, not only the one ranked by
            row.update({name: float(v[p]) for name, v in features.scores.items()
                        if name not in row})
        row["preview"] = pool[p].preview()
        rows.append(json.dumps(row, ensure_ascii=False))
    write_text_atomic(rdir / "selection.jsonl", "".join(line + "\n" for line in rows))
    write_json_atomic(rdir / "selector_state.json", selector.state_dict())
    if features is not None and save_features:
        arrays = {f"score_{k}": v for k, v in features.scores.items()}
        if features.embeddings is not None:
            arrays["embeddings"] = features.embeddings.astype(np.float16)
        arrays.update(features.extra)
        np.savez(rdir / "features.npz", ids=np.array([ex.id for ex in pool]), **arrays)


def _skip_summary(features: Features | None, pool) -> dict:
    """Per score: how many pool examples got no value, and a few of the reasons."""
    if features is None:
        return {}
    return {name: {"count": len(skipped),
                   "examples": [f"{pool[i].id}: {why}" for i, why in list(skipped.items())[:3]]}
            for name, skipped in features.skipped.items()}


def _summary(r, selector_name, selection_info, new, selected, pool, train_stats, eval_loss,
             eval_tokens, pass_stats, seconds, global_step, cfg, strategy, features,
             accuracy) -> dict:
    def by_source(positions):
        counts: dict[str, int] = {}
        for p in positions:
            counts[pool[p].source] = counts.get(pool[p].source, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return {
        "round": r, "selector": selector_name, "selection_info": selection_info,
        "score_skipped": _skip_summary(features, pool),
        "new_examples": len(new),
        "total_examples": len(selected), "new_by_source": by_source(new),
        "total_by_source": by_source(selected), "train_loss": train_stats.loss,
        "train_loss_first_epoch": train_stats.first_epoch_loss, "eval_loss": eval_loss,
        "eval_tokens": eval_tokens, "eval_accuracy": accuracy[0], "eval_choice_rows": accuracy[1],
        "train_steps": train_stats.steps, "global_step": global_step,
        "tokens": {"train": train_stats.tokens,
                   **{name: s.tokens for name, s in pass_stats.items()},
                   **{f"{name}_padded": s.padded_tokens for name, s in pass_stats.items()}},
        **{f"{name}_tokens_per_s": round(s.tokens_per_s, 1) for name, s in pass_stats.items()},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "retrain_from_base": cfg.train.retrain_from_base, "world_size": strategy.world_size,
    }


def _checkpoint_weights(out: Path, r: int, cfg: Config) -> tuple[float, list[Path]]:
    """This round's checkpoint weight for influence (the mean learning rate of round r-1's
    training, from its summary) and, with ``influence.checkpoints: all``, the stored terms of
    the earlier influence rounds."""
    from evotune.trainer.fit import lr_at
    summary_file = round_dir(out, r - 1) / "summary.json"
    weight = 1.0
    if r > 0 and summary_file.is_file():
        steps = json.loads(summary_file.read_text())["train_steps"]
        weight = sum(lr_at(s, steps, cfg.train) for s in range(steps)) / max(steps, 1)
    history = []
    if cfg.influence.checkpoints == "all":
        history = [round_dir(out, c) / "influence_terms.npz" for c in range(r)
                   if (round_dir(out, c) / "influence_terms.npz").is_file()]
    return weight, history


def _partial_dir(out: Path, r: int) -> Path:
    """Where round ``r``'s gradient pass keeps its finished batches until the round completes
    (outside ``rounds/``, which a resume clears for the rounds it redoes)."""
    return out / "partial" / f"round_{r:03d}"


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


def _finish(out: Path, cfg: Config, strategy: Strategy, model_path, tokenizer) -> list[dict]:
    """Copy the last round's export to ``OUT/final`` (and merge if asked); idempotent."""
    last = cfg.selection.rounds - 1
    state = read_state(out, last) if strategy.is_rank0 else None
    if strategy.is_rank0 and state is not None:
        from evotune.trainer.model import merge_adapter
        _rebuild_rounds_jsonl(out, last)   # in case the run died right after state.json
        final = out / "final"
        src = round_dir(out, last)
        name = "adapter" if cfg.lora.enabled else "model"
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src / name, tmp / name)
        if cfg.lora.enabled and cfg.output.save_merged:
            merge_adapter(model_path, tmp / "adapter", tmp / "merged", tokenizer)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        log.info(f"final {'adapter' if cfg.lora.enabled else 'model'}: {final / name}")
    strategy.barrier()
    if not strategy.is_rank0:
        return []
    return [json.loads((round_dir(out, r) / "summary.json").read_text())
            for r in range(cfg.selection.rounds) if read_state(out, r) is not None]
