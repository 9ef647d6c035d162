"""Instruction data: rows as examples, stable ids, prompt templates and response-only labels.

Three row shapes, detected per row:
- Alpaca: ``instruction`` (str), optional ``input`` (str), ``output`` (str); LLaMA-Factory's
  optional ``system`` (str) and ``history`` (earlier ``[instruction, response]`` pairs) make
  it a conversation.
- Chat: ``messages``, a list of ``{"role": system|user|assistant, "content": str}``.
- ShareGPT: ``conversations``, a list of ``{"from": human|gpt|system, "value": str}``.
In a conversation the loss covers every assistant turn; a ``system`` field is its system turn.
Optional fields: ``id`` (str or int; else a hash of the content is the id) and ``source``.
``data.columns`` maps these names to an input's own columns.

Rows are read by :mod:`evotune.trainer.sources` (JSON, JSONL, CSV, parquet, save_to_disk
folders). Errors name the file, the line or row, and the field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from evotune.trainer.sources import DataError, name_of, read_rows

IGNORE_INDEX = -100

# The Alpaca prompt, as in Stanford Alpaca (tatsu-lab/stanford_alpaca) and the Cherry/IFD scripts.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One instruction example. ``messages`` is the chat form of the row (Alpaca rows too)."""
    id: str
    source: str
    messages: list[dict]
    where: str                      # "file:line" for messages
    alpaca: dict | None = None      # the Alpaca fields, when the row was Alpaca-style
    extra: dict = field(default_factory=dict)   # other fields of the row, kept for later use

    def preview(self, chars: int = 80) -> str:
        """The first user turn, shortened, for logs and tables."""
        text = next((m["content"] for m in self.messages if m["role"] == "user"), "")
        text = " ".join(text.split())
        return text if len(text) <= chars else text[: chars - 1] + "…"


@dataclass
class Encoded:
    """Token ids of one example and its labels (IGNORE_INDEX on non-response tokens)."""
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def n_response(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class LoadReport:
    """What :func:`load_examples` skipped, as ``(where, reason)``."""
    skipped: list[tuple[str, str]] = field(default_factory=list)


# ----------------------------------------------------------------------------- rows

# evotune's names for a row's fields; ``data.columns`` maps them to the input's own columns
ROW_FIELDS = ("instruction", "input", "output", "system", "history", "messages", "conversations",
              "id", "source")
CONTENT_FIELDS = ("instruction", "input", "output", "messages", "conversations", "system",
                  "history")
# ShareGPT's speakers (``from``) as roles; "user" and "assistant" appear in some exports too
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def rename_columns(row, columns: dict[str, str] | None, where: str):
    """``row`` with the input's columns under evotune's field names (``columns``: field → the
    input's column, from ``data.columns``); a column not in the row is left alone. Raises
    DataError when a row has both a mapped column and a column of the name it maps to."""
    if not columns or not isinstance(row, dict):
        return row
    mapped = set(columns.values())
    out = {k: v for k, v in row.items() if k not in mapped}
    for name, column in columns.items():
        if column in row:
            if name in out:
                raise DataError(f"{where}: has both '{column}' (data.columns.{name}) and "
                                f"'{name}'; drop or rename one of them")
            out[name] = row[column]
    return out


def _string(row: dict, key: str, where: str, name: str, required: bool = True) -> str:
    """``row[key]`` as a string; ``name`` is how errors call the field."""
    if key not in row:
        if required:
            raise DataError(f"{where}: {name} is missing")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {name} must be a string, got {type(value).__name__}")
    return value


def _content_id(row: dict) -> str:
    content = {k: row[k] for k in CONTENT_FIELDS if k in row}
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False).encode()
    return "h" + hashlib.sha256(blob).hexdigest()[:16]


