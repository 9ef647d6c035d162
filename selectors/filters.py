"""The two wrappers the loop puts around a selector: the score filter and the unscored fill.

:class:`ScoreFiltered` runs any selector over the candidates that pass a filter on a score
(``selection.filter_score``: filter-then-diversify). :class:`ScoredFirst` keeps a rule that
reads a score alive when some candidates have no value for it. Which selector gets which is
decided in one place, :func:`evotune.selectors.registry.build`.
"""

from __future__ import annotations

import numpy as np

from evotune.selectors.base import Selection
from evotune.selectors.kcenter import KCenterSelector, kcenter_greedy
from evotune.selectors.sharded import top_k_mask, values_at


def score_filter(scores: np.ndarray, candidates: np.ndarray, max_value: float | None,
                 top_fraction: float, keep: str = "highest") -> tuple[np.ndarray, dict[str, int]]:
    """Candidates whose score is finite and at most ``max_value`` (when given), then the
    ``int(len(kept) × top_fraction)`` of them with the highest scores (``keep="lowest"``: the
    lowest, for a score where low is good, e.g. ``reference_loss`` as a quality gate; ties:
    lowest index).

    Cherry's IFD rule is this filter with ``max_value=1`` (it drops IFD > 1) and the top rate;
    Superfiltering keeps IFD < 1 strictly — a score of exactly 1.0 is the only difference.

    Returns:
        (passed positions, ascending; counts: ``nan_scores``, ``above_max``,
        ``below_top_fraction``, ``passed``).
    """
    _check_keep(keep)
    candidates = np.sort(np.asarray(candidates, dtype=np.int64))
    s = np.asarray(scores, dtype=np.float64)[candidates]
    finite = np.isfinite(s)
    under = finite & (s <= max_value) if max_value is not None else finite
    kept, kept_scores = candidates[under], s[under]
    keep_n = int(len(kept) * top_fraction)
    # Highest score first, ties to the lowest position: one O(N log N) sort (lexsort's last
    # key is the primary one).
    order = np.lexsort((kept, -kept_scores if keep == "highest" else kept_scores))[:keep_n]
    passed = np.sort(kept[order])
    info = {"nan_scores": int((~finite).sum()), "above_max": int((finite & ~under).sum()),
            "below_top_fraction": int(len(kept) - keep_n), "passed": int(len(passed))}
    return passed, info


def _check_keep(keep: str) -> None:
    if keep not in KEEP:
        raise ValueError(f"filter keep must be one of {', '.join(KEEP)}, got {keep!r}")


KEEP = ("highest", "lowest")


def score_filter_sharded(values: np.ndarray, positions: np.ndarray, candidates: np.ndarray,
                         max_value: float | None, top_fraction: float, comm,
                         keep: str = "highest") -> tuple[np.ndarray, dict[str, int]]:
    """:func:`score_filter` with the scores spread over ranks (every rank calls it with its
    own ``values`` at pool ``positions``): the same passed positions and counts on every
    rank. The top fraction is a distributed top-k (``selectors/sharded.py``); what crosses
    ranks is a few counts and the passed positions."""
    _check_keep(keep)
    values = np.asarray(values, dtype=np.float64)
    positions = np.asarray(positions, dtype=np.int64)
    here = np.isin(positions, candidates)
    s, pos = values[here], positions[here]
    held = comm.sum_int64(int(here.sum()))
    if held != len(candidates):
        raise ValueError(f"the ranks' shards hold {held} of {len(candidates)} candidates")
    finite = np.isfinite(s)
    under = finite & (s <= max_value) if max_value is not None else finite
    kept = comm.sum_int64(int(under.sum()))
    keep_n = int(kept * top_fraction)
    ranked = s[under] if keep == "highest" else -s[under]
    mine = pos[under][top_k_mask(ranked, pos[under], keep_n, comm)]
    passed = np.sort(np.concatenate(comm.all_gather_rows(mine)))
    info = {"nan_scores": comm.sum_int64(int((~finite).sum())),
            "above_max": comm.sum_int64(int((finite & ~under).sum())),
            "below_top_fraction": int(kept - keep_n), "passed": int(len(passed))}
    return passed, info


