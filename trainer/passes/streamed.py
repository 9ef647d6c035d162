"""Whole-pool row arrays written from shards, and read back into shards, a block at a time.

A sharded feature pass leaves each rank its own rows (``Features.positions``). Writing the
pool's embeddings to one file (``output.save_features``'s ``features.npz``, the base-model
cache) and reading them back into shards must not put N × D on one rank: rank 0 receives (or
reads) the rows in pool order one block of positions at a time (``BLOCK_BYTES`` of rows), so it
holds one block whatever N is. The files are ordinary uncompressed ``.npz`` files, as
``np.savez`` writes them (``np.load`` reads them), and need no filesystem shared by the ranks.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from evotune.trainer.files import write_bytes_atomic

BLOCK_BYTES = 64 << 20


def block_rows(dim: int, itemsize: int = 4) -> int:
    """Rows of ``dim`` values of ``itemsize`` bytes in one block (at least 1)."""
    return max(1, BLOCK_BYTES // max(1, dim * itemsize))


def pool_blocks(strategy, positions: np.ndarray, rows: np.ndarray, n: int, dim: int,
                block: int) -> Iterator[tuple[int, np.ndarray | None]]:
    """Every rank, in step: the pool's ``n`` rows in pool order, ``block`` positions a step,
    as ``(start, rows)`` on rank 0 — every rank's ``rows`` put at its ``positions``
    (ascending), NaN where no rank has a row — and ``(start, None)`` on the others. Each step is
    one gather to rank 0, so every rank must run the generator to its end."""
    positions = np.asarray(positions, dtype=np.int64)
    for a in range(0, n, block):
        b = min(n, a + block)
        lo, hi = np.searchsorted(positions, [a, b])
        parts = strategy.gather_to_rank0((positions[lo:hi], rows[lo:hi]))
        if parts is None:
            yield a, None
            continue
        out = np.full((b - a, dim), np.nan, dtype=np.float32)
        for where, values in parts:
            if len(where):
                out[where - a] = values
        yield a, out


@dataclass
class RowsPart:
    """This rank's rows of a whole array that rank 0 writes (a ``features.npz`` entry): row k
    of ``rows`` is row ``index[k]`` (ascending) of the ``length``-row array. In a shard's
    ``Features.extra`` every rank holds one under the same name (rank 0's whole-pool arrays sit
    beside it)."""
    index: np.ndarray
    rows: np.ndarray
    length: int


Stream = tuple[str, tuple[int, int], Iterator[tuple[int, np.ndarray | None]]]


def write_npz(path: str | Path, arrays: dict[str, np.ndarray], streams: list[Stream] = (),
              dtype=np.float32) -> None:
    """``np.savez(path, **arrays)``, plus one array per stream ``(name, shape, blocks)``
    written from its ``blocks`` — ``(start, rows)`` in row order — as they come, as ``dtype``:
    one block in memory. Raises ValueError when the blocks do not fill an array exactly."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for key, value in arrays.items():
            with z.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
        for name, shape, blocks in streams:
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                    "fortran_order": False, "shape": tuple(shape)})
                done = 0
                for start, rows in blocks:
                    if start != done or rows.shape[1:] != tuple(shape[1:]):
                        raise ValueError(f"{name}: block at row {start} of shape {rows.shape} "
                                         f"does not follow row {done} of {tuple(shape)}")
                    f.write(np.ascontiguousarray(rows, dtype=dtype).tobytes())
                    done += len(rows)
                if done != shape[0]:
                    raise ValueError(f"{name}: {done} rows written of {shape[0]}")


