"""``evotune score`` (and ``launch/score_pool.py``): score every example of a pool with one
model, without training.

The same sharded pass, scores and IFD passes as a round's feature pass
(``trainer/passes/features.py``), run once with ``model.path`` (or a proxy, ``scoring.model``).
Use it to look at the scores before a run, to score a pool once with a proxy, or — with
``--label`` — to measure how well each score separates clean rows from labelled bad ones
(AUROC, ``trainer/separation.py``).

    evotune score --config configs/quickstart.yaml --out runs/scores
    evotune score data.pool=noisy.jsonl --label corruption --pair orig_id \\
        --scores loss,length,ifd_cherry --out runs/noisy
    deepspeed --num_gpus 2 --no_python evotune score --config CFG --out OUT
    deepspeed --num_gpus 2 launch/score_pool.py --config CFG --out OUT    # the same

The pool is read through the token cache that training runs use (``trainer/tokens.py``: built
once per pool file, tokenizer and template, then mapped by every rank), so scoring a pool and
then training on it tokenises it once.

Writes ``OUT/scores.jsonl`` (per example: id, source, every score, ``skipped`` reasons),
``OUT/summary.json`` (tokens and tokens/s of each pass, settings) and, with ``--label``,
``OUT/separation.json`` plus a table on the terminal. Files in OUT are replaced.
Config keys used: model.*, data.* (pool, template, max_length, on_error, max_examples),
scoring.* (IFD settings, scoring.knn_k.*, scoring.linear.rule, scoring.reference.*: the
reference model is trained here, with lora.* and train.*, when a score reads it),
selection.batch_size, deepspeed.backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path


class ScoreRequest:
    """What the feature pass computes: stands where a selector's needs would."""
    name = "score_pool"

    def __init__(self, scores: tuple[str, ...]):
        self.scores = scores
        self.needs_embeddings = False     # a score that reads them (knn_k) brings them itself


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The options of ``evotune score`` and ``launch/score_pool.py`` (``prog``: the name in the
    usage line; the script's file name when None)."""
    from evotune.trainer.scores import SCORES
    p = argparse.ArgumentParser(prog=prog,
                                description="Score a pool with one model (no training).")
    p.add_argument("--config", help="YAML config (optional: overrides alone are enough)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--scores", default="all",
                   help=f"comma-separated, or all (= every score the config can compute: "
                        f"linear with scoring.linear.rule, rds with scoring.rds.targets, reward "
                        f"with scoring.reward.model; never influence, which needs a training "
                        f"run). Known: {', '.join(SCORES)}")
    p.add_argument("--label", help="row field naming a bad row's group (null/empty = clean): "
                                   "report each score's AUROC, clean vs each group")
    p.add_argument("--pair", help="with --label: row field holding the id of the clean row a "
                                  "bad row was made from; compare each group with its originals")
    # Added by the deepspeed launcher; the pass reads LOCAL_RANK from the environment instead.
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Score as ``argv`` says (sys.argv[1:] when None); the exit code: 0, or 2 for a bad
    option, config or input (printed once, by rank 0)."""
    args = parser(prog).parse_intermixed_args(argv)
    from evotune.trainer.config import ConfigError, load_config
    from evotune.trainer.scores import SCORES, check_computable
    try:
        cfg = load_config(args.config, args.overrides)
        names = tuple(n for n, s in SCORES.items() if s.source != "influence"
                      and _computable(n, cfg)) \
            if args.scores == "all" else tuple(s.strip() for s in args.scores.split(",") if s)
        unknown = [s for s in names if s not in SCORES]
        if unknown or not names:
            raise ConfigError(f"--scores: unknown {', '.join(unknown) or '(none given)'}; "
                              f"known: {', '.join(SCORES)}")
        if any(SCORES[n].source == "influence" for n in names):
            raise ConfigError("--scores influence: influence needs a training run's optimizer "
                              "state (evotune train with selection.selector=influence)")
        for n in names:
            try:
                check_computable((n,), cfg)
            except ValueError as e:
                raise ConfigError(f"--scores {n}: {e}") from None
        if args.pair and not args.label:
            raise ConfigError("--pair needs --label")
    except (ConfigError, FileNotFoundError) as e:
        return _fail(e)
    from evotune.trainer.loop import StartError
    try:
        return score(cfg, names, Path(args.out), args.label, args.pair)
    except (ValueError, OSError, StartError) as e:
        return _fail(e)


def _computable(name: str, cfg) -> bool:
    """Whether the config has what ``name`` needs (a rule, target examples, a reward model, a
    reference holdout), its inputs included."""
    from evotune.trainer.scores import check_computable
    try:
        check_computable((name,), cfg)
    except ValueError:
        return False
    return True


def score(cfg, names: tuple[str, ...], out: Path, label: str | None, pair: str | None) -> int:
    from evotune.trainer.data import resolve_template
    from evotune.trainer.engine import Strategy
    from evotune.trainer.logs import ProgressBars, log, setup_console_logging
    from evotune.trainer.loop import _agree, load_pool
    from evotune.trainer.model import (build_trainable_model, load_model, load_tokenizer,
                                       resolve_model_path)
    from evotune.trainer.passes.features import FeaturePass
    from evotune.trainer.separation import separation
    from evotune.trainer.sources import input_hash
    from evotune.trainer.files import write_json_atomic, write_text_atomic

    strategy = Strategy(cfg)
    strategy.setup()
    console = setup_console_logging(strategy.rank)
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path)
    template = resolve_template(cfg.data.template, tokenizer)
    logger = ProgressBars(strategy.is_rank0, console)
    # The pool's rows and tokens from the token cache a training run uses (rank 0 builds the
    # entry when there is none, reading the file a batch of rows at a time; every rank maps it)
    pool_hash = _agree(strategy, lambda: input_hash(cfg.data.pool, cfg.data.columns.mapping()))
    pool, pool_enc, report = load_pool(cfg, tokenizer, template, pool_hash, strategy, logger)
    skipped_rows = report.skipped
    if label and pool and label not in pool[0].extra:
        raise ValueError(f"--label {label}: the rows have no field {label!r} (fields: "
                         f"{', '.join(sorted(pool[0].extra)) or 'none beyond the standard ones'})")
    log.info(f"scoring {len(pool)} examples of {cfg.data.pool} ({len(skipped_rows)} skipped) "
             f"with {model_path}: {', '.join(names)}")
    feature_pass = FeaturePass(cfg, ScoreRequest(names), pool, pool_enc, tokenizer, template,
                               strategy)
    if feature_pass.fixed:               # reference_loss, base_loss and the scores made from them
        engines = []

        def reference_engine(seed: int):
            lora = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, enabled=True))
            engines.append(strategy.prepare(build_trainable_model(lora, model_path,
                                                                  strategy.dtype, seed)))
            return engines[-1]
        feature_pass.prepare_fixed(reference_engine, logger, None, model_path, pool_hash,
                                   template, strategy.dtype)
        for engine in engines:
            Strategy.release(engine)
    model = load_model(model_path, strategy.dtype, cfg.model.attn_implementation)
    model.to(strategy.device).eval()
    t0 = time.perf_counter()
    key = feature_pass.base_cache_key(model_path, pool_hash, template, strategy.dtype) \
        if cfg.scoring.base_cache else None
    result = feature_pass.run(model, logger, cache_key=key)
    features, stats = result.features, result.stats
    seconds = time.perf_counter() - t0
    if not strategy.is_rank0:
        strategy.close()
        return 0
    out.mkdir(parents=True, exist_ok=True)
    columns = {n: features.scores[n] for n in names}
    lines = []
    for i, ex in enumerate(pool):
        row = {"id": ex.id, "source": ex.source}
        if label:
            row[label] = ex.extra.get(label)
        row.update({n: None if math.isnan(v[i]) else float(v[i]) for n, v in columns.items()})
        why = {n: features.skipped[n][i] for n in names if i in features.skipped.get(n, {})}
        if why:
            row["skipped"] = why
        lines.append(json.dumps(row, ensure_ascii=False))
    write_text_atomic(out / "scores.jsonl", "".join(line + "\n" for line in lines))
    summary = {"pool": str(cfg.data.pool), "model": str(model_path), "template": template,
               "scoring_template": cfg.scoring.template, "rows": len(pool),
               "rows_skipped": len(skipped_rows), "world_size": strategy.world_size,
               "seconds": round(seconds, 2),
               "passes": {k: {"tokens": s.tokens, "padded_tokens": s.padded_tokens,
                              "seconds": round(s.seconds, 2),
                              "tokens_per_s": round(s.tokens_per_s, 1), "cached": s.cached}
                          for k, s in stats.items()},
               "no_value": {n: len(features.skipped.get(n, {})) for n in names}}
    write_json_atomic(out / "summary.json", summary)
    if label:
        table = separation(columns, [ex.extra.get(label) for ex in pool],
                           [ex.extra.get(pair) for ex in pool] if pair else None,
                           [ex.id for ex in pool])
        write_json_atomic(out / "separation.json", table)
        console.print(separation_table(table, names))
    console.print(f"wrote {out / 'scores.jsonl'} ({len(pool)} rows) in {seconds:.1f}s")
    strategy.close()                     # the other ranks wait here for rank 0's files
    return 0


def separation_table(table: dict, names):
    """A rich table: one row per score, one column per bad group, AUROC (clean > bad)."""
    from rich.table import Table
    t = Table(title="AUROC, clean rows scoring above bad rows (0.5 = no separation; < 0.5: "
                    "the score prefers the bad rows)")
    t.add_column("score")
    for group, entry in table.items():
        t.add_column(f"{group}\n({entry['n_clean']} vs {entry['n_bad']})", justify="right")
    for n in names:
        cells = []
        for entry in table.values():
            a = entry["scores"][n]["auroc"]
            nan = entry["scores"][n]["nan_clean"] + entry["scores"][n]["nan_bad"]
            cells.append("–" if math.isnan(a) else f"{a:.3f}" + (f" ({nan} n/a)" if nan else ""))
        t.add_row(n, *cells)
    return t


def _fail(error: Exception) -> int:
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {error}", file=sys.stderr)
    return 2
