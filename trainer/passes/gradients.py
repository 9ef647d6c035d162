"""Gradient features for influence selection (LESS, ROSE): per-example LoRA gradients, LESS's
Adam direction, ROSE's DPO-pair direction, a seeded sparse random projection, and the influence
score. Xia et al., "LESS", arXiv 2402.04333 (princeton-nlp/LESS); Wu et al., "ROSE", arXiv
2412.00631.

Every function here is model-agnostic: gradients come in as lists of tensors, one per trainable
parameter in :func:`trainable_params` order, and leave as projected (B, d) rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from evotune.trainer.data import IGNORE_INDEX


def trainable_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every trainable parameter, sorted by name: the order every gradient
    list follows (the same on every rank and after a resume)."""
    return sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad),
                  key=lambda x: x[0])


def answer_loss(model: torch.nn.Module, input_ids: list[int], labels: list[int],
                device) -> torch.Tensor:
    """Mean next-token NLL over the labelled (answer) tokens of one example, with grad."""
    ids = torch.tensor([input_ids], device=device)
    lab = torch.tensor([labels], device=device)
    logits = model(input_ids=ids).logits[0, :-1].float()
    target = lab[0, 1:]
    mask = target != IGNORE_INDEX
    if not mask.any():
        raise ValueError("the example has no answer token to take a gradient of")
    return F.cross_entropy(logits[mask], target[mask])


def answer_logprob(model: torch.nn.Module, input_ids: list[int], labels: list[int],
                   device) -> torch.Tensor:
    """Summed log-probability of the labelled (answer) tokens of one example, with grad (DPO's
    ``log π(y | x)``)."""
    return -answer_loss(model, input_ids, labels, device) * sum(
        1 for t in labels[1:] if t != IGNORE_INDEX)


