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

Held-out evaluation plans its batches from the rows alone (never the number of ranks), deals
them round-robin to ranks and pads a rank short of batches with dummy ones, so every rank makes
the same forward calls (ZeRO-3's parameter gathers are collectives) and every row gets the same
numbers on 1 or N ranks. Multiple-choice rows are batched too, each row's prompt forwarded once
and cached for its choices (:func:`choice_nll`).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from evotune.trainer.config import TrainConfig
from evotune.trainer.data import (IGNORE_INDEX, ChoiceSet, Encoded, collate, plan_batches,
                                  shard_batches)
from evotune.trainer.logs import RunLogger
from evotune.trainer.seeding import derive_seed
from evotune.trainer.state import crash_point


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


def logits_positions(labels: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """The last :func:`logits_window` positions of ``labels`` (B, T), as the index tensor to
    pass as ``logits_to_keep``.

    transformers slices the hidden states with an index tensor by gathering, which copies the
    window into one block, and with an int in place (a strided view when B > 1). On a CPU in
    bf16 the LM head on that view ran 2.5-10x slower than on the copy (oneDNN takes a slow path
    for strided bf16 inputs): a quarter of a training step. The logits are the same, bitwise.
    """
    t = labels.size(1)
    return torch.arange(t - logits_window(labels), t, device=device)


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


def train_round(engine, strategy, t: TrainConfig, encoded: list[Encoded], positions: list[int],
                round_idx: int, global_step: int, pad_id: int, logger: RunLogger, seed: int
                ) -> tuple[int, TrainStats]:
    """Train ``t.epochs`` passes over ``positions`` (pool positions into ``encoded``) with the
    settings ``t``; return the new global step and the round's statistics."""
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
                             logits_to_keep=logits_positions(b["labels"], strategy.device))
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
def row_losses(model, strategy, encoded: list[Encoded], pad_id: int, batch_size: int,
               advance=lambda n=1, **_: None) -> list[float]:
    """Summed response-token cross-entropy of every row (nats), on every rank."""
    was_training = model.training
    model.eval()
    batches = plan_batches([len(e.input_ids) for e in encoded], batch_size)
    ce = [0.0] * len(encoded)
    for positions, is_padding in shard_batches(batches, strategy.rank, strategy.world_size):
        b = collate([encoded[i] for i in positions], pad_id)
        logits = model(input_ids=b["input_ids"].to(strategy.device),
                       attention_mask=b["attention_mask"].to(strategy.device),
                       logits_to_keep=logits_positions(b["labels"], strategy.device)).logits
        if is_padding:
            continue
        labels = b["labels"].to(strategy.device)
        k, t = logits.size(1), labels.size(1)
        per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, t - k + 1:],
                                    ignore_index=IGNORE_INDEX, reduction="none")
        for i, value in zip(positions, per_token.sum(dim=1).tolist()):
            ce[i] = value
        advance(len(positions) * strategy.world_size)
    model.train(was_training)
    return strategy.all_reduce_sum(ce)


@dataclass
class EvalResult:
    """Held-out loss (nats per response token) and response tokens over every eval row;
    multiple-choice accuracy over the choice rows (None without any); and the same per group
    of rows (e.g. the source family: ``gsm8k``, ``t0``), group → ``{"loss", "tokens",
    "accuracy", "choice_rows"}``."""
    loss: float
    tokens: int
    accuracy: float | None
    groups: dict[str, dict] = field(default_factory=dict)


def _prompt_length(encoded: list[Encoded]) -> int:
    """Tokens before the first response label that every choice encoding shares (0: none)."""
    first = min(next(i for i, t in enumerate(e.labels) if t != IGNORE_INDEX) for e in encoded)
    head = encoded[0].input_ids[:first]
    return first if all(e.input_ids[:first] == head for e in encoded) else 0


