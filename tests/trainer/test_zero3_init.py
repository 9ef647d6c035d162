"""ZeRO-3 builds the base model partitioned (deepspeed.zero.Init): every weight is split over
the ranks as it is created and loaded into its partition, not loaded whole and split later;
a kept module's partitioned adapter is re-drawn in place for a new round."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import POOL_TINY, REPO

SCRIPT = r"""
import sys, torch
from evotune.trainer.config import load_config
from evotune.trainer.engine import Strategy
from evotune.trainer.model import build_trainable_model, load_model
model_dir, pool = sys.argv[1], sys.argv[2]
cfg = load_config(None, [f"model.path={model_dir}", "model.precision=fp32",
                         f"data.pool={pool}",
                         "deepspeed.zero_stage=3", "lora.target_modules=[q_proj,v_proj]"])
strategy = Strategy(cfg)
strategy.setup()
model = build_trainable_model(cfg, model_dir, torch.float32, 3, strategy.ds_config())
base = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
assert base and all(hasattr(p, "ds_id") for _, p in base), "not built under zero.Init"
assert all(p.numel() == 0 and p.ds_numel > 0 for _, p in base), "weights held whole"
# the partitions hold the checkpoint's weights: gathered, they equal a plain load
import deepspeed
plain = dict(load_model(model_dir, torch.float32).named_parameters())
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
assert not is_deepspeed_zero3_enabled(), "later loads would be partitioned too"
for name, p in base:
    with deepspeed.zero.GatheredParameters([p]):
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p.data, plain[key].data), name
print("partitioned", len(base))
# A kept module: its adapter, partitioned by an engine, re-drawn for a new round equals a new
# model's adapter drawn from the same seed (the base model is not loaded again)
from evotune.trainer.model import reset_adapter
engine = strategy.prepare(model)
lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
assert lora and all(hasattr(p, "ds_id") and p.numel() == 0 for _, p in lora)
# a per-example gradient, as influence's pass takes them, leaves parameters gathered
from evotune.trainer.passes.gradients import example_grad
ids = torch.tensor([[1, 2, 3, 4, 5]])
example_grad(engine.module(input_ids=ids, labels=ids).loss, [p for _, p in lora])
Strategy.release(engine)
reset_adapter(model, 11)
fresh = dict(build_trainable_model(cfg, model_dir, torch.float32, 11).named_parameters())
for name, p in lora:
    with deepspeed.zero.GatheredParameters([p]):
        assert torch.equal(p.data, fresh[name].data), name
        assert not torch.equal(p.data, torch.zeros_like(p.data)) or "lora_B" in name
print("reset", len(lora))
strategy.close()
"""


@pytest.mark.e2e
def test_zero3_builds_the_model_partitioned(tmp_path, tiny_model_dir):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(POOL_TINY)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "partitioned" in proc.stdout and "reset" in proc.stdout