def example_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """d loss / d params, fp32, detached (zeros for a parameter the loss does not reach)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p, dtype=torch.float32) if g is None else g.detach().float()
            for p, g in zip(params, grads)]


def adam_direction(grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
                   exp_avg_sq: list[torch.Tensor], betas=(0.9, 0.999), eps: float = 1e-8,
                   eps_inside_sqrt: bool = True) -> list[torch.Tensor]:
    """LESS's training feature: the Adam update direction the example's gradient would take,
    ``(β1·m + (1−β1)·g) / sqrt(β2·v + (1−β2)·g² + eps)``, with the optimizer's current moments
    m, v and no bias correction.

    ``eps_inside_sqrt=True`` is LESS's placement (``less/data_selection/collect_grad_reps.py``,
    ``obtain_gradients_with_adam``: ``torch.sqrt(updated_avg_sq + eps)``); False puts it outside
    as torch's Adam does (``sqrt(v) + eps``).
    """
    b1, b2 = betas
    out = []
    for g, m, v in zip(grads, exp_avg, exp_avg_sq):
        m1 = b1 * m + (1 - b1) * g
        v1 = b2 * v + (1 - b2) * g * g
        out.append(m1 / torch.sqrt(v1 + eps) if eps_inside_sqrt else m1 / (torch.sqrt(v1) + eps))
    return out


def dpo_coefficient(policy_margin: float, reference_margin: float, beta: float = 0.1,
                    label_smoothing: float = 0.0) -> float:
    """d(DPO loss)/d(policy margin), where margin = log π(y_w) − log π(y_l).

    Loss: ``−(1−ε)·log σ(β·z) − ε·log σ(−β·z)`` with ``z = policy_margin − reference_margin``
    (DPO with conservative label smoothing ε). Without smoothing this is ``−β·σ(−β·z) < 0`` for
    every z, so after row normalisation the feature does not depend on the reference model
    (a positive rescaling only); with ε > 0 its sign can flip, and then the reference model matters.
    """
    z = beta * (policy_margin - reference_margin)
    sig = 1.0 / (1.0 + math.exp(-z))
    return beta * (-(1 - label_smoothing) * (1 - sig) + label_smoothing * sig)


class SparseProjector:
    """A seeded sparse Johnson-Lindenstrauss projection of P-dim gradients to ``dim`` dims.

    Every input coordinate is sent to ``nnz`` output coordinates with random signs, scaled by
    1/sqrt(nnz) (a sparse JL / CountSketch transform, Kane & Nelson 2014): inner products are
    preserved in expectation, with a standard deviation of about |x|·|y|/sqrt(dim). The hash of
    each parameter block comes from a CPU ``torch.Generator`` seeded with (seed, block index),
    so the projection is identical on every rank, device and resume, and it never builds a
    P × dim matrix. The hashes are int32 indices and int8 signs (5 bytes per coordinate and
    non-zero) kept on the gradients' device while they fit in ``cache_mb`` MiB in all
    (LoRA: a few MiB), else drawn again for every batch (full fine-tuning of a large model:
    P · nnz · 5 bytes would not fit); ``cache=False`` never keeps them. The projection runs on
    the device the gradients live on. LESS uses a dense Rademacher projection (trak's CUDA
    projector) instead.
    """

    def __init__(self, sizes: list[int], dim: int = 8192, seed: int = 0, nnz: int = 4,
                 cache: bool = True, cache_mb: float = 1024):
        if dim < 1 or nnz < 1:
            raise ValueError(f"dim and nnz must be >= 1, got {dim}, {nnz}")
        if dim >= 2**31:
            raise ValueError(f"dim must be below 2^31, got {dim}")
        self.sizes, self.dim, self.seed, self.nnz = list(sizes), dim, seed, nnz
        self.cache = cache and sum(self.sizes) * nnz * 5 <= cache_mb * 2**20
        self._hashes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _hash(self, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if block in self._hashes:
            return self._hashes[block]
        gen = torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + block) % 2**63)
        n = self.sizes[block]
        index = torch.randint(0, self.dim, (n, self.nnz), generator=gen).to(torch.int32)
        sign = torch.randint(0, 2, (n, self.nnz), generator=gen, dtype=torch.int8) * 2 - 1
        index, sign = index.to(device), sign.to(device)
        if self.cache:
            self._hashes[block] = (index, sign)
        return index, sign

    def project(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """(B, dim) fp32 projection of B gradients given as one (B, *shape_i) tensor per block."""
        if len(blocks) != len(self.sizes):
            raise ValueError(f"expected {len(self.sizes)} gradient blocks, got {len(blocks)}")
        b = blocks[0].shape[0]
        out = torch.zeros(b, self.dim, dtype=torch.float32, device=blocks[0].device)
        for i, g in enumerate(blocks):
            flat = g.reshape(b, -1).float()
            if flat.shape[1] != self.sizes[i]:
                raise ValueError(f"block {i}: {flat.shape[1]} values, expected {self.sizes[i]}")
            index, sign = self._hash(i, flat.device)
            contrib = (flat.unsqueeze(-1) * sign.to(torch.float32)).reshape(b, -1)
            out.index_add_(1, index.reshape(-1), contrib)
        return out / math.sqrt(self.nnz)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def influence(train: torch.Tensor, val: torch.Tensor, subtasks: list[str],
              weight: float = 1.0) -> tuple[torch.Tensor, list[str]]:
    """LESS's score of each training row for each validation subtask at one checkpoint:
    ``weight · mean over the subtask's validation rows of ⟨train, val⟩``.

    Each row's scores depend on that row alone, not on the other rows computed with it, so a
    rank scoring its own rows gets what one process scoring them all gets: BLAS sums a dot
    product differently by matrix shape, so the products are summed in float64 and rounded to
    float32 (equal unless a float64 sum lies within float64 rounding of a float32 rounding
    boundary), and the means are per-row float64 sums.

    Returns:
        (N, S) float64 scores and the S subtask names (sorted).
    """
    names = sorted(set(subtasks))
    sims = (train.double() @ val.double().T).float().double()      # (N, V)
    cols = [sims[:, [i for i, s in enumerate(subtasks) if s == name]].mean(dim=1)
            for name in names]
    return weight * torch.stack(cols, dim=1), names


AGGREGATIONS = ("max", "mean")


def aggregate(per_subtask: torch.Tensor, how: str = "max") -> torch.Tensor:
    """One score per training row from its (S,) subtask scores: LESS takes the max."""
    if how == "max":
        return per_subtask.max(dim=1).values
    if how == "mean":
        return per_subtask.mean(dim=1)
    raise ValueError(f"unknown aggregation {how!r}; expected one of {', '.join(AGGREGATIONS)}")
