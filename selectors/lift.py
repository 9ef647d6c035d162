"""LIFT's curation: rows far from the centre of the data first, then the best-scored of them.

Xu et al., "Rethinking the Instruction Quality: LIFT is What You Need" (arXiv 2312.11508). After
expanding a dataset with GPT-4, LIFT curates it in two steps: for diversity, it standardises the
embeddings, projects them by PCA onto the components that keep 95% of the variance, and ranks
every row by its variance in that space (the spread of its coordinates: rows far from the
centroid rank high); for quality, it scores the kept rows (GPT-4 ratings in the paper) and
keeps the best.

Here, over the round's candidates: standardise each dimension (mean 0, population std 1; a
constant dimension stays 0) → principal components (the eigenvectors of the standardised
rows' D × D Gram matrix, which sums over ranks: the rows stay where they were embedded), the
fewest whose cumulative share of
the variance exceeds ``variance`` (scikit-learn's rule) → each row's variance over its
coordinates on them; the ``keep`` fraction of the candidates with the highest row variance (at
least the round's budget) passes; among those, the highest ``score`` (any evotune score), or
the highest row variance when no score is set. Ties go to the lowest pool index.

A row's variance depends on the sign of each component (flipping one changes the row's mean
coordinate), which an SVD leaves arbitrary: each component is signed here so that its loading
of largest magnitude is positive, so the ranking is the same on every machine and version.

Departures from LIFT: the component signs are fixed as above (LIFT's code takes whatever its
PCA returns); the embeddings are the current model's pooled hidden states (the paper
uses an embedding model); the quality step is an evotune score (the paper's is GPT-4's
rating); LIFT curates once, here every round re-ranks the remaining candidates with the
current model, and the labeled set does not enter; LIFT's expansion step (generating new rows
with GPT-4) is not part of selection and is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from evotune.selectors.base import Features, Selection, option, options_dict
from evotune.selectors.sharded import SingleProcess, top_k, top_k_mask, values_at


_CHUNK = 16384        # rows converted to float64 at a time


def row_variance(embeddings: np.ndarray, variance: float = 0.95, comm=None,
                 rows: np.ndarray | None = None) -> np.ndarray:
    """Each row's variance over its coordinates on the principal components that keep
    ``variance`` of the variance of the standardised rows.

    The rows may be spread over ranks: every rank calls this with its own rows and ``comm``
    (``selectors/sharded.py``; default: one process holding all of them) and gets its rows'
    values. What crosses ranks is three sums: the column sums, the column sums of squares
    about the mean (two passes, for accuracy) and the D × D Gram matrix of the standardised
    rows, whose eigenvectors are the principal axes (the right singular vectors of the SVD of
    the rows). The rows are read in blocks of 16,384, each standardised in float64 on the way,
    so beyond the rows themselves a rank holds one block and one D × D float64 matrix.

    ``rows``: a bool mask of the rows to use (the others are neither read nor returned), so
    that a selection of rows costs no copy of them.

    Raises ValueError (alike on every rank) on fewer than two rows in all or a fraction
    outside (0, 1]."""
    comm = comm or SingleProcess()
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"LIFT needs a 2-d array of embeddings, got shape {x.shape}")
    use = np.ones(len(x), dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
    total = comm.sum_int64(int(use.sum()))
    if total < 2:
        raise ValueError(f"LIFT needs at least 2 embedded rows, got {total}")
    if not 0 < variance <= 1:
        raise ValueError(f"variance must be in (0, 1], got {variance}")
    dim = x.shape[1]

    def blocks(shift=None, scale=None):
        at = 0                               # where the block's rows go in the output
        for s in range(0, len(x), _CHUNK):
            b = np.array(x[s: s + _CHUNK][use[s: s + _CHUNK]], dtype=np.float64)
            if shift is not None:
                b -= shift
            if scale is not None:
                b /= scale
            yield at, b
            at += len(b)

    mean = comm.sum_float64(sum((b.sum(axis=0) for _, b in blocks()), np.zeros(dim))) / total
    std = np.sqrt(comm.sum_float64(sum((np.einsum("ij,ij->j", b, b) for _, b in blocks(mean)),
                                       np.zeros(dim))) / total)
    scale = np.where(std > 0, std, 1.0)
    gram = comm.sum_float64(sum((b.T @ b for _, b in blocks(mean, scale)), np.zeros((dim, dim))))
    eigenvalues, axes = np.linalg.eigh(gram)                        # ascending
    eigenvalues, axes = np.clip(eigenvalues[::-1], 0.0, None), axes[:, ::-1]
    share = np.cumsum(eigenvalues) / max(float(eigenvalues.sum()), 1e-300)
    k = len(share) if variance >= 1 else int(np.searchsorted(share, variance, side="right")) + 1
    vt = axes[:, :k].T
    top = np.abs(vt).argmax(axis=1)
    vt = vt * np.sign(vt[np.arange(k), top])[:, None]     # largest loading positive
    out = np.empty(int(use.sum()))
    for s, z in blocks(mean, scale):
        out[s: s + len(z)] = (z @ vt.T).var(axis=1)
    return out


def finite_rows(x: np.ndarray) -> np.ndarray:
    """(N,) whether each row of ``x`` is all finite, read in blocks (no N × D temporary)."""
    return np.concatenate([np.isfinite(x[s: s + _CHUNK]).all(axis=1)
                           for s in range(0, len(x), _CHUNK)] or [np.zeros(0, dtype=bool)])


class LiftSelector:
    """LIFT's diversity-then-quality curation over the round's candidates.

    Sharded (:meth:`select_sharded`): each rank keeps its own rows; the PCA is three sums over
    ranks (:func:`row_variance`: rows read in float64 blocks, a D × D float64 matrix per rank,
    134 MB at D = 4096) and the
    two rankings are distributed top-k's. The picks are the one-process picks up to the order
    in which the sums add up: a rank count changes a row variance in its last digits (about
    1e-13 relative), so two rows whose variances agree that closely may swap. (scikit-learn's
    IncrementalPCA would stream the rows but approximates the components, and still reads
    them in one process; not used.)"""
    name = "lift"
    doc = ("LIFT: the candidates' embeddings standardised and PCA-projected (keeping "
           "`variance` of it); the `keep` fraction with the highest row variance (far from "
           "the centroid), then the best `score` among them (or the highest row variance)")
    logs = "`row_variance`, the score"
    scale = ("sharded with no score or any score (a derived score you register without a "
             "sharded form: rank 0, gathered): each rank reads its own rows in float64 blocks "
             "and adds a D × D Gram matrix to the other ranks' (one all-reduce); distributed "
             "top-k's")
    needs_embeddings = True

    @dataclass
    class Options:
        variance: float = option(0.95, "fraction of the variance the PCA keeps (LIFT: 0.95)",
                                 gt=0, le=1)
        keep: float = option(0.5, "fraction of the candidates kept by row variance before the "
                                  "quality step (at least the round's budget)", gt=0, le=1)
        score: Optional[str] = option(None, "the quality score ranked within the kept rows; "
                                            "null = rank by row variance only", score=True)

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        self.scores = (self.options.score,) if self.options.score else ()

    def select(self, features: Features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator) -> Selection:
        """One process: :meth:`select_sharded` over the whole pool as one shard (no copy of
        the rows)."""
        features.require(self.name, self.options.score)
        return self.select_sharded(features.as_one_shard(), labeled, np.sort(np.asarray(candidates, np.int64)),
                                   n, rng, SingleProcess())

    sharded = True

    def select_sharded(self, shard: Features, labeled: np.ndarray, candidates: np.ndarray,
                       n: int, rng: np.random.Generator, comm) -> Selection:
        """:meth:`select` with the embeddings and scores spread over ranks (every rank calls
        this with its shard): the row variances from sums over ranks, then a distributed top
        ``keep`` by row variance and a distributed top ``n`` by the score among those (class
        docstring: the same picks up to summation order). Bad input raises the same
        ValueError on every rank."""
        o = self.options
        shard.require(self.name, o.score)
        pos = np.asarray(shard.positions, dtype=np.int64)
        dim = comm.max_int64(shard.embeddings.shape[1] if len(pos) else 0)
        here = np.isin(pos, candidates)
        held = comm.sum_int64(int(here.sum()))
        if held != len(candidates):
            raise ValueError(f"the ranks' shards hold {held} of {len(candidates)} candidates")
        emb = np.asarray(shard.embeddings).reshape(len(pos), dim)
        ok = here & finite_rows(emb)
        if o.score:
            ok &= np.isfinite(shard.scores[o.score])
        rows = pos[ok]
        usable = comm.sum_int64(len(rows))
        if not 0 <= n <= usable:
            raise ValueError(f"cannot pick {n}: only {usable} of {len(candidates)} "
                             f"candidates have a finite embedding"
                             + (f" and {o.score!r}" if o.score else ""))
        rv = row_variance(emb, o.variance, comm, rows=ok)          # no copy of the rows
        keep = min(usable, max(n, math.ceil(o.keep * usable)))
        kept = top_k_mask(rv, rows, keep, comm)
        ranked = shard.scores[o.score][ok] if o.score else rv
        picks, _ = top_k(np.where(kept, ranked, np.nan), rows, n, comm)
        numbers = {"row_variance": values_at(rv, rows, picks, comm)}
        if o.score:
            numbers[o.score] = values_at(shard.scores[o.score], pos, picks, comm)
        return Selection(picks, numbers, {"kept_by_variance": int(keep),
                                          "unembedded": int(len(candidates) - usable)})

    def state_dict(self) -> dict:
        return {"name": self.name, **options_dict(self.options)}
