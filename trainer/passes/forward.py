"""The forward pass over the pool: embeddings and ``forward`` scores in one batched pass.

The embedding pools the last hidden state (after the final norm) over every real token of the
example, prompt and response, in fp32 (``selection.pooling``, :func:`pool`): ``mean``, the
masked mean (DiverseEvol's, the default); ``weighted_mean``, token i of n weighted i / Σj j
(RDS+, after SGPT: later tokens, which have seen more of the text, count more); ``last``, the
last real token. The ``forward`` scores of ``trainer/scores.py`` come from the logits of the
same pass, over the response tokens only.

Batches are planned globally by length (``plan_batches``) and dealt round-robin to ranks, every
rank making the same number of forward calls (ZeRO-3 gathers are collectives); rank 0 gathers
the results into pool order, or (``gather=False``, a sharded rule) every rank keeps its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from evotune.selectors.base import Features
from evotune.trainer.data import (IGNORE_INDEX, Encoded, collate, lengths, plan_batches,
                                  shard_batches)
from evotune.trainer.fit import logits_window
from evotune.trainer.model import backbone, lm_head
from evotune.trainer.passes.streamed import RowsPart
from evotune.trainer import scores as score_registry
from evotune.trainer.scores import PROMPT_EMBEDDINGS


POOLINGS = ("mean", "weighted_mean", "last")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """(B, D) fp32 embeddings from (B, T, D) hidden states and a (B, T) right-padded mask.

    Only real tokens count: ``mean`` averages them; ``weighted_mean`` weights token i (1-based)
    of a row's n by i / (n (n + 1) / 2); ``last`` takes the row's last real token. Raises
    ValueError on an unknown ``how``.
    """
    h = hidden.to(torch.float32)
    m = mask.to(torch.float32)
    if how == "mean":
        w = m
    elif how == "weighted_mean":
        w = torch.cumsum(m, dim=1) * m              # 1, 2, ..., n on real tokens, 0 on padding
    elif how == "last":
        w = torch.zeros_like(m)
        w[torch.arange(len(m)), m.sum(dim=1).long() - 1] = 1.0
    else:
        raise ValueError(f"unknown pooling {how!r}; expected one of {', '.join(POOLINGS)}")
    return (h * w.unsqueeze(-1)).sum(dim=1) / w.sum(dim=1, keepdim=True)


@torch.no_grad()
def response_scores(logits: torch.Tensor, labels: torch.Tensor,
                    score_names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The ``forward`` scores of each row of a batch (default: all of them).

    Args:
        logits: (B, K, V) logits of the last K positions (see ``trainer.fit.logits_window``).
        labels: (B, T) token labels, IGNORE_INDEX outside the response.

    Returns:
        name → (B,) float64 tensor on the CPU, NaN for a row without response tokens.
    """
    if score_names is None:
        score_names = score_registry.names("forward")
    k, t = logits.size(1), labels.size(1)
    targets = labels[:, t - k + 1:]
    out = {name: torch.full((logits.size(0),), float("nan"), dtype=torch.float64)
           for name in score_names}
    # One row at a time: a (K, V) fp32 softmax per row instead of (B, K, V) at once.
    for i in range(logits.size(0)):
        mask = targets[i] != IGNORE_INDEX
        if not mask.any():
            continue
        row = score_registry.ResponseTokens(logits[i, :-1][mask].float(), targets[i][mask])
        for name in score_names:
            out[name][i] = score_registry.SCORES[name].compute(row)
    return out


@dataclass
class PassStats:
    """What one pass cost: its wall seconds and the tokens it forwarded (or backpropagated);
    ``cached``: the figures of an earlier run whose results were reused (nothing ran now)."""
    seconds: float
    tokens: int          # real (non-padding) tokens forwarded, all ranks
    padded_tokens: int   # tokens forwarded including padding, all ranks
    cached: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@torch.no_grad()
