"""Every per-example score by name: what it means, which pass computes it, and its function.

This registry is the one list of score names: config validation, ``--help-config``,
``launch/score_pool.py`` and docs/scores.md's table read it, and the feature pass
(``trainer/passes/features.py``) decides from it which passes a round runs.

Every score follows one convention: HIGHER = PREFERRED by a selector that ranks by it (so the
uncertainty baselines are signed to make "less certain" larger). A score is one function plus
one :class:`Score` entry in :data:`SCORES`; its ``source`` says which pass calls the function:

- ``forward``: the conditioned forward pass over the pool (the embedding pass, in the training
  template: ``response_scores`` in ``trainer/passes/forward.py``), one row at a time:
  ``compute(tokens: ResponseTokens) -> float`` over the row's response tokens;
- ``ifd``: IFD's passes (``trainer/passes/ifd.py``): ``compute(loss_cond, loss_direct) ->
  float`` from the answer's two mean losses (nats/token); ValueError = no value, with its reason;
- ``derived``: after the passes: ``compute(features, options) -> (values, skipped)`` from the
  embeddings and the other scores (``inputs`` names the scores it reads), on rank 0 over the
  gathered features; a score with ``sharded=True`` is ``compute(features, options, comm)``
  and also runs on every rank over its own rows (``features.positions``; skip reasons keyed
  by pool position), with ``comm``'s collectives where it needs other ranks' rows (knn_k);
- ``targets``: from the pool's embeddings and those of a target set, embedded by the same
  model with the same pooling (``trainer/passes/features.py``): ``compute(pool_embeddings,
  target_embeddings, subtasks, options) -> {name: values}``, the score and one
  ``<name>:<subtask>`` per target subtask;
- ``reward``: a reward model or quality classifier (``trainer/passes/reward.py``), once per run;
- ``reference``: a fixed model run over the pool once per run (``trainer/passes/reference.py``):
  the reference model (RHO-LOSS's), trained on a small clean holdout; the base model itself;
- ``influence``: the gradient pass (``trainer/passes/influence.py``), which writes it.

A score of a new kind (another model, another forward pass) needs a new pass under
``trainer/passes/``. A score's settings are an ``options`` dataclass (fields made with
:func:`~evotune.selectors.base.option`), read by the config under ``scoring.<name>.<field>``
from the field of ``ScoringConfig`` (``trainer/config.py``) that names it; ``check(cfg)``
refuses a config that cannot compute the score.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from evotune.selectors.base import Features, option
from evotune.selectors.sharded import SingleProcess

SOURCES = ("forward", "ifd", "derived", "targets", "reward", "reference", "influence")


@dataclass(frozen=True)
class Score:
    """One registered score (see the module docstring)."""
    name: str
    source: str
    doc: str
    compute: Callable | None = None
    options: type | None = None                       # dataclass: scoring.<name>.<field>
    needs_embeddings: bool = False
    inputs: Callable[[Any], tuple[str, ...]] = lambda options: ()   # scores it is made from
    check: Callable[[Any], None] = lambda cfg: None    # raise ValueError: cannot be computed
    sharded: bool = False          # derived: computes over each rank's own rows (above)
    needs_prompt_embeddings: bool = False     # the forward pass also pools the prompts



# ----------------------------------------------------------------------------- forward

class ResponseTokens:
    """One example's response positions in the conditioned pass: the logits that predict the
    response tokens, (n, V) fp32, and those tokens, (n,). The quantities several scores share
    are computed once, on first use."""

    def __init__(self, logits: torch.Tensor, targets: torch.Tensor):
        self.logits, self.targets = logits, targets

    @cached_property
    def logp(self) -> torch.Tensor:
        return F.log_softmax(self.logits, dim=-1)

    @cached_property
    def nll(self) -> torch.Tensor:
        return -self.logp.gather(1, self.targets.unsqueeze(1)).squeeze(1)

    @cached_property
    def top2(self) -> torch.Tensor:
        return self.logits.topk(2, dim=-1).values


def _loss(t: ResponseTokens) -> float:
    return float(t.nll.mean())


def _perplexity(t: ResponseTokens) -> float:
    return float(torch.exp(t.nll.mean().double()))


def _length(t: ResponseTokens) -> float:
    return len(t.targets)


def _least_confidence(t: ResponseTokens) -> float:
    return -float(t.top2[:, 0].mean())


def _margin(t: ResponseTokens) -> float:
    return -float((t.top2[:, 0] - t.top2[:, 1]).mean())


def _entropy(t: ResponseTokens) -> float:
    return float(-(t.logp.exp() * t.logp).sum(-1).mean())


# ----------------------------------------------------------------------------- ifd

def _ifd_cherry(loss_cond: float, loss_direct: float) -> float:
    if loss_direct == 0:
        raise ValueError("direct loss is 0: the Cherry IFD ratio is undefined")
    return loss_cond / loss_direct


def _ifd_superfilter(loss_cond: float, loss_direct: float) -> float:
    return math.exp(loss_cond - loss_direct)


# ----------------------------------------------------------------------------- derived

@dataclass
class KnnOptions:
    k: int = option(6, "the neighbour whose distance is the score (Instruction Mining: 6)",
                    gt=0)
    chunk_size: int = option(4096, "most rows per side of a distance tile", gt=0, safe=True)
    block_mb: int = option(256, "memory bound of one distance tile (rows × rows × 20 bytes: "
                                "float64 products, float32 distances, the merge's copies): "
                                "smaller tiles under a smaller bound", gt=0, safe=True)


# bytes alive per tile cell: the float64 products, their float32 rounding, the running k
# smallest concatenated with them, and the partition's copy of that
_KNN_TILE_BYTES = 8 + 4 + 4 + 4


def knn_tile_rows(chunk_size: int, block_mb: float) -> int:
    """Rows per side of a distance tile: at most ``chunk_size``, and few enough that a tile
    with its temporaries stays within ``block_mb`` MiB (at least one row). It depends on the
    settings only, so every rank tiles alike whatever its number of rows."""
    fits = math.isqrt(int(block_mb * 2**20 // _KNN_TILE_BYTES))
    return max(1, min(chunk_size, fits))


def _distance_tiles(x: np.ndarray, counts: list[int], side: int, comm):
    """Squared Euclidean distances from this rank's rows ``x`` to every rank's rows, tile by
    tile: yields ``(src, s, mine, d)``, ``d`` the float32 distances of this rank's rows
    ``mine`` (a slice) to rows ``s:s + d.shape[1]`` of rank ``src`` (``counts``: every rank's
    row count), each rank's rows broadcast in tiles of ``side`` rows, a row's distance to itself
    infinite. ``|a|² + |b|² − 2ab`` summed in float64 from the float32 rows and rounded to
    float32, as k-center's initial distances."""
    norms = np.einsum("ij,ij->i", x, x).astype(np.float64)
    for src, count in enumerate(counts):
        for s in range(0, count, side):
            tile = comm.broadcast_block(x[s: s + side] if comm.rank == src else None, src,
                                        (min(side, count - s), x.shape[1])).astype(np.float64)
            tile_norms = np.einsum("ij,ij->i", tile, tile)
            for t in range(0, len(x), side):
                mine = slice(t, t + side)
                d = norms[mine, None] + tile_norms[None, :] \
                    - 2.0 * (x[mine].astype(np.float64) @ tile.T)
                d = np.maximum(d, 0.0).astype(np.float32)
                if comm.rank == src:                      # a row is not its own neighbour
                    own = np.arange(max(t, s), min(t + side, s + len(tile), len(x)))
                    d[own - t, own - s] = np.inf
                yield src, s, mine, d


