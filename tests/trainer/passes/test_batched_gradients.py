"""Per-row gradients from one batched backward (LinearTaps) against plain autograd one row at a
time, and the gradient pass's batched features against its one-row-per-backward path: LESS's
Adam direction and plain gradients for the candidates, SFT and preference (ROSE) validation
rows, on 1 and 2 ranks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evotune.trainer.data import IGNORE_INDEX, Encoded
from evotune.trainer.passes.gradients import LinearTaps, row_objectives, trainable_params
from helpers import EVAL_TINY, FIXTURES, POOL_TINY, spawn_ranks

PREFERENCES = FIXTURES / "preference_tiny.jsonl"


def lora_model(model_dir, targets=("q_proj", "v_proj", "o_proj", "down_proj")):
    """The tiny Llama with a LoRA adapter whose B factors are random (PEFT starts them at zero,
    which would make every A gradient zero and the check vacuous), fp32, eval mode."""
    from peft import LoraConfig, get_peft_model

    from evotune.trainer.model import load_model
    torch.manual_seed(0)
    model = get_peft_model(load_model(model_dir, torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                      target_modules=list(targets)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model.eval()


def one_row(model, params, enc: Encoded, summed: bool) -> list[torch.Tensor]:
    """Written out here: one row's forward, its answer loss (mean) or log-probability (sum),
    and autograd's gradient w.r.t. ``params``."""
    logits = model(input_ids=torch.tensor([enc.input_ids])).logits[0, :-1]
    target = torch.tensor(enc.labels[1:])
    keep = target != IGNORE_INDEX
    nll = F.cross_entropy(logits[keep], target[keep], reduction="sum")
    objective = -nll if summed else nll / keep.sum()
    return list(torch.autograd.grad(objective, params))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.norm())


@pytest.fixture(scope="module")
def encoded(tokenizer):
    from evotune.trainer.data import encode_all, load_examples
    _, rows, _ = encode_all(load_examples(POOL_TINY)[0], tokenizer, "chat", 160, "skip")
    return rows


@pytest.mark.parametrize("summed", [False, True])
def test_linear_taps_equal_autograd_one_row_at_a_time(tiny_model_dir, encoded, summed):
    model = lora_model(tiny_model_dir)
    named = trainable_params(model)
    params = [p for _, p in named]
    taps, others = LinearTaps.find(model, named)
    assert others == [] and len(taps.owners) == len(params) == 16
    by_length = {len(e.input_ids): e for e in encoded}   # lengths differ: padding in play
    rows = [by_length[n] for n in sorted(by_length)[:5]]
    with taps:
        objectives, mask = row_objectives(model, rows, "cpu", summed=summed)
    batched = taps.grads(objectives.sum(), len(rows), mask)
    assert [tuple(g.shape) for g in batched] == [(len(rows), *p.shape) for p in params]
    for i, enc in enumerate(rows):
        want = one_row(model, params, enc, summed)
        assert all(w.norm() > 0 for w in want)            # A and B both have something
        for got, w in zip(batched, want):
            assert rel(got[i], w) < 1e-5
    assert taps._hooks == [] and taps._calls == {}        # nothing left on the model


class Twice(torch.nn.Module):
    """A linear layer (with a bias) applied twice in one forward, and a second one once."""

    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_a_layer_called_twice_sums_both_calls_and_biases_are_summed_over_tokens():
    torch.manual_seed(1)
    net = Twice()
    named = trainable_params(net)
    taps, _ = LinearTaps.find(net, named)
    x = torch.randn(3, 5, 4)
    with taps:
        per_row = (net(x) ** 2).sum(dim=(1, 2))
    got = taps.grads(per_row.sum(), 3)
    for i in range(3):
        want = torch.autograd.grad((net(x[i:i + 1]) ** 2).sum(), [p for _, p in named])
        for g, w in zip(got, want):
            assert rel(g[i], w) < 1e-5


def test_parameters_outside_linear_layers_need_one_backward_per_row(tiny_model_dir):
    from evotune.trainer.model import load_model
    model = load_model(tiny_model_dir, torch.float32)          # full fine-tuning
    model.get_input_embeddings().weight.requires_grad_(False)
    taps, others = LinearTaps.find(model, trainable_params(model))
    assert taps is None
    assert any("norm" in n for n in others)
    assert not any(n.endswith("q_proj.weight") for n in others)


