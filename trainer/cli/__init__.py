"""The ``evotune`` command: ``evotune train|score|inspect|export [OPTIONS]``.

Each command is one module of this package, whose ``main(argv, prog)`` parses the command's own
options; ``launch/``'s scripts call the same ``main``, so ``evotune train ...`` and
``python launch/train.py ...`` take the same options and run the same code.

    evotune train --config configs/quickstart.yaml
    deepspeed --num_gpus 8 --no_python evotune train --config configs/quickstart.yaml
    python -m evotune.trainer.cli train ...          # the same, without the script on PATH
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module of this package, what it does: one line of `evotune --help`)
COMMANDS = {
    "train": ("train", "run or resume a run: select, train, evaluate, round after round"),
    "score": ("score_pool", "score every example of a pool with one model, without training"),
    "inspect": ("inspect_rounds", "show what a run selected, round by round (text, PNGs, an "
                                  "HTML report)"),
    "export": ("export_selection", "write the examples a run selected, as a dataset for "
                                   "another trainer"),
}


def parser() -> argparse.ArgumentParser:
    """The options before the command: --help, --version, and the launcher's --local_rank."""
    listing = "\n".join(f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="evotune", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="evotune [-h] [--version] COMMAND [OPTIONS]",
        description="Fine-tune an LLM in rounds, reselecting its training data with the "
                    "current model.",
        epilog=f"commands:\n{listing}\n\n"
               "evotune COMMAND --help lists a command's options. On several ranks:\n"
               "  deepspeed --num_gpus N --no_python evotune train --config CFG")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # `deepspeed --no_python evotune ...` (and `--module evotune.trainer.cli`) puts
    # --local_rank=N before the command; every rank reads LOCAL_RANK from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("command", metavar="COMMAND", choices=COMMANDS,
                   help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``evotune ARGV`` (sys.argv[1:] when None): the command's exit code; 2 (with a
    message naming the commands) when there is no command or an unknown one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the command's name is the command's own, handed on untouched (a "--"
    # included): only what comes before it is parsed here.
    at = next((i for i, arg in enumerate(argv) if arg in COMMANDS), len(argv))
    name = parser().parse_args(argv[:at + 1]).command
    module = importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")
    return module.main(argv[at + 1:], prog=f"evotune {name}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("evotune")
    except PackageNotFoundError:      # imported from a source tree that was not installed
        return "(not installed)"
