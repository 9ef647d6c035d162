"""Rank-0 logging: console, step metrics (JSONL + TensorBoard), progress bars, round tables.

Every method is a no-op on other ranks, so the loop calls them unconditionally and only rank 0
writes files or draws bars.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from evotune.trainer.files import write_text_atomic

log = logging.getLogger("evotune")


def setup_console_logging(rank: int) -> Console:
    """Log INFO on rank 0 and WARNING on the others, with the rank in the message.

    transformers' own progress bars and INFO chatter are turned off: the loop draws its own.
    """
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 100)
    handler = RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s" if rank else "%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    return console


class ProgressBars:
    """Rich progress bars on rank 0 (``enabled``), silent elsewhere."""

    def __init__(self, enabled: bool, console: Console):
        self.enabled = enabled
        self.console = console

    @contextmanager
    def progress(self, description: str, total: int | None):
        """A rich progress bar on rank 0; yields ``advance(n)``. ``total`` None: a count
        without an end (rows read from a file not counted beforehand)."""
        if not self.enabled:
            yield lambda n=1, **_: None
            return
        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                       TimeRemainingColumn(), console=self.console, transient=False)
        with bar:
            task = bar.add_task(description, total=total, info="")
            done = [0]

            def advance(n: int = 1, info: str | None = None):
                done[0] += n
                bar.update(task, advance=n, **({"info": info} if info is not None else {}))
            yield advance
            if total is None:                      # the count is known now: a full bar
                bar.update(task, total=done[0])


class RunLogger(ProgressBars):
    """Writes ``metrics.jsonl`` (and TensorBoard events when installed) on rank 0."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, console: Console):
        super().__init__(enabled, console)
        self.out_dir = Path(out_dir)
        self._metrics = None
        self._tb = None
        if not enabled:
            return
        self._metrics = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:
                log.info("TensorBoard not installed: step metrics go to metrics.jsonl only "
                         "(pip install tensorboard to get event files)")

    def metrics(self, step: int, values: dict) -> None:
        """One line of namespaced metrics (``train/loss``...) at optimizer step ``step``."""
        if not self.enabled:
            return
        self._metrics.write(json.dumps({"global_step": step, **values}) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()


def drop_metrics_after(out_dir: Path, round_idx: int) -> None:
    """Remove metric lines of rounds after ``round_idx`` (left by a crashed, redone round), and
    a line cut short by a crash or a power loss mid-write (with a warning)."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning(f"{path}:{n}: an unreadable metrics line (cut short by a crash?) is "
                        f"dropped")
            continue
        if isinstance(row, dict) and row.get("round", -1) <= round_idx:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def rounds_table(summaries: list[dict], title: str = "evotune rounds") -> Table:
    """Per round: examples selected (new / total), train loss, held-out loss, time (fits 80
    columns; the per-phase seconds are in each round's summary.json)."""
    table = Table(title=title)
    accuracy = any(s.get("eval_accuracy") is not None for s in summaries)
    for col in ("round", "selector", "new", "total", "train loss", "eval loss") \
            + (("eval acc",) if accuracy else ()) + ("select s", "time s"):
        table.add_column(col, justify="left" if col == "selector" else "right", no_wrap=True,
                         min_width=len(col))
    for sm in summaries:
        sec = sm.get("seconds", {})
        table.add_row(str(sm["round"]), sm.get("selector", "-"), str(sm["new_examples"]),
                      str(sm["total_examples"]), fmt(sm.get("train_loss")),
                      fmt(sm.get("eval_loss")),
                      *((fmt(sm.get("eval_accuracy"), 3),) if accuracy else ()),
                      fmt(sec.get("features", 0.0) + sec.get("select", 0.0), 1),
                      fmt(sec.get("total"), 1))
    return table
