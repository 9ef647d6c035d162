"""Helpers shared by the tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
POOL_TINY = FIXTURES / "pool_tiny.jsonl"      # 40 real rows (see fixtures/ATTRIBUTION.md)
EVAL_TINY = FIXTURES / "eval_tiny.jsonl"      # 10 real held-out rows


def write_config(path: Path, model_dir: Path, out_dir: Path, **sections) -> Path:
    """A small run config for end-to-end tests; ``sections`` update the defaults below."""
    import yaml
    cfg = {
        "seed": 7,
        "model": {"path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        "data": {"pool": str(POOL_TINY), "max_length": 160, "on_error": "skip"},
        "eval": {"path": str(EVAL_TINY), "batch_size": 4},
        "selection": {"selector": "kcenter", "rounds": 3, "init_size": 6, "per_round": 5,
                      "batch_size": 8},
        "train": {"epochs": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3},
        "deepspeed": {"zero_stage": 0},
        "output": {"dir": str(out_dir), "keep_checkpoints": 0},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_train(args: list[str], ranks: int | None = None, timeout: int = 600,
              env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run launch/train.py: under the real ``deepspeed`` launcher when ``ranks`` is given,
    else as a plain python process."""
    if ranks is None:
        cmd = [sys.executable, str(REPO / "launch" / "train.py"), *args]
    else:
        deepspeed = Path(sys.executable).with_name("deepspeed")
        cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port",
               str(_free_port()), str(REPO / "launch" / "train.py"), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    shm_before = shm_buffers()
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    leaked = shm_buffers() - shm_before
    assert not leaked, f"the run left DeepSpeed shared-memory buffers behind: {sorted(leaked)}"
    return proc


def shm_buffers() -> set[str]:
    """Names of DeepSpeed's CPU allreduce buffers in /dev/shm (each holds ~69 MB of RAM)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed_allreduce_buffer_*")} if shm.is_dir() else set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