def _pass_rows(rank: int, world: int, port: int, model_dir: str) -> dict:
    """Both paths of the gradient pass on this rank's share, every rank of a gloo group."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch.distributed as dist

    from evotune.trainer.config import config_from_dict
    from evotune.trainer.data import encode_all, load_examples
    from evotune.trainer.engine import Strategy
    from evotune.trainer.model import load_tokenizer
    from evotune.trainer.passes.gradients import SparseProjector
    from evotune.trainer.passes.influence import InfluencePass, _assemble
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = lora_model(model_dir)
        params = [p for _, p in trainable_params(model)]
        gen = torch.Generator().manual_seed(3)
        moments = ([torch.randn(p.shape, generator=gen) * 1e-3 for p in params],
                   [torch.rand(p.shape, generator=gen) * 1e-5 for p in params])
        tok = load_tokenizer(model_dir)
        _, pool, _ = encode_all(load_examples(POOL_TINY)[0], tok, "chat", 160, "skip")
        out = {}
        for name, validation in (("sft", EVAL_TINY), ("pairs", PREFERENCES)):
            cfg = config_from_dict({"data": {"pool": str(POOL_TINY), "max_length": 160,
                                             "on_error": "skip"},
                                    "model": {"path": model_dir, "precision": "fp32"},
                                    "influence": {"validation": str(validation), "dim": 512,
                                                  "batch_size": 4}})
            strategy = Strategy(cfg)
            strategy.rank, strategy.world_size = rank, world
            grads = InfluencePass(cfg, pool, tok, "chat", strategy)
            grads._round = 1
            if name == "pairs":
                # DPO's coefficient with label smoothing can change sign from pair to pair
                grads.icfg.label_smoothing = 0.4
                grads.reference_margins = [(-1) ** i * 30.0 for i in range(len(grads.val))]
            projector = SparseProjector([p.numel() for p in params], 512, 7, 4)
            items = list(range(len(pool))) if name == "sft" else []
            for batched in (True, False):
                grads.batched = batched
                grads._taps = LinearTaps.find(model, trainable_params(model))[0] \
                    if batched else None
                for which, its, mom in (("train", items, moments), ("train-sgd", items, None),
                                        ("val", list(range(len(grads.val))), None)):
                    got = grads._features(model, params, projector, its, mom,
                                          which.split("-")[0], lambda *a, **k: None)
                    parts = strategy.gather_to_rank0(got)
                    if strategy.is_rank0:
                        out[(name, which, batched)] = _assemble(parts, np.asarray(sorted(its)))
        return out
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_batched_pass_equals_one_backward_per_row_after_projection(tiny_model_dir, world):
    """Candidates (Adam direction and plain gradient), SFT validation rows and preference
    pairs (DPO coefficients of both signs): every projected, normalised row within 1e-5 of
    the one-row-per-backward path's (which is plain autograd: tests/.../test_influence_e2e)."""
    rows = spawn_ranks(_pass_rows, world, str(tiny_model_dir), timeout=300)[0]
    compared = {("sft", "train"): 25, ("sft", "train-sgd"): 25, ("sft", "val"): 8,
                ("pairs", "val"): 33}                   # rows that fit max_length 160
    for (name, which), n in compared.items():
        got, want = rows[(name, which, True)], rows[(name, which, False)]
        assert got.shape == want.shape == (n, 512)
        err = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
        assert err.max() < 1e-5, (name, which, err.max())
    if world == 2:
        one = spawn_ranks(_pass_rows, 1, str(tiny_model_dir), timeout=300)[0]
        for key, got in rows.items():          # the same batches on 1 and 2 ranks: bitwise
            assert np.array_equal(got, one[key]), key


class FixedLogits(torch.nn.Module):
    """Stands in for a model's head: returns the given (B, T, V) logits at the kept positions."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask, logits_to_keep):
        import types
        return types.SimpleNamespace(logits=self.logits[:, logits_to_keep])


def test_row_objectives_are_as_exact_as_float64_allows_at_a_real_vocabulary():
    """Logits of a trained model's size (49,152 classes, values up to ~30): each row's mean
    NLL within 2e-6 of a float64 computation (log-softmax over a strided middle dim was off by
    ~1e-5 here, which put rows 1e-3 off on SmolLM2)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 40, 49_152, generator=gen) * 6
    rows = []
    for n, first in ((40, 10), (31, 25)):           # row 1 is padded, its answer later
        ids = torch.randint(0, 49_152, (n,), generator=gen).tolist()
        rows.append(Encoded(ids, [IGNORE_INDEX] * first + ids[first:], False))
    got, mask = row_objectives(FixedLogits(logits), rows, "cpu")
    for i, e in enumerate(rows):
        n = len(e.input_ids)
        target = torch.tensor(e.labels[1:])
        keep = target != IGNORE_INDEX
        want = F.cross_entropy(logits[i, :n - 1].double()[keep], target[keep])
        assert abs(float(got[i]) - float(want)) < 2e-6
    assert mask.sum(dim=1).tolist() == [40, 31]
