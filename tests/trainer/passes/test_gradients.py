"""Gradient-feature building blocks: the sparse projection, LESS's Adam direction, ROSE's DPO
direction (the reference model only scales it), and the influence aggregation."""

import math

import pytest
import torch

from evotune.trainer.passes.gradients import (SparseProjector, adam_direction, aggregate,
                                         answer_logprob, dpo_coefficient, example_grad,
                                         influence, normalize_rows, trainable_params)
from evotune.trainer.data import IGNORE_INDEX


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_projection_preserves_cosines_within_005_at_8192_dims():
    sizes = [60_000, 90_000, 50_000]
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(200_000, generator=gen)
    rows = []
    for mix in (0.0, 0.3, 0.6, 0.9, 1.0):        # cosines to `base` from ~0 to 1
        noise = torch.randn(200_000, generator=gen)
        rows.append(mix * base + math.sqrt(1 - mix * mix) * noise)
    x = torch.stack([base] + rows)
    proj = SparseProjector(sizes, dim=8192, seed=3)
    blocks = list(torch.split(x, sizes, dim=1))
    y = proj.project(blocks)
    assert y.shape == (6, 8192)
    errors = [abs(cos(y[0], y[i]) - cos(x[0], x[i])) for i in range(1, 6)]
    assert max(errors) < 0.05, errors
    # norms too (within 10%)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=0.1)


def test_projection_is_seeded_and_linear():
    sizes = [7, 5]
    x = torch.randn(3, 12)
    blocks = list(torch.split(x, sizes, dim=1))
    a = SparseProjector(sizes, dim=16, seed=1).project(blocks)
    b = SparseProjector(sizes, dim=16, seed=1, cache=False).project(blocks)
    c = SparseProjector(sizes, dim=16, seed=2).project(blocks)
    assert torch.equal(a, b) and not torch.equal(a, c)
    two = SparseProjector(sizes, dim=16, seed=1).project([2 * t for t in blocks])
    assert torch.allclose(two, 2 * a)
    with pytest.raises(ValueError, match="expected 2 gradient blocks"):
        SparseProjector(sizes, dim=16).project(blocks[:1])
    # the hashes: int64 indices and fp32 signs, kept (concatenated) only while they fit
    kept = SparseProjector(sizes, dim=16, seed=1)
    kept.project(blocks)
    (index, sign), = kept._hashes.values()
    assert kept.cache and index.dtype == torch.int64 and sign.dtype == torch.float32
    assert index.shape == sign.shape == (12, 4)
    small = SparseProjector(sizes, dim=16, seed=1, cache_mb=(12 * 4 * 12 - 1) / 2**20)
    assert not small.cache and torch.equal(small.project(blocks), a) and not small._hashes
    # reference: the projection written out densely from the same seeded hashes
    dense = torch.zeros(12, 16)
    for i, (start, n) in enumerate([(0, 7), (7, 5)]):
        idx, sgn = SparseProjector(sizes, dim=16, seed=1, cache=False)._hash(i, "cpu")
        for row in range(n):
            for k in range(4):
                dense[start + row, int(idx[row, k])] += float(sgn[row, k])
    assert torch.allclose(a, x @ dense / 2.0, atol=1e-6)


def test_projecting_blocks_together_adds_in_the_same_order_as_one_at_a_time(monkeypatch):
    sizes = [7, 5, 3, 9, 2, 11]
    blocks = [torch.randn(4, n) for n in sizes]
    alone = SparseProjector(sizes, dim=8, seed=3, cache=False).project(blocks)
    expected = {1: [(i, i + 1) for i in range(6)],          # 4 hashed values per coordinate
                40: [(0, 1), (1, 3), (3, 4), (4, 5), (5, 6)],
                60: [(0, 3), (3, 5), (5, 6)], 2**16: [(0, 6)]}
    for chunk, runs in expected.items():
        monkeypatch.setattr(SparseProjector, "CHUNK", chunk)
        together = SparseProjector(sizes, dim=8, seed=3)
        assert together._chunks() == runs
        assert torch.equal(together.project(blocks), alone)


def test_adam_direction_formula_and_eps_placement():
    g, m, v = torch.tensor([0.2, -0.1]), torch.tensor([0.05, 0.0]), torch.tensor([1e-4, 0.0])
    (inside,) = adam_direction([g], [m], [v])
    m1 = 0.9 * m + 0.1 * g
    v1 = 0.999 * v + 0.001 * g * g
    assert torch.allclose(inside, m1 / torch.sqrt(v1 + 1e-8))
    (outside,) = adam_direction([g], [m], [v], eps_inside_sqrt=False)
    assert torch.allclose(outside, m1 / (torch.sqrt(v1) + 1e-8))
    assert not torch.allclose(inside, outside, rtol=0, atol=1e-9)


