"""The feature pass: per-example numbers from the current model, over the whole pool.

One batched, sharded forward pass (no gradients) yields what the round's selector asked for:
the DiverseEvol embedding (the masked mean of the last hidden state, after the final norm, over
every real token of the example, prompt and response) and the response scores of
``selectors/scores.py``. :class:`FeaturePass` adds IFD's extra passes and the derived scores
(``selectors/derived.py``) on top, and the prompt-only pass of Cherry's pre-experienced round.

Batches are planned globally by length (``plan_batches``) and dealt round-robin to ranks, every
rank making the same number of forward calls; rank 0 gathers the results into pool order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from evotune.selectors.base import Features
from evotune.selectors.scores import SCORES, response_scores
from evotune.trainer.data import IGNORE_INDEX, Encoded, collate, plan_batches, shard_batches
from evotune.trainer.fit import logits_window
from evotune.trainer.model import backbone, lm_head


@dataclass
class PassStats:
    seconds: float
    tokens: int          # real (non-padding) tokens forwarded, all ranks
    padded_tokens: int   # tokens forwarded including padding, all ranks

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@torch.no_grad()
def compute_features(model: torch.nn.Module, encoded: list[Encoded], strategy, pad_id: int,
                     batch_size: int, need_embeddings: bool, score_names: tuple[str, ...] = (),
                     advance=lambda n=1, **_: None) -> tuple[Features | None, PassStats]:
    """Run the feature pass over ``encoded`` (the whole pool, in pool order).

    Args:
        model: the current model (the DeepSpeed engine's module; a PeftModel or a plain LM).
        encoded: token ids per pool example.
        strategy: the run's :class:`~evotune.trainer.engine.Strategy` (device, rank, gather).
        pad_id: the tokenizer's pad token id.
        batch_size: examples per forward call per rank.
        need_embeddings: compute the (N, D) float32 embeddings.
        score_names: scores to compute (names from ``selectors.scores.SCORES``).
        advance: progress callback, called with the number of examples done.

    Returns:
        Features on rank 0 (None on other ranks), and the pass statistics.
    """
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    decoder, head = backbone(model), lm_head(model)
    batches = plan_batches([len(e.input_ids) for e in encoded], batch_size)
    rows: list[tuple[list[int], np.ndarray | None, dict[str, np.ndarray]]] = []
    real = padded = 0
    for positions, is_padding in shard_batches(batches, strategy.rank, strategy.world_size):
        batch = collate([encoded[i] for i in positions], pad_id)
        ids = batch["input_ids"].to(strategy.device)
        mask = batch["attention_mask"].to(strategy.device)
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        # The head runs on padding calls too: under ZeRO-3 every module call is a collective.
        logits = head(hidden[:, -logits_window(batch["labels"]):]) if score_names else None
        if is_padding:
            continue
        real += int(mask.sum())
        padded += mask.numel()
        emb, scores = None, {}
        if need_embeddings:
            m = mask.unsqueeze(-1).to(torch.float32)
            emb = ((hidden.to(torch.float32) * m).sum(dim=1) / m.sum(dim=1)).cpu().numpy()
        if score_names:
            computed = response_scores(logits, batch["labels"].to(hidden.device))
            scores = {name: computed[name].numpy() for name in score_names}
        rows.append((positions, emb, scores))
        advance(len(positions) * strategy.world_size)
    model.train(was_training)
    real, padded = (int(v) for v in strategy.all_reduce_sum([real, padded]))
    gathered = strategy.gather_to_rank0(rows)
    stats = PassStats(time.perf_counter() - start, real, padded)
    if not strategy.is_rank0:
        return None, stats
    parts = [row for rank_rows in gathered for row in rank_rows]
    features = Features()
    if need_embeddings and parts:
        dim = next(emb for _, emb, _ in parts).shape[1]
        features.embeddings = np.full((len(encoded), dim), np.nan, dtype=np.float32)
        for positions, emb, _ in parts:
            features.embeddings[positions] = emb
    for name in score_names:
        features.scores[name] = np.full(len(encoded), np.nan, dtype=np.float64)
        for positions, _, scores in parts:
            features.scores[name][positions] = scores[name]
    return features, stats


def _round(r: int | None) -> str:
    return "" if r is None else f"round {r}: "


def _merge(a: PassStats, b: PassStats) -> PassStats:
    return PassStats(a.seconds + b.seconds, a.tokens + b.tokens, a.padded_tokens + b.padded_tokens)


class FeaturePass:
    """Everything a round's selector reads, computed by one object: embeddings, scores from the
    conditioned pass, IFD, and the derived scores (``knn_k``, ``linear``).

    Built once per run from the config and the selector's needs; ``run`` is called each round
    with the current model. The IFD passes depend on ``scoring.template``:

    - ``train`` (default): the conditioned loss is the ``loss`` of the feature pass itself (the
      run's own training encoding: chat template for chat models, with the same truncation and
      response-only masking), so the embedding and the conditioned loss come from one forward
      pass and the direct pass (response header + response tokens, :func:`direct_pass`) is the
      only extra one; both IFD variants share it and differ by formula only.
    - ``reference``: the published templates and token rules (``selectors/ifd.py``), two extra
      passes per variant, Alpaca rows only; for parity with Cherry_LLM and Superfiltering.

    A proxy model (``scoring.model``) scores IFD with its own tokenizer, once (it never changes);
    in ``train`` mode its conditioned pass is then an extra pass over the pool encoded with the
    proxy's tokenizer and template.
    """

    def __init__(self, cfg, selector, pool, pool_enc, tokenizer, template: str, strategy):
        from evotune.selectors.derived import DERIVED, parse_linear
        from evotune.selectors.ifd import VARIANTS

        self.cfg, self.strategy, self.pool_enc = cfg, strategy, pool_enc
        self.pad_id = tokenizer.pad_token_id
        wanted = set(selector.scores)
        known = SCORES + VARIANTS + ("knn_k", "influence")
        self.linear = parse_linear(cfg.selection.linear, known) if "linear" in wanted else {}
        base = wanted | set(self.linear)
        self.derived = {s for s in base if s in DERIVED}
        self.variants = [v for v in VARIANTS if v in base]
        self.needs_embeddings = selector.needs_embeddings or "knn_k" in base
        # Gradient embeddings come from the gradient pass, not from the hidden states.
        self.gradient_embeddings = self.needs_embeddings and \
            cfg.selection.embedding == "gradient"
        self.mode = cfg.scoring.template
        self.proxy = None
        pass_scores = {s for s in base if s in SCORES}
        if self.variants and self.mode == "train" and not cfg.scoring.model:
            pass_scores.add("loss")
        self.pass_scores = tuple(s for s in SCORES if s in pass_scores)
        self.loss_cache: dict[str, tuple] = {}
        if self.variants:
            self._prepare_ifd(pool, tokenizer, template)
        self.influence = None
        if "influence" in base or self.gradient_embeddings:
            self.influence = self._prepare_influence(tokenizer, template)

    @property
    def needed(self) -> bool:
        return bool(self.needs_embeddings or self.pass_scores or self.variants or self.derived
                    or self.influence)

    @property
    def needs_optimizer_state(self) -> bool:
        """True when the pass reads Adam's moments (a resume must restore the optimizer)."""
        return self.influence is not None and self.cfg.influence.adam

    def _prepare_influence(self, tokenizer, template):
        from evotune.selectors.influence import InfluencePass
        from evotune.trainer.model import load_model, resolve_model_path
        from evotune.trainer.validation import load_validation

        icfg = self.cfg.influence
        if not icfg.validation:          # gradient embeddings only (TAGCOS): no influence score
            return InfluencePass(self.cfg, self.pool_enc, [], self.strategy)
        val, skipped = load_validation(icfg.validation, tokenizer, template,
                                       self.cfg.data.max_length, self.cfg.data.on_error)
        if skipped:
            from evotune.trainer.logs import log
            log.warning(f"influence.validation: {len(skipped)} rows skipped (first: "
                        f"{skipped[0][1]})")
        reference = None
        if icfg.reference_model:
            if any(it.kind != "preference" for it in val):
                raise ValueError("influence.reference_model applies to preference validation "
                                 "sets only")
            reference = load_model(resolve_model_path(icfg.reference_model), self.strategy.dtype)
        elif icfg.label_smoothing > 0:
            raise ValueError("influence.label_smoothing > 0 needs influence.reference_model: "
                             "with smoothing the reference model decides the direction's sign")
        return InfluencePass(self.cfg, self.pool_enc, val, self.strategy, reference)

    def _prepare_ifd(self, pool, tokenizer, template) -> None:
        from evotune.selectors.ifd import direct_pass, ifd_inputs, response_header
        from evotune.trainer.data import encode, resolve_template
        from evotune.trainer.model import load_model, load_tokenizer, resolve_model_path

        cfg, tok, enc = self.cfg, tokenizer, self.pool_enc
        if cfg.scoring.model:
            path = resolve_model_path(cfg.scoring.model)
            tok = load_tokenizer(path)     # a proxy keeps its own tokenizer
            self.proxy = load_model(path, self.strategy.dtype).to(self.strategy.device).eval()
            self.ifd_pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
            if self.mode == "train":
                template = resolve_template(cfg.data.template, tok)
                enc = []
                for ex in pool:
                    try:
                        enc.append(encode(ex, tok, template, cfg.data.max_length))
                    except ValueError as e:       # no response token fits with this tokenizer
                        enc.append(f"proxy tokenizer: {e}")
        else:
            self.ifd_pad_id = self.pad_id
        if self.mode == "reference":
            self.inputs = {v: [ifd_inputs(ex.alpaca, tok, v, cfg.scoring.max_length)
                               if ex.alpaca else "chat row: the reference IFD templates need "
                               "instruction/input/output (scoring.template=train scores it)"
                               for ex in pool] for v in self.variants}
            return
        header, bos = response_header(tok, template), tok.bos_token_id
        pairs = [e if isinstance(e, str) else (e, direct_pass(e, header, bos)) for e in enc]
        self.inputs = {v: pairs for v in self.variants}

    def run(self, model, logger, r: int | None, engine=None, candidates=None, labeled=None,
            shard_dir=None, weight: float = 1.0, history=()
            ) -> tuple[Features | None, dict[str, PassStats]]:
        """Compute the features with ``model`` (the current model; every rank calls this).
        ``r`` (the round, or None outside a run) only labels the progress bars. Influence
        selection and gradient embeddings also need the DeepSpeed ``engine`` (its optimizer's
        moments), the round's ``candidates`` and the ``labeled`` (selected) positions.

        Returns:
            Features on rank 0 (None elsewhere), and the statistics of each pass that ran:
            ``features`` (embeddings + conditioned scores) and ``ifd`` (IFD's extra passes).
        """
        from evotune.selectors.derived import add_derived

        stats: dict[str, PassStats] = {}
        features = Features() if self.strategy.is_rank0 else None
        hidden = self.needs_embeddings and not self.gradient_embeddings
        if hidden or self.pass_scores:
            with logger.progress(f"{_round(r)}embed pool", len(self.pool_enc)) as advance:
                features, stats["features"] = compute_features(
                    model, self.pool_enc, self.strategy, self.pad_id, self.cfg.selection.batch_size,
                    hidden, self.pass_scores, advance)
        losses = dict(self.loss_cache)         # a proxy's losses, computed in an earlier round
        for v in self.variants:
            key = v if self.mode == "reference" else "shared"
            if key not in losses:
                losses[key], s = self._losses(key, model, features, logger, r)
                stats["ifd"] = _merge(stats["ifd"], s) if "ifd" in stats else s
                if self.proxy is not None:
                    self.loss_cache[key] = losses[key]
            if features is not None:
                features.scores[v], features.skipped[v] = self._values(v, self.inputs[v],
                                                                       *losses[key])
        if self.influence is not None:
            if engine is None or candidates is None:
                raise ValueError("influence selection runs inside a training run only")
            found, stats["influence"] = self.influence.run(
                engine, candidates, r, logger, labeled if labeled is not None else [],
                self.gradient_embeddings, shard_dir, weight, history)
            if features is not None:
                features.scores.update(found.scores)
                features.skipped.update(found.skipped)
                features.extra.update(found.extra)
                if self.gradient_embeddings:
                    features.embeddings = found.embeddings
        if features is not None:
            add_derived(features, self.derived, self.linear, self.cfg.selection.knn_k,
                        self.cfg.selection.chunk_size)
        return features, stats

    def run_instructions(self, model, logger) -> tuple[Features | None, dict[str, PassStats]]:
        """Features of the prompts alone, for Cherry's pre-experienced round 0: the mean last
        hidden state over the prompt tokens (everything before the first response token) and
        the prompt's perplexity (every token after the first), as Cherry's
        ``get_perplexity_and_embedding_whole_text``.

        Returns:
            Features with ``embeddings`` and the ``instruction_perplexity`` score on rank 0.
        """
        prompts = []
        for e in self.pool_enc:
            first = next(i for i, t in enumerate(e.labels) if t != IGNORE_INDEX)
            ids = e.input_ids[:max(first, 2)]            # >= 2 tokens: one is predicted
            prompts.append(Encoded(ids, list(ids), e.truncated))
        with logger.progress("round 0: embed instructions", len(prompts)) as advance:
            features, stats = compute_features(model, prompts, self.strategy, self.pad_id,
                                               self.cfg.selection.batch_size, True,
                                               ("perplexity",), advance)
        if features is not None:
            features.scores = {"instruction_perplexity": features.scores["perplexity"]}
        return features, {"features": stats}

    def _losses(self, key, model, features, logger, r):
        """Mean answer losses (conditioned, direct) of the scored rows of ``inputs[key]``, on
        rank 0 (None elsewhere), and the statistics of the passes run for them."""
        inputs = self.inputs[self.variants[0] if key == "shared" else key]
        scored = [i for i, x in enumerate(inputs) if not isinstance(x, str)]
        model = self.proxy or model
        need_cond = self.mode == "reference" or self.proxy is not None
        bs, pad = self.cfg.selection.batch_size, self.ifd_pad_id
        label = key if key != "shared" else "IFD direct pass"
        with logger.progress(f"{_round(r)}{label}", len(scored) * (1 + need_cond)) as advance:
            cond = None
            if need_cond:
                cond, s1 = compute_features(model, [inputs[i][0] for i in scored], self.strategy,
                                            pad, bs, False, ("loss",), advance)
            direct, stats = compute_features(model, [inputs[i][1] for i in scored],
                                             self.strategy, pad, bs, False, ("loss",), advance)
        if need_cond:
            stats = _merge(s1, stats)
        if not self.strategy.is_rank0:
            return None, stats
        cond_loss = cond.scores["loss"] if need_cond else features.scores["loss"][scored]
        return (cond_loss, direct.scores["loss"]), stats

    @staticmethod
    def _values(variant, inputs, cond_loss, direct_loss):
        """(N,) IFD values, NaN where skipped, and ``{position: reason}``."""
        from evotune.selectors.ifd import ifd_value

        values = np.full(len(inputs), np.nan)
        skipped = {i: x for i, x in enumerate(inputs) if isinstance(x, str)}
        scored = [i for i, x in enumerate(inputs) if not isinstance(x, str)]
        for k, i in enumerate(scored):
            try:
                values[i] = ifd_value(float(cond_loss[k]), float(direct_loss[k]), variant)
            except ValueError as e:
                skipped[i] = str(e)
        return values, skipped
