"""Instruction-Following Difficulty (IFD): how much the instruction helps the model say the answer.

Both scores compare two forward passes over the same answer text: a *conditioned* pass, where the
answer follows its prompt, and a *direct* pass, where it follows little or nothing. Only answer
tokens are scored; the score is high when the prompt barely lowers the answer's loss. The
authors published two formulas in two repositories; evotune implements both, under explicit
names, with the reference scripts' exact token choices (checked against values from the
unmodified scripts: tests/fixtures/IFD_REFERENCE.md).

``ifd_cherry`` (Li et al., "From Quantity to Quality", arXiv 2308.12032; tianyi-lab/Cherry_LLM,
``cherry_seletion/data_analysis.py`` then ``data_by_IFD.py``, run with ``--prompt alpaca``):
  - prompt: the Stanford Alpaca template (with or without its Input block; the Input block is used
    when ``input`` is not the empty string); conditioned text = prompt + answer, no separator;
  - direct text = ``"### Response:"`` + answer;
  - IFD = mean NLL(answer | prompt) / mean NLL(answer | "### Response:"), a ratio of mean losses.
``ifd_superfilter`` (Li et al., "Superfiltering", arXiv 2402.00530; tianyi-lab/Superfiltering,
``code_ifd/data_analysis.py`` then ``put_analysis_to_data.py``, ``--prompt none``):
  - prompt: no template, ``"{instruction}\\n{input}\\n"`` or ``"{instruction}\\n"``;
    conditioned text = prompt + answer;
  - direct text = the bare answer;
  - IFD = PPL(answer | prompt) / PPL(answer) = exp(loss_cond - loss_direct).

Token rules shared by both references (they are what make values match, so they are kept):
  - every text goes through ``tokenizer.encode`` with its default special tokens (a BOS where
    the tokenizer adds one) and right truncation to the pass's length limit;
  - the answer starts at token ``len(tokenizer.encode(text[:text.rfind(answer)]))``: the prefix
    is tokenised on its own and its length (BOS included) indexes the full text's ids, even where
    tokenising the prefix alone splits the boundary differently from the full text;
  - position 0 is never scored (nothing predicts it). In Superfiltering's direct pass the whole
    text is the answer, so with a tokenizer that adds no BOS (GPT-2, SmolLM2) the answer's
    first token is not scored and a one-token answer has no direct loss at all;
  - the prompt length P is ``len(encode(prompt))`` truncated to ``max_length``; the conditioned
    pass is truncated to ``max_length``, the direct pass to ``max_length - P + 4`` (Cherry) or
    ``max_length - P + 1`` (Superfiltering). Cherry's 4 is BOS + "### Response:" under the
    Llama-1/2 tokenizer; with other tokenizers it lets the direct pass keep more or fewer answer
    tokens than the conditioned one. Kept for parity.

Skips, where the reference drops the row or produces no number:
  - Cherry (``data_by_IFD.py``): P >= max_length; no answer token in either pass; P + the direct
    pass's answer tokens > max_length (with a tokenizer where "### Response:" is 3 tokens, e.g.
    SmolLM2, that drops every row whose answer is cut by truncation).
  - Superfiltering: an empty answer (the script writes an empty record, later NaN); a pass with
    no scored answer token (the script's loss is then NaN, and its selection drops NaN).

The training template (``scoring.template: train``, evotune's own, not a reference method): the
conditioned pass is the run's training encoding and the direct pass is built from it by
:func:`direct_pass` (response header + the same response tokens), see :class:`IfdPass`. The
rules above are for ``reference``.

Departures from the references:
  - A row that cannot be scored is returned as ``{"skipped": reason}``. The references skip
    silently (Cherry) or write NaN / 0 (Superfiltering turns any exception in a forward pass into
    a perplexity of 0 and a zero division into IFD 0); evotune never returns a stand-in number and
    lets real errors (out of memory, a bad model) raise.
  - Cherry's script also drops IFD > 1 and Superfiltering's keeps IFD < 1: those are selection
    rules, not scoring; every IFD is kept and the score filter applies the threshold.
  - Batched with right padding (one forward per batch, means over the answer tokens only) where
    the references run one example at a time; in fp32 the losses agree to ~2e-6 relative.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evotune.trainer.data import (ALPACA_NO_INPUT, ALPACA_WITH_INPUT, IGNORE_INDEX, Encoded,
                                  encode, resolve_template)
from evotune.trainer.model import load_model, load_tokenizer, resolve_model_path
from evotune.trainer.passes.forward import PassStats, compute_features, merge_stats
from evotune.trainer.scores import SCORES, names
from evotune.trainer.logs import ProgressBars

# The IFD scores with published templates and token rules (``scoring.template: reference``);
# under the training template every registered ``ifd`` score is computed from the same passes.
VARIANTS = ("ifd_cherry", "ifd_superfilter")

# Cherry's direct pass: the answer after the bare response header.
CHERRY_DIRECT_PREFIX = "### Response:"
# Extra tokens the direct pass may hold beyond ``max_length - P`` (the references' constants).
DIRECT_SLACK = {"ifd_cherry": 4, "ifd_superfilter": 1}


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"IFD variant {variant!r} has no reference template; expected one of "
                         f"{', '.join(VARIANTS)} (scoring.template=train scores any IFD score)")


def ifd_prompt(alpaca: dict, variant: str) -> str:
    """The conditioning prompt of an Alpaca row (instruction, optional input) for ``variant``."""
    _check_variant(variant)
    inp = alpaca.get("input", "")
    # Both references test ``input == ''`` exactly, so a whitespace-only input keeps its block.
    if variant == "ifd_cherry":
        template = ALPACA_WITH_INPUT if inp != "" else ALPACA_NO_INPUT
        return template.format(instruction=alpaca["instruction"], input=inp)
    return alpaca["instruction"] + "\n" + (inp + "\n" if inp != "" else "")


def _answer_pass(tokenizer, text: str, answer: str, limit: int) -> Encoded:
    """``text`` truncated to ``limit`` tokens, labelled from the answer's first token on."""
    ids = tokenizer.encode(text, truncation=True, max_length=limit)
    start = len(tokenizer.encode(text[: text.rfind(answer)])) if text != answer else 0
    first = max(start, 1)                      # position 0 is never a prediction target
    labels = [IGNORE_INDEX] * min(first, len(ids)) + ids[first:]
    truncated = len(tokenizer.encode(text)) > len(ids)
    return Encoded(ids, labels, truncated)