def knn_distance(embeddings: np.ndarray, k: int, chunk_size: int = 4096,
                 block_mb: float = 256, comm=None) -> np.ndarray:
    """(n,) distance of each of this rank's rows to its k-th nearest other row of the pool
    (Euclidean, float64 result), every rank calling this with its own rows.

    Exact, O(N² D) time. Every rank's rows travel to every other rank in tiles of
    :func:`knn_tile_rows` rows (``comm.broadcast_block``, from each rank in turn); each rank
    measures its own rows against each tile and keeps each row's k smallest distances so far.
    So a rank holds its rows, their k smallest distances and one tile of at most ``block_mb``
    MiB: nothing N × D, and one process (``comm`` None) is the case of one rank. A squared
    distance is ``|a|² + |b|² − 2ab`` summed in float64 from the float32 rows and rounded to
    float32 (as k-center's initial distances), so which rows share a tile, and hence the number
    of ranks, can change a value only at a float32 rounding boundary. Rows with a non-finite
    value get NaN and are nobody's neighbour. Raises ValueError (on every rank alike) when the
    pool has k or fewer finite rows, or k < 1.
    """
    comm = comm or SingleProcess()
    if k < 1:
        raise ValueError(f"knn_k must be >= 1, got {k}")
    emb = np.asarray(embeddings, dtype=np.float32)
    idx = np.flatnonzero(np.isfinite(emb).all(axis=1))
    x = emb[idx]                                          # this rank's finite rows
    counts = [int(c[0]) for c in comm.all_gather_rows(np.array([len(x)], dtype=np.int64))]
    if sum(counts) <= k:
        raise ValueError(f"knn_k={k} needs more than {k} embedded examples, got {sum(counts)}")
    best = np.full((len(x), k), np.inf, dtype=np.float32)     # each row's k smallest so far
    for _, _, mine, d in _distance_tiles(x, counts, knn_tile_rows(chunk_size, block_mb), comm):
        best[mine] = np.partition(np.concatenate([best[mine], d], axis=1), k - 1,
                                  axis=1)[:, :k]
    out = np.full(len(emb), np.nan)
    out[idx] = np.sqrt(best.max(axis=1).astype(np.float64))
    return out