def compute_features(model: torch.nn.Module, encoded: list[Encoded], strategy, pad_id: int,
                     batch_size: int, need_embeddings: bool, score_names: tuple[str, ...] = (),
                     advance=lambda n=1, **_: None, pooling: str = "mean",
                     gather: bool = True, prompt_embeddings: bool = False
                     ) -> tuple[Features | None, PassStats]:
    """Run the feature pass over ``encoded`` (the whole pool, in pool order).

    Args:
        model: the current model (the DeepSpeed engine's module; a PeftModel or a plain LM).
        encoded: token ids per pool example.
        strategy: the run's :class:`~evotune.trainer.engine.Strategy` (device, rank, gather).
        pad_id: the tokenizer's pad token id.
        batch_size: examples per forward call per rank.
        need_embeddings: compute the (N, D) float32 embeddings, pooled by ``pooling``.
        score_names: ``forward`` scores to compute (names from ``trainer/scores.py``).
        advance: progress callback, called with the number of examples done.
        gather: True: everything to rank 0, in pool order. False: every rank keeps its own rows
            (``Features.positions``, ascending): nothing N-sized crosses ranks.
        prompt_embeddings: also the mean of the last hidden state over each row's prompt
            tokens (every real token that is not a response label: the same forward, causal
            attention keeps the answer out of them), (N, D) float32 in
            ``Features.extra["prompt_embeddings"]`` (``trainer/scores.py``'s ``loss_excess``
            finds neighbours with them).

    Returns:
        Features on rank 0 (None on other ranks; with ``gather=False`` this rank's shard on
        every rank), and the pass statistics.
    """
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    decoder, head = backbone(model), lm_head(model)
    batches = shard_batches(plan_batches(lengths(encoded), batch_size), strategy.rank,
                            strategy.world_size)
    # This rank's results go straight into arrays sized up front: results kept batch by batch
    # (small, long-lived) between each batch's large temporaries fragment the C heap, which
    # then grows with the rows (measured: 5.4 GiB at 1M rows on one rank, 8.5 GiB per rank
    # on two, for 122 MiB of embeddings).
    mine = RankRows(positions=np.array([p for ps, pad in batches if not pad for p in ps],
                                   dtype=np.int64))
    mine.scores = {name: np.full(len(mine.positions), np.nan) for name in score_names}
    if prompt_embeddings:
        mine.prompts = np.full((len(mine.positions), backbone_width(model)), np.nan,
                               dtype=np.float32)
    k = real = padded = 0
    for positions, is_padding in batches:
        batch = collate([encoded[i] for i in positions], pad_id)
        ids = batch["input_ids"].to(strategy.device)
        mask = batch["attention_mask"].to(strategy.device)
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        # The head runs on padding calls too: under ZeRO-3 every module call is a collective.
        # The window is copied into one block first: on a CPU with bf16 weights the head on the
        # strided slice ran 4x slower inside a PeftModel (measured: 1.67 s against 0.39 s for a
        # 16 x 150-position window), half the cost of a pass that also computes the loss.
        logits = head(hidden[:, -logits_window(batch["labels"]):].contiguous()) \
            if score_names else None
        if is_padding:
            continue
        real += int(mask.sum())
        padded += mask.numel()
        done = slice(k, k + len(positions))
        if need_embeddings:
            emb = pool(hidden, mask, pooling).cpu().numpy()
            if mine.embeddings is None:
                mine.embeddings = np.empty((len(mine.positions), emb.shape[1]), dtype=np.float32)
            mine.embeddings[done] = emb
        if prompt_embeddings:
            prompt = mask * (batch["labels"] == IGNORE_INDEX).to(mask.device)
            mine.prompts[done] = pool(hidden, prompt, "mean").cpu().numpy()
        if score_names:
            computed = response_scores(logits, batch["labels"].to(hidden.device), score_names)
            for name in score_names:
                mine.scores[name][done] = computed[name].numpy()
        k += len(positions)
        advance(len(positions) * strategy.world_size)
    model.train(was_training)
    real, padded = (int(v) for v in strategy.all_reduce_sum([real, padded]))
    stats = PassStats(time.perf_counter() - start, real, padded)
    if not gather:
        return _shard(mine, need_embeddings), stats
    gathered = strategy.gather_to_rank0(mine)
    if not strategy.is_rank0:
        return None, stats
    features = Features()
    if prompt_embeddings:
        features.extra[PROMPT_EMBEDDINGS] = np.full((len(encoded), backbone_width(model)),
                                                    np.nan, dtype=np.float32)
    dims = [part.embeddings.shape[1] for part in gathered if part.embeddings is not None]
    if need_embeddings and dims:
        features.embeddings = np.full((len(encoded), dims[0]), np.nan, dtype=np.float32)
    for name in score_names:
        features.scores[name] = np.full(len(encoded), np.nan, dtype=np.float64)
    for part in gathered:
        if features.embeddings is not None and part.embeddings is not None:
            features.embeddings[part.positions] = part.embeddings
        for name in score_names:
            features.scores[name][part.positions] = part.scores[name]
        if prompt_embeddings:
            features.extra[PROMPT_EMBEDDINGS][part.positions] = part.prompts
    return features, stats


