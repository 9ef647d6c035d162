"""Read Adam's moments through Strategy.optimizer_moments after two DeepSpeed steps and compare
them with a plain torch AdamW trained on the same batches (run by tests/trainer/test_influence_e2e.py).

    python tests/scripts/check_moments.py MODEL_DIR ZERO_STAGE OUT_JSON
    deepspeed --num_gpus 2 tests/scripts/check_moments.py MODEL_DIR ZERO_STAGE OUT_JSON
"""

import json
import sys

import torch

from evotune.trainer.passes.gradients import trainable_params
from evotune.trainer.config import config_from_dict
from evotune.trainer.engine import Strategy
from evotune.trainer.model import build_trainable_model


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    model_dir, stage, out = args[0], int(args[1]), args[2]
    cfg = config_from_dict({
        "data": {"pool": __file__},
        "model": {"path": model_dir, "precision": "fp32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "train": {"batch_size": 2, "micro_batch_size": 1, "lr": 1e-2, "max_grad_norm": 0.0},
        "deepspeed": {"zero_stage": stage}})
    strategy = Strategy(cfg)
    strategy.setup()
    cfg.train.micro_batch_size = 2 // strategy.world_size
    engine = strategy.prepare(build_trainable_model(cfg, model_dir, torch.float32, 5))
    ref_model = build_trainable_model(cfg, model_dir, torch.float32, 5)
    ref_params = [p for _, p in trainable_params(ref_model)]
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        batch = torch.randint(5, 1000, (2, 12), generator=gen)
        mine = batch[strategy.rank::strategy.world_size] if strategy.world_size > 1 else batch
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
        engine.step()
        ref_opt.zero_grad()
        ref_model(input_ids=batch, labels=batch).loss.backward()
        ref_opt.step()
    params = [p for _, p in trainable_params(engine.module)]
    m, v = strategy.optimizer_moments(engine, params)
    if strategy.is_rank0:
        worst = 0.0
        for p_ref, mm, vv in zip(ref_params, m, v):
            state = ref_opt.state[p_ref]
            for got, want in ((mm, state["exp_avg"]), (vv, state["exp_avg_sq"])):
                scale = float(want.abs().max()) or 1.0
                worst = max(worst, float((got.cpu() - want).abs().max()) / scale)
        with open(out, "w") as f:
            json.dump({"max_rel_diff": worst, "params": len(params),
                       "world_size": strategy.world_size}, f)
    strategy.close()


if __name__ == "__main__":
    main()