def _turns(row: dict, key: str, where: str, column: str) -> list[dict]:
    """A chat row's turns as ``{"role", "content"}``: ``messages`` (role/content) or ShareGPT's
    ``conversations`` (from/value: human, gpt, system); ``column`` is the input's name for it."""
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{column}' must be a non-empty list")
    speaker, text, roles = (("role", "content", {r: r for r in ROLES}) if key == "messages"
                            else ("from", "value", SHAREGPT_ROLES))
    clean = []
    for i, m in enumerate(turns):
        at = f"{where}: {column}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at} must be an object with {speaker} and {text}")
        role = _string(m, speaker, at, f"field '{speaker}'")
        content = _string(m, text, at, f"field '{text}'")
        if role not in roles:
            raise DataError(f"{at}.{speaker} is {role!r}; expected one of {', '.join(roles)}")
        clean.append({"role": roles[role], "content": content})
    return clean


def _history(row: dict, where: str, name: str) -> list[dict]:
    """LLaMA-Factory's Alpaca ``history``: earlier ``[instruction, response]`` pairs, as turns."""
    history = row.get("history", [])
    if not isinstance(history, list) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(t, str) for t in p)
            for p in history):
        raise DataError(f"{where}: {name} must be a list of [instruction, response] pairs of "
                        f"strings")
    return [{"role": role, "content": text} for pair in history
            for role, text in zip(("user", "assistant"), pair)]


def _check_chat(turns: list[dict], where: str, column: str) -> None:
    for i, m in enumerate(turns):
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: {column}[{i}]: empty assistant response")
    if not any(m["role"] == "assistant" for m in turns):
        raise DataError(f"{where}: field '{column}' has no assistant turn to train on")
    first = next((i for i, m in enumerate(turns) if m["role"] != "system"), None)
    if turns[first]["role"] != "user":
        raise DataError(f"{where}: {column}[{first}] is an assistant turn; a conversation "
                        f"starts with a user turn (after an optional system turn)")


def parse_row(row, where: str, default_source: str,
              columns: dict[str, str] | None = None) -> Example:
    """Turn one row into an Example; raise DataError naming the field as the input spells it.

    ``columns`` (``data.columns``) maps evotune's field names to the input's columns. A null
    in one of the row fields (:data:`ROW_FIELDS`) is an absent field; other fields keep it.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    columns = columns or {}
    row = {k: v for k, v in rename_columns(row, columns, where).items()
           if v is not None or k not in ROW_FIELDS}

    def name(key: str) -> str:
        return (f"field '{columns[key]}' (data.columns.{key})" if key in columns
                else f"field '{key}'")

    if "id" in row:
        if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
            raise DataError(f"{where}: {name('id')} must be a string or an integer")
        ex_id = str(row["id"])
        if not ex_id.strip():
            raise DataError(f"{where}: {name('id')} is empty")
    else:
        ex_id = _content_id(row)
    source = _string(row, "source", where, name("source"), required=False) or default_source
    extra = {k: v for k, v in row.items() if k not in ROW_FIELDS}
    system = _string(row, "system", where, name("system"), required=False)
    lead = [{"role": "system", "content": system}] if system.strip() else []
    chat = [k for k in ("messages", "conversations") if k in row]
    if len(chat) == 2:
        raise DataError(f"{where}: has both {name('messages')} and {name('conversations')}; a "
                        f"row is one conversation")
    if chat:
        key = chat[0]
        column = columns.get(key, key)
        turns = _turns(row, key, where, column)
        if lead and turns[0]["role"] == "system":
            raise DataError(f"{where}: has both {name('system')} and a system turn in "
                            f"'{column}'")
        _check_chat(turns, where, column)
        return Example(ex_id, source, lead + turns, where, None, extra)
    instruction = _string(row, "instruction", where, name("instruction"))
    inp = _string(row, "input", where, name("input"), required=False)
    output = _string(row, "output", where, name("output"))
    if not instruction.strip():
        raise DataError(f"{where}: {name('instruction')} is empty")
    if not output.strip():
        raise DataError(f"{where}: {name('output')} is empty (an empty response has nothing to "
                        f"train on)")
    user = instruction + ("\n\n" + inp if inp.strip() else "")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    history = _history(row, where, name("history"))
    if lead or history:        # LLaMA-Factory's Alpaca with a system prompt or earlier turns
        return Example(ex_id, source, lead + history + messages, where, None, extra)
    alpaca = {"instruction": instruction, "input": inp, "output": output}
    return Example(ex_id, source, messages, where, alpaca, extra)


def load_examples(path: str | Path, on_error: str = "error", limit: int = 0,
                  columns: dict[str, str] | None = None) -> tuple[list[Example], LoadReport]:
    """Read every row of an input (any form :mod:`evotune.trainer.sources` reads); ``limit``
    > 0 keeps the first rows only; ``columns``: ``data.columns``.

    ``on_error="skip"`` drops malformed rows and lists them in the report; "error" raises
    DataError at the first one. Duplicate ids always raise, naming both rows. An input without
    rows raises DataError.
    """
    report = LoadReport()
    return list(iter_examples(path, on_error, limit, columns, report)), report


def iter_examples(path: str | Path, on_error: str = "error", limit: int = 0,
                  columns: dict[str, str] | None = None, report: LoadReport | None = None
                  ) -> Iterator[Example]:
    """:func:`load_examples` one row at a time (what builds the token cache: the pool is never
    a list of rows). ``report`` gets the skipped rows as they are met; the errors are
    :func:`load_examples`' (an input without usable rows: at the end). Holds each row's id and
    where it came from, to name duplicates."""
    report = report if report is not None else LoadReport()
    seen: dict[str, str] = {}
    source = name_of(path)
    id_column = (columns or {}).get("id", "id")
    for where, row in read_rows(path):
        if limit and len(seen) >= limit:
            break
        try:
            if isinstance(row, DataError):
                raise row
            ex = parse_row(row, where, source, columns)
        except DataError as e:
            if on_error == "skip":
                report.skipped.append((where, str(e)))
                continue
            raise
        if ex.id in seen:
            if row.get(id_column) is not None:
                raise DataError(f"duplicate id {ex.id!r}: {seen[ex.id]} and {where}; ids must be"
                                f" unique (drop the '{id_column}' field to use content hashes)")
            raise DataError(f"duplicate rows: {where} has the same content as {seen[ex.id]} "
                            f"(content hash {ex.id}); remove one of them or give each an 'id'")
        seen[ex.id] = where
        yield ex
    if not seen:
        raise DataError(f"{path}: no usable rows"
                        + (f" ({len(report.skipped)} skipped)" if report.skipped else ""))


# ----------------------------------------------------------------------------- templates

def resolve_template(template: str, tokenizer) -> str:
    """``auto`` → ``chat`` when the tokenizer has a chat template, else ``alpaca``."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise DataError("data.template is 'chat' but the tokenizer has no chat template; "
                        "use data.template=alpaca or auto")
    if template == "auto":
        return "chat" if has_chat else "alpaca"
    return template


