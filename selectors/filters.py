"""Score filters that run before a diversity rule (filter-then-diversify)."""

from __future__ import annotations

import numpy as np


def score_filter(scores: np.ndarray, candidates: np.ndarray, max_value: float | None,
                 top_fraction: float) -> tuple[np.ndarray, dict[str, int]]:
    """Candidates whose score is finite and at most ``max_value`` (when given), then the
    ``int(len(kept) × top_fraction)`` of them with the highest scores (ties: lowest index).

    Cherry's IFD rule is this filter with ``max_value=1`` (it drops IFD > 1) and the top rate;
    Superfiltering keeps IFD < 1 strictly — a score of exactly 1.0 is the only difference.

    Returns:
        (passed positions, ascending; counts: ``nan_scores``, ``above_max``,
        ``below_top_fraction``, ``passed``).
    """
    candidates = np.sort(np.asarray(candidates, dtype=np.int64))
    s = np.asarray(scores, dtype=np.float64)[candidates]
    finite = np.isfinite(s)
    under = finite & (s <= max_value) if max_value is not None else finite
    kept = candidates[under]
    keep_n = int(len(kept) * top_fraction)
    order = sorted(range(len(kept)), key=lambda i: (-s[under][i], kept[i]))[:keep_n]
    passed = np.sort(kept[order])
    info = {"nan_scores": int((~finite).sum()), "above_max": int((finite & ~under).sum()),
            "below_top_fraction": int(len(kept) - keep_n), "passed": int(len(passed))}
    return passed, info
