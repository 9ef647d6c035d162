"""``evotune export`` (and ``launch/export_selection.py``): write the examples an evotune run
selected, as a dataset for another trainer.

    evotune export RUN                        # every round, as in the pool
    evotune export RUN --round 1              # rounds 0 and 1 only
    evotune export RUN --format sharegpt      # conversations (from/value)
    evotune export RUN --format alpaca -o picks.json
    evotune export RUN --format parquet       # the pool's own rows, parquet

Reads ``RUN/selected.jsonl`` (written after every round) and the run's ``data.columns`` from
``RUN/config.yaml``; needs no model. Writes JSON lines (parquet: one parquet file) to
``--output`` (default: ``RUN/export_round_<N>_<format>.jsonl``,
``RUN/export_round_<N>.parquet``), or JSON lines to stdout with ``-o -``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from evotune.trainer.selected import FORMATS, ROUND, convert, read_selected


def run_columns(run: Path) -> dict[str, str]:
    """The run's ``data.columns`` as ``{field: column}`` (empty without a config.yaml)."""
    path = run / "config.yaml"
    saved = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    columns = ((saved or {}).get("data") or {}).get("columns") or {}
    return {k: v for k, v in columns.items() if v and v != k}


def write_parquet(rows: list[dict], path: Path) -> None:
    """``rows`` as one parquet file: a column per field any row has (null where a row has
    none), types inferred by pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    names = list(dict.fromkeys(k for row in rows for k in row))
    try:
        table = pa.table({k: [row.get(k) for row in rows] for k in names})
    except (pa.ArrowException, TypeError) as e:
        raise ValueError(f"the selected rows do not fit one parquet table ({e}); export them "
                         f"as jsonl") from None
    pq.write_table(table, path)


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The options of ``evotune export`` and ``launch/export_selection.py`` (``prog``: the name
    in the usage line; the script's file name when None)."""
    p = argparse.ArgumentParser(
        prog=prog, description="Write the examples an evotune run selected, as a dataset for "
                               "another trainer.")
    p.add_argument("run", type=Path, help="the run's output dir (output.dir)")
    p.add_argument("--round", type=int, default=None,
                   help="the last round to include (default: every saved round)")
    p.add_argument("--format", choices=FORMATS, default="jsonl",
                   help="jsonl, parquet: the pool's own rows; alpaca: instruction/input/"
                        "output (system, history for chat rows); sharegpt: conversations")
    p.add_argument("-o", "--output", default=None, help="file to write ('-' for stdout)")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Export as ``argv`` says (sys.argv[1:] when None); the exit code: 0, 1 when the run's
    files cannot be read or the output written, 2 for a bad option."""
    p = parser(prog)
    args = p.parse_args(argv)
    if args.format == "parquet" and args.output == "-":
        p.error("--format parquet writes a file; give -o FILE or leave -o out")
    try:
        rows = read_selected(args.run, args.round)
        columns = run_columns(args.run)
        rows = [convert(row, args.format, f"{args.run / 'selected.jsonl'}:{i + 1}", columns)
                for i, row in enumerate(rows)]
        last = max(row[ROUND] for row in rows)
        if args.output == "-":
            sys.stdout.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            return 0
        name = (f"export_round_{last}.parquet" if args.format == "parquet"
                else f"export_round_{last}_{args.format}.jsonl")
        path = Path(args.output) if args.output else args.run / name
        if args.format == "parquet":
            write_parquet(rows, path)
        else:
            path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                            encoding="utf-8")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(rows)} examples (rounds 0-{last}, {args.format}) → {path}", file=sys.stderr)
    return 0