def test_adam_direction_reads_like_torch_adam_would_step():
    """With the moments of a real torch Adam, the feature is the next step's direction (up to
    the bias correction LESS leaves out and the eps placement)."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = torch.optim.Adam([w], lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    for x in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.5, 2.0])):
        opt.zero_grad()
        (w * x).sum().pow(2).backward()
        opt.step()
    state = opt.state[w]
    opt.zero_grad()
    (w * torch.tensor([0.3, -1.0, 1.0])).sum().pow(2).backward()
    g = w.grad.clone()
    (feat,) = adam_direction([g], [state["exp_avg"]], [state["exp_avg_sq"]],
                             eps_inside_sqrt=False)
    before = w.detach().clone()
    opt.step()
    step = (before - w.detach())        # lr · m̂ / (sqrt(v̂) + eps), bias-corrected
    t = state["step"].item()
    expected = feat * (1 - 0.999 ** t) ** 0.5 / (1 - 0.9 ** t) * 0.1
    assert torch.allclose(step, expected, rtol=1e-4, atol=1e-6)


def tiny_lm(seed):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("smoothing, flips", [(0.0, False), (0.9, True)])
def test_dpo_direction_needs_no_reference_model_unless_label_smoothing(smoothing, flips):
    policy, reference = tiny_lm(0), tiny_lm(1)
    params = [p for _, p in trainable_params(policy)]
    prompt = [1, 5, 7, 9]
    chosen, rejected = [11, 12, 13], [21, 22]
    ids_w, ids_l = prompt + chosen, prompt + rejected
    lab_w = [IGNORE_INDEX] * 4 + chosen
    lab_l = [IGNORE_INDEX] * 4 + rejected
    beta = 0.1

    def margin(model):
        return answer_logprob(model, ids_w, lab_w, "cpu") - answer_logprob(model, ids_l, lab_l, "cpu")

    with torch.no_grad():
        ref_margin = float(margin(reference))
    z = margin(policy)
    # The DPO loss with the reference model, and its full gradient.
    u = beta * (z - ref_margin)
    loss = -(1 - smoothing) * torch.nn.functional.logsigmoid(u) \
        - smoothing * torch.nn.functional.logsigmoid(-u)
    full = torch.cat([g.flatten() for g in example_grad(loss, params)])
    # ROSE's reference-free direction: normalize(∇ log π(y_l) − ∇ log π(y_w)) = normalize(−∇z).
    grad_z = torch.cat([g.flatten() for g in example_grad(margin(policy), params)])
    free = normalize_rows(-grad_z[None])[0]
    c = dpo_coefficient(float(z.detach()), ref_margin, beta, smoothing)
    assert torch.allclose(full, c * grad_z, rtol=1e-4, atol=1e-7)        # the scalar is exact
    same = torch.allclose(normalize_rows(full[None])[0], free, atol=1e-5)
    assert same != flips
    if not flips:
        assert c < 0                  # any reference model: only the length changes


def test_influence_of_a_row_does_not_depend_on_the_rows_scored_with_it():
    """Ranks score their own rows: any split of the rows gives the one-process values bit for
    bit (a plain float32 matmul does not: BLAS sums by shape)."""
    g = torch.Generator().manual_seed(0)
    train, val = torch.randn(301, 1024, generator=g), torch.randn(12, 1024, generator=g)
    subtasks = ["a", "b", "c"] * 4
    whole, _ = influence(train, val, subtasks)
    parts = [influence(train[i:i + k], val, subtasks)[0]
             for i, k in [(0, 1), (1, 7), (8, 100), (108, 193)]]
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(torch.cat([influence(train[i:i + 1], val, subtasks)[0]
                                  for i in range(len(train))]), whole)


def test_influence_means_per_subtask_then_max():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    val = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    scores, names = influence(train, val, ["math", "math", "qa"], weight=2.0)
    assert names == ["math", "qa"]
    expected = 2.0 * torch.tensor([[0.9, 0.0], [0.3, 1.0], [0.78, 0.8]], dtype=torch.float64)
    assert scores.dtype == torch.float64 and torch.allclose(scores, expected)
    assert torch.allclose(aggregate(scores), torch.tensor([1.8, 2.0, 1.6], dtype=torch.float64))
    assert torch.allclose(aggregate(scores, "mean"), expected.mean(dim=1))
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(scores, "sum")
