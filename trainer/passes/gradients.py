"""Gradient features for influence selection (LESS, ROSE): per-example LoRA gradients, LESS's
Adam direction, ROSE's DPO-pair direction, a seeded sparse random projection, and the influence
score. Xia et al., "LESS", arXiv 2402.04333 (princeton-nlp/LESS); Wu et al., "ROSE", arXiv
2412.00631.

Every function here is model-agnostic: gradients come in as lists of tensors, one per trainable
parameter in :func:`trainable_params` order, and leave as projected (B, d) rows.

Per-row gradients come from one batched forward and backward (:class:`LinearTaps`) when every
trainable parameter is a linear layer's weight or bias (LoRA's A and B), and otherwise from one
backward per row (:func:`example_grad`), as LESS computes them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from evotune.trainer.data import IGNORE_INDEX, Encoded, collate
from evotune.trainer.fit import logits_positions


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


def row_objectives(model: torch.nn.Module, rows: list[Encoded], device,
                   summed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) per-row objectives of one right-padded batch, with grad: each row's mean next-token
    NLL over its answer tokens (:func:`answer_loss`), or with ``summed`` its summed answer
    log-probability (:func:`answer_logprob`); and the batch's (B, T) attention mask. Each value
    depends on its own row alone: the padding comes after a row's tokens and the attention is
    causal and masked.
    """
    b = collate(rows, pad_id=0)
    labels = b["labels"].to(device)
    logits = model(input_ids=b["input_ids"].to(device),
                   attention_mask=b["attention_mask"].to(device),
                   logits_to_keep=logits_positions(labels, device)).logits
    k, t = logits.size(1), labels.size(1)
    target = labels[:, t - k + 1:]
    # over the last dim: torch's CPU log-softmax over a strided middle dim, (B, V, K), was
    # 10x less exact in fp32 (8e-5 per token at 49,152 classes against 6e-6)
    shifted = logits[:, :-1].float()
    nll = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), target.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view_as(target).sum(dim=1)
    counts = (target != IGNORE_INDEX).sum(dim=1)
    if not bool((counts > 0).all()):
        raise ValueError("the example has no answer token to take a gradient of")
    return (-nll if summed else nll / counts), b["attention_mask"]