def knn_values(embeddings: np.ndarray, positions: np.ndarray, values: np.ndarray, k: int,
               chunk_size: int = 4096, block_mb: float = 256, comm=None) -> np.ndarray:
    """(n, k) the ``values`` of each of this rank's rows' k nearest other rows of the pool,
    nearest first; every rank calls this with its own rows (``positions``: their pool
    positions, distinct over the ranks).

    Neighbours are ranked by squared Euclidean distance, computed and tiled as in
    :func:`knn_distance` (nothing N × D on a rank), then by pool position: ties go to the
    lower position whatever rank holds a row. Only rows with a finite embedding and a finite
    value are neighbours; a row without either gets NaN throughout. Every rank gets the pool's
    positions and values once (O(N) numbers). Raises ValueError (on every rank alike) when
    k < 1 or the pool has k or fewer such rows.
    """
    comm = comm or SingleProcess()
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    emb = np.asarray(embeddings, dtype=np.float32)
    vals = np.asarray(values, dtype=np.float64)
    idx = np.flatnonzero(np.isfinite(emb).all(axis=1) & np.isfinite(vals))
    x = emb[idx]
    parts = comm.all_gather_rows(np.stack([np.asarray(positions, dtype=np.float64)[idx],
                                           vals[idx]]))
    counts = [p.shape[1] for p in parts]
    if sum(counts) <= k:
        raise ValueError(f"k={k} needs more than {k} rows with an embedding and a value, got "
                         f"{sum(counts)}")
    best_d = np.full((len(x), k), np.inf, dtype=np.float32)
    best_p = np.full((len(x), k), np.inf)
    best_v = np.full((len(x), k), np.nan)
    for src, s, mine, d in _distance_tiles(x, counts, knn_tile_rows(chunk_size, block_mb), comm):
        tile_p, tile_v = parts[src][0, s: s + d.shape[1]], parts[src][1, s: s + d.shape[1]]
        cand_d = np.concatenate([best_d[mine], d], axis=1)
        cand_p = np.concatenate([best_p[mine], np.broadcast_to(tile_p, d.shape)], axis=1)
        cand_v = np.concatenate([best_v[mine], np.broadcast_to(tile_v, d.shape)], axis=1)
        order = np.lexsort((cand_p, cand_d), axis=1)[:, :k]
        at = np.arange(d.shape[0])[:, None]
        best_d[mine], best_p[mine], best_v[mine] = (cand_d[at, order], cand_p[at, order],
                                                    cand_v[at, order])
    out = np.full((len(emb), k), np.nan)
    out[idx] = np.where(np.isfinite(best_d), best_v, np.nan)
    return out


