"""The pool's token cache: tokenised once, memory-mapped by every rank.

Tokenising the pool as Python lists on every rank at every start costs time and about 40 bytes
per token per rank (two lists of ints). Here the pool is tokenised once per (pool file and its
content, tokenizer, template, max_length, data settings) — read and tokenised in batches, one
tokenizer call per batch of rows, never all in memory — into four arrays under
``$EVOTUNE_CACHE/tokens/<key>/`` (default ``~/.cache/evotune``):

- ``tokens.npy``: every kept row's token ids back to back (int32);
- ``labels.npy``: 1 where the token is a training target (a response token), else 0 (uint8);
- ``offsets.npy``: row ``i`` is ``tokens[offsets[i]:offsets[i + 1]]`` (int64, N + 1);
- ``truncated.npy``: the row was cut to ``max_length`` (uint8);

- ``rows.npy`` and ``row_offsets.npy``: every kept row itself (its :class:`Example`: id,
  source, messages, where it came from) as one JSON line, back to back (uint8), and where each
  starts (int64, N + 1); ``ids.json``, the rows' ids alone;

plus ``meta.json`` (why the rows left out were skipped, at loading or at encoding). That is 5
bytes per token and the rows' JSON, shared by every rank of a machine through the page cache
(``np.load`` with ``mmap_mode="r"``): no rank holds the pool as Python objects (about 2.2 KB a
row on every rank before: ``benchmarks/RESULTS.md``), and only rank 0 ever reads the pool file,
when it builds the cache. A resume, or any run with the same inputs, reuses the cache; a
changed or moved pool file, tokenizer, chat template or setting gets a new key. Rank 0 builds
it (atomically: a temporary folder renamed into place) while the others wait; then every rank
maps it.

:class:`TokenizedPool` is a read-only sequence of :class:`~evotune.trainer.data.Encoded`,
and :class:`CachedExamples` one of :class:`~evotune.trainer.data.Example`, each materialised
one row at a time, so code written for lists reads them unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from evotune.trainer.data import (IGNORE_INDEX, DataError, Encoded, Example, LoadReport,
                                  assemble, bos_prefix, segments)
from evotune.trainer.sources import to_json
from evotune.trainer.files import cache_root, fsync_dir, fsync_tree

VERSION = 3          # 2 (2026-12-01): ShareGPT rows and Alpaca system/history are parsed;
                     # 3 (2026-12-02): the rows themselves are cached too
BATCH_ROWS = 256


def tokens_dir() -> Path:
    return cache_root() / "tokens"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the token ids: the tokenizer's full state (vocabulary, merges,
    normaliser; a fast tokenizer's JSON), its special tokens and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(
        tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps([type(tokenizer).__name__, tokenizer.all_special_tokens,
                        getattr(tokenizer, "chat_template", None), tokenizer.bos_token_id,
                        tokenizer.eos_token])
    return hashlib.sha256((state + extra).encode()).hexdigest()


def cache_key(pool_hash: str, pool_path: str | Path, tokenizer, template: str, max_length: int,
              on_error: str, max_examples: int) -> str:
    """The entry's name. The pool file's absolute path is part of it as well as its content:
    the cached rows and skip messages name the file they came from (``file:line``), which a
    copy of the pool elsewhere must not inherit."""
    blob = json.dumps([VERSION, pool_hash, str(Path(pool_path).resolve()),
                       tokenizer_fingerprint(tokenizer), template, max_length, on_error,
                       max_examples])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class _Mapped(Sequence):
    """Rows stored back to back in memory-mapped arrays, ``offsets`` (N + 1) saying where each
    starts; a subclass makes row ``i`` from its span ``a:b`` (``row``), one row at a time."""
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.row(i, int(self.offsets[i]), int(self.offsets[i + 1]))

    def row(self, i: int, a: int, b: int):
        raise NotImplementedError


class TokenizedPool(_Mapped):
    """The cached encodings of the kept pool rows, memory-mapped (see the module docstring)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        load = lambda name: np.load(self.directory / f"{name}.npy", mmap_mode="r")  # noqa: E731
        self.tokens, self.is_label = load("tokens"), load("labels")
        self.offsets, self.truncated = load("offsets"), load("truncated")
        self.lengths = np.diff(np.asarray(self.offsets))

    def row(self, i: int, a: int, b: int) -> Encoded:
        ids = np.asarray(self.tokens[a:b], dtype=np.int64)
        labels = np.where(self.is_label[a:b].astype(bool), ids, IGNORE_INDEX)
        return Encoded(ids.tolist(), labels.tolist(), bool(self.truncated[i]))


