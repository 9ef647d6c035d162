"""Write the examples an evotune run selected, as a dataset for another trainer.

    python launch/export_selection.py RUN                        # every round, as in the pool
    python launch/export_selection.py RUN --round 1              # rounds 0 and 1 only
    python launch/export_selection.py RUN --format sharegpt      # conversations (from/value)
    python launch/export_selection.py RUN --format alpaca -o picks.json

Reads ``RUN/selected.jsonl`` (written after every round); needs no model. Writes JSON lines to
``--output`` (default: ``RUN/export_round_<N>_<format>.jsonl``), or to stdout with ``-o -``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evotune.trainer.selected import FORMATS, ROUND, convert, read_selected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the run's output dir (output.dir)")
    parser.add_argument("--round", type=int, default=None,
                        help="the last round to include (default: every saved round)")
    parser.add_argument("--format", choices=FORMATS, default="jsonl",
                        help="jsonl: the pool's own rows; alpaca: instruction/input/output "
                             "(system, history for chat rows); sharegpt: conversations")
    parser.add_argument("-o", "--output", default=None,
                        help="file to write ('-' for stdout)")
    args = parser.parse_args(argv)
    try:
        rows = read_selected(args.run, args.round)
        text = "".join(json.dumps(convert(row, args.format,
                                          f"{args.run / 'selected.jsonl'}:{i + 1}"),
                                  ensure_ascii=False) + "\n" for i, row in enumerate(rows))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    last = max(row[ROUND] for row in rows)
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.output) if args.output else \
        args.run / f"export_round_{last}_{args.format}.jsonl"
    path.write_text(text, encoding="utf-8")
    print(f"{len(rows)} examples (rounds 0-{last}, {args.format}) → {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
