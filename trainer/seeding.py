"""Seeds and random states: a stable seed per (run seed, what, round), seeded samples, and
the Python, numpy and torch RNG states captured into (and restored from) a round's state.

A foundation of ``trainer/``: it imports nothing of evotune.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random

import numpy as np
import torch


def derive_seed(seed: int, *keys) -> int:
    """A stable 63-bit seed from the run seed and keys (same on every rank, every resume).

    Every random choice of a round draws from a generator seeded this way, so a resumed round
    makes the same choices as an uninterrupted one without replaying earlier rounds.
    """
    blob = json.dumps([seed, *keys]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


def sample_size(amount: int | float, n: int) -> int:
    """How many of ``n`` candidates a sampling setting takes: a count (an int, at most n) or a
    fraction (a float in (0, 1]: its floor, at least one)."""
    k = amount if isinstance(amount, int) else max(1, int(amount * n))
    return min(k, n)


def seeded_sample(candidates: np.ndarray, amount: int | float, seed: int, what: str,
                  r: int) -> np.ndarray:
    """A sorted sample of ``candidates`` (``sample_size``), drawn by a generator seeded with
    (seed, what, round): the same on every rank and after a resume."""
    rng = np.random.default_rng(derive_seed(seed, what, r))
    return np.sort(rng.choice(candidates, size=sample_size(amount, len(candidates)),
                              replace=False))


def _bytes(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def capture_rng() -> dict:
    """Python, numpy and torch RNG states as plain JSON (numbers and base64 bytes: a state file
    holds data only, nothing a reader would execute)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"format": 2,
              "python": {"version": version, "state": list(internal), "gauss": gauss},
              "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached": float(cached)},
              "torch": _bytes(torch.get_rng_state())}
    if torch.cuda.is_available():
        states["cuda"] = [_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return states


def restore_rng(saved: dict) -> None:
    """Restore what :func:`capture_rng` saved. A state file of an older evotune (pickled
    states) is not read: unpickling a file could run code; evotune's own random choices are
    seeded per round (:func:`derive_seed`) and do not need these states."""
    if saved.get("format") != 2:
        if saved:
            import logging
            logging.getLogger("evotune").warning(
                "the run's RNG states were saved by an older evotune (pickled): not restored; "
                "evotune's own random choices are seeded per round and unaffected")
        return
    p = saved["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    n = saved["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(_tensor(saved["torch"]))
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_tensor(s) for s in saved["cuda"]])
