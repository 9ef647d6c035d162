"""``evotune train`` (and ``launch/train.py``): run or resume an evotune active-selection run.

    evotune train --config configs/quickstart.yaml [section.key=value ...]   # one process
    deepspeed --num_gpus 8 --no_python evotune train --config configs/diverseevol.yaml
    deepspeed --num_gpus 8 launch/train.py --config configs/diverseevol.yaml  # the same run

Options: --resume auto|never|PATH (default auto), --overwrite, --help-config.
"""

from __future__ import annotations

import argparse
import os
import sys


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The options of ``evotune train`` and ``launch/train.py`` (``prog``: the name in the
    usage line; the script's file name when None)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="evotune: fine-tune in rounds, reselecting data with the current model.",
        epilog="Overrides are dotted keys, e.g. train.lr=1e-4 selection.per_round=64. "
               "--help-config lists every key.")
    p.add_argument("--config", help="YAML config (optional with --resume PATH: the run's own "
                                    "config is used)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                   help="auto: continue after the last complete round (default); never: start "
                        "fresh; PATH: a run dir or one of its rounds/round_XXX folders")
    p.add_argument("--overwrite", action="store_true",
                   help="allow deleting a non-empty output dir (or rounds after --resume PATH)")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    p.add_argument("--help-config-markdown", action="store_true", help=argparse.SUPPRESS)
    # Added by the deepspeed launcher; the run reads LOCAL_RANK from the environment instead.
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run ``argv`` (sys.argv[1:] when None); the exit code: 0, or 2 for a config or start-up
    error (printed once, by rank 0)."""
    args = parser(prog).parse_intermixed_args(argv)
    from evotune.trainer.config import (ConfigError, describe, describe_markdown, load_config,
                                        scores_markdown, selectors_markdown)
    if args.help_config:
        print(describe())
        return 0
    if args.help_config_markdown:     # the docs' tables (tests/test_docs.py keeps them equal)
        for title, table in (("Selectors", selectors_markdown()), ("Scores", scores_markdown()),
                             ("Configuration", describe_markdown())):
            print(f"<!-- docs/{title.lower()}.md -->\n{table}\n")
        return 0
    try:
        if args.config is None and args.resume not in ("auto", "never"):
            cfg = load_config(None, args.overrides, base=_run_config(args.resume))
        elif args.config is None:
            raise ConfigError("--config is required (or --resume PATH to reuse a run's config)")
        else:
            cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        return _fail(e)

    from evotune.trainer.loop import StartError, run
    try:
        run(cfg, resume=args.resume, overwrite=args.overwrite)
    except StartError as e:
        return _fail(e)
    return 0


def _fail(error: Exception) -> int:
    """Print a start-up error once (every rank hits the same one) and return exit code 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {error}", file=sys.stderr)
    return 2


def _run_config(path: str) -> dict:
    """The saved config.json of the run that ``--resume PATH`` names."""
    import json
    from pathlib import Path

    from evotune.trainer.state import run_dir_of
    run_dir, _ = run_dir_of(Path(path))
    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"--resume {path}: no config.json in {run_dir}")
    return json.loads(cfg_file.read_text())
