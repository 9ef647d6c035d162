"""LIFT's curation: rows far from the centre of the data first, then the best-scored of them.

Xu et al., "Rethinking the Instruction Quality: LIFT is What You Need" (arXiv 2312.11508). After
expanding a dataset with GPT-4, LIFT curates it in two steps: for diversity, it standardises the
embeddings, projects them by PCA onto the components that keep 95% of the variance, and ranks
every row by its variance in that space (the spread of its coordinates: rows far from the
centroid rank high); for quality, it scores the kept rows (GPT-4 ratings in the paper) and
keeps the best.

Here, over the round's candidates: standardise each dimension (mean 0, population std 1; a
constant dimension stays 0) → principal components by SVD, the fewest whose cumulative share of
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


def row_variance(embeddings: np.ndarray, variance: float = 0.95) -> np.ndarray:
    """(N,) each row's variance over its coordinates on the principal components that keep
    ``variance`` of the variance of the standardised rows. Raises ValueError on fewer than two
    rows or a fraction outside (0, 1]."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"LIFT needs at least 2 embedded rows, got shape {x.shape}")
    if not 0 < variance <= 1:
        raise ValueError(f"variance must be in (0, 1], got {variance}")
    std = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    share = np.cumsum(s ** 2) / max(float(np.sum(s ** 2)), 1e-300)
    k = len(s) if variance >= 1 else int(np.searchsorted(share, variance, side="right")) + 1
    vt = vt[:k]
    top = np.abs(vt).argmax(axis=1)
    vt = vt * np.sign(vt[np.arange(k), top])[:, None]     # largest loading positive
    return (z @ vt.T).var(axis=1)


class LiftSelector:
    """LIFT's diversity-then-quality curation over the round's candidates.

    Needs the whole matrix: the candidates' (N, D) embeddings on rank 0, standardised float64
    copies (8·N·D bytes each) and numpy's thin SVD of them. scikit-learn's IncrementalPCA
    would stream the rows but still read the gathered matrix, and its components are an
    approximation of the exact ones; not used."""
    name = "lift"
    doc = ("LIFT: the candidates' embeddings standardised and PCA-projected (keeping "
           "`variance` of it); the `keep` fraction with the highest row variance (far from "
           "the centroid), then the best `score` among them (or the highest row variance)")
    logs = "`row_variance`, the score"
    scale = "rank 0: the N × D embeddings, standardised float64 copies and numpy's thin SVD"
    needs_embeddings = True

    @dataclass
    class Options:
        variance: float = option(0.95, "fraction of the variance the PCA keeps (LIFT: 0.95)")
        keep: float = option(0.5, "fraction of the candidates kept by row variance before the "
                                  "quality step (at least the round's budget)")
        score: Optional[str] = option(None, "the quality score ranked within the kept rows; "
                                            "null = rank by row variance only", score=True)

        def check(self) -> None:
            for key in ("variance", "keep"):
                if not 0 < getattr(self, key) <= 1:
                    raise ValueError(f"{key}: must be in (0, 1], got {getattr(self, key)}")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        self.scores = (self.options.score,) if self.options.score else ()

    def select(self, features: Features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator) -> Selection:
        o = self.options
        features.require(self.name, o.score)
        candidates = np.sort(np.asarray(candidates, dtype=np.int64))
        emb = np.asarray(features.embeddings)[candidates]
        ok = np.isfinite(emb).all(axis=1)
        if o.score:
            ok &= np.isfinite(features.scores[o.score][candidates])
        rows = candidates[ok]
        if not 0 <= n <= len(rows):
            raise ValueError(f"cannot pick {n}: only {len(rows)} of {len(candidates)} "
                             f"candidates have a finite embedding"
                             + (f" and {o.score!r}" if o.score else ""))
        rv = row_variance(emb[ok], o.variance)
        keep = min(len(rows), max(n, math.ceil(o.keep * len(rows))))
        by_variance = np.lexsort((rows, -rv))[:keep]          # ties: lowest pool index
        if o.score:
            s = features.scores[o.score][rows[by_variance]]
            chosen = by_variance[np.lexsort((rows[by_variance], -s))[:n]]
        else:
            chosen = by_variance[:n]
        picks = rows[chosen]
        numbers = {"row_variance": rv[chosen]}
        if o.score:
            numbers[o.score] = features.scores[o.score][picks]
        return Selection(picks, numbers, {"kept_by_variance": int(keep),
                                          "unembedded": int((~ok).sum())})

    def state_dict(self) -> dict:
        return {"name": self.name, **options_dict(self.options)}
