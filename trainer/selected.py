"""The chosen set as a dataset: ``OUT/selected.jsonl`` and its conversions.

After every round, ``selected.jsonl`` holds every row selected so far, each as it stands in the
pool file (its own shape and field names, unparsed), plus ``evotune_round`` (the round that
picked it) and ``evotune_pick_order`` (its place in that round's picks), in selection order:
ready for another trainer. It is derived from the rounds' ``selection.jsonl`` and the pool file,
so a resumed run rewrites it exactly.

:func:`convert` turns a row into the two shapes other trainers read (LLaMA-Factory, axolotl,
TRL): ``alpaca`` (``instruction``, ``input``, ``output``, with ``system`` and ``history`` for
chat rows) and ``sharegpt`` (``conversations`` of ``from`` / ``value`` turns: ``system``,
``human``, ``gpt``). ``launch/export_selection.py`` writes any round's set in any of them, or
as parquet (the rows as they are).
"""

from __future__ import annotations

import json
from pathlib import Path

from evotune.trainer.data import DataError, parse_row, rename_columns
from evotune.trainer.sources import read_rows, to_json
from evotune.trainer.files import write_text_atomic
from evotune.trainer.state import round_dir

FILE = "selected.jsonl"
ROUND, ORDER = "evotune_round", "evotune_pick_order"
FORMATS = ("jsonl", "parquet", "alpaca", "sharegpt")


def write_selected(out: Path, r: int, pool_path: str | Path, pool) -> int:
    """Rank 0, when round ``r`` is saved: ``OUT/selected.jsonl`` with the picks of rounds
    0..r (from their ``selection.jsonl``), each the pool's own row (``pool``: the run's
    examples, in pool order, whose ``where`` names the row). Values JSON has no type for
    (parquet dates, bytes) are written as text. Returns the number of rows."""
    picks = {}                                   # the row's "file:line" → (round, pick order)
    for c in range(r + 1):
        path = round_dir(out, c) / "selection.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            picks[pool[row["pool_index"]].where] = (c, row["pick_order"])
    found = []
    for where, row in read_rows(pool_path):
        if where in picks:
            found.append((picks[where], {**row, ROUND: picks[where][0],
                                         ORDER: picks[where][1]}))
    if len(found) != len(picks):
        raise DataError(f"{pool_path}: {len(picks) - len(found)} selected rows are no longer "
                        f"in the pool file (was it changed during the run?)")
    found.sort(key=lambda item: item[0])
    write_text_atomic(out / FILE, "".join(json.dumps(row, ensure_ascii=False, default=to_json)
                                          + "\n" for _, row in found))
    return len(found)


def read_selected(run: Path, upto: int | None = None) -> list[dict]:
    """The rows of ``RUN/selected.jsonl`` picked in rounds 0..``upto`` (None: all of them).
    Raises FileNotFoundError without one, ValueError for a round the file does not reach."""
    path = Path(run) / FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run} an evotune run dir with a "
                                f"completed round?")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    last = max(row[ROUND] for row in rows)
    if upto is not None and not 0 <= upto <= last:
        raise ValueError(f"round {upto}: {path} holds rounds 0 to {last}")
    return [row for row in rows if upto is None or row[ROUND] <= upto]


def convert(row: dict, fmt: str, where: str = "selected row",
            columns: dict[str, str] | None = None) -> dict:
    """One ``selected.jsonl`` row in ``fmt`` (``jsonl``, ``parquet``: as it is). The evotune
    fields, the row's ``id`` (when it had one) and its ``source`` come along; other fields of
    the input are kept by ``jsonl`` and ``parquet`` only. ``columns``: the run's
    ``data.columns``. Raises ValueError naming the row when it does not fit ``alpaca`` (a chat
    row that does not alternate user and assistant turns)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt in ("jsonl", "parquet"):
        return dict(row)
    fields = rename_columns({k: v for k, v in row.items() if k not in (ROUND, ORDER)}, columns,
                            where)
    ex = parse_row(fields, where, "pool")
    keep = {k: v for k, v in {**fields, **row}.items() if k in ("id", "source", ROUND, ORDER)}
    turns = ex.messages
    if fmt == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": names[m["role"]], "value": m["content"]}
                                  for m in turns], **keep}
    if ex.alpaca is not None:
        return {**ex.alpaca, **keep}
    system = [m["content"] for m in turns if m["role"] == "system"]
    talk = [m for m in turns if m["role"] != "system"]
    pairs = [(talk[i], talk[i + 1]) for i in range(0, len(talk) - 1, 2)]
    if len(talk) % 2 or any(u["role"] != "user" or a["role"] != "assistant" for u, a in pairs):
        raise ValueError(f"{where}: its turns do not alternate user and assistant, so it has "
                         f"no alpaca form; export it as sharegpt or jsonl")
    out = {"instruction": pairs[-1][0]["content"], "input": "",
           "output": pairs[-1][1]["content"]}
    if system:
        out["system"] = "\n\n".join(system)
    if len(pairs) > 1:
        out["history"] = [[u["content"], a["content"]] for u, a in pairs[:-1]]
    return {**out, **keep}
