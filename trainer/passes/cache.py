"""Features of the base model, kept across runs.

The base model's features depend only on the model, the pool, its encoding and the pass
settings, never on a run's seed or budget (a fresh LoRA adapter starts as a no-op), so every
run that chooses round 0 with the base model (``selection.first_round: selector``) and every
``launch/score_pool.py`` call on the same inputs would compute the same numbers. They are
stored once under ``$EVOTUNE_CACHE/features/`` (default ``~/.cache/evotune``), keyed by a hash
of everything they depend on (:func:`features_key`), and read back by the next run
(``scoring.base_cache``, on by default). Gradient features are never cached (they need a
training run's optimizer).

The model enters the key by its path, its ``config.json`` and the size and modification time
of each weight file: a model rewritten in place gets a new key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from evotune.selectors.base import Features
from evotune.trainer.passes.forward import PassStats
from evotune.trainer.state import cache_root, write_bytes_atomic, write_json_atomic

VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def cache_dir() -> Path:
    return cache_root() / "features"


def model_fingerprint(path: str | os.PathLike) -> dict:
    """What identifies a local model dir: its path, config and weight files (size, mtime)."""
    path = Path(path).resolve()
    weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    config = path / "config.json"
    return {"path": str(path),
            "config": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file()
            else None,
            "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights]}


def features_key(spec: dict) -> str:
    """A hex key for a JSON-able description of everything the features depend on."""
    blob = json.dumps({"version": VERSION, **spec}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def load(key: str) -> tuple[Features, dict[str, PassStats]] | None:
    """The cached features and the statistics of the passes that made them, or None."""
    base = cache_dir() / key
    npz, meta = base.with_suffix(".npz"), base.with_suffix(".json")
    if not (npz.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        with np.load(npz) as f:
            features = Features(
                embeddings=f["embeddings"] if "embeddings" in f.files else None,
                scores={k[6:]: f[k] for k in f.files if k.startswith("score:")},
                extra={k[6:]: f[k] for k in f.files if k.startswith("extra:")})
    except (OSError, ValueError, KeyError):        # torn or foreign: compute again
        return None
    features.skipped = {name: {int(i): why for i, why in reasons.items()}
                        for name, reasons in info["skipped"].items()}
    stats = {name: PassStats(*s, cached=True) for name, s in info["stats"].items()}
    return features, stats


def save(key: str, features: Features, stats: dict[str, PassStats]) -> None:
    """Store features atomically (the arrays first, the description last: a reader that finds
    the description finds whole arrays)."""
    base = cache_dir() / key
    base.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"score:{k}": v for k, v in features.scores.items()}
    arrays.update({f"extra:{k}": v for k, v in features.extra.items()})
    if features.embeddings is not None:
        arrays["embeddings"] = features.embeddings
    write_bytes_atomic(base.with_suffix(".npz"), lambda tmp: np.savez(tmp, **arrays))
    write_json_atomic(base.with_suffix(".json"), {
        "skipped": {name: {str(i): why for i, why in reasons.items()}
                    for name, reasons in features.skipped.items()},
        "stats": {name: [s.seconds, s.tokens, s.padded_tokens] for name, s in stats.items()}})
