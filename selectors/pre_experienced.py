"""Cherry LLM's "pre-experienced" sample: the first round's data, chosen by the base model.

Li et al., arXiv 2308.12032, §2.2; tianyi-lab/Cherry_LLM ``cherry_seletion/data_by_cluster.py``
(``sample_middle_confidence_data``, run with ``--kmeans_num_clusters 100 --sample_num 10
--low_th 25 --up_th 75``). The base model embeds the *templated instruction only* (mean of the
last hidden state over its tokens) and scores its perplexity; KMeans (random_state 0) clusters
the embeddings; inside each cluster the members whose instruction perplexity lies between the
cluster's 25th and 75th percentiles (inclusive) are kept, and ``sample_num`` of them are taken
evenly spaced by dataset index (every ``len(band) // sample_num``-th, from the first). A cluster
with fewer than ``sample_num`` members gives all of them; a band with fewer gives the band.

Same as the reference: the percentile band, the step rule, KMeans' random_state 0.
Departures (each on purpose):
- ``sample_num`` is ``n // n_clusters`` (at least 1), from the round's budget ``n``; Cherry's
  1,000 = 100 clusters × 10. Its total can fall short (small clusters, narrow bands): the
  shortfall is filled with seeded random picks from the remaining candidates, flagged
  ``in_band: 0`` and counted in ``info["filled"]``, so the round gets its budget. Picks beyond
  ``n`` (never with the default sample_num) are cut in pick order.
- KMeans' ``n_init`` is pinned (10): sklearn's default changed across versions. Cluster ids are
  canonical (by lowest pool index), as in :mod:`~evotune.selectors.cluster_quota`.
- "Templated instruction" is the run's own training prompt (the tokens before the first
  response token); with ``data.template: alpaca`` that is Cherry's Alpaca prompt.
- Pick order is cluster by cluster (cluster-id order), as the reference's output list.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from evotune.selectors.base import Features, Selection, option, options_dict
from evotune.selectors.cluster_quota import canonical_labels

SCORE = "instruction_perplexity"


def middle_band_sample(labels: np.ndarray, confidences: np.ndarray, n: int,
                       low: float = 25, up: float = 75) -> dict[int, np.ndarray]:
    """Cherry's ``sample_middle_confidence_data``: cluster id → chosen row indices.

    ``labels`` and ``confidences`` are per row (rows in dataset order); the result holds row
    indices into them, ascending within each cluster.
    """
    out = {}
    for c in range(int(labels.max()) + 1 if len(labels) else 0):
        members = np.flatnonzero(labels == c)
        if len(members) < n:
            out[c] = members
            continue
        conf = confidences[members]
        lo, hi = np.percentile(conf, low), np.percentile(conf, up)
        band = members[(conf >= lo) & (conf <= hi)]
        out[c] = band if len(band) < n else band[:: len(band) // n][:n]
    return out


class PreExperiencedSelector:
    """Round 0 by Cherry's pre-experienced sampling (see the module docstring).

    It reads features of the prompts alone (the ``instructions`` pass of
    ``trainer/passes/features.py``), so it chooses round 0 only (``selection.first_round``).
    """
    name = "pre_experienced"
    doc = ("Cherry LLM's pre-experienced round 0: KMeans on the base model's prompt embeddings, "
           "from each cluster members of the middle prompt-perplexity band, evenly spaced")
    logs = "`instruction_perplexity`, `cluster`, `in_band`"
    scale = "rank 0: the N × D prompt embeddings and KMeans"
    needs_embeddings = True
    scores = (SCORE,)

    @dataclass
    class Options:
        n_clusters: int = option(100, "KMeans clusters (Cherry: 100)", gt=0)
        low: float = option(25.0, "lower percentile of a cluster's prompt-perplexity band "
                                  "(Cherry: 25)", ge=0, le=100)
        up: float = option(75.0, "upper percentile of the band (Cherry: 75)")
        n_init: int = option(10, "KMeans restarts (pinned: scikit-learn's default has changed "
                                 "across versions)", gt=0)

        def check(self) -> None:
            if not self.low <= self.up <= 100:
                raise ValueError(f"up: must be in [low, 100] = [{self.low}, 100], got {self.up}")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def select(self, features: Features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator) -> Selection:
        o = self.options
        features.require(self.name, SCORE)
        candidates = np.sort(np.asarray(candidates, dtype=np.int64))
        if not 0 <= n <= len(candidates):
            raise ValueError(f"cannot pick {n} of {len(candidates)} candidates")
        ppl = features.scores[SCORE][candidates]
        ok = np.isfinite(ppl) & np.isfinite(features.embeddings[candidates]).all(axis=1)
        rows = candidates[ok]
        k = min(o.n_clusters, len(rows))
        if k < 1:
            raise ValueError("no candidate has a finite instruction embedding and perplexity")
        # Imported here: scikit-learn's import adds ~1.5 s to every process of every run.
        from sklearn.cluster import KMeans
        from sklearn.exceptions import ConvergenceWarning
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            raw = KMeans(n_clusters=k, n_init=o.n_init, random_state=0).fit_predict(
                np.asarray(features.embeddings[rows], dtype=np.float32))
        labels = canonical_labels(raw)
        per_cluster = max(1, n // k)
        chosen = middle_band_sample(labels, ppl[ok], per_cluster, o.low, o.up)
        picks = np.concatenate([rows[chosen[c]] for c in sorted(chosen)])[:n]
        cluster = np.concatenate([labels[chosen[c]] for c in sorted(chosen)])[:n]
        fill = n - len(picks)
        if fill:
            rest = np.setdiff1d(candidates, picks)
            picks = np.concatenate([picks, rng.choice(rest, size=fill, replace=False)])
            cluster = np.concatenate([cluster, np.full(fill, -1)])
        numbers = {SCORE: features.scores[SCORE][picks], "cluster": cluster.astype(np.float64),
                   "in_band": (cluster >= 0).astype(np.float64)}
        info = {"n_clusters": int(labels.max()) + 1, "sample_num": per_cluster,
                "filled": int(fill), "unscored": int((~ok).sum())}
        return Selection(picks.astype(np.int64), numbers, info)

    def state_dict(self) -> dict:
        return {"name": self.name, **options_dict(self.options)}