@dataclass
class ExcessOptions:
    of: str = option("loss", "the loss compared: the current model's (loss: no extra pass) or "
                             "the reference model's (reference_loss)",
                     choices=("loss", "reference_loss"))
    k: int = option(10, "neighbours: the k rows with the nearest prompts", gt=0)
    chunk_size: int = option(4096, "most rows per side of a distance tile", gt=0, safe=True)
    block_mb: int = option(256, "memory bound of one distance tile (as scoring.knn_k's)",
                           gt=0, safe=True)


PROMPT_EMBEDDINGS = "prompt_embeddings"     # Features.extra: the prompts' pooled hidden states


def _loss_excess(features: Features, options: ExcessOptions, comm=None):
    prompts = features.extra.get(PROMPT_EMBEDDINGS)
    if prompts is None:
        raise ValueError("loss_excess needs the prompts' embeddings; the forward pass "
                         "computed none")
    if options.of not in features.scores:
        raise ValueError(f"loss_excess: score {options.of!r} was not computed")
    own = features.scores[options.of]
    where = features.positions if features.positions is not None else np.arange(len(own))
    near = knn_values(prompts, where, own, options.k, options.chunk_size, options.block_mb,
                      comm)
    with warnings.catch_warnings():                     # all-NaN rows: no value, said below
        warnings.simplefilter("ignore", RuntimeWarning)
        values = own - np.nanmedian(near, axis=1)
    skipped = {int(where[i]): f"{options.of}: {why}"
               for i, why in ((i, features.skipped.get(options.of, {}).get(int(where[i])))
                              for i in np.flatnonzero(np.isnan(values))) if why}
    for i in np.flatnonzero(np.isnan(values)):
        skipped.setdefault(int(where[i]), "no prompt embedding or no neighbour")
    return values, skipped


def _knn_k(features: Features, options: KnnOptions, comm=None):
    if features.embeddings is None:
        raise ValueError("knn_k needs embeddings; the feature pass computed none")
    values = knn_distance(features.embeddings, options.k, options.chunk_size,
                          options.block_mb, comm)
    where = features.positions
    return values, {int(i if where is None else where[i]): "no embedding"
                    for i in np.flatnonzero(np.isnan(values))}


@dataclass
class LinearOptions:
    rule: str = option("", "the 'linear' score: a rule over other scores, e.g. "
                           "'0.9*knn_k - 1.0*ifd_cherry + 8e-5*length' (Instruction Mining; "
                           "higher = preferred)")

    def check(self) -> None:
        if self.rule:
            try:
                parse_linear(self.rule)
            except ValueError as e:
                raise ValueError(f"rule: {e}") from None


_TERM = re.compile(r"\s*([+-]?)\s*((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*([A-Za-z_]\w*)\s*")


