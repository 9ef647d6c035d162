"""Scores derived on rank 0 from what the feature pass produced: ``knn_k`` and ``linear``.

``knn_k``: the Euclidean distance from an example's embedding to its k-th nearest neighbour
among all other pool examples (``selection.knn_k``, default 6, as Instruction Mining's
``knn6``). Large = the example sits in a sparse region of the current embedding space. Exact,
computed in blocks of ``chunk_size`` rows against the whole pool: O(N² D) time, O(N · chunk)
memory.

``linear``: a user-given linear rule over computed scores (Instruction Mining, Cao et al.,
arXiv 2307.06290): ``selection.linear: "0.5*knn_k - 1.0*ifd_cherry + 8e-5*length"``. The paper's
rule predicts evaluation *loss* (lower is better, e.g. ``1.0694 − 0.1498·reward + 8.257e-5·length
− 0.9350·knn6``); evotune's scores are "higher = preferred", so write the paper's coefficients
with their signs flipped and leave out the constant (it does not change a ranking). Terms are
used raw, as in the paper (no normalisation). An example with a NaN in any term gets NaN (never
selected) and the term's skip reason.
"""

from __future__ import annotations

import re

import numpy as np

from evotune.selectors.base import Features

DERIVED = ("knn_k", "linear")

_TERM = re.compile(r"\s*([+-]?)\s*((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*([A-Za-z_]\w*)\s*")


def parse_linear(text: str, known: tuple[str, ...]) -> dict[str, float]:
    """``"0.5*knn_k - 1.0*ifd_cherry"`` → ``{"knn_k": 0.5, "ifd_cherry": -1.0}``.

    Raises ValueError naming the unreadable part, an unknown score or a repeated one.
    """
    terms: dict[str, float] = {}
    pos, text = 0, text.strip()
    if not text:
        raise ValueError("the linear rule is empty; write e.g. '0.5*knn_k - 1.0*ifd_cherry'")
    while pos < len(text):
        m = _TERM.match(text, pos)
        if not m or (pos > 0 and not m.group(1)):
            raise ValueError(f"cannot read the linear rule {text!r} at {text[pos:]!r}; write "
                             f"terms as COEF*SCORE joined by + or -, e.g. '0.5*knn_k - 1*loss'")
        sign, coef, name = m.groups()
        if name not in known:
            raise ValueError(f"linear rule: unknown score {name!r}; known: {', '.join(known)}")
        if name in terms:
            raise ValueError(f"linear rule: {name!r} appears twice")
        terms[name] = -float(coef) if sign == "-" else float(coef)
        pos = m.end()
    return terms


def knn_distance(embeddings: np.ndarray, k: int, chunk_size: int = 4096) -> np.ndarray:
    """(N,) distance of each row to its k-th nearest other row (Euclidean, float64 result).

    Rows with a non-finite value get NaN and are nobody's neighbour. Raises ValueError when
    fewer than k other finite rows exist or k < 1.
    """
    if k < 1:
        raise ValueError(f"knn_k must be >= 1, got {k}")
    emb = np.asarray(embeddings, dtype=np.float32)
    ok = np.isfinite(emb).all(axis=1)
    idx = np.flatnonzero(ok)
    out = np.full(len(emb), np.nan)
    if len(idx) <= k:
        raise ValueError(f"knn_k={k} needs more than {k} embedded examples, got {len(idx)}")
    x = emb[idx]
    norms = np.einsum("ij,ij->i", x, x)
    for s in range(0, len(x), chunk_size):
        block = slice(s, s + chunk_size)
        d = norms[block, None] + norms[None, :] - 2.0 * (x[block] @ x.T)
        np.maximum(d, 0.0, out=d)
        rows = np.arange(d.shape[0])
        d[rows, rows + s] = np.inf                       # not its own neighbour
        kth = np.partition(d, k - 1, axis=1)[:, k - 1]
        out[idx[block]] = np.sqrt(kth.astype(np.float64))
    return out


def add_derived(features: Features, wanted: set[str], linear: dict[str, float], knn_k: int,
                chunk_size: int = 4096) -> None:
    """Add the derived scores in ``wanted`` (names from DERIVED) to ``features``, in place.

    ``linear``: the parsed rule (:func:`parse_linear`); its terms must already be in
    ``features.scores``, except ``knn_k``, which is computed first when the rule uses it.
    """
    if "knn_k" in wanted or "knn_k" in linear:
        if features.embeddings is None:
            raise ValueError("knn_k needs embeddings; the feature pass computed none")
        features.scores["knn_k"] = knn_distance(features.embeddings, knn_k, chunk_size)
        features.skipped["knn_k"] = {int(i): "no embedding" for i in
                                     np.flatnonzero(np.isnan(features.scores["knn_k"]))}
    if "linear" not in wanted:
        return
    if not linear:
        raise ValueError("the linear score needs a rule (selection.linear)")
    total = 0.0
    skipped: dict[int, str] = {}
    for name, coef in linear.items():
        if name not in features.scores:
            raise ValueError(f"linear rule term {name!r} was not computed")
        total = total + coef * features.scores[name]
        for i, why in features.skipped.get(name, {}).items():
            skipped.setdefault(int(i), f"{name}: {why}")
    features.scores["linear"] = np.asarray(total, dtype=np.float64)
    features.skipped["linear"] = skipped


def mark_non_finite(features: Features) -> dict[str, int]:
    """Turn every infinite score into NaN and give each NaN without a reason one.

    A selector never picks a NaN score, so after this every unpickable example is visible in
    ``features.skipped`` (and the round summary's ``score_skipped``) with its reason.

    Returns:
        name → number of values newly marked (non-zero means the model produced inf/NaN).
    """
    marked = {}
    for name, values in features.scores.items():
        bad = np.flatnonzero(~np.isfinite(values))
        reasons = features.skipped.setdefault(name, {})
        new = [int(i) for i in bad if int(i) not in reasons]
        for i in new:
            reasons[i] = f"non-finite value ({values[i]})"
        values[bad] = np.nan
        if new:
            marked[name] = len(new)
    return marked