def ifd_inputs(alpaca: dict | None, tokenizer, variant: str, max_length: int
               ) -> tuple[Encoded, Encoded] | str:
    """The conditioned and the direct pass of one Alpaca row, or why the row gets no IFD.

    Args:
        alpaca: ``{"instruction", "input" (optional), "output"}`` (``Example.alpaca``); None
            (a chat row) gets a skip reason, the references having no chat form.
        tokenizer: a Hugging Face tokenizer; ``encode`` adds its usual special tokens.
        variant: ``"ifd_cherry"`` or ``"ifd_superfilter"``.
        max_length: the token limit of the conditioned pass (the references' ``--max_length``).

    Returns:
        ``(conditioned, direct)``, each with labels IGNORE_INDEX except on the answer tokens the
        reference scores, or a short reason string where the reference skips the row or
        produces no number.

    Raises:
        ValueError: unknown variant, or ``max_length`` < 1.
    """
    _check_variant(variant)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if alpaca is None:
        return "chat row: IFD is defined for Alpaca rows (instruction, input, output)"
    answer = alpaca["output"]
    if answer == "":
        return "empty answer"
    prompt = ifd_prompt(alpaca, variant)
    n_prompt = len(tokenizer.encode(prompt, truncation=True, max_length=max_length))
    if variant == "ifd_cherry" and n_prompt >= max_length:
        return f"prompt fills max_length ({n_prompt} >= {max_length} tokens)"
    cond = _answer_pass(tokenizer, prompt + answer, answer, max_length)
    direct_text = CHERRY_DIRECT_PREFIX + answer if variant == "ifd_cherry" else answer
    direct = _answer_pass(tokenizer, direct_text, answer,
                          max_length - n_prompt + DIRECT_SLACK[variant])
    if cond.n_response == 0:
        return f"no answer token left in the conditioned pass (prompt {n_prompt} tokens, " \
               f"max_length {max_length})"
    if direct.n_response == 0:
        return "no scored answer token in the direct pass"
    if variant == "ifd_cherry" and n_prompt + direct.n_response > max_length:
        return (f"prompt + answer exceed max_length ({n_prompt} + {direct.n_response} > "
                f"{max_length})")
    return cond, direct