class LinearTaps:
    """Per-row gradients of linear layers' weights and biases from one batched forward and
    backward, instead of one backward per row.

    For ``y = x Wᵀ + b`` applied to a row's tokens, the gradient of that row's objective is
    ``Σ_t g_t x_tᵀ`` for W and ``Σ_t g_t`` for b, where ``g_t`` is the gradient at the layer's
    output. Forward hooks keep each layer's input x and output y; one ``autograd.grad`` of the
    summed objectives w.r.t. the outputs gives every g (the rows do not interact, so row i's
    part of g is the gradient of row i's objective), and one einsum per layer gives the B
    per-row gradients (as the ghost-clipping and LoGra line of work computes them: Goodfellow
    2015; Choe et al. 2024, arXiv 2405.13954). A layer called several times in one forward sums
    its calls. The parameters' own ``.grad`` is never touched, so ZeRO's partitioned
    parameters and gradient hooks are not involved: x and g are whole on every rank.

    The einsum runs in fp32 from the layer's activations; in bf16 that is more exact than one
    backward per row, whose parameter gradients are rounded to bf16 (so bf16 values differ
    from the per-row path by that rounding).
    """

    def __init__(self, owners: list[tuple[str, torch.nn.Linear, str]]):
        self.owners = owners                       # per parameter: (module name, module, attr)
        self._modules = {id(m): (name, m) for name, m, _ in owners}
        self._calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._hooks: list = []

    @classmethod
    def find(cls, model: torch.nn.Module, named: list[tuple[str, torch.nn.Parameter]]
             ) -> tuple[LinearTaps | None, list[str]]:
        """The taps for the parameters ``named`` (in :func:`trainable_params` order), or None
        and the names of the parameters that are not a ``torch.nn.Linear``'s weight or bias
        (full fine-tuning: embeddings, norms), which need one backward per row."""
        where = {}
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear):
                for attr in ("weight", "bias"):
                    p = getattr(m, attr)
                    if p is not None:
                        where.setdefault(id(p), (name, m, attr))
        missing = [n for n, p in named if id(p) not in where]
        if missing:
            return None, missing
        return cls([where[id(p)] for _, p in named]), []

    def __enter__(self) -> LinearTaps:
        self._calls = {}
        for key, (_, m) in self._modules.items():
            self._hooks.append(m.register_forward_hook(self._keep(key)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _keep(self, key: int):
        def hook(module, inputs, output):
            self._calls.setdefault(key, []).append((inputs[0], output))
        return hook

    def grads(self, total: torch.Tensor, rows: int, mask: torch.Tensor | None = None
              ) -> list[torch.Tensor]:
        """The (rows, *param shape) fp32 per-row gradients of every tapped parameter, from
        ``total`` (the sum of the rows' objectives) after a forward made inside ``with
        taps:``. ``mask`` (rows, T): 1 on real tokens, 0 on padding (zeroed: their gradients
        are zero anyway, this keeps a non-finite activation there out of the sums)."""
        keys = list(self._calls)
        outputs = [y for k in keys for _, y in self._calls[k]]
        found = torch.autograd.grad(total, outputs, allow_unused=True)
        by_key, at = {}, 0
        for k in keys:
            n = len(self._calls[k])
            by_key[k] = list(zip([x.detach() for x, _ in self._calls[k]], found[at:at + n]))
            at += n
        self._calls = {}
        with torch.no_grad():
            return self._per_row(by_key, rows, mask, total.device)

    def _per_row(self, by_key, rows: int, mask, device) -> list[torch.Tensor]:
        out = []
        for name, m, attr in self.owners:
            shape = (rows, m.out_features, m.in_features) if attr == "weight" else \
                (rows, m.out_features)
            g_sum = torch.zeros(shape, dtype=torch.float32, device=device)
            for x, g in by_key.get(id(m), []):
                if g is None:                      # the output does not reach the objective
                    continue
                if x.dim() < 2 or x.shape[0] != rows:
                    raise ValueError(f"gradient pass: layer {name} saw input of shape "
                                     f"{tuple(x.shape)}, not {rows} rows first")
                g = g.float().reshape(rows, -1, m.out_features)
                x = x.float().reshape(rows, -1, m.in_features)
                if mask is not None and g.shape[1] == mask.shape[1]:
                    real = mask.to(g.device).bool().unsqueeze(-1)
                    g, x = torch.where(real, g, 0.0), torch.where(real, x, 0.0)
                if attr == "weight":
                    g_sum += torch.einsum("bto,bti->boi", g, x)
                else:
                    g_sum += g.sum(dim=1)
            out.append(g_sum)
        return out


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
    P × dim matrix. The hashes are int64 indices and fp32 signs (12 bytes per coordinate and
    non-zero: ``index_add_`` with int32 indices ran 30× slower on a CPU) kept on the gradients'
    device while they fit in ``cache_mb`` MiB in all (LoRA: tens of MiB), else drawn again for
    every batch (full fine-tuning of a large model: P · nnz · 12 bytes would not fit);
    ``cache=False`` never keeps them. The projection runs on
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
        self.cache = cache and sum(self.sizes) * nnz * 12 <= cache_mb * 2**20
        self._hashes: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # by run

    def _hash(self, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``block``'s (n, nnz) indices (int64) and signs (fp32), drawn from its seed."""
        gen = torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + block) % 2**63)
        n = self.sizes[block]
        index = torch.randint(0, self.dim, (n, self.nnz), generator=gen)
        sign = torch.randint(0, 2, (n, self.nnz), generator=gen, dtype=torch.int8) * 2 - 1
        return index.to(device), sign.to(device, torch.float32)

    def project(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """(B, dim) fp32 projection of B gradients given as one (B, *shape_i) tensor per block.

        With the hashes cached, consecutive blocks are projected together, up to
        ``CHUNK`` hashed values per row at a time (one ``index_add_`` instead of one per block:
        a LoRA adapter has hundreds of small blocks, and their calls cost more than the sums).
        The values are added in the same order either way, so the result is the same, bitwise.
        """
        if len(blocks) != len(self.sizes):
            raise ValueError(f"expected {len(self.sizes)} gradient blocks, got {len(blocks)}")
        b = blocks[0].shape[0]
        out = torch.zeros(b, self.dim, dtype=torch.float32, device=blocks[0].device)
        flats = []
        for i, g in enumerate(blocks):
            flat = g.reshape(b, -1)
            if flat.shape[1] != self.sizes[i]:
                raise ValueError(f"block {i}: {flat.shape[1]} values, expected {self.sizes[i]}")
            flats.append(flat)
        device = flats[0].device
        for first, last in self._chunks():
            index, sign = self._chunk_hash(first, last, device) if self.cache else \
                self._hash(first, device)
            flat = torch.cat([f.float() for f in flats[first:last]], dim=1)
            contrib = (flat.unsqueeze(-1) * sign).reshape(b, -1)
            out.index_add_(1, index.reshape(-1), contrib)
        return out / math.sqrt(self.nnz)

    CHUNK = 2**16        # hashed values per row projected at once (B x 256 KiB of temporaries;
    #                      on a 2-core CPU 2^16 to 2^18 ran fastest, 2^20 up to 3x slower)

    def _chunks(self) -> list[tuple[int, int]]:
        """Runs of consecutive blocks [first, last) with at most CHUNK hashed values per row
        (a larger block alone); one block each without the cache."""
        if not self.cache:
            return [(i, i + 1) for i in range(len(self.sizes))]
        runs, first, held = [], 0, 0
        for i, n in enumerate(self.sizes):
            if i > first and held + n * self.nnz > self.CHUNK:
                runs.append((first, i))
                first, held = i, 0
            held += n * self.nnz
        runs.append((first, len(self.sizes)))
        return runs

    def _chunk_hash(self, first: int, last: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The hashes of blocks [first, last) concatenated (cached)."""
        if (first, last) not in self._hashes:
            parts = [self._hash(i, device) for i in range(first, last)]
            self._hashes[first, last] = (torch.cat([ix for ix, _ in parts]),
                                         torch.cat([sg for _, sg in parts]))
        return self._hashes[first, last]


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