class ScoreFiltered:
    """Any selector, run only over the candidates that pass :func:`score_filter`.

    Filter-then-diversify (Superfiltering, MoDS's quality step): e.g. k-center or facility
    location over the candidates with IFD <= 1 in the top 20% by IFD. If fewer candidates pass
    than the round needs, a run must not stop in round 7 over it: the rest is picked by the same
    selector from the candidates that failed, flagged ``passed_filter: 0`` and counted.
    """

    def __init__(self, inner, score: str, max_value: float | None, top_fraction: float,
                 keep: str = "highest"):
        _check_keep(keep)
        self.inner, self.score = inner, score
        self.max_value, self.top_fraction, self.keep = max_value, top_fraction, keep
        self.name, self.options = inner.name, inner.options
        self.needs_embeddings = inner.needs_embeddings
        self.scores = tuple(dict.fromkeys((*inner.scores, score)))

    @property
    def sharded(self) -> bool:
        """Sharded when the selector inside is (k-center with a filter score)."""
        return bool(getattr(self.inner, "sharded", False))

    def select(self, features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator):
        passed, info = score_filter(features.scores[self.score], candidates, self.max_value,
                                    self.top_fraction, self.keep)
        return self._then(passed, info, labeled, candidates, n,
                          lambda lab, cands, k: self.inner.select(features, lab, cands, k, rng))

    def select_sharded(self, shard, labeled: np.ndarray, candidates: np.ndarray, n: int,
                       rng: np.random.Generator, comm):
        """:meth:`select` over every rank's own rows (:func:`score_filter_sharded`, then the
        inner rule's ``select_sharded``): the same picks."""
        shard.require_score(self.name, self.score)
        passed, info = score_filter_sharded(shard.scores[self.score], shard.positions,
                                            candidates, self.max_value, self.top_fraction, comm,
                                            self.keep)
        return self._then(passed, info, labeled, candidates, n,
                          lambda lab, cands, k: self.inner.select_sharded(shard, lab, cands, k,
                                                                          rng, comm))

    @staticmethod
    def _then(passed, info, labeled, candidates, n, inner) -> Selection:
        """The inner rule over the ``passed`` candidates, then over the others for what is
        missing (flagged ``passed_filter: 0``)."""
        first = inner(labeled, passed, min(n, len(passed)))
        parts, met = [first], [np.ones(len(first.positions))]
        if len(first.positions) < n:
            rest = np.setdiff1d(candidates, passed)
            more = inner(np.concatenate([labeled, first.positions]), rest,
                         n - len(first.positions))
            parts.append(more)
            met.append(np.zeros(len(more.positions)))
        # Every number of either part, for every pick: a part without it gets NaN, except the
        # unscored-fill flag (``scored``), which a part without it had no reason to set: 1.
        keys = dict.fromkeys(k for p in parts for k in p.numbers)
        numbers = {k: np.concatenate([p.numbers[k] if k in p.numbers else
                                      np.full(len(p.positions), 1.0 if k == "scored" else np.nan)
                                      for p in parts]) for k in keys}
        numbers["passed_filter"] = np.concatenate(met)
        counts = {**first.info}
        for p in parts[1:]:                 # the fill's counts add up with the first part's
            for k, v in p.info.items():
                is_count = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                counts[k] = counts.get(k, 0) + v if is_count else counts.get(k, v)
        info = {**info, **counts, "filled": n - len(first.positions)}
        return Selection(np.concatenate([p.positions for p in parts]), numbers, info)

    def state_dict(self) -> dict:
        return {**self.inner.state_dict(), "filter_score": self.score,
                "filter_max": self.max_value, "filter_top_fraction": self.top_fraction,
                "filter_keep": self.keep}