def _alpaca_segments(ex: Example, tokenizer) -> list[tuple[str, bool]]:
    """(text, is_response) pieces of an example under the Alpaca template."""
    eos = tokenizer.eos_token or ""
    if ex.alpaca is None:
        # Chat rows under the Alpaca template: each user turn becomes an instruction block
        # (after a blank line from the previous turn), each assistant turn its response.
        pieces, system = [], ""
        for m in ex.messages:
            if m["role"] == "system":
                system = m["content"] + "\n\n"
            elif m["role"] == "user":
                block = system + ALPACA_NO_INPUT.format(instruction=m["content"])
                pieces.append((("\n\n" if pieces else "") + block, False))
                system = ""
            else:
                pieces.append((m["content"] + eos, True))
        return pieces
    a = ex.alpaca
    prompt = (ALPACA_WITH_INPUT if a["input"].strip() else ALPACA_NO_INPUT).format(**a)
    return [(prompt, False), (a["output"] + eos, True)]


def _chat_segments(ex: Example, tokenizer) -> list[tuple[str, bool]]:
    """(text, is_response) pieces under the tokenizer's chat template.

    Each assistant turn is the text the template adds between "prompt up to this turn with the
    generation prompt" and "conversation up to and including this turn". The template must
    render each shorter conversation as a prefix of the longer one (ChatML and Llama-3 do).
    """
    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    pieces, done = [], ""
    for i, m in enumerate(ex.messages):
        if m["role"] != "assistant":
            continue
        prompt = render(ex.messages[:i], True)
        upto = render(ex.messages[: i + 1], False)
        if not prompt.startswith(done) or not upto.startswith(prompt):
            raise DataError(f"{ex.where}: the chat template does not render turns as prefixes "
                            f"of the conversation; use data.template=alpaca")
        pieces += [(prompt[len(done):], False), (upto[len(prompt):], True)]
        done = upto
    full = render(ex.messages, False)
    if full.startswith(done) and len(full) > len(done):
        pieces.append((full[len(done):], False))
    return pieces


