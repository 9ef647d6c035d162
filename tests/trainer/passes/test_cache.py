"""The base-model feature cache: a round trip, and keys that change with what they describe."""

import os

import numpy as np

from evotune.selectors.base import Features
from evotune.trainer.passes import cache
from evotune.trainer.passes.forward import PassStats


def test_features_round_trip_with_skip_reasons_and_pass_statistics(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOTUNE_CACHE", str(tmp_path))
    f = Features(embeddings=np.arange(6, dtype=np.float32).reshape(3, 2),
                 scores={"loss": np.array([1.0, np.nan, 2.0]), "rds:gsm8k": np.ones(3)},
                 skipped={"loss": {1: "no response token"}}, extra={"grad_sample": np.arange(2)})
    key = cache.features_key({"a": 1})
    assert cache.load(key) is None
    cache.save(key, f, {"features": PassStats(2.5, 100, 120)})
    g, stats = cache.load(key)
    assert np.array_equal(g.embeddings, f.embeddings) and g.skipped == f.skipped
    assert set(g.scores) == {"loss", "rds:gsm8k"} and np.isnan(g.scores["loss"][1])
    assert np.array_equal(g.extra["grad_sample"], [0, 1])
    assert stats == {"features": PassStats(2.5, 100, 120, cached=True)}
    (tmp_path / "features" / f"{key}.npz").write_bytes(b"torn")      # a torn file: recompute
    assert cache.load(key) is None


def test_keys_follow_the_model_files_and_the_settings(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"0" * 10)
    before = cache.model_fingerprint(model)
    assert cache.model_fingerprint(model) == before
    os.utime(model / "model.safetensors", ns=(1, 1))                  # rewritten in place
    assert cache.model_fingerprint(model) != before
    assert cache.features_key({"pooling": "mean"}) != cache.features_key({"pooling": "last"})
    assert cache.features_key({"x": [1, 2]}) == cache.features_key({"x": [1, 2]})
