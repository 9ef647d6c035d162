"""Greedy k-center (furthest-first) selection, with DiverseEvol's semantics.

DiverseEvol: Wu et al., "Self-Evolved Diverse Data Sampling for Efficient Instruction Tuning",
arXiv 2311.08182; code OFA-Sys/DiverseEvol.

All labeled points are the initial centres. Each pick is the candidate furthest (Euclidean) from
its nearest centre; it then becomes a centre. Ties go to the lowest pool index.

Departures from the reference implementation (OFA-Sys/DiverseEvol), on purpose:
- The reference builds an N×N distance matrix. Here one vector holds each candidate's squared
  distance to its nearest centre (O(N) memory, beside one float32 copy of the candidates'
  embeddings) and is updated after each pick; the initial
  distances to the labeled set are computed in blocks of ``chunk_size`` candidates. Same picks.
  Over several ranks (:func:`kcenter_sharded`), each rank holds only its own candidates; on an
  accelerator (CUDA under NCCL) in the device's memory, the distances computed there in
  float64 and rounded to float32 (``trainer/device_centres.py``).
- The reference computes ``sqrt(|a|²+|b|²−2ab)`` without a clamp, so in fp32 a near-duplicate
  can get a negative squared distance → NaN → that point is picked first. Squared distances are
  clamped at 0 here, so a near-duplicate is never preferred.
- The reference returns the new indices sorted; the pick order is kept here, with each pick's
  distance to its nearest centre at pick time.
- With no labeled point at all the reference is undefined; here the first pick is the lowest
  candidate index (every distance is +inf, ties to the lowest index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evotune.selectors.base import Features, Selection, option, options_dict
from evotune.selectors.sharded import SingleProcess


def row_norms(x: np.ndarray) -> np.ndarray:
    """Squared L2 norm of each row (float32 rows: float32 norms), one row at a time in the same
    way whatever the number of rows, so a row's norm is the same on any rank."""
    return np.einsum("ij,ij->i", x, x)


class NearestCentre:
    """Each candidate's squared Euclidean distance to its nearest centre (O(N) memory).

    ``cand``: the candidates' float32 embeddings (kept, not copied); ``lab``: the initial
    centres' (the labeled points), measured in blocks of ``chunk_size`` rows of each.
    ``add(j)`` makes candidate ``j`` a centre, ``add_centre(row, norm)`` any point. Squared
    distances are ``|a|²+|b|²−2ab``, clamped at 0 (see the module docstring), kept in float32;
    +inf where there is no centre yet.

    A distance must not depend on which other rows share its computation, or the picks would
    change with the number of ranks (BLAS sums a dot product differently by matrix shape and
    by a row's place in it: measured). So a new centre is measured with ``einsum`` (each
    candidate's dot product on its own, in float32; about as fast as BLAS's matrix-vector
    product here), and the initial centres, a matrix product too large for that, with BLAS in
    float64 from the float32 rows, rounded to float32: the shape can then change a distance
    only where its float64 value lies within float64 rounding of a float32 rounding boundary.
    """

    def __init__(self, cand: np.ndarray, lab: np.ndarray, chunk_size: int):
        self.cand, self.chunk_size = cand, chunk_size
        self.norms = row_norms(cand)
        self.sq = np.full(len(cand), np.inf, dtype=np.float32)
        for t in range(0, len(lab), chunk_size):
            self.add_centres(lab[t: t + chunk_size])

    def add_centres(self, lab: np.ndarray) -> None:
        """Make the rows ``lab`` (a block of at most ``chunk_size``) centres too."""
        if not len(lab):
            return
        lab_norms = row_norms(lab).astype(np.float64)
        lab64 = lab.astype(np.float64)
        for s in range(0, len(self.cand), self.chunk_size):
            block = slice(s, s + self.chunk_size)
            d = self.norms[block, None].astype(np.float64) + lab_norms[None, :] \
                - 2.0 * (self.cand[block].astype(np.float64) @ lab64.T)
            np.minimum(self.sq[block], np.maximum(d, 0.0).min(axis=1).astype(np.float32),
                       out=self.sq[block])

    @classmethod
    def of(cls, emb: np.ndarray, labeled: np.ndarray, candidates: np.ndarray,
           chunk_size: int) -> "NearestCentre":
        """Over pool embeddings ``emb``: the ``candidates`` rows, with ``labeled`` as centres."""
        return cls(emb[candidates], emb[labeled], chunk_size)

    def add(self, j: int) -> None:
        self.add_centre(self.cand[j], self.norms[j])

    def add_centre(self, row: np.ndarray, norm) -> None:
        d = np.maximum(self.norms + norm - 2.0 * np.einsum("nd,d->n", self.cand, row), 0.0)
        np.minimum(self.sq, d, out=self.sq)

    # What the sharded greedy asks of either form (this one and the device form)
    def best(self) -> tuple[int, np.float32]:
        """The candidate furthest from its nearest centre (the lowest index on ties) and its
        squared distance; (-1, -inf) without candidates."""
        if not len(self.sq):
            return -1, np.float32(-np.inf)
        j = int(np.argmax(self.sq))
        return j, np.float32(self.sq[j])

    def drop(self, j: int) -> None:
        """Candidate ``j`` was picked: never the maximum again."""
        self.sq[j] = -np.inf

    def distances(self) -> np.ndarray:
        """Every candidate's squared distance to its nearest centre (float32, on the host)."""
        return self.sq

    def centre_row(self, j: int) -> np.ndarray:
        """Candidate ``j``'s row with its squared norm appended (float32), as sent to the
        other ranks when it is picked."""
        return np.append(self.cand[j], self.norms[j]).astype(np.float32)


