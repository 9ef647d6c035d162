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
import zipfile
from pathlib import Path

import numpy as np

from evotune.selectors.base import Features
from evotune.trainer.passes.forward import PassStats, gather_shards
from evotune.trainer.passes.streamed import RowsPart, read_shard, save_parts, write_npz
from evotune.trainer.files import cache_root, write_bytes_atomic, write_json_atomic

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


def _paths(key: str) -> tuple[Path, Path]:
    base = cache_dir() / key
    return base.with_suffix(".npz"), base.with_suffix(".json")


def _arrays(features: Features) -> dict[str, np.ndarray]:
    """The entry's arrays other than the embeddings."""
    arrays = {f"score:{k}": v for k, v in features.scores.items()}
    arrays.update({f"extra:{k}": v for k, v in features.extra.items()})
    return arrays


def _meta(features: Features, stats: dict[str, PassStats]) -> dict:
    return {"skipped": {name: {str(i): why for i, why in reasons.items()}
                        for name, reasons in features.skipped.items()},
            "stats": {name: [s.seconds, s.tokens, s.padded_tokens] for name, s in stats.items()}}


def _read(key: str, embeddings: bool) -> tuple[Features, dict[str, PassStats], bool] | None:
    """The entry's features (with the embeddings when asked), its pass statistics and whether
    it holds embeddings; None when there is none or it cannot be read."""
    npz, meta = _paths(key)
    if not (npz.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        with np.load(npz) as f:
            has = "embeddings" in f.files
            features = Features(
                embeddings=f["embeddings"] if has and embeddings else None,
                scores={k[6:]: f[k] for k in f.files if k.startswith("score:")},
                extra={k[6:]: f[k] for k in f.files if k.startswith("extra:")})
        features.skipped = {name: {int(i): why for i, why in reasons.items()}
                            for name, reasons in info["skipped"].items()}
        stats = {name: PassStats(*s, cached=True) for name, s in info["stats"].items()}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # torn or foreign: compute again
        return None
    return features, stats, has


def load(key: str) -> tuple[Features, dict[str, PassStats]] | None:
    """The cached features and the statistics of the passes that made them, or None."""
    found = _read(key, embeddings=True)
    return None if found is None else found[:2]


def save(key: str, features: Features, stats: dict[str, PassStats]) -> None:
    """Store features atomically (the arrays first, the description last: a reader that finds
    the description finds whole arrays)."""
    npz, meta = _paths(key)
    npz.parent.mkdir(parents=True, exist_ok=True)
    arrays = _arrays(features)
    if features.embeddings is not None:
        arrays["embeddings"] = features.embeddings
    write_bytes_atomic(npz, lambda tmp: write_npz(tmp, arrays))
    write_json_atomic(meta, _meta(features, stats))


def load_shard(key: str, strategy, n: int) -> tuple[Features, dict[str, PassStats]] | None:
    """Every rank: its shard of the cached features of an ``n``-row pool — a contiguous run of
    positions, ``n / ranks`` rows — or None on every rank when rank 0 finds no readable entry.
    Rank 0 reads the entry and sends the scores and skip reasons (O(N) numbers) and the
    embeddings a block at a time (``streamed.py``): no rank holds N × D. ``extra`` arrays stay
    on rank 0, as with a sharded pass."""
    found = _read(key, embeddings=False) if strategy.is_rank0 else None
    head = None if found is None else (found[0].scores, found[0].skipped, found[1], found[2])
    head = strategy.broadcast_from_rank0(head)
    if head is None:
        return None
    scores, skipped, stats, has_embeddings = head
    rank, world = strategy.rank, strategy.world_size
    positions = np.arange(n * rank // world, n * (rank + 1) // world, dtype=np.int64)
    a, b = (int(positions[0]), int(positions[-1]) + 1) if len(positions) else (0, 0)
    shard = Features(scores={k: v[a:b].copy() for k, v in scores.items()},
                     skipped={name: {i: why for i, why in reasons.items() if a <= i < b}
                              for name, reasons in skipped.items()},
                     extra=found[0].extra if found is not None else {}, positions=positions)
    if has_embeddings:
        shard.embeddings = read_shard(strategy, _paths(key)[0], "embeddings", positions)
        if shard.embeddings is None:
            return None
    return shard, stats


def save_shard(key: str, shard: Features, stats: dict[str, PassStats], strategy,
               n: int) -> str | None:
    """Every rank: store sharded features like :func:`save`, rank 0 writing the entry while
    every rank sends its rows a block at a time (``streamed.py``: no rank holds N × D). Returns
    why the entry could not be written (on every rank), or None."""
    whole = gather_shards(strategy, shard, n, embeddings=False)
    npz, meta = _paths(key)           # (the folder is made by the atomic write, on rank 0)
    arrays = _arrays(whole) if strategy.is_rank0 else None
    rows = None if shard.embeddings is None else RowsPart(shard.positions, shard.embeddings, n)
    error = save_parts(strategy, npz, arrays, {"embeddings": rows})
    if error is None and strategy.is_rank0:
        try:
            write_json_atomic(meta, _meta(whole, stats))
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
    return strategy.broadcast_from_rank0(error)
