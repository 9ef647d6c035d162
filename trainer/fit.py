"""Training one round, and held-out evaluation.

The whole step plan is computed the same way on every rank from the seed: the round's shuffled
order per epoch, cut into global batches of ``train.batch_size`` examples; global batch slot
``j`` (``micro_batch_size`` examples) runs on rank ``j % world`` at micro-step ``j // world``.
So micro-batches, their padding and their dropout masks (seeded per slot) are the same on 1 or
N ranks, and the only difference between world sizes is floating-point summation order.

Loss: token-level cross-entropy over response tokens, normalised by the response-token count of
the whole global batch (not per micro-batch), so every token weighs the same whatever the
batch split. DeepSpeed divides by the accumulation steps and averages over ranks; the loss
handed to it is pre-scaled by both to undo that.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from evotune.trainer.config import TrainConfig
from evotune.trainer.data import (IGNORE_INDEX, ChoiceSet, Encoded, collate, plan_batches,
                                  shard_batches)
from evotune.trainer.state import crash_point, derive_seed


def lr_at(step: int, total: int, t: TrainConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of a round with ``total`` steps."""
    warmup = int(t.warmup_ratio * total)
    if step < warmup:
        return t.lr * (step + 1) / warmup
    if t.lr_scheduler == "constant" or total <= warmup:
        return t.lr
    progress = (step - warmup) / max(1, total - warmup)
    if t.lr_scheduler == "linear":
        return t.lr * (1.0 - progress)
    return t.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def plan_steps(positions: list[int], epochs: int, batch_size: int, seed: int, round_idx: int
               ) -> list[list[int]]:
    """Global batches for the round: one seeded shuffle per epoch, cut into ``batch_size``."""
    steps = []
    for epoch in range(epochs):
        rng = np.random.default_rng(derive_seed(seed, "order", round_idx, epoch))
        order = [positions[i] for i in rng.permutation(len(positions))]
        steps += [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    return steps


def response_tokens(e: Encoded) -> int:
    """Tokens that are prediction targets after the causal shift."""
    return sum(1 for t in e.labels[1:] if t != IGNORE_INDEX)


def logits_window(labels: torch.Tensor) -> int:
    """How many trailing positions need logits: from the one before the batch's first target.

    Passed to the model as ``logits_to_keep``, so the LM head and the softmax skip the prompt
    positions before any response starts (most of a long-prompt, short-answer example).
    """
    is_target = labels != IGNORE_INDEX
    first = torch.where(is_target.any(dim=1), is_target.int().argmax(dim=1), labels.size(1))
    return labels.size(1) - max(int(first.min()) - 1, 0)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over response tokens, in fp32.

    ``logits`` (B, K, V) may cover only the last K of the T positions of ``labels`` (B, T).
    """
    k, t = logits.size(1), labels.size(1)
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, t - k + 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                           shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


@dataclass
class TrainStats:
    steps: int
    loss: float              # token-weighted mean over the round's last epoch
    first_epoch_loss: float
    tokens: int              # tokens forwarded in training (real tokens, all ranks)
    seconds: float


def train_round(engine, strategy, encoded: list[Encoded], positions: list[int], round_idx: int,
                global_step: int, pad_id: int, logger, seed: int) -> tuple[int, TrainStats]:
    """Train ``train.epochs`` passes over ``positions``; return the new global step and stats."""
    t = strategy.cfg.train
    world, gas, micro = strategy.world_size, strategy.grad_accum_steps(), t.micro_batch_size
    steps = plan_steps(positions, t.epochs, t.batch_size, seed, round_idx)
    steps_per_epoch = len(steps) // t.epochs
    engine.train()
    start = time.perf_counter()
    epoch_sums = [[0.0, 0.0] for _ in range(t.epochs)]
    tokens = 0
    with logger.progress(f"round {round_idx}: train", len(steps)) as advance:
        for step_idx, batch in enumerate(steps):
            lr = lr_at(step_idx, len(steps), t)
            strategy.set_lr(engine, lr)
            # Sorted by length, micro-batches hold similar lengths: less padding. Any fixed
            # order works; this one depends only on the data, not on the number of ranks.
            batch = sorted(batch, key=lambda i: (len(encoded[i].input_ids), i))
            n_tokens = sum(response_tokens(encoded[i]) for i in batch)
            loss_sum = 0.0
            for g in range(gas):
                slot = g * world + strategy.rank
                mine = batch[slot * micro: (slot + 1) * micro]
                # An empty slot (last, short batch) still runs forward/backward with weight 0,
                # so every rank makes the same collective calls.
                weight = 1.0 if mine else 0.0
                items = [encoded[i] for i in (mine or batch[:1])]
                b = collate(items, pad_id)
                torch.manual_seed(derive_seed(seed, "dropout", round_idx, step_idx, slot))
                out = engine(input_ids=b["input_ids"].to(strategy.device),
                             attention_mask=b["attention_mask"].to(strategy.device),
                             logits_to_keep=logits_window(b["labels"]))
                ce = token_loss_sum(out.logits, b["labels"].to(strategy.device))
                engine.backward(ce * weight * (world * gas) / max(n_tokens, 1))
                if g == gas - 1:
                    grad_norm = strategy.grad_norm_before_step(engine)
                engine.step()
                loss_sum += float(ce.detach()) * weight
                tokens += int(b["attention_mask"].sum()) if mine else 0
            global_step += 1
            crash_point("train", round_idx)   # after the round's first optimizer step
            ce_total = strategy.all_reduce_sum([loss_sum])[0]
            step_loss = ce_total / max(n_tokens, 1)
            epoch = step_idx // steps_per_epoch
            epoch_sums[epoch][0] += ce_total
            epoch_sums[epoch][1] += n_tokens
            advance(1, info=f"loss {step_loss:.4f}")
            if global_step % t.log_every == 0 or step_idx == len(steps) - 1:
                if grad_norm is None:
                    grad_norm = engine.get_global_grad_norm()
                logger.metrics(global_step, {
                    "round": round_idx, "train/loss": step_loss, "train/lr": lr,
                    "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "train/response_tokens": n_tokens, "train/epoch": epoch})
    tokens = int(strategy.all_reduce_sum([tokens])[0])
    mean = [s / max(n, 1) for s, n in epoch_sums]
    return global_step, TrainStats(len(steps), mean[-1], mean[0], tokens,
                                   time.perf_counter() - start)


@torch.no_grad()
def evaluate(model, strategy, encoded: list[Encoded], pad_id: int, batch_size: int,
             advance=lambda n=1, **_: None) -> tuple[float, int]:
    """Per-token held-out loss on response tokens; returns (loss, response tokens)."""
    was_training = model.training
    model.eval()
    batches = plan_batches([len(e.input_ids) for e in encoded], batch_size)
    ce_sum = n = 0.0
    for positions, is_padding in shard_batches(batches, strategy.rank, strategy.world_size):
        b = collate([encoded[i] for i in positions], pad_id)
        logits = model(input_ids=b["input_ids"].to(strategy.device),
                       attention_mask=b["attention_mask"].to(strategy.device),
                       logits_to_keep=logits_window(b["labels"])).logits
        if is_padding:
            continue
        ce_sum += float(token_loss_sum(logits, b["labels"].to(strategy.device)))
        n += sum(response_tokens(encoded[i]) for i in positions)
        advance(len(positions) * strategy.world_size)
    model.train(was_training)
    ce_sum, n = strategy.all_reduce_sum([ce_sum, n])
    return ce_sum / max(n, 1), int(n)


@torch.no_grad()
def evaluate_choices(model, strategy, choices: ChoiceSet, pad_id: int, batch_size: int,
                     advance=lambda n=1, **_: None) -> float:
    """Multiple-choice accuracy: a row counts as right when its gold choice has the highest
    summed log-likelihood of the response tokens (ties go to the first choice listed).

    Every choice of every row is one sequence; sequences are batched by length across rows and
    dealt to ranks like ``evaluate``, so 1 or N ranks give the same numbers."""
    was_training = model.training
    model.eval()
    nll = [0.0] * len(choices.encoded)
    batches = plan_batches([len(e.input_ids) for e in choices.encoded], batch_size)
    for positions, is_padding in shard_batches(batches, strategy.rank, strategy.world_size):
        b = collate([choices.encoded[i] for i in positions], pad_id)
        logits = model(input_ids=b["input_ids"].to(strategy.device),
                       attention_mask=b["attention_mask"].to(strategy.device),
                       logits_to_keep=logits_window(b["labels"])).logits
        if is_padding:
            continue
        labels = b["labels"].to(strategy.device)
        k, t = logits.size(1), labels.size(1)
        targets = labels[:, t - k + 1:]
        per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                    ignore_index=IGNORE_INDEX, reduction="none")
        for row, value in zip(positions, per_token.sum(dim=1).tolist()):
            nll[row] = value
        advance(len(positions) * strategy.world_size)
    model.train(was_training)
    nll = strategy.all_reduce_sum(nll)
    right = sum(int(np.argmin(nll[s: s + n])) == g
                for s, n, g in zip(choices.starts, choices.counts, choices.gold))
    return right / max(len(choices), 1)
