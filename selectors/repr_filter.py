"""DEITA's representation filter: best score first, skipping near-duplicates.

DEITA: Liu et al., "What Makes Good Data for Alignment?", arXiv 2312.15685; code hkust-nlp/deita.

Candidates are walked by descending score. One is admitted only if its largest cosine similarity
to everything already admitted is <= ``threshold`` (0.9 in DEITA); the walk stops at ``n``.
"Already admitted" here means the labeled set (earlier rounds) plus this round's admitted picks,
so a candidate close to something trained on before is skipped as well.

Departures from the reference implementation (hkust-nlp/deita, ``IterativeFilter.filter``), on
purpose:
- The reference starts from an empty set and always admits its first example; here the labeled
  set is in the comparison from the start, so even the best-scored candidate can be rejected.
- The reference sorts with pandas' default (unstable) sort; here ties in score go to the lowest
  pool index.
- The reference divides by the norm, so a zero embedding gives NaN similarities, every
  comparison with NaN is False and the example is admitted by accident. Here a zero vector has
  cosine 0 with everything (admitted for any threshold >= 0, and never blocks another example);
  it is counted in ``info["zero_embeddings"]``.
- The reference returns fewer than the budget when the walk runs out; here the rest is filled
  with the best-scored rejected candidates (``admitted`` = 0 for those, ``info["filled"]``).
- With ``batch_size > 1`` the reference compares a candidate with earlier members of its batch
  even when those were rejected; here the walk is strictly sequential (its batch_size=1 default).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evotune.selectors.base import Features, Selection, option, options_dict
from evotune.selectors.sharded import SingleProcess


def _unit_rows(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Rows scaled to unit L2 norm (float32); zero rows stay zero. Also returns their count."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    zero = norms == 0
    scale = np.where(zero, 0.0, 1.0 / np.where(zero, 1.0, norms))
    return (x * scale[:, None]).astype(np.float32), int(zero.sum())


def _max_cosine(block: np.ndarray, kept: np.ndarray, chunk_size: int) -> np.ndarray:
    """Max over ``kept`` rows of the cosine with each ``block`` row (both unit rows); -inf when
    ``kept`` is empty. Computed ``chunk_size`` kept rows at a time."""
    best = np.full(len(block), -np.inf, dtype=np.float32)
    for s in range(0, len(kept), chunk_size):
        np.maximum(best, (block @ kept[s:s + chunk_size].T).max(axis=1), out=best)
    return best


def repr_filter(embeddings: np.ndarray, scores: np.ndarray, labeled: np.ndarray,
                candidates: np.ndarray, n: int, threshold: float = 0.9,
                block_size: int = 256, chunk_size: int = 4096) -> Selection:
    """Pick ``n`` of ``candidates`` by score, skipping those too similar to what is already kept.

    Args:
        embeddings: (N, D) pool embeddings (any float dtype; cosines computed in float32).
        scores: (N,) pool scores, higher = better; NaN = not scored (never picked).
        labeled: positions already selected in earlier rounds; they block similar candidates.
        candidates: positions that may be picked, disjoint from ``labeled``.
        n: number of picks, 0 <= n <= number of scored candidates.
        threshold: largest cosine similarity allowed to anything already kept (DEITA: 0.9).
        block_size: candidates compared with the kept set per matrix product. The walk is still
            one candidate at a time; at most one block is examined past the last admit.
        chunk_size: kept rows per matrix product; peak extra memory about
            block_size × chunk_size × 4 bytes beside the kept set's (len(labeled) + n) × D.

    Returns:
        A Selection in pick order: the admitted candidates (walk order), then any fill-ins.
        ``numbers``: ``score``; ``max_cosine``, the largest cosine to the labeled set and all
        earlier picks at pick time (NaN when there was nothing to compare with: no labeled
        example and first pick); ``admitted``, 1 if the pick passed the threshold, 0 if it fills
        the budget after the walk ran out. ``info``: ``nan_scores`` (candidates without a
        score), ``rejected_by_threshold`` (candidates the walk examined and rejected; fill-ins
        are counted there too), ``filled``, ``zero_embeddings`` (zero vectors among the labeled
        and scored candidates).

    Raises:
        ValueError: on non-finite embeddings (labeled or scored candidates), overlapping sets,
            wrong shapes, a NaN threshold, n out of range, or fewer scored candidates than n.
    """
    emb = np.asarray(embeddings)
    scores = np.asarray(scores, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {emb.shape}")
    if scores.shape != (len(emb),):
        raise ValueError(f"scores must have shape ({len(emb)},), got {scores.shape}")
    return repr_filter_sharded(emb, scores, np.arange(len(emb)), labeled, candidates, n,
                               SingleProcess(), threshold, block_size, chunk_size)


def repr_filter_sharded(embeddings: np.ndarray, scores: np.ndarray, positions: np.ndarray,
                        labeled: np.ndarray, candidates: np.ndarray, n: int, comm,
                        threshold: float = 0.9, block_size: int = 256,
                        chunk_size: int = 4096) -> Selection:
    """:func:`repr_filter` with the rows spread over ranks; every rank calls this with its own
    ``embeddings`` and ``scores`` at pool ``positions`` (ascending) and gets the same Selection.

    Each rank sorts its own scored candidates once; each block of the walk is merged from
    every rank's next ``block_size`` (positions and scores gathered), and only the block's
    rows travel, from their ranks. Every rank then holds the kept set, (len(labeled) + n) × D,
    and walks the block itself. The blocks, the kept set and every matrix product are those
    of one process, so the picks and numbers are the same bit for bit. A fill reads the rows
    it takes from their ranks; the walk's rejected positions (8 bytes each) are kept for it.
    """
    emb, values = np.asarray(embeddings), np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positions, dtype=np.int64)
    labeled = np.asarray(labeled, dtype=np.int64)
    candidates = np.sort(np.asarray(candidates, dtype=np.int64))
    if np.isnan(threshold):
        raise ValueError("threshold is NaN")
    if not 0 <= n <= len(candidates):
        raise ValueError(f"cannot pick {n} of {len(candidates)} candidates")
    if np.intersect1d(labeled, candidates).size:
        raise ValueError("labeled and candidate positions overlap")
    dim = comm.max_int64(emb.shape[1] if len(pos) else 0)
    emb = emb.reshape(len(pos), dim)
    is_cand, is_lab = np.isin(pos, candidates), np.isin(pos, labeled)
    scored = is_cand & ~np.isnan(values)
    bad = np.zeros(len(pos), dtype=bool)
    for s in range(0, len(pos), 65536):                          # no N × D copy
        rows = slice(s, s + 65536)
        bad[rows] = (scored[rows] | is_lab[rows]) & ~np.isfinite(emb[rows]).all(axis=1)
    found = np.stack(comm.all_gather_rows(np.array(
        [int(is_cand.sum()), int(scored.sum()), int(bad.sum())])))
    held, n_scored, n_bad = (int(v) for v in found.sum(axis=0))
    if held != len(candidates):
        raise ValueError(f"the ranks' shards hold {held} of {len(candidates)} candidates")
    if n_scored < n:
        raise ValueError(f"cannot pick {n}: only {n_scored} of {len(candidates)} candidates have "
                         f"a score ({held - n_scored} are NaN)")
    if n_bad:
        # The first bad one as one process reports it: the labeled rows in their order, then
        # the scored candidates in pool order.
        bad_pos = np.concatenate(comm.all_gather_rows(pos[bad]))
        bad_lab = labeled[np.isin(labeled, bad_pos)]
        first = int(bad_lab[0]) if len(bad_lab) else int(bad_pos.min())
        raise ValueError(f"{n_bad} embeddings are NaN or inf (first at pool position {first}); "
                         f"the repr filter needs finite embeddings")

    # The kept set: labeled rows first (in the given order), then each pick as it is made.
    lab_unit, zero_l = _unit_rows(emb[is_lab])
    lab_rows = _rows_in_order(labeled, pos[is_lab], lab_unit, dim, comm)
    kept = np.empty((len(labeled) + n, dim), dtype=np.float32)
    kept[:len(labeled)] = lab_rows
    n_kept = len(labeled)
    zero_c = sum(int((emb[s: s + 65536][scored[s: s + 65536]] == 0).all(axis=1).sum())
                 for s in range(0, len(pos), 65536))
    zeros = comm.sum_int64(zero_l + zero_c)

    # This rank's scored candidates by descending score, ties to the lowest pool index.
    mine = np.flatnonzero(scored)
    mine = mine[np.lexsort((pos[mine], -values[mine]))]
    cursor = 0
    walk_pos: list[int] = []
    walk_score: list[float] = []
    walk_cos: list[float] = []
    rejected: list[tuple[int, float]] = []       # (position, score), in walk order
    while len(walk_pos) < n:
        offer = mine[cursor: cursor + block_size]
        merged = np.concatenate(comm.all_gather_rows(
            np.stack([pos[offer].astype(np.float64), values[offer]], axis=1)))
        order = np.lexsort((merged[:, 0], -merged[:, 1]))[:block_size]
        if not len(order):
            break                                # the walk ran out
        block_pos = merged[order, 0].astype(np.int64)
        block_score = merged[order, 1]
        taken = int(np.isin(pos[offer], block_pos).sum())    # a prefix of this rank's offer
        unit, _ = _unit_rows(emb[offer[:taken]])
        block = _rows_in_order(block_pos, pos[offer[:taken]], unit, dim, comm)
        cursor += taken
        before = _max_cosine(block, kept[:n_kept], chunk_size)   # kept before this block
        gram = block @ block.T                                   # within the block
        new: list[int] = []                                      # admitted in this block
        for k in range(len(block)):
            if len(walk_pos) == n:
                break
            c = before[k]
            if new:
                c = max(c, gram[k, new].max())
            if c <= threshold:
                new.append(k)
                walk_pos.append(int(block_pos[k]))
                walk_score.append(float(block_score[k]))
                walk_cos.append(float(c))
            else:
                rejected.append((int(block_pos[k]), float(block_score[k])))
        kept[n_kept:n_kept + len(new)] = block[new]
        n_kept += len(new)

    # Fill-ins: the walk examined every scored candidate, so the rest are rejected ones; take the
    # best of them, each compared with the labeled set and every earlier pick for the report.
    fill = rejected[:n - len(walk_pos)]
    fill_pos = np.array([p for p, _ in fill], dtype=np.int64)
    here = np.isin(pos, fill_pos)
    unit, _ = _unit_rows(emb[here])
    fill_rows = _rows_in_order(fill_pos, pos[here], unit, dim, comm)
    fill_cos = []
    for row in fill_rows:
        fill_cos.append(float(_max_cosine(row[None, :], kept[:n_kept], chunk_size)[0]))
        kept[n_kept] = row
        n_kept += 1

    picks = np.array(walk_pos + fill_pos.tolist(), dtype=np.int64)
    max_cos = np.array(walk_cos + fill_cos, dtype=np.float64)
    max_cos[np.isneginf(max_cos)] = np.nan        # nothing to compare with: no labeled, first pick
    numbers = {"score": np.array(walk_score + [v for _, v in fill], dtype=np.float64),
               "max_cosine": max_cos,
               "admitted": np.r_[np.ones(len(walk_pos)), np.zeros(len(fill))]}
    info = {"nan_scores": held - n_scored,
            "rejected_by_threshold": len(rejected),
            "filled": len(fill),
            "zero_embeddings": zeros}
    return Selection(picks, numbers, info)


def _rows_in_order(wanted: np.ndarray, mine: np.ndarray, rows: np.ndarray, dim: int,
                   comm) -> np.ndarray:
    """The rows of pool positions ``wanted`` (every rank: the same array), in that order, each
    from the rank that holds it (``mine``: this rank's positions among them, ``rows`` their
    rows)."""
    parts_pos = comm.all_gather_rows(np.asarray(mine, dtype=np.int64))
    parts_rows = comm.all_gather_rows(np.asarray(rows, dtype=np.float32).reshape(-1, dim))
    got_pos, got_rows = np.concatenate(parts_pos), np.concatenate(parts_rows)
    by_pos = np.argsort(got_pos, kind="stable")
    return got_rows[by_pos[np.searchsorted(got_pos[by_pos], wanted)]] if len(wanted) else \
        np.zeros((0, dim), dtype=np.float32)


class RepresentationFilterSelector:
    """DEITA's score-first, near-duplicate-skipping rule over the round's embeddings.

    One process or sharded (:meth:`select_sharded`, with any score): each
    rank keeps its own rows; every rank holds the kept set ((selected + n) × D float32) and
    one block of the walk; the blocks come from every rank's own sorted candidates."""
    name = "repr_filter"
    doc = ("DEITA's representation filter: candidates by descending score, each admitted only "
           "if its max cosine similarity to everything selected (earlier rounds and this one) is "
           "≤ `threshold`; if too few pass, the best rejected fill the budget (`admitted: 0`)")
    logs = "the score, `max_cosine`, `admitted`"
    scale = ("sharded with any score (a derived score you register without a sharded form: "
             "rank 0, gathered): each rank its own rows; every rank the kept set ((selected + "
             "n) × D) and one block of 256 rows; 3 gathers a block")
    needs_embeddings = True

    @dataclass
    class Options:
        score: str = option("loss", "the score candidates are walked by (highest first)",
                            score=True)
        threshold: float = option(0.9, "admit a candidate only if its max cosine similarity to "
                                       "everything selected is at most this (DEITA: 0.9)",
                                   ge=-1, le=1)

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        self.scores = (self.options.score,)

    def select(self, features: Features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator) -> Selection:
        o = self.options
        features.require(self.name, o.score)
        return repr_filter(features.embeddings, features.scores[o.score], labeled,
                           candidates, n, float(o.threshold))

    sharded = True

    def select_sharded(self, shard: Features, labeled: np.ndarray, candidates: np.ndarray,
                       n: int, rng: np.random.Generator, comm) -> Selection:
        """:meth:`select` with the rows spread over ranks (every rank calls this with its
        shard): :func:`repr_filter_sharded`, the same picks and numbers."""
        o = self.options
        shard.require(self.name, o.score)
        return repr_filter_sharded(shard.embeddings, shard.scores[o.score], shard.positions,
                                   labeled, candidates, n, comm, float(o.threshold))

    def state_dict(self) -> dict:
        return {"name": self.name, **options_dict(self.options)}
