"""Ranking rows that are spread over ranks: a distributed top-k, exact and in the same order as
one process.

A sharded rule (``select_sharded``, see ``selectors/base.py``) gets each rank's own rows. To
rank them by a score no rank gathers the scores: :func:`top_k_mask` finds the k-th largest
value by bisection over an order-preserving int64 key of the float64 scores (about 64
all-reduces of one int64 each), then the last position taken among the rows holding exactly
that value (about log2 of the pool size more), and each rank marks its own rows in the global top k. :func:`top_k` then
gathers just those k rows, in ranking order, on every rank. The order is the one
``np.lexsort((positions, -values))`` gives on the whole pool (highest value first, ties to the
lowest position; NaN never ranked), so a sharded rule picks what the one-process rule picks.

The collectives come from ``comm`` (``rank``, ``world_size``, ``sum_int64``, ``max_int64``,
``sum_float64`` (an element-wise sum of a float64 array),
``all_gather_rows``, ``gather_rows`` (every rank's object on rank 0, None elsewhere)
and the broadcasts of :func:`~evotune.selectors.kcenter.kcenter_sharded`):
:class:`SingleProcess` here, or the run's ranks (:class:`evotune.trainer.engine.TorchComm`).
"""

from __future__ import annotations

import numpy as np

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class SingleProcess:
    """The collectives of a sharded rule for one process (the whole pool is here)."""
    rank, world_size = 0, 1

    def max_int64(self, value: int) -> int:
        return int(value)

    def sum_int64(self, value: int) -> int:
        return int(value)

    def sum_float64(self, array: np.ndarray) -> np.ndarray:
        return np.array(array, dtype=np.float64)

    def broadcast_row(self, row: np.ndarray | None, src: int, size: int) -> np.ndarray:
        return row

    def broadcast_block(self, block: np.ndarray | None, src: int, shape) -> np.ndarray:
        return block

    def all_gather_rows(self, rows: np.ndarray) -> list[np.ndarray]:
        return [rows]

    def gather_rows(self, rows):
        return [rows]


def order_keys(values: np.ndarray) -> np.ndarray:
    """int64 keys that order like the float64 ``values`` (finite or ±inf; not NaN): the IEEE
    bits of a non-negative double grow with it; for a negative one the low 63 bits are flipped
    so that its order reverses. ``-0.0`` counts as ``0.0``, as it compares equal."""
    v = np.asarray(values, dtype=np.float64) + 0.0          # -0.0 + 0.0 is +0.0
    bits = v.view(np.int64)
    return np.where(bits >= 0, bits, bits ^ np.int64(_INT64_MAX))


def from_key(key: int) -> float:
    """The float64 whose :func:`order_keys` key is ``key``."""
    bits = np.int64(key)
    return float((bits if bits >= 0 else bits ^ np.int64(_INT64_MAX)).view(np.float64))


def global_max(values: np.ndarray, comm) -> float:
    """The largest of every rank's ``values`` (float64, no NaN; -inf where no rank has one):
    one int64 all-reduce, exact."""
    mine = int(order_keys(np.max(values))) if len(values) else int(order_keys(-np.inf))
    return from_key(comm.max_int64(mine))


def _smallest(lo: int, hi: int, enough) -> int:
    """The smallest t in [lo, hi] with ``enough(t)``, for a predicate that, once true, stays
    true as t grows and holds at ``hi`` (a bisection: one ``enough`` call per halving)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if enough(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def top_k_mask(values: np.ndarray, positions: np.ndarray, k: int, comm) -> np.ndarray:
    """Which of this rank's rows are in the global top ``k`` by value (highest first, ties to
    the lowest pool position, NaN rows never); every rank calls this with its own rows.

    Args:
        values: this rank's float64 values (NaN = not ranked).
        positions: their pool positions (distinct over all ranks).
        k: rows wanted; fewer are marked when fewer rows have a value.
        comm: the collectives (module docstring).

    Returns:
        bool mask over this rank's rows.
    """
    values = np.asarray(values, dtype=np.float64)
    positions = np.asarray(positions, dtype=np.int64)
    ranked = ~np.isnan(values)
    keys, pos = order_keys(values[ranked]), positions[ranked]
    k = min(int(k), comm.sum_int64(len(keys)))          # the same k on every rank
    mask = np.zeros(len(values), dtype=bool)
    if k <= 0:
        return mask
    def count(selected) -> int:
        return comm.sum_int64(int(selected.sum()))
    # No key is near the int64 limits (-inf's is above -2**63 + 2**51), so negating is safe.
    lo = -comm.max_int64(-int(keys.min()) if len(keys) else _INT64_MIN + 1)
    hi = comm.max_int64(int(keys.max()) if len(keys) else _INT64_MIN + 1)
    # The cut: the k-th largest key, i.e. the smallest t with fewer than k keys above it.
    cut = _smallest(lo, hi, lambda t: count(keys > t) < k)
    need = k - count(keys > cut)                 # >= 1 of the rows whose key is the cut
    at_cut = pos[keys == cut]
    first = -comm.max_int64(-int(at_cut.min()) if len(at_cut) else _INT64_MIN + 1)
    last = comm.max_int64(int(at_cut.max()) if len(at_cut) else -1)
    # The last position taken at the cut: the smallest p with `need` rows at the cut up to p.
    upto = _smallest(first, last, lambda p: count(at_cut <= p) >= need)
    mask[np.flatnonzero(ranked)] = (keys > cut) | ((keys == cut) & (pos <= upto))
    return mask


def top_k(values: np.ndarray, positions: np.ndarray, k: int, comm
          ) -> tuple[np.ndarray, np.ndarray]:
    """The global top ``k`` rows (:func:`top_k_mask`) on every rank: their pool positions and
    values, highest value first (ties to the lowest position). Only these rows cross ranks."""
    values = np.asarray(values, dtype=np.float64)
    positions = np.asarray(positions, dtype=np.int64)
    mask = top_k_mask(values, positions, k, comm)
    rows = np.concatenate(comm.all_gather_rows(
        np.stack([positions[mask].astype(np.float64), values[mask]], axis=1)))
    pos, val = rows[:, 0].astype(np.int64), rows[:, 1]
    order = np.lexsort((pos, -val))
    return pos[order], val[order]


def values_at(values: np.ndarray, positions: np.ndarray, wanted: np.ndarray, comm
              ) -> np.ndarray:
    """The values at pool positions ``wanted`` (every rank: the same array), each from the
    rank that holds it (``positions``: this rank's, ascending); NaN where no rank does."""
    positions, wanted = np.asarray(positions, dtype=np.int64), np.asarray(wanted, np.int64)
    here = np.isin(wanted, positions)
    found = np.full(len(wanted), np.nan)
    found[here] = np.asarray(values, dtype=np.float64)[np.searchsorted(positions, wanted[here])]
    parts = comm.all_gather_rows(np.stack([here.astype(np.float64), found], axis=1))
    out = np.full(len(wanted), np.nan)
    for part in parts:
        out[part[:, 0] > 0] = part[part[:, 0] > 0, 1]
    return out
