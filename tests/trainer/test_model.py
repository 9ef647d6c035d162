"""A kept base model's adapter re-drawn for a new round equals a freshly built one."""

from __future__ import annotations

import math

import torch

from evotune.trainer.config import load_config
from evotune.trainer.model import build_trainable_model, load_model, reset_adapter


def test_reset_adapter_gives_a_fresh_adapter(tiny_model_dir):
    from helpers import POOL_TINY
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.pool={POOL_TINY}",
                             "lora.r=4", "lora.target_modules=[q_proj,v_proj]"])
    fresh = build_trainable_model(cfg, tiny_model_dir, torch.float32, 11)
    kept = build_trainable_model(cfg, tiny_model_dir, torch.float32, 5)
    for p in kept.parameters():                       # as if trained for a round
        if p.requires_grad:
            p.data.add_(0.3)
    reset_adapter(kept, 11)
    a, b = dict(fresh.named_parameters()), dict(kept.named_parameters())
    lora = [n for n in a if "lora_" in n]
    assert lora and all(torch.equal(a[n], b[n]) for n in a)
    for n in lora:
        if ".lora_B." in n:
            assert not a[n].any()
        else:        # kaiming-uniform with a = √5: U(-1/√fan_in, 1/√fan_in), fan_in = in features
            bound = 1 / math.sqrt(a[n].shape[1])
            assert a[n].abs().max() <= bound and a[n].std() > bound / 3
    other = build_trainable_model(cfg, tiny_model_dir, torch.float32, 12)
    assert not all(torch.equal(a[n], dict(other.named_parameters())[n]) for n in lora)
    # B = 0: the adapted model computes what the base model computes
    base = load_model(tiny_model_dir, torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 14, 2]])
    with torch.no_grad():
        assert torch.allclose(kept.eval()(input_ids=ids).logits, base(input_ids=ids).logits,
                              atol=1e-6)


def test_building_and_merging_the_model_warn_about_nothing(tiny_model_dir, tmp_path):
    """No deprecation warning from building the trainable model or merging its adapter (PEFT
    reads a deprecated transformers property; evotune filters exactly that one)."""
    import warnings

    from helpers import POOL_TINY

    from evotune.trainer.model import load_tokenizer, merge_adapter
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.pool={POOL_TINY}",
                             "lora.target_modules=[q_proj,v_proj]"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_trainable_model(cfg, tiny_model_dir, torch.float32, 3)
        model.save_pretrained(str(tmp_path / "adapter"))
        merge_adapter(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged",
                      load_tokenizer(tiny_model_dir))
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    assert (tmp_path / "merged" / "config.json").is_file()