def check_inputs(emb: np.ndarray, labeled: np.ndarray, candidates: np.ndarray, n: int) -> None:
    """Raise ValueError on a bad shape, overlapping sets, n out of range or non-finite rows."""
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {emb.shape}")
    if not 0 <= n <= len(candidates):
        raise ValueError(f"cannot pick {n} of {len(candidates)} candidates")
    if np.intersect1d(labeled, candidates).size:
        raise ValueError("labeled and candidate positions overlap")
    used = np.concatenate([labeled, candidates])
    bad = np.concatenate([~np.isfinite(emb[used[s: s + 65536]]).all(axis=1)   # no N x D copy
                          for s in range(0, len(used), 65536)] or [np.zeros(0, dtype=bool)])
    if bad.any():
        raise ValueError(f"{int(bad.sum())} embeddings are NaN or inf (first at pool position "
                         f"{int(used[bad][0])}); selection needs finite embeddings")


def kcenter_greedy(embeddings: np.ndarray, labeled: np.ndarray, candidates: np.ndarray, n: int,
                   chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``n`` of ``candidates`` by greedy k-center over ``embeddings``.

    Args:
        embeddings: (N, D) pool embeddings (any float dtype; computed in float32).
        labeled: positions of the initial centres (the already selected examples).
        candidates: positions that may be picked, disjoint from ``labeled``.
        n: number of picks, 0 <= n <= len(candidates).
        chunk_size: candidate rows per block when measuring distances to the labeled set; peak
            extra memory is about chunk_size × min(len(labeled), chunk_size) × 4 bytes.

    Returns:
        (picks, distances): pool positions in pick order, and each pick's Euclidean distance to
        its nearest centre when it was picked.

    Raises:
        ValueError: on non-finite embeddings, overlapping sets or n out of range.
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    labeled = np.asarray(labeled, dtype=np.int64)
    # Sorting makes "first maximum" in argmax mean "lowest pool index" on ties.
    candidates = np.sort(np.asarray(candidates, dtype=np.int64))
    check_inputs(emb, labeled, candidates, n)
    return kcenter_sharded(emb[candidates], candidates, emb[labeled], n, SingleProcess(),
                           chunk_size)


def _pick_key(sq: np.float32, position: int) -> int:
    """One int64 that orders candidates as k-center does: larger squared distance first, then
    the lower pool position. A non-negative float32's bits grow with its value (+inf above
    every finite one), so the key is those 31 bits over the complement of a 32-bit position;
    -1 means "nothing left here"."""
    return (int(np.float32(sq).view(np.int32)) << 32) | (0xFFFFFFFF - int(position))


def _unkey(key: int) -> tuple[np.float32, int]:
    return np.int32(key >> 32).view(np.float32), 0xFFFFFFFF - (key & 0xFFFFFFFF)


def kcenter_sharded(cand: np.ndarray, positions: np.ndarray, labeled: np.ndarray, n: int,
                    comm, chunk_size: int = 4096, device=None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-center with the candidates spread over ranks; every rank calls this.

    Each rank holds its own candidates: ``cand`` (float32 rows) at pool ``positions``
    (ascending) and ``labeled``, its own part of the initial centres' rows (the ranks' parts
    together are all of them). Per rank, memory is its rows, one float32 per candidate and
    every rank's positions (8 bytes per pool row, gathered once); the initial centres are
    broadcast by their ranks ``chunk_size`` rows at a time. Each pick is one
    all-reduce of an int64 (the largest distance, ties to the lowest position:
    :func:`_pick_key`) and one broadcast of the picked row from the rank that has it; every
    rank then updates its own distances. The picks are :func:`kcenter_greedy`'s on the same
    embeddings: each distance is computed from its own pair of rows whatever the sharding
    (:class:`NearestCentre` says how, and the one rare exception).

    ``comm``: ``rank``, ``world_size``, ``max_int64(int)``, ``broadcast_row(row or None,
    src, size)`` (a float32 vector), ``broadcast_block(block or None, src, shape)``,
    ``all_gather_rows(array)`` (:class:`~evotune.selectors.sharded.SingleProcess`, or
    the run's ranks: :class:`evotune.trainer.engine.TorchComm`). ``cand`` is (rows, D) even
    on a rank without candidates. ``device``: a device form of :class:`NearestCentre`
    (``device(cand, centres, chunk_size)``, see :func:`accelerator`); None: numpy on the host.
    Returns (picks, distances) on every rank.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) > 1 and not (np.diff(positions) > 0).all():
        raise ValueError("positions must be ascending")
    held, nearest = sharded_centres(cand, positions, labeled, comm, chunk_size, device)
    picks = np.empty(n, dtype=np.int64)
    dists = np.empty(n, dtype=np.float64)
    for k in range(n):
        j, sq_j = nearest.best()
        mine = _pick_key(sq_j, positions[j]) if j >= 0 and sq_j >= 0 else -1
        best = comm.max_int64(mine)
        if best < 0:
            raise ValueError(f"cannot pick {n} of the candidates: only {k} left")
        sq, position = _unkey(best)
        if best == mine:
            nearest.drop(j)
        add_pick(nearest, held, position, j if best == mine else None, comm)
        picks[k], dists[k] = position, float(np.sqrt(sq))
    return picks, dists


def sharded_centres(cand: np.ndarray, positions: np.ndarray, labeled: np.ndarray, comm,
                    chunk_size: int, device=None) -> tuple[list[np.ndarray], NearestCentre]:
    """Every rank's positions (to find a pick's owner) and this rank's :class:`NearestCentre`
    (or ``device``'s form, :func:`accelerator`) over its own candidates ``cand`` with every
    rank's ``labeled`` rows as centres, streamed from their ranks a block at a time: no rank
    ever holds more than one block of another rank's rows."""
    cand, lab = np.asarray(cand, dtype=np.float32), np.asarray(labeled, dtype=np.float32)

    def make(centres):
        return NearestCentre(cand, centres, chunk_size) if device is None else \
            device(cand, centres, chunk_size)
    if comm.world_size == 1:
        return [positions], make(lab)
    held = comm.all_gather_rows(positions)
    counts = [int(c[0]) for c in comm.all_gather_rows(np.array([len(lab)]))]
    nearest = make(lab[:0])
    for src, count in enumerate(counts):
        for t in range(0, count, chunk_size):
            block = lab[t: t + chunk_size] if comm.rank == src else None
            nearest.add_centres(comm.broadcast_block(
                block, src, (min(chunk_size, count - t), cand.shape[1])))
    return held, nearest


def add_pick(nearest: NearestCentre, held: list[np.ndarray], position: int, j: int | None,
             comm) -> None:
    """Make the picked candidate at pool ``position`` a centre on every rank: its owner (``j``,
    its row here; None elsewhere) sends the row with its norm, so every rank measures against
    exactly the values the owner has."""
    owner = next(r for r, h in enumerate(held)
                 if len(h) and h[min(np.searchsorted(h, position), len(h) - 1)] == position)
    row = nearest.centre_row(j) if j is not None else None
    row = comm.broadcast_row(row, owner, nearest.cand.shape[1] + 1)
    nearest.add_centre(row[:-1], row[-1])


def accelerator(comm):
    """The ranks' device form of :class:`NearestCentre` (``comm.device_centres()``: a GPU run's,
    :class:`evotune.trainer.device_centres.DeviceNearestCentre` on the device of the
    collectives), or None on a CPU run (gloo) and in one process without ranks. Selectors stay
    free of torch: the form comes from the comm."""
    make = getattr(comm, "device_centres", None)
    return make() if make is not None else None


class KCenterSelector:
    """DiverseEvol's diversity rule over the current model's embeddings."""
    name = "kcenter"
    doc = ("DiverseEvol's greedy k-center: the candidate furthest (Euclidean, current-model "
           "embedding) from everything selected so far, one at a time.")
    logs = "`kcenter_distance`"
    scale = ("sharded (also behind a filter by any score): each rank keeps its own "
             "rows and 4 bytes per candidate (a GPU run: in the device's memory, computed "
             "there); a pick is 2 collectives")
    needs_embeddings = True
    scores = ()

    @dataclass
    class Options:
        chunk_size: int = option(4096, "candidate rows per distance block (a memory bound; also "
                                       "the block of the k-center fill of unscored candidates)",
                                 gt=0, safe=True)

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def select(self, features: Features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator) -> Selection:
        features.require(self.name)
        picks, dists = kcenter_greedy(features.embeddings, labeled, candidates, n,
                                      self.options.chunk_size)
        return Selection(picks, {"kcenter_distance": dists})

    sharded = True

    def select_sharded(self, shard: Features, labeled: np.ndarray, candidates: np.ndarray,
                       n: int, rng: np.random.Generator, comm) -> Selection:
        """:meth:`select` with the embeddings spread over ranks (every rank calls this with its
        shard, ``shard.positions``): :func:`kcenter_sharded`, the same picks. Bad input raises
        the same ValueError on every rank."""
        shard.require(self.name)
        pos = np.asarray(shard.positions, dtype=np.int64)
        dim = comm.max_int64(shard.embeddings.shape[1] if len(pos) else 0)
        emb = np.asarray(shard.embeddings, dtype=np.float32).reshape(len(pos), dim)
        is_cand, is_lab = np.isin(pos, candidates), np.isin(pos, labeled)
        bad = ~np.isfinite(emb[is_cand | is_lab]).all(axis=1)
        first_bad = int(pos[is_cand | is_lab][bad][0]) if bad.any() else -1
        # What each rank found, agreed by all before the collectives of the picks begin.
        found = np.stack(comm.all_gather_rows(np.array(
            [int(is_cand.sum()), int(is_lab.sum()), int(bad.sum()), first_bad])))
        labeled, candidates = np.asarray(labeled), np.asarray(candidates)
        if np.intersect1d(labeled, candidates).size:
            raise ValueError("labeled and candidate positions overlap")
        if not 0 <= n <= len(candidates):
            raise ValueError(f"cannot pick {n} of {len(candidates)} candidates")
        if found[:, 2].sum():
            first = min(int(f) for f in found[:, 3] if f >= 0)
            raise ValueError(f"{int(found[:, 2].sum())} embeddings are NaN or inf (first at pool "
                             f"position {first}); selection needs finite embeddings")
        if found[:, 0].sum() != len(candidates) or found[:, 1].sum() != len(labeled):
            raise ValueError(f"the ranks' shards hold {int(found[:, 0].sum())} of "
                             f"{len(candidates)} candidates and {int(found[:, 1].sum())} of "
                             f"{len(labeled)} selected rows")
        picks, dists = kcenter_sharded(emb[is_cand], pos[is_cand], emb[is_lab], n, comm,
                                       self.options.chunk_size, accelerator(comm))
        return Selection(picks, {"kcenter_distance": dists})

    def state_dict(self) -> dict:
        return {"name": self.name, **options_dict(self.options)}