def parse_linear(text: str, known: tuple[str, ...] | None = None) -> dict[str, float]:
    """``"0.5*knn_k - 1.0*ifd_cherry"`` → ``{"knn_k": 0.5, "ifd_cherry": -1.0}``.

    ``known``: the score names a term may use (default: every registered score but
    ``linear``). Raises ValueError naming the unreadable part, an unknown score or a repeated one.
    """
    if known is None:
        known = tuple(n for n in SCORES if n != "linear")
    terms: dict[str, float] = {}
    pos, text = 0, text.strip()
    if not text:
        raise ValueError("the linear rule is empty; write e.g. '0.5*knn_k - 1.0*ifd_cherry'")
    while pos < len(text):
        m = _TERM.match(text, pos)
        if not m or (pos > 0 and not m.group(1)):
            raise ValueError(f"cannot read the linear rule {text!r} at {text[pos:]!r}; write "
                             f"terms as COEF*SCORE joined by + or -, e.g. '0.5*knn_k - 1*loss'")
        sign, coef, name = m.groups()
        if name not in known:
            raise ValueError(f"linear rule: unknown score {name!r}; known: {', '.join(known)}")
        if name in terms:
            raise ValueError(f"linear rule: {name!r} appears twice")
        terms[name] = -float(coef) if sign == "-" else float(coef)
        pos = m.end()
    return terms


def _linear(features: Features, options: LinearOptions, comm=None):
    total = 0.0
    skipped: dict[int, str] = {}
    for name, coef in parse_linear(options.rule).items():
        if name not in features.scores:
            raise ValueError(f"linear rule term {name!r} was not computed")
        total = total + coef * features.scores[name]
        for i, why in features.skipped.get(name, {}).items():
            skipped.setdefault(int(i), f"{name}: {why}")
    return np.asarray(total, dtype=np.float64), skipped


def _check_linear(cfg) -> None:
    if not cfg.scoring.linear.rule:
        raise ValueError("scoring.linear.rule: the 'linear' score is used but no rule is set; "
                         "e.g. scoring.linear.rule='0.9*knn_k - 1.0*ifd_cherry'")


@dataclass
class RdsOptions:
    targets: str = option("", "target examples (any data.pool form): SFT rows or prompt-only "
                              "rows ({\"prompt\": ...}), optional 'subtask'", path="file")
    reduce: str = option("max", "over a subtask's targets: the max cosine (RDS+) or the mean",
                         choices=("max", "mean"))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64); a zero or non-finite row becomes NaN."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = x / norms
    out[~np.isfinite(out).all(axis=1) | (norms[:, 0] == 0)] = np.nan
    return out


def rds_scores(pool_embeddings: np.ndarray, target_embeddings: np.ndarray,
               subtasks: list[str], options: RdsOptions) -> dict[str, np.ndarray]:
    """RDS+'s scores (Ivison et al. 2025, arXiv 2503.01807): each pool row's cosine to every
    target row, reduced (max or mean) over each subtask's targets: ``rds:<subtask>``, (N,)
    each; ``rds``, the max over the subtasks. NaN for a pool row without a finite embedding.

    A row's value depends on that row alone (einsum's loop, not BLAS, whose sums depend on how
    many rows share a call): the ranks that score their own rows get the numbers one process
    gets."""
    sims = np.einsum("nd,td->nt", unit_rows(pool_embeddings), unit_rows(target_embeddings))
    names = sorted(set(subtasks))
    reduce = np.max if options.reduce == "max" else np.mean
    out = {}
    for name in names:
        cols = [j for j, s in enumerate(subtasks) if s == name]
        out[f"rds:{name}"] = reduce(sims[:, cols], axis=1)
    out["rds"] = np.max(np.stack([out[f"rds:{n}"] for n in names], axis=1), axis=1)
    return out


def _check_rds(cfg) -> None:
    if not cfg.scoring.rds.targets:
        raise ValueError("scoring.rds.targets: the rds score needs target examples (SFT rows or "
                         "prompt-only rows, optional 'subtask')")
    if cfg.selection.embedding != "hidden":
        raise ValueError("selection.embedding: rds compares hidden-state embeddings of the pool "
                         "and the targets; set selection.embedding=hidden")


@dataclass
class RewardOptions:
    model: str = option("", "a local Hugging Face sequence-classification model (a reward model "
                            "or a quality classifier) that scores (prompt, response)",
                        path="model")
    label: int = option(-1, "with several labels: the one whose probability is the score "
                            "(-1 = the last)")