@dataclass
class RankRows:
    """One rank's results of the pass, in its batches' order."""
    positions: np.ndarray
    embeddings: np.ndarray | None = None
    scores: dict[str, np.ndarray] | None = None
    prompts: np.ndarray | None = None           # the prompts' embeddings, when asked


def backbone_width(model) -> int:
    """The width of the model's last hidden state (from its config: under ZeRO-3 a weight's
    local shape says nothing)."""
    return int(model.config.hidden_size)


def _shard(mine: "RankRows", need_embeddings: bool) -> Features:
    """This rank's rows of the pass as a shard (positions ascending)."""
    order = np.argsort(mine.positions, kind="stable")
    features = Features(positions=mine.positions[order])
    if need_embeddings:
        features.embeddings = mine.embeddings[order] if mine.embeddings is not None else \
            np.zeros((0, 0), dtype=np.float32)
    for name, values in mine.scores.items():
        features.scores[name] = values[order]
    if mine.prompts is not None:
        features.extra[PROMPT_EMBEDDINGS] = mine.prompts[order]
    return features


def gather_shards(strategy, shard: Features, n: int, embeddings: bool = True
                  ) -> Features | None:
    """The whole pool's features on rank 0 from every rank's shard (NaN where no rank has a
    row), with every rank's skip reasons and rank 0's ``extra`` (a shard keeps whole-pool
    arrays there, on rank 0 only, and per-rank rows to be streamed into ``features.npz``,
    :class:`~evotune.trainer.passes.streamed.RowsPart`, left out here); None on the other
    ranks. ``embeddings=False``: the scores
    and reasons only (O(N) numbers per score, nothing N × D)."""
    part = Features(shard.embeddings if embeddings else None, shard.scores, shard.skipped,
                    positions=shard.positions)
    parts = strategy.gather_to_rank0(part)
    if not strategy.is_rank0:
        return None
    features = Features(extra={k: v for k, v in shard.extra.items()     # rank 0's whole
                               if not isinstance(v, RowsPart)})          # arrays only
    dims = [p.embeddings.shape[1] for p in parts if p.embeddings is not None and len(p.positions)]
    if dims:
        features.embeddings = np.full((n, dims[0]), np.nan, dtype=np.float32)
    for part in parts:
        if dims:
            features.embeddings[part.positions] = part.embeddings
        for name, values in part.scores.items():
            features.scores.setdefault(name, np.full(n, np.nan))[part.positions] = values
        for name, why in part.skipped.items():
            features.skipped.setdefault(name, {}).update(why)
    return features


def merge_stats(a: PassStats, b: PassStats) -> PassStats:
    """Two passes' statistics as one (seconds and tokens added)."""
    return PassStats(a.seconds + b.seconds, a.tokens + b.tokens, a.padded_tokens + b.padded_tokens)
