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

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from evotune.selectors.base import Features, Selection
from evotune.selectors.cluster_quota import _canonical_labels

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
    """Round 0 by Cherry's pre-experienced sampling (see the module docstring)."""
    name = "pre_experienced"
    needs_embeddings = True
    scores = (SCORE,)

    def __init__(self, n_clusters: int = 100, low: float = 25, up: float = 75, n_init: int = 10):
        self.n_clusters, self.low, self.up, self.n_init = n_clusters, low, up, n_init

    def select(self, features: Features, labeled: np.ndarray, candidates: np.ndarray, n: int,
               rng: np.random.Generator) -> Selection:
        features.require(self.name, SCORE)
        candidates = np.sort(np.asarray(candidates, dtype=np.int64))
        if not 0 <= n <= len(candidates):
            raise ValueError(f"cannot pick {n} of {len(candidates)} candidates")
        ppl = features.scores[SCORE][candidates]
        ok = np.isfinite(ppl) & np.isfinite(features.embeddings[candidates]).all(axis=1)
        rows = candidates[ok]
        k = min(self.n_clusters, len(rows))
        if k < 1:
            raise ValueError("no candidate has a finite instruction embedding and perplexity")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            raw = KMeans(n_clusters=k, n_init=self.n_init, random_state=0).fit_predict(
                np.asarray(features.embeddings[rows], dtype=np.float32))
        labels = _canonical_labels(raw)
        per_cluster = max(1, n // k)
        chosen = middle_band_sample(labels, ppl[ok], per_cluster, self.low, self.up)
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
        return {"n_clusters": self.n_clusters, "low": self.low, "up": self.up,
                "n_init": self.n_init}