def segments(ex: Example, tokenizer, template: str) -> list[tuple[str, bool]]:
    """The (text, is_response) pieces of ``ex`` under ``template`` (``chat`` or ``alpaca``)."""
    return _chat_segments(ex, tokenizer) if template == "chat" else _alpaca_segments(ex, tokenizer)


def bos_prefix(tokenizer, template: str) -> list[int]:
    """The BOS token the Alpaca template starts with when the tokenizer would add it itself
    (the chat template writes its own)."""
    bos = tokenizer.bos_token_id
    if template == "alpaca" and bos is not None and tokenizer("a").input_ids[:1] == [bos]:
        return [bos]
    return []


def encode(ex: Example, tokenizer, template: str, max_length: int) -> Encoded:
    """Token ids and response-only labels of ``ex``, truncated on the right to ``max_length``.

    Each piece is tokenised on its own and the ids concatenated, so the label mask is exact.
    Raises DataError when no response token survives truncation.
    """
    parts = segments(ex, tokenizer, template)
    pieces = [tokenizer(text, add_special_tokens=False).input_ids for text, _ in parts]
    return assemble(ex, bos_prefix(tokenizer, template), pieces, [r for _, r in parts],
                    max_length)


def assemble(ex: Example, prefix: list[int], pieces: list[list[int]], is_response: list[bool],
             max_length: int) -> Encoded:
    """An example's encoding from its tokenised pieces (see :func:`encode`)."""
    ids: list[int] = list(prefix)
    labels: list[int] = [IGNORE_INDEX] * len(prefix)
    for piece, response in zip(pieces, is_response):
        ids += piece
        labels += piece if response else [IGNORE_INDEX] * len(piece)
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE_INDEX for t in labels):
        n_prompt = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
        raise DataError(f"{ex.where}: no response token fits in data.max_length={max_length} "
                        f"(the prompt takes {n_prompt}+ tokens); raise data.max_length or drop "
                        f"the row (data.on_error=skip)")
    return Encoded(ids, labels, truncated)


def encode_prompt(text: str, tokenizer, template: str, max_length: int) -> Encoded:
    """A prompt alone, as the model sees it just before answering: the user turn and the
    response header under the chat template (its generation prompt), or the Alpaca prompt up to
    ``### Response:``. No token is a label; truncated on the right to ``max_length``."""
    if template == "chat":
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        bos = tokenizer.bos_token_id
        add_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
        ids = ([bos] if add_bos else []) + tokenizer(
            ALPACA_NO_INPUT.format(instruction=text), add_special_tokens=False).input_ids
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    return Encoded(ids, [IGNORE_INDEX] * len(ids), truncated)


def encode_all(examples: list[Example], tokenizer, template: str, max_length: int,
               on_error: str) -> tuple[list[Example], list[Encoded], LoadReport]:
    """Encode every example; with ``on_error="skip"`` drop those that cannot be trained on."""
    kept, encoded, report = [], [], LoadReport()
    for ex in examples:
        try:
            enc = encode(ex, tokenizer, template, max_length)
        except DataError as e:
            if on_error == "skip":
                report.skipped.append((ex.where, str(e)))
                continue
            raise
        kept.append(ex)
        encoded.append(enc)
    return kept, encoded, report


@dataclass
class ChoiceSet:
    """Multiple-choice eval rows, each choice encoded as the row's response.

    ``encoded`` holds every choice of every row back to back; row ``i`` (eval example
    ``rows[i]``) owns ``encoded[starts[i]: starts[i] + counts[i]]`` and its gold answer is choice
    ``gold[i]``, encoded exactly as the example itself.
    """
    encoded: list[Encoded]
    starts: list[int]
    counts: list[int]
    gold: list[int]
    rows: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.starts)