def _check_reward(cfg) -> None:
    model = cfg.scoring.reward.model
    if not model:
        raise ValueError("scoring.reward.model: the reward score needs a local "
                         "sequence-classification model dir")


def _check_reference(cfg) -> None:
    if not cfg.scoring.reference.data:
        raise ValueError("scoring.reference.data: the reference model is trained on a small "
                         "clean holdout of the pool's kinds of task (SFT rows, none of them in "
                         "the pool); give its file")


def _from_two(features: Features, a: str, b: str, combine) -> tuple[np.ndarray, dict]:
    """A score made row by row from scores ``a`` and ``b`` (``combine(a, b)``); a row without
    either has none, with that one's reason."""
    for name in (a, b):
        if name not in features.scores:
            raise ValueError(f"score {name!r} was not computed")
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.asarray(combine(features.scores[a], features.scores[b]), dtype=np.float64)
    skipped: dict[int, str] = {}
    for name in (a, b):
        for i, why in features.skipped.get(name, {}).items():
            skipped.setdefault(int(i), f"{name}: {why}")
    return values, skipped


def _reducible_loss(features: Features, options=None, comm=None):
    return _from_two(features, "loss", "reference_loss", lambda cur, ref: cur - ref)


def _reducible_share(features: Features, options=None, comm=None):
    return _from_two(features, "loss", "reference_loss", lambda cur, ref: (cur - ref) / cur)


def _loss_left(features: Features, options=None, comm=None):
    return _from_two(features, "loss", "base_loss", lambda cur, base: cur / base)


def _check_influence(cfg) -> None:
    if not cfg.influence.validation:
        raise ValueError("influence.validation: the influence score needs a validation set "
                         "(SFT rows or prompt/chosen/rejected pairs)")


# ----------------------------------------------------------------------------- the registry

SCORES: dict[str, Score] = {s.name: s for s in (
    Score("loss", "forward", "mean next-token NLL of the response given the prompt "
          "(nats/token)", _loss),
    Score("perplexity", "forward", "`exp(loss)`", _perplexity),
    Score("length", "forward", "response tokens (the longest-response baseline)", _length),
    Score("least_confidence", "forward", "minus the mean top logit over the response "
          "(DiverseEvol's least-confidence baseline)", _least_confidence),
    Score("margin", "forward", "minus the mean top-1 − top-2 logit gap (DiverseEvol's margin "
          "baseline)", _margin),
    Score("entropy", "forward", "mean softmax entropy over the response (nats)", _entropy),
    Score("ifd_cherry", "ifd", "Cherry LLM's IFD: mean answer loss with the prompt over "
          "without it (arXiv 2308.12032)", _ifd_cherry),
    Score("ifd_superfilter", "ifd", "Superfiltering's IFD: `exp(loss_cond − loss_direct)`, "
          "the perplexity ratio (arXiv 2402.00530)", _ifd_superfilter),
    Score("knn_k", "derived", "distance to the k-th nearest pool neighbour in the current "
          "embedding space (Instruction Mining's knn6)", _knn_k, KnnOptions,
          needs_embeddings=True, sharded=True),
    Score("linear", "derived", "a linear rule over other scores (Instruction Mining, arXiv "
          "2307.06290)", _linear, LinearOptions,
          inputs=lambda o: tuple(parse_linear(o.rule)) if o.rule else (), check=_check_linear,
          sharded=True),
    Score("rds", "targets", "RDS+: cosine of the pooled embedding to the target examples, max "
          "over each subtask's targets, then max over subtasks (arXiv 2503.01807)", rds_scores,
          RdsOptions, needs_embeddings=True, check=_check_rds),
    Score("reward", "reward", "a reward model's or quality classifier's score of (prompt, "
          "response) (MoDS's quality step, DEITA's quality scorer)", options=RewardOptions,
          check=_check_reward),
    Score("loss_excess", "derived", "the current model's `loss` minus the median loss of the "
          "k rows with the most similar prompts (`scoring.loss_excess.of: reference_loss`: "
          "the reference's): how much harder this answer is than answers to prompts like it. "
          "HIGH = the answer does not fit its task (cut, one word, another row's), so use it "
          "as a gate (`selection.filter_keep: lowest`); from the round's own forward pass, "
          "the neighbours found among the prompts' pooled hidden states", _loss_excess,
          ExcessOptions, inputs=lambda o: (o.of,), sharded=True,
          needs_prompt_embeddings=True),
    Score("reference_loss", "reference", "mean response NLL under the reference model: the base "
          "model with a LoRA adapter trained on a small clean holdout (`scoring.reference`; "
          "RHO-LOSS's irreducible loss, arXiv 2206.07137). A loss: LOW = clean, so use it as a "
          "quality gate (`selection.filter_keep: lowest`)", check=_check_reference),
    Score("reducible_loss", "derived", "RHO-LOSS's reducible holdout loss: the current "
          "model's `loss` minus `reference_loss` (what training could still remove)",
          _reducible_loss, inputs=lambda o: ("loss", "reference_loss"), sharded=True),
    Score("reducible_share", "derived", "`reducible_loss / loss`: the share of the current "
          "loss the reference removes (a relative reduction)", _reducible_share,
          inputs=lambda o: ("loss", "reference_loss"), sharded=True),
    Score("base_loss", "reference", "mean response NLL under the base model (the run's model "
          "before any training), once per run: where each row's loss trajectory starts"),
    Score("loss_left", "derived", "`loss / base_loss`: the share of the base model's loss "
          "that training so far has not removed. HIGH = not yet learnt (rows like the picks so "
          "far have become easier; this one has not); broken answers stay high too, so put a "
          "gate in front (`loss_excess`)", _loss_left, inputs=lambda o: ("loss", "base_loss"),
          sharded=True),
    Score("influence", "influence", "LESS / ROSE gradient influence on the validation set "
          "(max over subtasks of the mean cosine)", check=_check_influence),
)}


