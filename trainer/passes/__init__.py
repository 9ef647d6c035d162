"""Model passes: everything that runs the network to produce what selection reads.

- ``forward.py``: the batched, sharded forward pass over the pool: embeddings and the
  ``forward`` scores of ``trainer/scores.py``;
- ``ifd.py``: IFD's passes (the direct pass, or the reference templates) and their token rules;
- ``gradients.py`` and ``influence.py``: per-example LoRA gradients, their projection, and the
  influence score (LESS, ROSE) or gradient embeddings (TAGCOS);
- ``features.py``: :class:`~evotune.trainer.passes.features.FeaturePass`, which decides from a
  selector's needs which of these a round runs, runs them and derives the remaining scores.

A pass returns :class:`~evotune.selectors.base.Features` (on rank 0) and its statistics; the
selectors under ``selectors/`` only read the features.
"""