def save_streamed(strategy, path: Path, arrays: dict[str, np.ndarray] | None,
                  streams: list[Stream], dtype=np.float32) -> str | None:
    """Every rank: rank 0 writes ``path`` atomically (:func:`write_npz`: ``arrays`` and the
    ``streams``, each from a :func:`pool_blocks`) while the others feed the blocks. Returns
    rank 0's error as text on every rank (None once written); rank 0 keeps feeding after an
    error, so no rank is left waiting in a gather. A bug (not OSError or ValueError) is raised
    on rank 0 and reported as RuntimeError on the others."""
    error, crash = None, None
    if strategy.is_rank0:
        try:
            write_bytes_atomic(path, lambda tmp: write_npz(tmp, arrays, streams, dtype))
        except (OSError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
        except Exception as e:                     # noqa: BLE001  (re-raised below)
            error, crash = f"{type(e).__name__}: {e}", e
    for _, _, blocks in streams:                   # the others' steps; rank 0's after an error
        for _ in blocks:
            pass
    status = strategy.broadcast_from_rank0((error, crash is not None))
    if crash is not None:
        raise crash
    if status[1]:
        raise RuntimeError(f"rank 0 failed writing {path}: {status[0]}")
    return status[0]


def save_parts(strategy, path: Path, arrays: dict[str, np.ndarray] | None,
               parts: dict[str, RowsPart | None], dtype=np.float32) -> str | None:
    """Every rank: :func:`save_streamed` of ``arrays`` (rank 0's) and one array per entry of
    ``parts`` (the same names on every rank) made of every rank's :class:`RowsPart`; an entry
    that is None on every rank is left out. Returns rank 0's error or None."""
    comm, streams = strategy.comm, []
    for name in sorted(parts):
        part = parts[name]
        if not comm.max_int64(int(part is not None)):
            continue
        dim = comm.max_int64(part.rows.shape[1] if part.rows.ndim == 2 else 0)
        streams.append((name, (part.length, dim), pool_blocks(
            strategy, part.index, part.rows, part.length, dim, block_rows(dim))))
    return save_streamed(strategy, path, arrays, streams, dtype)


def _member_header(z: zipfile.ZipFile, name: str) -> tuple[zipfile.ZipInfo, tuple, np.dtype]:
    """The zip entry of array ``name`` and its shape and dtype (read from its header)."""
    info = z.getinfo(f"{name}.npy")
    with z.open(info) as f:
        shape, fortran, dtype = _read_header(f)
    if fortran or len(shape) != 2:
        raise ValueError(f"{name}: expected a C-ordered 2-D array, found shape {shape}")
    return info, shape, dtype


def _read_header(f) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran order, dtype) of the ``.npy`` stream ``f``, left at its data."""
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f".npy format {version} not read here")
    return read(f)


def read_shard(strategy, path: Path | None, name: str, positions: np.ndarray
               ) -> np.ndarray | None:
    """Every rank: the rows at its ``positions`` (ascending) of the 2-D float array ``name``
    in the ``.npz`` at ``path`` (rank 0's; the others pass anything), as float32. Rank 0 reads
    it a block at a time and broadcasts each block; every rank keeps its own rows. None on
    every rank when rank 0 cannot read it whole (a torn or foreign file)."""
    comm = strategy.comm
    head, z = None, None
    if strategy.is_rank0:
        try:
            z = zipfile.ZipFile(path)
            info, shape, dtype = _member_header(z, name)
            if info.compress_type != zipfile.ZIP_STORED or \
                    info.file_size < int(np.prod(shape)) * dtype.itemsize:
                raise ValueError(f"{name}: compressed or short")
            head = (tuple(int(s) for s in shape), dtype.str)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            head = None
    head = strategy.broadcast_from_rank0(head)
    if head is None:
        if z is not None:
            z.close()
        return None
    (n, dim), dtype = head[0], np.dtype(head[1])
    positions = np.asarray(positions, dtype=np.int64)
    mine = np.empty((len(positions), dim), dtype=np.float32)
    block, failed = block_rows(dim), False
    f = None
    if strategy.is_rank0:
        f = z.open(f"{name}.npy")
        _read_header(f)
    for a in range(0, n, block):
        b = min(n, a + block)
        rows = None
        if f is not None:
            try:
                raw = f.read((b - a) * dim * dtype.itemsize)
                rows = np.frombuffer(raw, dtype=dtype).reshape(b - a, dim)
            except (OSError, ValueError, zipfile.BadZipFile):
                failed, rows = True, np.full((b - a, dim), np.nan)
        rows = comm.broadcast_block(rows, 0, (b - a, dim))
        lo, hi = np.searchsorted(positions, [a, b])
        mine[lo:hi] = rows[positions[lo:hi] - a]
    if f is not None:
        f.close()
        z.close()
    return None if strategy.broadcast_from_rank0(failed) else mine
