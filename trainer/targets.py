"""Target sets: small sets of examples of the tasks a run selects for.

Influence selection scores the pool against one (``influence.validation``: LESS calls it the
validation set, ROSE the preference validation set), and so does RDS (``scoring.rds.targets``:
its query set). Neither is the held-out eval set (``eval.path``), which only measures.

A target set is any input :mod:`evotune.trainer.sources` reads (JSON, JSONL, CSV, parquet,
a save_to_disk folder; ``data.columns`` does not apply). Its rows are examples, or preference pairs, not both:
- SFT: any pool row (Alpaca, chat ``messages`` or ShareGPT ``conversations``), plus an
  optional ``subtask`` (default: the row's ``source``, else the file name).
- Prompt only: ``prompt`` (str) without an answer, optional ``subtask`` and ``id``: encoded as
  the model sees a prompt just before answering (RDS can embed it; a gradient needs an answer).
- Preference: ``prompt`` (str), ``chosen`` (str), ``rejected`` (str), optional ``subtask``
  and ``id``. The prompt is the user turn; each answer is encoded like a training example.

Errors name the file, the line (JSONL) or item (JSON) and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evotune.trainer.data import (DataError, Encoded, _content_id, encode, encode_prompt,
                                  parse_row)
from evotune.trainer.sources import name_of, read_rows


@dataclass
class TargetItem:
    """One target item: an SFT example or a prompt (``encoded``), or a preference pair
    (``chosen``, ``rejected``), with its subtask."""
    id: str
    subtask: str
    kind: str                               # "sft" | "prompt" | "preference"
    encoded: Encoded | None = None
    chosen: Encoded | None = None
    rejected: Encoded | None = None


def _pair(row: dict, where: str, name: str) -> tuple[dict, dict, str]:
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise DataError(f"{where}: preference row without field {key!r} (a pair needs "
                            f"prompt, chosen and rejected)")
        if not isinstance(row[key], str) or not row[key].strip():
            raise DataError(f"{where}: field {key!r} must be a non-empty string")
    if row["chosen"] == row["rejected"]:
        raise DataError(f"{where}: chosen and rejected are the same text; a pair must differ")
    subtask = _optional_str(row, "subtask", where) or name
    base = {"instruction": row["prompt"], "source": subtask}
    return {**base, "output": row["chosen"]}, {**base, "output": row["rejected"]}, subtask


def _optional_str(row: dict, key: str, where: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise DataError(f"{where}: field {key!r} must be a non-empty string (or an integer)")
    return str(value)


def _prompt(row: dict, where: str, name: str, tokenizer, template: str,
            max_length: int) -> TargetItem:
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise DataError(f"{where}: field 'prompt' must be a non-empty string")
    subtask = _optional_str(row, "subtask", where) or _optional_str(row, "source", where) \
        or name
    item_id = _optional_str(row, "id", where) or _content_id({"instruction": row["prompt"]})
    return TargetItem(item_id, subtask, "prompt",
                      encoded=encode_prompt(row["prompt"], tokenizer, template, max_length))


def load_targets(path: str | Path, tokenizer, template: str, max_length: int,
                 on_error: str = "error") -> tuple[list[TargetItem], list[tuple[str, str]]]:
    """Read and encode a target file (see the module docstring).

    Raises DataError on a malformed row or a mix of preference pairs and examples. A row whose answer
    has no token left after truncation to ``max_length`` raises too, or with
    ``on_error="skip"`` is dropped and listed.

    Returns:
        The items, and ``(where, reason)`` for each skipped row.
    """
    name = name_of(path)
    items: list[TargetItem] = []
    skipped: list[tuple[str, str]] = []
    kind = None
    for where, row in read_rows(path):
        if isinstance(row, dict):
            row = {k: v for k, v in row.items() if v is not None}     # a null is an absent field
        if isinstance(row, DataError) or not isinstance(row, dict):
            error = row if isinstance(row, DataError) else DataError(
                f"{where}: expected a JSON object, got {type(row).__name__}")
            if on_error != "skip":
                raise error
            skipped.append((where, str(error)))
            continue
        row_kind = "preference" if ("chosen" in row or "rejected" in row) else \
            "prompt" if "prompt" in row else "sft"
        family = "pairs" if row_kind == "preference" else "examples"
        if kind is None:
            kind = family
        elif family != kind:
            raise DataError(f"{where}: a {row_kind} row in a file of {kind}; a target file holds "
                            f"examples (SFT or prompt-only rows) or preference pairs, not both")
        try:
            if row_kind == "prompt":
                items.append(_prompt(row, where, name, tokenizer, template, max_length))
            elif row_kind == "sft":
                ex = parse_row(row, where, name)
                subtask = _optional_str(row, "subtask", where) or ex.source
                items.append(TargetItem(ex.id, subtask, "sft",
                                     encoded=encode(ex, tokenizer, template, max_length)))
            else:
                chosen_row, rejected_row, subtask = _pair(row, where, name)
                chosen = parse_row(chosen_row, where, name)
                rejected = parse_row(rejected_row, where, name)
                pair_id = _optional_str(row, "id", where) or _content_id(
                    {"instruction": row["prompt"], "input": row["chosen"],
                     "output": row["rejected"]})     # the whole pair, not one side of it
                items.append(TargetItem(pair_id, subtask, "preference",
                                     chosen=encode(chosen, tokenizer, template, max_length),
                                     rejected=encode(rejected, tokenizer, template, max_length)))
        except DataError as e:
            if on_error != "skip":
                raise
            skipped.append((where, str(e)))
    if not items:
        raise DataError(f"{path}: no usable validation rows ({len(skipped)} skipped)")
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise DataError(f"{path}: duplicate validation id {it.id!r}")
        seen.add(it.id)
    return items, skipped