def register(score: Score) -> Score:
    """Add a score to :data:`SCORES` (e.g. from your own launch script, before the config is
    loaded). Raises ValueError on a taken name or an unknown source."""
    if score.source not in SOURCES:
        raise ValueError(f"score {score.name!r}: source must be one of {', '.join(SOURCES)}")
    if score.name in SCORES and SCORES[score.name] is not score:
        raise ValueError(f"a score named {score.name!r} is already registered")
    SCORES[score.name] = score
    return score


def names(source: str | None = None) -> tuple[str, ...]:
    """Registered score names (of one ``source``), in registry order."""
    return tuple(n for n, s in SCORES.items() if source is None or s.source == source)


def option_sections() -> dict[str, type]:
    """Name → options dataclass of every score with settings (``scoring.<name>``)."""
    return {n: s.options for n, s in SCORES.items() if s.options is not None}


def with_inputs(wanted, options_of: Callable[[str], Any]) -> list[str]:
    """``wanted`` and every score they are computed from, inputs before the scores that read
    them (``options_of(name)``: that score's options). Raises ValueError on an unknown name."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]):
        if name not in SCORES:
            raise ValueError(f"unknown score {name!r}; known: {', '.join(SCORES)}")
        if name in order:
            return
        if name in path:
            raise ValueError(f"score {name!r} is computed from itself ({' → '.join(path)})")
        for dep in SCORES[name].inputs(options_of(name)):
            visit(dep, path + (name,))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def check_computable(wanted, cfg) -> None:
    """Raise ValueError, naming the key to fix, when ``cfg`` lacks what a score of ``wanted``
    or a score it is computed from needs (each score's ``check``: ``reducible_loss`` needs the
    reference's holdout through ``reference_loss``)."""
    for name in with_inputs(wanted, lambda n: getattr(cfg.scoring, n, None)):
        SCORES[name].check(cfg)