def ifd_value(loss_cond: float, loss_direct: float, variant: str) -> float:
    """IFD from the two mean answer losses (nats/token), by the registered score's formula.

    Cherry: ``loss_cond / loss_direct``. Superfiltering: ``exp(loss_cond - loss_direct)``, the
    perplexity ratio. Raises ValueError for a name that is not an ``ifd`` score, or for Cherry
    when ``loss_direct`` is 0 (the ratio is undefined; the reference would divide by zero).
    """
    if variant not in names("ifd"):
        raise ValueError(f"unknown IFD score {variant!r}; expected one of "
                         f"{', '.join(names('ifd'))}")
    return SCORES[variant].compute(loss_cond, loss_direct)


def response_header(tokenizer, template: str) -> list[int]:
    """Token ids that open a response under the training ``template`` ("alpaca" or "chat").

    Alpaca: ``"### Response:"`` (Cherry's direct prefix). Chat: what the tokenizer's chat template
    adds for the generation prompt (for ChatML ``"<|im_start|>assistant\\n"``), found as the
    difference between a one-turn conversation rendered with and without it.
    """
    if template == "alpaca":
        text = CHERRY_DIRECT_PREFIX
    else:
        msgs = [{"role": "user", "content": "x"}]
        with_gen = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        without = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        if not with_gen.startswith(without) or with_gen == without:
            raise ValueError("the chat template adds no generation prompt after the user turn, "
                             "so IFD has no response header for its direct pass; use "
                             "scoring.template=reference or data.template=alpaca")
        text = with_gen[len(without):]
    return tokenizer(text, add_special_tokens=False).input_ids


def direct_pass(enc: Encoded, header: list[int], bos: int | None) -> Encoded:
    """The direct pass of a training-template example: its response tokens without the prompt.

    Each labelled span of ``enc`` (one per assistant turn) is kept, preceded by ``header`` (the
    response opener); the prompt tokens are dropped. A leading BOS of ``enc`` is kept. The scored
    tokens are exactly those of the conditioned pass (``enc``), so the two mean losses cover the
    same tokens.
    """
    keep_bos = bos is not None and enc.input_ids[:1] == [bos]
    ids = [bos] if keep_bos else []
    labels = [IGNORE_INDEX] if keep_bos else []
    j, n = 0, len(enc.labels)
    while j < n:
        if enc.labels[j] == IGNORE_INDEX:
            j += 1
            continue
        k = j
        while k < n and enc.labels[k] != IGNORE_INDEX:
            k += 1
        ids += header + enc.input_ids[j:k]
        labels += [IGNORE_INDEX] * len(header) + enc.input_ids[j:k]
        j = k
    return Encoded(ids, labels, enc.truncated)


def _round(r: int | None) -> str:
    return "" if r is None else f"round {r}: "


