"""The gradient pass's batched rows (LinearTaps) against its one-backward-per-row path inside a
DeepSpeed engine, after two training steps (so LoRA's B factors and Adam's moments are not
zero): candidates with LESS's Adam direction and plain, SFT validation rows, preference pairs
(run by tests/trainer/test_influence_e2e.py).

    python tests/scripts/check_batched_grads.py MODEL_DIR ZERO_STAGE OUT_NPZ
    deepspeed --num_gpus 2 tests/scripts/check_batched_grads.py MODEL_DIR ZERO_STAGE OUT_NPZ

Rank 0 writes every (kind, path) row set, in item order, and the largest relative row error.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from evotune.trainer.config import config_from_dict
from evotune.trainer.data import encode_all, load_examples
from evotune.trainer.engine import Strategy
from evotune.trainer.model import build_trainable_model, load_tokenizer
from evotune.trainer.passes.gradients import (LinearTaps, SparseProjector,
                                              trainable_params)
from evotune.trainer.passes.influence import InfluencePass, _assemble

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    model_dir, stage, out = args[0], int(args[1]), args[2]
    cfg = config_from_dict({
        "data": {"pool": str(FIXTURES / "pool_tiny.jsonl"), "max_length": 160,
                 "on_error": "skip"},
        "model": {"path": model_dir, "precision": "fp32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "train": {"batch_size": 2, "micro_batch_size": 1, "lr": 1e-2, "max_grad_norm": 0.0},
        "deepspeed": {"zero_stage": stage},
        "influence": {"validation": str(FIXTURES / "eval_tiny.jsonl"), "dim": 256,
                      "batch_size": 4}})
    strategy = Strategy(cfg)
    strategy.setup()
    cfg.train.micro_batch_size = 2 // strategy.world_size
    engine = strategy.prepare(build_trainable_model(cfg, model_dir, torch.float32, 5))
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        batch = torch.randint(5, 1000, (2, 12), generator=gen)
        mine = batch[strategy.rank::strategy.world_size] if strategy.world_size > 1 else batch
        engine.backward(engine(input_ids=mine, labels=mine).loss)
        engine.step()
    module = engine.module.eval()
    named = trainable_params(module)
    params = [p for _, p in named]
    moments = strategy.optimizer_moments(engine, params)
    tok = load_tokenizer(model_dir)
    _, pool, _ = encode_all(load_examples(cfg.data.pool)[0], tok, "chat", 160, "skip")
    sizes = [int(np.prod(strategy.full_shape(p))) for p in params]
    rows = {}
    for validation in ("eval_tiny.jsonl", "preference_tiny.jsonl"):
        cfg.influence.validation = str(FIXTURES / validation)
        grads = InfluencePass(cfg, pool, tok, "chat", strategy)
        grads._round = 1
        jobs = [("val", list(range(len(grads.val))), None)]
        if validation == "eval_tiny.jsonl":
            jobs += [("train", list(range(len(pool))), moments),
                     ("train-sgd", list(range(len(pool))), None)]
        for batched in (True, False):
            grads._taps = LinearTaps.find(module, named)[0] if batched else None
            for which, items, mom in jobs:
                got = grads._features(module, params, SparseProjector(sizes, 256, 7, 4), items,
                                      mom, which.split("-")[0], lambda *a, **k: None)
                parts = strategy.gather_to_rank0(got)
                if strategy.is_rank0:
                    key = f"{validation.split('_')[0]}-{which}-{'batched' if batched else 'rows'}"
                    rows[key] = _assemble(parts, np.asarray(items))
    if strategy.is_rank0:
        worst = max(float((np.linalg.norm(rows[k] - rows[k.replace("batched", "rows")], axis=1)
                           / np.linalg.norm(rows[k.replace("batched", "rows")], axis=1)).max())
                    for k in rows if k.endswith("batched"))
        np.savez(out, worst=worst, world_size=strategy.world_size, **rows)
    strategy.close()


if __name__ == "__main__":
    main()
