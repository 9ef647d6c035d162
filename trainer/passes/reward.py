"""The reward pass: a quality score for every pool example from a reward model or classifier.

A local Hugging Face sequence-classification model (``scoring.reward.model``: a reward model,
or a quality classifier such as DEITA's scorers or MoDS's reward model) reads each example,
prompt and response, and its output is the ``reward`` score (higher = preferred):

- the text is the example's conversation under the model's own chat template when its tokenizer
  has one, else its turns joined by blank lines; truncated on the right to ``data.max_length``;
- a model with one output gives its logit; one with several, the softmax probability of label
  ``scoring.reward.label`` (default: the last, the "good" class of a binary classifier);
- it is read where the model's own forward reads it (for decoder reward models, the last token
  that is not padding): batches are right-padded with the model's pad token, so a row scores
  the same alone or in a batch.

The model never changes during a run, so the pass runs once (sharded over ranks, gathered on
rank 0) and later rounds reuse the values, as a proxy IFD model's. Batches are planned by the
rows' lengths in the training tokenizer (the token cache knows them), the same on any number
of ranks, and each rank tokenises only its own batches' rows, as it reaches them: no rank
holds an encoding of the whole pool. MoDS uses such a score for
its quality step (``configs/mods_like.yaml``), DEITA for its quality scorer.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from evotune.trainer.data import Encoded, collate, plan_batches, shard_batches
from evotune.trainer.model import resolve_model_path
from evotune.trainer.passes.forward import PassStats
from evotune.trainer.logs import ProgressBars


def reward_text(messages: list[dict], tokenizer) -> str:
    """The text a reward model reads for one example (see the module docstring)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n\n".join(m["content"] for m in messages)


class RewardPass:
    """Loads the reward model once (every rank) and scores the pool on first use."""

    def __init__(self, options, pool, strategy, max_length: int, plan_lengths):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model_path(options.model)
        self.strategy, self.label = strategy, options.label
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, dtype=strategy.dtype).to(strategy.device).eval()
        pad = self.model.config.pad_token_id
        if pad is None:                     # pad with what the model will recognise as padding
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
                else tokenizer.eos_token_id
            if pad is None:
                raise ValueError(f"scoring.reward.model: {path} has no pad or eos token to pad "
                                 f"a batch with")
            self.model.config.pad_token_id = pad
        self.pad_id = pad
        n_labels = self.model.config.num_labels
        if n_labels > 1 and not -n_labels <= self.label < n_labels:
            raise ValueError(f"scoring.reward.label: {self.label} is not a label of {path} "
                             f"({n_labels} labels)")
        self.tokenizer, self.pool, self.max_length = tokenizer, pool, max_length
        self.plan_lengths = plan_lengths
        self.values: np.ndarray | None = None       # rank 0, after the first run
        self.truncated: int | None = None           # rows cut to max_length, after the run
        self._done = False

    def encode(self, positions: list[int]) -> tuple[list[Encoded], int]:
        """The rows at ``positions`` as the reward model reads them (one tokenizer call), and
        how many were cut to ``max_length``."""
        tok = self.tokenizer
        texts = [reward_text(self.pool[i].messages, tok) for i in positions]
        ids = tok(texts, add_special_tokens=not getattr(tok, "chat_template", None)).input_ids
        cut = sum(len(row) > self.max_length for row in ids)
        return [Encoded(row[:self.max_length], row[:self.max_length], False) for row in ids], cut

    @torch.no_grad()
    def run(self, batch_size: int, logger: ProgressBars, r: int | None) -> PassStats | None:
        """The pool's reward values (rank 0: ``self.values``); None when already computed."""
        if self._done:
            return None
        st, start = self.strategy, time.perf_counter()
        rows, real, padded, cut = [], 0, 0, 0
        batches = plan_batches(self.plan_lengths, batch_size)
        label = "" if r is None else f"round {r}: "
        with logger.progress(f"{label}reward model", len(self.pool)) as advance:
            for positions, is_padding in shard_batches(batches, st.rank, st.world_size):
                encoded, n_cut = self.encode(positions)
                batch = collate(encoded, self.pad_id)
                logits = self.model(input_ids=batch["input_ids"].to(st.device),
                                    attention_mask=batch["attention_mask"].to(st.device)
                                    ).logits.float()
                if is_padding:
                    continue
                values = logits[:, 0] if logits.shape[1] == 1 else \
                    torch.softmax(logits, dim=-1)[:, self.label]
                rows.append((positions, values.double().cpu().numpy()))
                cut += n_cut
                real += int(batch["attention_mask"].sum())
                padded += batch["attention_mask"].numel()
                advance(len(positions) * st.world_size)
        real, padded, self.truncated = (int(v) for v in st.all_reduce_sum([real, padded, cut]))
        gathered = st.gather_to_rank0(rows)
        self._done = True
        if st.is_rank0:
            self.values = np.full(len(self.pool), np.nan)
            for part in gathered:
                for positions, values in part:
                    self.values[positions] = values
        return PassStats(time.perf_counter() - start, real, padded)