@functools.cache
def _cache_name() -> str:
    """The name of a model's key/value cache, argument and output: ``cache`` since transformers
    renamed it (passing the old ``past_key_values`` then warns on every call), before that
    ``past_key_values``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ \
        else "past_key_values"


@torch.no_grad()
def choice_nll(model, strategy, choices: ChoiceSet, batch_size: int,
               advance=lambda n=1, **_: None) -> list[float]:
    """Summed response-token NLL (nats) of every choice sequence, a list in ``choices.encoded``
    order, on every rank.

    ``batch_size`` rows per pair of forward calls. The first call forwards the rows' shared
    prompts (right-padded, one cache row each, the last prompt token left out); the cache is
    then indexed so each choice gets its own row's entries, and the second call forwards every
    choice's tail (the last prompt token, then its response) against them, with its own
    ``position_ids`` and a 2-D mask over the cache and tail columns that hides another row's
    padding. Choices are short and prompts are not: on the bundled eval set this forwards about
    a third of the tokens of one sequence per choice. A row whose choices do not share a
    tokenised prompt (:func:`_prompt_length` 0) caches nothing and forwards whole sequences as
    tails. Memory: the second call holds one copy of its row's prompt cache per choice,
    (choices in the batch) × (longest prompt in it) positions per layer.

    Batches are planned from the prompt lengths alone (:func:`plan_batches`), so every row is
    computed with the same padding on 1 or N ranks; they are dealt round-robin to ranks and
    padded with dummy batches, so every rank makes ``2 * ceil(batches / world)`` forward calls
    whatever rows it holds (ZeRO-3's parameter gathers are collectives)."""
    from transformers import DynamicCache
    device, cache_arg = strategy.device, _cache_name()
    # Cached tokens of each row: its shared prompt but the last token, which goes with every
    # choice's tail so that the tail's logits predict each response token, the first included.
    heads = [max(_prompt_length(choices.encoded[s: s + n]) - 1, 0)
             for s, n in zip(choices.starts, choices.counts)]
    nll = [0.0] * len(choices.encoded)
    batches = plan_batches(heads, batch_size)
    for rows, is_padding in shard_batches(batches, strategy.rank, strategy.world_size):
        # At least one column, so a batch that caches nothing still makes its first call.
        width = max(1, max(heads[r] for r in rows))
        prompts = torch.zeros((len(rows), width), dtype=torch.long)
        at, owner, seqs = [], [], []   # per choice: where in ``nll``, its row in the batch,
        for b, r in enumerate(rows):   # (cached tokens, encoding)
            s, n = choices.starts[r], choices.counts[r]
            prompts[b, :heads[r]] = torch.tensor(choices.encoded[s].input_ids[:heads[r]])
            at += range(s, s + n)
            owner += [b] * n
            seqs += [(heads[r], e) for e in choices.encoded[s: s + n]]
        tail_width = max(len(e.input_ids) - h for h, e in seqs)
        tails = torch.zeros((len(seqs), tail_width), dtype=torch.long)
        labels = torch.full((len(seqs), tail_width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(seqs), width + tail_width), dtype=torch.long)
        for c, (h, e) in enumerate(seqs):
            k = len(e.input_ids) - h
            tails[c, :k] = torch.tensor(e.input_ids[h:])
            labels[c, :k] = torch.tensor(e.labels[h:])
            mask[c, :h] = 1
            mask[c, width: width + k] = 1
        positions = torch.tensor([h for h, _ in seqs])[:, None] + torch.arange(tail_width)
        # No mask here: right padding comes after a row's prompt, so causality alone keeps it
        # out of the prompt's keys and values, and the second call's mask hides it. (A padding
        # mask would leave a row that caches nothing with no key to attend to, which some
        # attention kernels turn into NaN keys and values.)
        head = model(input_ids=prompts.to(device), logits_to_keep=1,
                     **{cache_arg: DynamicCache()}, use_cache=True)
        cache = getattr(head, cache_arg)
        cache.batch_select_indices(torch.tensor(owner, device=device))
        window = logits_window(labels)
        logits = model(input_ids=tails.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device),
                       logits_to_keep=logits_positions(labels, device),
                       **{cache_arg: cache}, use_cache=True).logits
        if is_padding:
            continue
        per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2),
                                    labels[:, tail_width - window + 1:].to(device),
                                    ignore_index=IGNORE_INDEX, reduction="none")
        for i, value in zip(at, per_token.sum(dim=1).tolist()):
            nll[i] = value
        advance(len(rows) * strategy.world_size)      # rows
    return strategy.all_reduce_sum(nll)


def evaluate_with_choices(model, strategy, encoded: list[Encoded], choices: ChoiceSet | None,
                          pad_id: int, batch_size: int, advance=lambda n=1, **_: None,
                          groups: list[str] | None = None) -> EvalResult:
    """Held-out loss over every eval row, and multiple-choice accuracy over ``choices``.

    A row counts as right when its gold choice has the highest summed log-likelihood of the
    response tokens (ties: the first choice listed). The gold choice is encoded exactly as its
    row, so a choice row's loss comes from its gold choice and only the rows without choices
    get a forward of their own. ``groups`` (one label per row): the same figures per label when
    there are two or more labels."""
    choices = choices if choices else None
    in_choices = set(choices.rows) if choices else set()
    rest = [i for i in range(len(encoded)) if i not in in_choices]
    ce = [0.0] * len(encoded)
    for i, value in zip(rest, row_losses(model, strategy, [encoded[i] for i in rest], pad_id,
                                         batch_size, advance)):
        ce[i] = value
    right: dict[int, bool] = {}
    if choices:
        was_training = model.training
        model.eval()
        nll = choice_nll(model, strategy, choices, batch_size, advance)
        model.train(was_training)
        for row, s, c, g in zip(choices.rows, choices.starts, choices.counts, choices.gold):
            ce[row] = nll[s + g]
            right[row] = int(np.argmin(nll[s: s + c])) == g
    tokens = [response_tokens(e) for e in encoded]

    def figures(rows: list[int]) -> tuple[float, int, float | None, int]:
        n = sum(tokens[i] for i in rows)
        hits = [right[i] for i in rows if i in right]
        return (sum(ce[i] for i in rows) / max(n, 1), int(n),
                sum(hits) / len(hits) if hits else None, len(hits))

    loss, n, accuracy, _ = figures(list(range(len(encoded))))
    by_group = {}
    if groups is not None and len(set(groups)) > 1:
        for label in sorted(set(groups)):
            g_loss, g_n, g_acc, g_choices = figures([i for i, x in enumerate(groups)
                                                     if x == label])
            by_group[label] = {"loss": g_loss, "tokens": g_n, "accuracy": g_acc,
                               "choice_rows": g_choices}
    return EvalResult(loss, n, accuracy, by_group)
