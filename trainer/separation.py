"""How well a score separates clean rows from labelled bad ones (AUROC), for score evidence.

Used by ``launch/score_pool.py --label FIELD`` and ``benchmarks/noisy_auroc.py``. Convention:
AUROC is the probability that a clean row scores *higher* than a bad row (ties count half).
Every evotune score is "higher = preferred", so AUROC > 0.5 means the score prefers the clean
rows, < 0.5 that it prefers the bad ones; |AUROC − 0.5| is the strength either way (a filter can
use either direction). Rows without a value (NaN) are left out and counted.
"""

from __future__ import annotations

import numpy as np


def auroc(clean: np.ndarray, bad: np.ndarray) -> float:
    """P(clean > bad) + ½ P(tie) over all clean × bad pairs of finite values; NaN if either side
    has no finite value."""
    clean = np.asarray(clean, dtype=np.float64)
    bad = np.asarray(bad, dtype=np.float64)
    clean, bad = clean[np.isfinite(clean)], bad[np.isfinite(bad)]
    if not len(clean) or not len(bad):
        return float("nan")
    # Imported here: scikit-learn's import adds ~1.5 s to every process of every run.
    from sklearn.metrics import roc_auc_score

    y = np.concatenate([np.ones(len(clean)), np.zeros(len(bad))])
    return float(roc_auc_score(y, np.concatenate([clean, bad])))


def separation(scores: dict[str, np.ndarray], labels: list, pair_ids: list | None = None,
               ids: list | None = None) -> dict[str, dict]:
    """AUROC of every score for every bad group against the clean rows.

    Args:
        scores: name → (N,) values, NaN where not scored.
        labels: per row, None / "" for a clean row, else the group name (e.g. the corruption).
        pair_ids: optional, per row, the id of the clean row it was made from (e.g.
            ``orig_id``); then each group is compared with *its own* clean originals only, so
            the two sides share their instructions and differ only in the answer.
        ids: the row ids (needed with ``pair_ids``).

    Returns:
        group → {"n_clean", "n_bad", "scores": name → {"auroc", "nan_clean", "nan_bad"}}.
    """
    labels = ["" if v is None else str(v) for v in labels]
    clean_rows = np.array([i for i, g in enumerate(labels) if g == ""], dtype=np.int64)
    position = {row_id: i for i, row_id in enumerate(ids)} if ids is not None else {}
    out = {}
    for group in sorted({g for g in labels if g}):
        bad_rows = np.array([i for i, g in enumerate(labels) if g == group], dtype=np.int64)
        if pair_ids is not None:
            originals = [position.get(pair_ids[i]) for i in bad_rows]
            clean = np.array(sorted({o for o in originals if o is not None and labels[o] == ""}),
                             dtype=np.int64)
        else:
            clean = clean_rows
        entry = {"n_clean": int(len(clean)), "n_bad": int(len(bad_rows)), "scores": {}}
        for name, values in scores.items():
            v = np.asarray(values, dtype=np.float64)
            entry["scores"][name] = {
                "auroc": auroc(v[clean], v[bad_rows]),
                "nan_clean": int((~np.isfinite(v[clean])).sum()),
                "nan_bad": int((~np.isfinite(v[bad_rows])).sum())}
        out[group] = entry
    return out