def _gold_response(ex: Example) -> str:
    if ex.alpaca is not None:
        return ex.alpaca["output"]
    return [m for m in ex.messages if m["role"] == "assistant"][-1]["content"]


def _with_response(ex: Example, response: str) -> Example:
    messages = [dict(m) for m in ex.messages]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages[last]["content"] = response
    alpaca = dict(ex.alpaca, output=response) if ex.alpaca is not None else None
    return Example(ex.id, ex.source, messages, ex.where, alpaca, ex.extra)


def choice_set(examples: list[Example], tokenizer, template: str, max_length: int,
               on_error: str = "error") -> ChoiceSet:
    """Encode the rows that carry ``choices`` (a list of answer strings, the gold one among
    them) for accuracy by ranking: the choice with the highest summed log-likelihood of its
    response tokens wins (lm-evaluation-harness's unnormalised ``acc``).

    Rows without the field are left out. A malformed field raises DataError naming the row
    (``on_error="skip"``: the row is listed in ``skipped``); a row with a choice that does not
    fit in ``max_length`` whole is always skipped, since a cut answer would be compared unfairly.
    """
    out = ChoiceSet([], [], [], [])
    for index, ex in enumerate(examples):
        choices = ex.extra.get("choices")
        if choices is None:
            continue
        try:
            if (not isinstance(choices, list) or len(choices) < 2
                    or not all(isinstance(c, str) and c.strip() for c in choices)):
                raise DataError(f"{ex.where}: field 'choices' must be a list of at least 2 "
                                f"non-empty strings")
            if len(set(choices)) != len(choices):
                raise DataError(f"{ex.where}: field 'choices' repeats an answer")
            gold = _gold_response(ex)
            if gold not in choices:
                raise DataError(f"{ex.where}: the answer {gold[:60]!r} is not one of its "
                                f"'choices'")
        except DataError as e:
            if on_error != "skip":
                raise
            out.skipped.append((ex.where, str(e)))
            continue
        try:
            encoded = [encode(_with_response(ex, c), tokenizer, template, max_length)
                       for c in choices]
        except DataError as e:
            out.skipped.append((ex.where, str(e)))
            continue
        if any(e.truncated for e in encoded):
            out.skipped.append((ex.where, f"a choice does not fit in max_length={max_length}"))
            continue
        out.starts.append(len(out.encoded))
        out.counts.append(len(choices))
        out.gold.append(choices.index(gold))
        out.rows.append(index)
        out.encoded += encoded
    return out


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask``, ``labels`` of shape (B, T)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Group positions into batches of similar length (sorted by length, ties by position).

    The plan depends only on the lengths and the batch size, never on the number of ranks, so
    every example is computed in the same batch (same padding, same numbers) on 1 or N ranks.
    """
    # by length, ties by position: lexsort's last key is the primary one
    order = np.lexsort((np.arange(len(lengths)), np.asarray(lengths, dtype=np.int64))).tolist()
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def lengths(encoded) -> list[int] | np.ndarray:
    """Token count of every encoding (a :class:`~evotune.trainer.tokens.TokenizedPool` knows
    them without materialising a row)."""
    found = getattr(encoded, "lengths", None)
    return found if found is not None else [len(e.input_ids) for e in encoded]


class Rows(Sequence):
    """Some rows of a sequence of encodings, in the given order, without copying them."""

    def __init__(self, base, rows):
        self.base, self.rows = base, np.asarray(rows, dtype=np.int64)
        found = getattr(base, "lengths", None)
        self.lengths = None if found is None else np.asarray(found)[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k):
        return self.base[int(self.rows[k])]


def shard_batches(batches: list[list[int]], rank: int, world_size: int
                  ) -> list[tuple[list[int], bool]]:
    """This rank's batches (round-robin), padded so every rank makes the same number of calls.

    Returns ``(positions, is_padding)`` pairs; padding repeats the first batch and its results
    must be discarded. Equal call counts keep ZeRO-3's parameter gathers in step across ranks.
    """
    calls = -(-len(batches) // world_size)
    mine = [(b, False) for b in batches[rank::world_size]]
    pad = calls - len(mine)
    return mine + ([(batches[0], True)] * pad if pad else [])