class CachedExamples(_Mapped):
    """The kept pool rows as :class:`Example` objects, decoded from the cache one at a time
    (see the module docstring)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.rows = np.load(self.directory / "rows.npy", mmap_mode="r")
        self.offsets = np.load(self.directory / "row_offsets.npy", mmap_mode="r")

    def row(self, i: int, a: int, b: int) -> Example:
        return Example(**json.loads(self.rows[a:b].tobytes()))

    def ids(self) -> list[str]:
        """Every kept row's id, in pool order (read from ``ids.json``, not kept: call it where
        they are all needed at once, rather than decoding every row)."""
        return json.loads((self.directory / "ids.json").read_text())


def _row_json(ex: Example) -> bytes:
    """One cached row: the Example's fields as a JSON line (values JSON has no type for, in
    ``extra``, as text)."""
    return (json.dumps(dataclasses.asdict(ex), ensure_ascii=False, default=to_json)
            + "\n").encode()


def encode_batched(examples: Iterable[Example], tokenizer, template: str, max_length: int,
                   advance=lambda n=1, **_: None) -> Iterator[tuple[Example, Encoded | DataError]]:
    """Yield each example with its :class:`Encoded` or its :class:`DataError`, in order,
    reading ``examples`` (any iterable) ``BATCH_ROWS`` rows at a time; a batch's pieces go
    through one tokenizer call (the same ids as one call each:
    :func:`evotune.trainer.data.encode`)."""
    prefix = bos_prefix(tokenizer, template)
    rows = iter(examples)
    while batch := list(itertools.islice(rows, BATCH_ROWS)):
        parts: list[list[tuple[str, bool]] | DataError] = []
        for ex in batch:
            try:
                parts.append(segments(ex, tokenizer, template))
            except DataError as e:
                parts.append(e)
        texts = [text for p in parts if not isinstance(p, DataError) for text, _ in p]
        ids = tokenizer(texts, add_special_tokens=False).input_ids if texts else []
        k = 0
        for ex, p in zip(batch, parts):
            if isinstance(p, DataError):
                yield ex, p
                continue
            pieces, k = ids[k: k + len(p)], k + len(p)
            try:
                yield ex, assemble(ex, prefix, pieces, [r for _, r in p], max_length)
            except DataError as e:
                yield ex, e
        advance(len(batch))


def build(directory: Path, examples: Iterable[Example], tokenizer, template: str,
          max_length: int, on_error: str, advance=lambda n=1, **_: None,
          load_skipped: Sequence[tuple[str, str]] = ()) -> None:
    """Tokenise ``examples`` (any iterable: they are read once, a batch at a time, and never
    held) into the cache folder ``directory`` (atomically), with the kept rows themselves.
    Raises the first row's DataError with ``on_error="error"``; with ``"skip"`` the row is left
    out and listed, after ``load_skipped`` (the rows the loading skipped, ``(where, reason)``;
    read when the examples are exhausted, so a loader may fill it as it goes)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        tokens = open(tmp / "tokens.bin", "wb")
        labels = open(tmp / "labels.bin", "wb")
        offsets, truncated, skipped = [0], [], []
        with tokens, labels, _RowsWriter(tmp) as rows:
            for ex, enc in encode_batched(examples, tokenizer, template, max_length, advance):
                if isinstance(enc, DataError):
                    if on_error != "skip":
                        raise enc
                    skipped.append([ex.where, str(enc)])
                    continue
                ids = np.asarray(enc.input_ids, dtype=np.int64)
                if ids.size and (ids.max() >= 2**31 or ids.min() < 0):
                    raise DataError(f"{ex.where}: token ids outside int32")
                tokens.write(ids.astype(np.int32).tobytes())
                labels.write((np.asarray(enc.labels) != IGNORE_INDEX).astype(np.uint8).tobytes())
                offsets.append(offsets[-1] + len(ids))
                truncated.append(enc.truncated)
                rows.add(ex)
        for name, dtype in (("tokens", np.int32), ("labels", np.uint8)):
            _bin_to_npy(tmp / f"{name}.bin", tmp / f"{name}.npy", np.dtype(dtype))
        np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        np.save(tmp / "truncated.npy", np.asarray(truncated, dtype=np.uint8))
        skipped = [list(s) for s in load_skipped] + skipped
        (tmp / "meta.json").write_text(json.dumps({"version": VERSION, "skipped": skipped}))
        fsync_tree(tmp)
        try:
            os.rename(tmp, directory)
        except OSError:           # another process finished the same cache first: use it
            if not (directory / "meta.json").is_file():
                raise
        fsync_dir(directory.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _RowsWriter:
    """Writes the rows :class:`CachedExamples` reads (``rows.npy``, ``row_offsets.npy``,
    ``ids.json``: the module docstring) one row at a time, completed on a clean exit."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.file = open(directory / "rows.bin", "wb")
        self.offsets, self.ids = [0], []

    def add(self, ex: Example) -> None:
        line = _row_json(ex)
        self.file.write(line)
        self.offsets.append(self.offsets[-1] + len(line))
        self.ids.append(ex.id)

    def __enter__(self) -> "_RowsWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        self.file.close()
        if kind is not None:
            return
        _bin_to_npy(self.directory / "rows.bin", self.directory / "rows.npy",
                    np.dtype(np.uint8))
        np.save(self.directory / "row_offsets.npy", np.asarray(self.offsets, dtype=np.int64))
        (self.directory / "ids.json").write_text(json.dumps(self.ids))


def write_rows(directory: Path, examples: Iterable[Example]) -> None:
    """The rows :class:`CachedExamples` reads (module docstring), streamed to disk."""
    with _RowsWriter(directory) as rows:
        for ex in examples:
            rows.add(ex)


def _bin_to_npy(raw: Path, npy: Path, dtype: np.dtype) -> None:
    """A raw file of ``dtype`` values as a 1-D ``.npy`` file, streamed (the pool's tokens are
    never all in memory at once), then the raw file removed."""
    count = raw.stat().st_size // dtype.itemsize
    with open(npy, "wb") as f, open(raw, "rb") as src:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                 "fortran_order": False, "shape": (count,)})
        shutil.copyfileobj(src, f, 16 << 20)
    raw.unlink()


def open_cached(directory: Path) -> tuple[CachedExamples, TokenizedPool, LoadReport]:
    """The kept examples, their cached encodings and the rows left out (loading's, then
    encoding's)."""
    meta = json.loads((directory / "meta.json").read_text())
    pool = TokenizedPool(directory)
    kept = CachedExamples(directory)
    if len(kept) != len(pool):
        raise ValueError(f"token cache {directory} is inconsistent ({len(pool)} rows for "
                         f"{len(kept)} kept examples); delete it")
    return kept, pool, LoadReport([tuple(s) for s in meta["skipped"]])