class ScoredFirst:
    """A score-reading selector, kept alive when some candidates have no score.

    The rules themselves refuse to pick more than the candidates with a finite score (they are
    pure and say so). A run would then stop in round 7 because a proxy tokenizer made a few
    hundred rows unscorable, so every rule that reads a score *and* measures embeddings is
    wrapped in this (:func:`evotune.selectors.registry.build`): the rule runs over the scored
    candidates, and only if they are fewer than the round needs, the rest is picked by k-center
    (on the same embeddings) from the unscored ones, flagged ``scored: 0`` and counted in
    ``info["unscored_fill"]``. A rule without embeddings (influence) has nothing to fill with
    and raises instead.
    """

    def __init__(self, inner, score: str, chunk_size: int = 4096):
        self.inner, self.score, self.chunk_size = inner, score, chunk_size
        self.name, self.options = inner.name, inner.options
        self.needs_embeddings = inner.needs_embeddings
        self.scores = inner.scores

    def select(self, features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator):
        features.require(self.name, self.score)
        candidates = np.sort(np.asarray(candidates, dtype=np.int64))
        scored = candidates[np.isfinite(features.scores[self.score][candidates])]
        if len(scored) >= n:
            return self.inner.select(features, labeled, candidates, n, rng)
        first = self.inner.select(features, labeled, scored, len(scored), rng)
        rest = np.setdiff1d(candidates, scored)
        more, dists = kcenter_greedy(features.embeddings,
                                     np.concatenate([labeled, first.positions]).astype(np.int64),
                                     rest, n - len(scored), self.chunk_size)
        return self._filled(first, more, dists,
                            features.scores[self.score][np.concatenate([first.positions, more])])

    @property
    def sharded(self) -> bool:
        """Sharded when the rule inside is (LIFT, weighted, the repr filter)."""
        return bool(getattr(self.inner, "sharded", False))

    def select_sharded(self, shard, labeled: np.ndarray, candidates: np.ndarray, n: int,
                       rng: np.random.Generator, comm):
        """:meth:`select` over every rank's own rows: the rule's ``select_sharded``, and the
        fill by sharded k-center (:class:`~evotune.selectors.kcenter.KCenterSelector`'s
        ``select_sharded``): the same picks. Only the scored candidates' positions are
        gathered, and only when they are too few."""
        shard.require(self.name, self.score)
        candidates = np.sort(np.asarray(candidates, dtype=np.int64))
        pos = np.asarray(shard.positions, dtype=np.int64)
        values = shard.scores[self.score]
        mine = pos[np.isin(pos, candidates) & np.isfinite(values)]
        if comm.sum_int64(len(mine)) >= n:
            return self.inner.select_sharded(shard, labeled, candidates, n, rng, comm)
        scored = np.sort(np.concatenate(comm.all_gather_rows(mine)))
        first = self.inner.select_sharded(shard, labeled, scored, len(scored), rng, comm)
        fill = KCenterSelector(KCenterSelector.Options(chunk_size=self.chunk_size))
        more = fill.select_sharded(shard, np.concatenate([labeled, first.positions]).astype(
            np.int64), np.setdiff1d(candidates, scored), n - len(scored), rng, comm)
        picks = np.concatenate([first.positions, more.positions])
        return self._filled(first, more.positions, more.numbers["kcenter_distance"],
                            values_at(values, pos, picks, comm))

    def _filled(self, first: Selection, more: np.ndarray, dists: np.ndarray,
                score_values: np.ndarray) -> Selection:
        """The rule's picks and the k-center fill's as one selection: the rule's numbers
        (NaN for the fill), the score for all, ``kcenter_distance``, and ``scored``."""
        k = len(first.positions)
        numbers = {name: np.concatenate([v, np.full(len(more), np.nan)])
                   for name, v in first.numbers.items()}
        numbers[self.score] = score_values
        numbers["kcenter_distance"] = np.concatenate(
            [first.numbers.get("kcenter_distance", np.full(k, np.nan)), dists])
        numbers["scored"] = np.concatenate([np.ones(k), np.zeros(len(more))])
        info = {**first.info, "unscored_fill": int(len(more))}
        return Selection(np.concatenate([first.positions, more]), numbers, info)

    def state_dict(self) -> dict:
        return self.inner.state_dict()