class IfdPass:
    """The passes behind a run's ``ifd`` scores, and the scores from their losses.

    ``scoring.template: train`` (default): the conditioned loss is the ``loss`` of the forward
    pass itself (the run's own training encoding), so the direct pass (response header +
    response tokens, :func:`direct_pass`) is the only extra one; every IFD score shares it and
    differs by formula only. ``reference``: the published templates and token rules, two extra
    passes per variant, Alpaca rows only; for parity with Cherry_LLM and Superfiltering.

    A proxy model (``scoring.model``) scores with its own tokenizer, once (it never changes):
    its losses are kept for later rounds; in ``train`` mode its conditioned pass is then an
    extra pass over the pool encoded with the proxy's tokenizer and template.
    """

    def __init__(self, cfg, variants: list[str], pool, pool_enc, tokenizer, template: str,
                 strategy):
        self.cfg, self.variants, self.strategy = cfg, list(variants), strategy
        self.mode = cfg.scoring.template
        tok, enc = tokenizer, pool_enc
        self.proxy = None
        if cfg.scoring.model:
            path = resolve_model_path(cfg.scoring.model)
            tok = load_tokenizer(path)     # a proxy keeps its own tokenizer
            self.proxy = load_model(path, strategy.dtype).to(strategy.device).eval()
            if self.mode == "train":
                template = resolve_template(cfg.data.template, tok)

                def proxy_encoded(i: int, tok=tok, template=template):
                    try:
                        return encode(pool[i], tok, template, cfg.data.max_length)
                    except ValueError as e:       # no response token fits with this tokenizer
                        return f"proxy tokenizer: {e}"
                enc = Lazy(len(pool), proxy_encoded)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        # Each row's inputs are made when read, never kept for the whole pool: the pool's
        # encodings as Python lists would cost ~40 bytes a token on every rank.
        if self.mode == "reference":
            for v in self.variants:
                _check_variant(v)

            def reference(i: int, v: str, tok=tok):
                ex = pool[i]
                return ifd_inputs(ex.alpaca, tok, v, cfg.scoring.max_length) if ex.alpaca \
                    else ("chat row: the reference IFD templates need instruction/input/output "
                          "(scoring.template=train scores it)")
            self.inputs = {v: Lazy(len(pool), lambda i, v=v: reference(i, v))
                           for v in self.variants}
        else:
            header, bos = response_header(tok, template), tok.bos_token_id

            def shared(i: int):
                e = enc[i]
                return e if isinstance(e, str) else (e, direct_pass(e, header, bos))
            self.inputs = {"shared": Lazy(len(enc), shared)}
        self.cache: dict[str, tuple] = {}         # a proxy's losses, computed in an earlier round

    @property
    def needs_forward_loss(self) -> bool:
        """True when the conditioned loss is the forward pass's ``loss`` (train template, no
        proxy): the round's forward pass must compute it."""
        return self.mode == "train" and self.proxy is None

    def _key(self, variant: str) -> str:
        return variant if self.mode == "reference" else "shared"

    def run(self, model, features, logger: ProgressBars, r: int | None,
            measured=None) -> PassStats | None:
        """Add every IFD score (values, skip reasons) to ``features`` on rank 0 (None on the
        other ranks; every rank calls this). ``features`` must already hold the forward pass's
        ``loss`` when :attr:`needs_forward_loss`. ``measured``: the pool positions to score
        (None: all; a proxy scores all, once). Returns the statistics of the passes that ran
        (None when a proxy's cached losses were enough)."""
        stats = None
        losses = dict(self.cache)
        if self.proxy is not None:
            measured = None
        for v in self.variants:
            key = self._key(v)
            if key not in losses:
                losses[key], s = self._losses(key, model, features, logger, r, measured)
                stats = s if stats is None else merge_stats(stats, s)
                if self.proxy is not None:
                    self.cache[key] = losses[key]
            if features is not None:
                features.scores[v], features.skipped[v] = _values(v, self.inputs[key],
                                                                  *losses[key])
        return stats

    def _losses(self, key, model, features, logger: ProgressBars, r, measured=None):
        """The scored rows of ``inputs[key]`` (of ``measured``, when given) and their mean
        answer losses (conditioned, direct), on rank 0 (None elsewhere), and the statistics of
        the passes run for them."""
        inputs = self.inputs[key]
        rows = range(len(inputs)) if measured is None else (int(i) for i in measured)
        scored = [i for i in rows if not isinstance(inputs[i], str)]
        model = self.proxy or model
        need_cond = not self.needs_forward_loss
        bs, pad = self.cfg.selection.batch_size, self.pad_id
        label = key if key != "shared" else "IFD direct pass"
        with logger.progress(f"{_round(r)}{label}", len(scored) * (1 + need_cond)) as advance:
            cond = None
            part = lambda j: Lazy(len(scored), lambda k: inputs[scored[k]][j])  # noqa: E731
            if need_cond:
                cond, s1 = compute_features(model, part(0), self.strategy, pad, bs, False,
                                            ("loss",), advance)
            direct, stats = compute_features(model, part(1), self.strategy, pad, bs, False,
                                             ("loss",), advance)
        if need_cond:
            stats = merge_stats(s1, stats)
        if not self.strategy.is_rank0:
            return None, stats
        cond_loss = cond.scores["loss"] if need_cond else features.scores["loss"][scored]
        return (scored, cond_loss, direct.scores["loss"]), stats


class Lazy(Sequence):
    """``n`` rows, row ``i`` made by ``make(i)`` each time it is read (nothing kept)."""

    def __init__(self, n: int, make):
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.make(i)


def _values(variant, inputs, scored, cond_loss, direct_loss):
    """(N,) IFD values, NaN where skipped or not ``scored``, and ``{position: reason}``."""
    values = np.full(len(inputs), np.nan)
    skipped = {i: x for i, x in enumerate(inputs) if isinstance(x, str)}
    for k, i in enumerate(scored):
        try:
            values[i] = ifd_value(float(cond_loss[k]), float(direct_loss[k]), variant)
        except ValueError as e:
            skipped[i] = str(e)
    return values, skipped
