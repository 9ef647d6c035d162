"""The gradient pass of influence selection (LESS, ROSE) and of gradient embeddings (TAGCOS).

Each round, with the current adapter and the optimizer's live Adam moments:
1. a seeded sample of the candidates (``influence.candidates``: a gradient pass costs about a
   training epoch over what it covers, so the cost per round is bounded);
2. per candidate: the gradient of its mean answer-token loss w.r.t. the trainable (LoRA)
   parameters, turned into LESS's Adam direction (``influence.adam``), projected to
   ``influence.dim`` dims (:class:`~evotune.trainer.passes.gradients.SparseProjector`),
   L2-normalised. ``influence.batch_size`` rows share one forward and one backward, each row's
   gradient rebuilt from the LoRA layers' inputs and output gradients
   (:class:`~evotune.trainer.passes.gradients.LinearTaps`); one backward per row where a
   trainable parameter is not a linear layer's (full fine-tuning);
3. per validation item: the plain gradient (SFT, LESS) or the DPO-pair direction (preference,
   ROSE), projected and normalised the same way;
4. influence = mean cosine over each subtask's validation items, aggregated over subtasks
   (LESS: max); the rule (``selectors/influence.py``) takes the top candidates. With
   ``influence.checkpoints: all`` each subtask's score is first summed over every influence
   round so far, each weighted by the mean learning rate of the training that made that
   round's model (LESS's sum over checkpoints); each round's terms are kept in its
   ``influence_terms.npz`` for the later rounds.

Both passes are sharded over ranks (every rank runs the same number of forward/backward calls).
The validation features (a few rows) reach every rank; with the influence rule (``sharded``),
each rank scores its own candidates and keeps them (the rule ranks them with a distributed
top-k): rank 0 gathers only the scores (S + 1 numbers per candidate); with
``output.save_features`` the projected features go to the round's ``features.npz``
(``grad_train``, ``grad_val``, fp16), ``grad_train`` streamed to rank 0 a block of rows at a
time as the file is written (``streamed.py``). Gradient embeddings (TAGCOS) stay on their
ranks for a sharded rule (k-center, ``cluster_quota`` with ``kmeans: minibatch``; with a
validation set each rank also scores its sampled rows) and are gathered on rank 0 for the
others. Every finished batch is also written to ``OUT/partial/round_XXX/`` until the round
completes, so a resumed round reuses it.

Departures from LESS: the checkpoints are the loop's rounds (LESS sums the four epoch
checkpoints of one warm-up run and selects once; ``checkpoints: current`` scores with the
latest round only); a sparse JL projection instead of trak's dense Rademacher one; gradients in
eval mode (no dropout); the per-round candidate sample; a batch of rows per backward (LESS:
one example per backward), the same gradients up to float rounding (in bf16, summed in fp32
where one backward per row rounds them to bf16). Departures from ROSE: the validation
direction is reference-free unless ``influence.reference_model`` is set (equal after
normalisation without label smoothing, see
:func:`~evotune.trainer.passes.gradients.dpo_coefficient`).
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from evotune.selectors.base import Features
from evotune.selectors.influence import SCORE
from evotune.trainer.data import plan_batches, shard_batches
from evotune.trainer.fit import lr_at
from evotune.trainer.logs import ProgressBars, log
from evotune.trainer.model import load_model, resolve_model_path
from evotune.trainer.passes.forward import PassStats
from evotune.trainer.passes.gradients import (SparseProjector, adam_direction, aggregate,
                                              answer_logprob, answer_loss, dpo_coefficient,
                                              example_grad, influence, LinearTaps,
                                              normalize_rows, row_objectives,
                                              trainable_params)
from evotune.trainer.passes.streamed import RowsPart
from evotune.trainer.files import write_bytes_atomic
from evotune.trainer.seeding import derive_seed, seeded_sample
from evotune.trainer.state import crash_point, partial_dir, round_dir
from evotune.trainer.targets import load_targets

TERMS_FILE = "influence_terms.npz"


class InfluencePass:
    """Computes the ``influence`` score (and one ``influence:<subtask>`` score per subtask), and
    the projected gradients as embeddings (``selection.embedding: gradient``).

    Built once per run: reads the validation set (``influence.validation``; none for gradient
    embeddings alone) and, with ``influence.reference_model``, that model's DPO margins.
    """

    def __init__(self, cfg, pool_enc, tokenizer, template: str, strategy):
        self.cfg, self.icfg = cfg, cfg.influence
        self.pool_enc, self.strategy = pool_enc, strategy
        self.val, self.reference_margins = [], None
        # Rows per backward (LinearTaps) where every trainable parameter is a linear layer's;
        # False: one backward per row everywhere (the tests' reference for the batched path).
        self.batched, self._said_per_row, self._taps = True, False, None
        icfg = self.icfg
        if not icfg.validation:          # gradient embeddings only (TAGCOS): no influence score
            return
        self.val, skipped = load_targets(icfg.validation, tokenizer, template,
                                         cfg.data.max_length, cfg.data.on_error)
        if any(it.kind == "prompt" for it in self.val):
            raise ValueError(f"influence.validation: {icfg.validation} has prompt-only rows; a "
                             f"gradient needs an answer: give SFT rows or preference pairs")
        if skipped:
            log.warning(f"influence.validation: {len(skipped)} rows skipped (first: "
                        f"{skipped[0][1]})")
        if icfg.reference_model:
            if any(it.kind != "preference" for it in self.val):
                raise ValueError("influence.reference_model applies to preference validation "
                                 "sets only")
            reference = load_model(resolve_model_path(icfg.reference_model), strategy.dtype)
            self.reference_margins = self._margins(reference)
        elif icfg.label_smoothing > 0:
            raise ValueError("influence.label_smoothing > 0 needs influence.reference_model: "
                             "with smoothing the reference model decides the direction's sign")

    @torch.no_grad()
    def _margins(self, model) -> list[float]:
        """log π(y_w) − log π(y_l) of every preference item under ``model`` (every rank)."""
        dev = self.strategy.device
        model.to(dev).eval()
        out = []
        for it in self.val:
            w = answer_logprob(model, it.chosen.input_ids, it.chosen.labels, dev)
            lo = answer_logprob(model, it.rejected.input_ids, it.rejected.labels, dev)
            out.append(float(w - lo))
        return out

    def run(self, engine, candidates: np.ndarray, r: int, logger: ProgressBars, labeled=(),
            embeddings: bool = False, run_dir: Path | None = None, sharded: bool = False):
        """Every rank calls this. Returns Features on rank 0 (None elsewhere) with the scores
        (when there is a validation set), skip reasons, the projected features (``extra``) and,
        with ``embeddings``, the projected features of the sample and of the ``labeled``
        positions as (N, dim) ``embeddings`` (NaN rows elsewhere); and the pass statistics
        (tokens forwarded and backpropagated, all ranks).

        ``sharded`` (a sharded rule): every rank returns its shard instead — the scores of its
        own sampled candidates (``Features.positions``), or with ``embeddings`` its rows'
        gradient embeddings (sampled and ``labeled``; scores NaN on the labeled rows); rank
        0's also holds the skip reasons of the rows outside the sample and the ``extra``
        arrays; with ``output.save_features`` and no embeddings, every rank's ``extra`` holds
        its rows of ``grad_train`` (a ``RowsPart``, streamed into ``features.npz``; sharded
        embeddings are saved as themselves).

        ``run_dir``: the run's output dir, where the pass keeps its finished batches until the
        round is complete (``partial/``, see :meth:`_features`), reads the earlier rounds'
        terms (``influence.checkpoints: all``) and writes this round's (``influence_terms.npz``,
        rank 0). Without it (outside a run) the pass keeps nothing and scores with this model
        only."""
        self._round = r
        shard_dir = partial_dir(run_dir, r) if run_dir is not None else None
        st, icfg = self.strategy, self.icfg
        module = engine.module
        t0 = time.perf_counter()
        sample = seeded_sample(candidates, icfg.candidates, self.cfg.seed, "influence-sample", r)
        named = trainable_params(module)
        params = [p for _, p in named]
        if not params:
            raise ValueError("influence selection needs trainable parameters (LoRA or full)")
        self._taps, others = LinearTaps.find(module, named) if self.batched else (None, [])
        if others and not self._said_per_row:
            self._said_per_row = True
            log.info(f"gradient pass: one backward per row ({len(others)} trainable parameters "
                     f"are not linear layers' weights, e.g. {others[0]}); with LoRA only it "
                     f"takes influence.batch_size rows per backward")
        moments = st.optimizer_moments(engine, params) if icfg.adam else None
        sizes = [int(np.prod(st.full_shape(p))) for p in params]
        projector = SparseProjector(sizes, icfg.dim, derive_seed(self.cfg.seed, "projection", 0),
                                    icfg.projection_nnz)
        rows_for = np.union1d(sample, np.asarray(labeled, dtype=np.int64)) if embeddings \
            else sample
        was_training = module.training
        module.eval()
        try:
            with logger.progress(f"round {r}: gradients (train)", len(rows_for)) as advance:
                train_rows = self._features(module, params, projector, list(rows_for), moments,
                                            "train", advance, shard_dir)
            with logger.progress(f"round {r}: gradients (validation)", len(self.val)) as advance:
                val_rows = self._features(module, params, projector, list(range(len(self.val))),
                                          None, "val", advance, shard_dir)
        finally:
            module.train(was_training)
        tokens = sum(len(self.pool_enc[i].input_ids) for i in rows_for) + sum(
            len(it.encoded.input_ids) if it.kind == "sft" else
            len(it.chosen.input_ids) + len(it.rejected.input_ids) for it in self.val)
        stats = PassStats(time.perf_counter() - t0, tokens, tokens)
        n = len(self.pool_enc)
        val_all = st.gather_to_rank0(val_rows)
        val = _assemble(val_all, np.arange(len(self.val))) if st.is_rank0 and self.val else None
        if sharded:
            items, rows = train_rows
            order = np.argsort(items, kind="stable")
            mine, train = items[order], rows[order]
            del train_rows, items, rows
            val = st.broadcast_from_rank0(val)             # V x dim: a few rows, every rank
            shard = Features(embeddings=train if embeddings else None, positions=mine)
            if self.cfg.output.save_features and not embeddings:
                # grad_train (the sample's rows, in pool order) streamed to rank 0 when the
                # round's features.npz is written; sharded embeddings are saved as themselves
                shard.extra["grad_train"] = RowsPart(np.searchsorted(sample, mine), train,
                                                     len(sample))
                if st.is_rank0:
                    shard.extra["grad_positions"] = sample
            if st.is_rank0:
                shard.extra["grad_sample"] = sample
            if not self.val:
                return shard, stats
            scored = np.isin(mine, sample)     # embeddings: the selected rows have no score
            self._score(shard, mine[scored], train[scored], val, candidates, sample, r,
                        run_dir, st)
            if not scored.all():
                for name, values in shard.scores.items():
                    shard.scores[name] = np.full(len(mine), np.nan)
                    shard.scores[name][scored] = values
            return shard, stats
        train_all = st.gather_to_rank0(train_rows)
        if not st.is_rank0:
            return None, stats
        computed = _assemble(train_all, rows_for)
        features = Features()
        features.extra = {"grad_sample": sample, "grad_positions": rows_for,
                          "grad_train": computed.astype(np.float16)}
        if embeddings:
            features.embeddings = np.full((n, computed.shape[1]), np.nan, dtype=np.float32)
            features.embeddings[rows_for] = computed
        if not self.val:
            return features, stats
        self._score(features, sample, computed[np.searchsorted(rows_for, sample)], val,
                    candidates, sample, r, run_dir, _RankZeroAlone())
        for name in list(features.scores):              # the whole pool, NaN outside the sample
            values = np.full(n, np.nan)
            values[sample] = features.scores[name]
            features.scores[name] = values
        return features, stats

    def _score(self, features: Features, mine: np.ndarray, train: np.ndarray, val: np.ndarray,
               candidates: np.ndarray, sample: np.ndarray, r: int, run_dir: Path | None,
               st) -> None:
        """The scores of the pool rows ``mine`` (their projected features ``train``):
        ``influence`` and one ``influence:<subtask>`` per subtask, into ``features``, with the
        reasons of the rows without one (rank 0). Rank 0 writes this round's terms (gathered:
        S numbers per row) and, with ``influence.checkpoints: all``, sends every rank the sums
        over the earlier rounds (S numbers per sampled row).

        ``st``: the ranks that call this together, each with its own rows (the run's strategy),
        or :class:`_RankZeroAlone` (rank 0 with every row)."""
        icfg, n = self.icfg, len(self.pool_enc)
        per_subtask, names = influence(torch.from_numpy(train), torch.from_numpy(val),
                                       [it.subtask for it in self.val])
        per_subtask = per_subtask.numpy()
        parts = st.gather_to_rank0((mine, per_subtask))
        weight, history, earlier = None, [], None
        if st.is_rank0:
            weight, history = self._checkpoints(run_dir, r)
            terms = np.full((n, len(names)), np.nan)
            for positions, values in parts:
                terms[positions] = values
            if run_dir is not None:   # read back by later rounds (influence.checkpoints: all)
                write_bytes_atomic(round_dir(run_dir, r) / TERMS_FILE, lambda tmp: np.savez(
                    tmp, influence_terms=terms, influence_weight=np.array(weight),
                    influence_subtasks=np.array(names)))
            if history:
                earlier = np.zeros((len(sample), len(names)))
                for path in history:         # earlier checkpoints (influence.checkpoints: all)
                    with np.load(path) as old:
                        if list(old["influence_subtasks"]) != names:
                            raise ValueError(f"{path}: its validation subtasks differ from "
                                             f"this round's")
                        earlier = earlier + float(old["influence_weight"]) * \
                            old["influence_terms"][sample]
                if not np.isfinite(earlier).all():
                    raise ValueError("influence.checkpoints=all: a candidate lacks a score at an "
                                     "earlier checkpoint (influence.candidates must be all of "
                                     "them)")
        weight, earlier = st.broadcast_from_rank0((weight, earlier))   # earlier: sample x S
        # One checkpoint: the mean cosines as they are; a sum over checkpoints: LR-weighted.
        summed = weight * per_subtask if icfg.checkpoints == "all" else per_subtask
        if earlier is not None:
            summed = summed + earlier[np.searchsorted(sample, mine)]
        total = aggregate(torch.from_numpy(summed), icfg.aggregation).numpy()
        unsampled = {}
        if st.is_rank0:
            unsampled = {int(i): "not in this round's gradient sample (influence.candidates)"
                         for i in np.setdiff1d(candidates, sample)}
            unsampled.update({int(i): "already selected" for i in
                              np.setdiff1d(np.arange(n), candidates)})
            features.extra.update({"grad_val": val.astype(np.float16),
                                   "grad_val_subtasks": np.array([it.subtask
                                                                  for it in self.val])})
        for name, values in [(SCORE, total)] + [(f"{SCORE}:{t}", summed[:, j])
                                                for j, t in enumerate(names)]:
            features.scores[name] = np.asarray(values, dtype=np.float64)
            features.skipped[name] = dict(unsampled)

    def _checkpoints(self, run_dir: Path | None, r: int) -> tuple[float, list[Path]]:
        """This round's checkpoint weight (the mean learning rate of round r-1's training, from
        its summary; 1 without one) and, with ``influence.checkpoints: all``, the stored terms
        of the earlier influence rounds."""
        if run_dir is None:
            return 1.0, []
        weight = 1.0
        summary = round_dir(run_dir, r - 1) / "summary.json"
        if r > 0 and summary.is_file():
            steps = json.loads(summary.read_text())["train_steps"]
            weight = sum(lr_at(s, steps, self.cfg.train) for s in range(steps)) / max(steps, 1)
        history = []
        if self.icfg.checkpoints == "all":
            history = [round_dir(run_dir, c) / TERMS_FILE for c in range(r)
                       if (round_dir(run_dir, c) / TERMS_FILE).is_file()]
        return weight, history

    def _features(self, module, params, projector, items: list[int], moments, which: str,
                  advance, shard_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
        """This rank's share of ``items`` (int64, in its batches' order) and their normalised
        projected features (float32, one row each). The rows go into an array sized before the
        first batch, as the forward pass's do (results kept batch by batch between each
        batch's large temporaries fragment the C heap: measured there, ``forward.py``).

        The batches are planned from the rows' lengths alone (sorted by length, ``batch_size``
        rows each) and dealt to the ranks round-robin, so a row is computed in the same batch,
        with the same padding and the same numbers, on 1 or N ranks; every rank makes the same
        number of calls (ZeRO-3's gathers are collectives), repeating its first batch if short.

        With ``shard_dir``, every projected batch is written there as a shard (atomically,
        fp32) as soon as it is done, and a rerun of the same pass (a resumed round) reloads the
        shards every rank has finished and computes only the rest: a crash mid-pass loses at
        most one batch per rank, and the resumed values are the uninterrupted ones.
        """
        st, icfg = self.strategy, self.icfg
        plan = [[items[j] for j in batch] for batch in
                plan_batches([self._length(i, which) for i in items], icfg.batch_size)]
        calls = shard_batches(plan, st.rank, st.world_size)
        batches = [batch for batch, _ in calls]
        key = _fingerprint(self.cfg, which, st.world_size, st.rank, batches)
        done = _load_shards(shard_dir, which, st.rank, key, batches) if shard_dir else []
        # Every rank resumes at the same batch (the fewest any rank has finished).
        counts = st.gather_to_rank0(len(done))
        start = st.broadcast_from_rank0(min(counts) if st.is_rank0 else None)
        if start and st.is_rank0:
            log.info(f"gradient pass ({which}): reusing {start} of {len(batches)} finished "
                     f"batches per rank from {shard_dir}")
        mine = [i for batch, padding in calls if not padding for i in batch]
        out = np.empty((len(mine), icfg.dim), dtype=np.float32)
        at = 0

        def keep(k, rows):
            nonlocal at
            if calls[k][1]:                  # a repeated batch: its results are discarded
                return
            out[at:at + len(rows)] = rows
            at += len(rows)
            advance(len(rows) * st.world_size)

        for k in range(start):
            keep(k, done[k])
        del done
        for k in range(start, len(batches)):
            rows = self._rows(module, params, projector, batches[k], moments, which)
            if shard_dir is not None:
                _save_shard(shard_dir, which, st.rank, k, key, rows)
                crash_point(f"grad_{which}", self._round, sync=st.barrier)
            keep(k, rows)
        return np.asarray(mine, dtype=np.int64), out

    def _length(self, item: int, which: str) -> int:
        if which == "train":
            return len(self.pool_enc[item].input_ids)
        it = self.val[item]
        return len(it.encoded.input_ids) if it.kind == "sft" else \
            max(len(it.chosen.input_ids), len(it.rejected.input_ids))

    def _rows(self, module, params, projector, batch: list[int], moments,
              which: str) -> np.ndarray:
        """The (B, dim) normalised projected features of one batch of items."""
        if self._taps is not None:
            blocks = self._batched(module, batch, moments, which)
        else:
            # One backward per row. With several ranks, each makes batch_size of them for every
            # batch (ZeRO-3's gathers are collectives): a short batch repeats its first row.
            calls = batch + [batch[0]] * (self.icfg.batch_size - len(batch)) \
                if self.strategy.world_size > 1 else batch
            per_row = [self._grad(module, params, item, moments, which)
                       for item in calls][:len(batch)]
            blocks = [torch.stack([g[i] for g in per_row]) for i in range(len(params))]
            del per_row
        # projected where the gradients are; only (B, dim) leaves
        return normalize_rows(projector.project(blocks)).cpu().numpy()

    def _batched(self, module, batch: list[int], moments, which: str) -> list[torch.Tensor]:
        """The per-row gradient blocks of ``batch`` from one forward and one backward
        (:class:`~evotune.trainer.passes.gradients.LinearTaps`): the same values as
        :meth:`_grad` row by row, up to float rounding."""
        dev, icfg = self.strategy.device, self.icfg
        items = [self.pool_enc[i] for i in batch] if which == "train" else \
            [self.val[i] for i in batch]
        pairs = which == "val" and items[0].kind == "preference"
        if which == "train":
            rows = items
        elif pairs:
            rows = [e for it in items for e in (it.chosen, it.rejected)]
        else:
            rows = [it.encoded for it in items]
        with self._taps:
            objectives, mask = row_objectives(module, rows, dev, summed=pairs)
        blocks = self._taps.grads(objectives.sum(), len(rows), mask)
        if pairs:          # the margin log π(y_w) − log π(y_l), times DPO's coefficient
            margins = (objectives[0::2] - objectives[1::2]).detach().double().cpu().tolist()
            c = torch.tensor([self._dpo_coef(m, i) for m, i in zip(margins, batch)],
                             dtype=torch.float32, device=blocks[0].device)
            blocks = [c.reshape(-1, *[1] * (g.dim() - 1)) * (g[0::2] - g[1::2])
                      for g in blocks]
        elif which == "train" and moments is not None:
            blocks = adam_direction(blocks, *moments, eps_inside_sqrt=icfg.eps_inside_sqrt)
        return blocks

    def _grad(self, module, params, item: int, moments, which: str) -> list[torch.Tensor]:
        dev, icfg = self.strategy.device, self.icfg
        if which == "train":
            enc = self.pool_enc[item]
            g = example_grad(answer_loss(module, enc.input_ids, enc.labels, dev), params)
            if moments is not None:
                g = adam_direction(g, *moments, eps_inside_sqrt=icfg.eps_inside_sqrt)
            return [t.reshape(-1) for t in g]
        it = self.val[item]
        if it.kind == "sft":
            g = example_grad(answer_loss(module, it.encoded.input_ids, it.encoded.labels, dev),
                             params)
            return [t.reshape(-1) for t in g]
        margin = answer_logprob(module, it.chosen.input_ids, it.chosen.labels, dev) \
            - answer_logprob(module, it.rejected.input_ids, it.rejected.labels, dev)
        coef = self._dpo_coef(float(margin.detach()), item)
        g = example_grad(margin, params)
        return [(coef * t).reshape(-1) for t in g]

    def _dpo_coef(self, margin: float, item: int) -> float:
        """DPO's d(loss)/d(margin) for validation pair ``item``; reference-free: −1 (every DPO
        gradient is a negative multiple of the margin's)."""
        if self.reference_margins is None:
            return -1.0
        return dpo_coefficient(margin, self.reference_margins[item], self.icfg.beta,
                               self.icfg.label_smoothing)


class _RankZeroAlone:
    """The collectives of :meth:`InfluencePass._score` when rank 0 holds every row."""
    is_rank0 = True

    @staticmethod
    def gather_to_rank0(obj):
        return [obj]

    @staticmethod
    def broadcast_from_rank0(obj):
        return obj


def _fingerprint(cfg, which: str, world_size: int, rank: int, batches: list[list[int]]) -> str:
    """What a shard's values depend on besides the model (the round's model is fixed by the
    run's settings and seeds, which ``results_hash`` covers): the rows of each batch."""
    text = json.dumps([cfg.results_hash(), which, world_size, rank,
                       [[int(i) for i in batch] for batch in batches]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _shard_path(shard_dir: Path, which: str, rank: int, k: int) -> Path:
    return shard_dir / f"{which}_rank{rank:03d}_{k:05d}.npz"


def _save_shard(shard_dir: Path, which: str, rank: int, k: int, key: str, rows) -> None:
    write_bytes_atomic(_shard_path(shard_dir, which, rank, k),
                       lambda tmp: np.savez(tmp, key=np.array(key), rows=rows))


def _load_shards(shard_dir: Path, which: str, rank: int, key: str, batches) -> list[np.ndarray]:
    """The finished shards of this rank, in order, up to the first missing or foreign one."""
    done = []
    for k, batch in enumerate(batches):
        path = _shard_path(shard_dir, which, rank, k)
        if not path.is_file():
            break
        try:
            with np.load(path) as f:
                if str(f["key"]) != key or f["rows"].shape[0] != len(batch):
                    break
                done.append(f["rows"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            break                                   # a torn file: recompute from here
    return done


def _assemble(gathered, order) -> np.ndarray:
    """The rows of ``order`` (items) from every rank's (items, rows) pair."""
    items = np.concatenate([part[0] for part in gathered])
    by_item = np.argsort(items, kind="stable")
    where = np.searchsorted(items[by_item], order)
    if len(order) and (where.max() >= len(items) or (items[by_item][where] != order).any()):
        raise ValueError("gradient pass: a requested row was computed by no rank")
    rows = np.concatenate([part[1] for part in gathered]) if len(gathered) > 1 else gathered[0][1]
    return rows[by_item[where]]
