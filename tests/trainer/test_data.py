"""Data: reading rows, ids, errors naming file/line/field, templates and response-only labels,
padding, batch plans and sharding, and the tokenizer/model-path helpers."""

from __future__ import annotations

import copy
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from evotune.trainer.data import (ALPACA_NO_INPUT, ALPACA_WITH_INPUT, IGNORE_INDEX, DataError,
                                  Encoded, collate, encode, encode_all, load_examples, parse_row,
                                  plan_batches, resolve_template, shard_batches)
from evotune.trainer.model import load_tokenizer, resolve_model_path

GOOD = {"instruction": "Add 2 and 3.", "output": "5"}
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "Yes, more."}]


def write_jsonl(path: Path, rows) -> Path:
    """One line per row: dicts are JSON-encoded, strings written as they are."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load_error(path: Path, on_error: str = "error") -> str:
    with pytest.raises(DataError) as e:
        load_examples(path, on_error)
    return str(e.value)


def example(row: dict, where: str = "rows.jsonl:1"):
    return parse_row(row, where, "rows")


def labelled_spans(enc: Encoded) -> list[list[int]]:
    """The runs of consecutive labelled tokens; checks that labels equal the ids there."""
    spans, current = [], []
    for tok, lab in zip(enc.input_ids, enc.labels):
        if lab == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert lab == tok
            current.append(tok)
    return spans + ([current] if current else [])


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


# ----------------------------------------------------------------------------- rows

def test_alpaca_row_parses(tmp_path):
    path = write_jsonl(tmp_path / "pool.jsonl", [
        {"instruction": "Sum.", "input": "2 3", "output": "5", "category": "math"}])
    (ex,), report = load_examples(path)
    assert ex.messages == [{"role": "user", "content": "Sum.\n\n2 3"},
                           {"role": "assistant", "content": "5"}]
    assert ex.alpaca == {"instruction": "Sum.", "input": "2 3", "output": "5"}
    assert ex.source == "pool"                          # the file's stem by default
    assert ex.extra == {"category": "math"}
    assert ex.where == f"{path}:1"
    assert report.skipped == []


def test_alpaca_row_without_input(tmp_path):
    (ex,), _ = load_examples(write_jsonl(tmp_path / "p.jsonl", [{**GOOD, "source": "dolly"}]))
    assert ex.messages[0] == {"role": "user", "content": "Add 2 and 3."}
    assert ex.alpaca["input"] == ""
    assert ex.source == "dolly"


def test_chat_row_parses(tmp_path):
    messages = [{**m, "name": "x"} for m in CHAT]        # extra keys in a turn are dropped
    (ex,), _ = load_examples(write_jsonl(tmp_path / "p.jsonl", [{"messages": messages}]))
    assert ex.messages == CHAT
    assert ex.alpaca is None


def test_content_hash_ids_are_stable_and_content_sensitive(tmp_path):
    a = example(GOOD, "a.jsonl:1")
    assert example(dict(GOOD), "b.jsonl:9").id == a.id      # same content, elsewhere
    assert example({**GOOD, "source": "other", "extra": 1}).id == a.id   # not content
    assert example({**GOOD, "output": "6"}).id != a.id
    assert example({**GOOD, "input": "x"}).id != a.id
    assert example({"messages": CHAT}).id != example({"messages": CHAT[:3]}).id
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, {**GOOD, "output": "6"}])
    first, _ = load_examples(path)
    second, _ = load_examples(path)
    assert [e.id for e in first] == [e.id for e in second] == [a.id, first[1].id]
    assert first[0].id != first[1].id


def test_explicit_ids_are_used_as_is(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{**GOOD, "id": "abc"}, {**GOOD, "id": 7}])
    examples, _ = load_examples(path)
    assert [e.id for e in examples] == ["abc", "7"]


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, "", '{"instruction": "a", "output":'])
    message = load_error(path)
    assert message.startswith(f"{path}:3:") and "malformed JSON" in message


@pytest.mark.parametrize("row, fragment", [
    ({"instruction": "a"}, "field 'output' is missing"),
    ({"output": "b"}, "field 'instruction' is missing"),
    ({"instruction": 5, "output": "b"}, "field 'instruction' must be a string"),
    ({"instruction": "a", "input": 3, "output": "b"}, "field 'input' must be a string"),
    ({"instruction": "a", "output": "  "}, "field 'output' is empty"),
    ({"instruction": " ", "output": "b"}, "field 'instruction' is empty"),
    ({**GOOD, "id": True}, "field 'id'"),
    ({**GOOD, "id": " "}, "field 'id'"),
    ({**GOOD, "source": 3}, "field 'source'"),
    ({"messages": []}, "field 'messages'"),
    ({"messages": "hi"}, "field 'messages'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
     "messages[1].role is 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "field 'messages' has no assistant"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
     "messages[0]: field 'content' is missing"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     "messages[1]: empty assistant response"),
    ({"messages": ["hi"]}, "messages[0]"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_row_names_file_line_and_field(tmp_path, row, fragment):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, row])
    message = load_error(path)
    assert message.startswith(f"{path}:2:"), message
    assert fragment in message


@pytest.mark.parametrize("on_error", ["error", "skip"])
def test_duplicate_ids_name_both_lines(tmp_path, on_error):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {**GOOD, "id": "x"}, {"instruction": "b", "output": "c"}, {"instruction": "d",
                                                                   "output": "e", "id": "x"}])
    message = load_error(path, on_error)
    assert "'x'" in message and f"{path}:1" in message and f"{path}:3" in message


def test_identical_rows_without_ids_are_duplicates(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, {"instruction": "b", "output": "c"}, GOOD])
    message = load_error(path, "skip")
    assert f"{path}:1" in message and f"{path}:3" in message


def test_skip_drops_bad_rows_and_reports_them(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        GOOD, {"instruction": "a"}, "{oops", {"instruction": "b", "output": "c"}])
    examples, report = load_examples(path, on_error="skip")
    assert [e.where for e in examples] == [f"{path}:1", f"{path}:4"]
    assert [where for where, _ in report.skipped] == [f"{path}:2", f"{path}:3"]
    assert "field 'output' is missing" in report.skipped[0][1]
    assert "malformed JSON" in report.skipped[1][1]


def test_limit_keeps_the_first_rows(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"instruction": str(i), "output": "o"}
                                              for i in range(5)])
    examples, _ = load_examples(path, limit=2)
    assert [e.alpaca["instruction"] for e in examples] == ["0", "1"]


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, text):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    assert "no usable rows" in load_error(path)


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "a"}, "{oops"])
    message = load_error(path, "skip")
    assert "no usable rows" in message and "2 skipped" in message


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_examples(tmp_path / "nope.jsonl")


def test_json_array_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([GOOD, {"instruction": "a"}, {"messages": CHAT}], indent=2))
    message = load_error(path)
    assert message.startswith(f"{path}: item 1:") and "'output'" in message
    examples, report = load_examples(path, on_error="skip")
    assert [e.where for e in examples] == [f"{path}: item 0", f"{path}: item 2"]
    assert [w for w, _ in report.skipped] == [f"{path}: item 1"]


def test_invalid_json_array_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n')
    assert str(path) in load_error(path, "skip")


# ----------------------------------------------------------------------------- encoding

def test_alpaca_encoding_labels_exactly_the_output_and_eos(tokenizer):
    ex = example(GOOD)
    enc = encode(ex, tokenizer, "alpaca", 512)
    prompt = ids_of(tokenizer, ALPACA_NO_INPUT.format(instruction="Add 2 and 3."))
    n = len(prompt)
    assert enc.input_ids[:n] == prompt                      # no BOS: SmolLM2 adds none
    assert enc.labels[:n] == [IGNORE_INDEX] * n
    assert enc.labels[n:] == enc.input_ids[n:]
    assert tokenizer.decode(enc.labels[n:]) == "5" + tokenizer.eos_token
    assert enc.input_ids[-1] == tokenizer.eos_token_id
    assert enc.n_response == len(enc.input_ids) - n and not enc.truncated


def test_alpaca_encoding_with_input_uses_the_input_prompt(tokenizer):
    ex = example({"instruction": "Sum.", "input": "2 3", "output": "It is 5."})
    enc = encode(ex, tokenizer, "alpaca", 512)
    assert tokenizer.decode(enc.input_ids) == (
        ALPACA_WITH_INPUT.format(instruction="Sum.", input="2 3") + "It is 5." +
        tokenizer.eos_token)
    (span,) = labelled_spans(enc)
    assert tokenizer.decode(span) == "It is 5." + tokenizer.eos_token


def test_chat_encoding_labels_exactly_the_assistant_turns(tokenizer):
    enc = encode(example({"messages": CHAT}), tokenizer, "chat", 512)
    spans = [tokenizer.decode(s) for s in labelled_spans(enc)]
    # The ChatML template ends a turn with "<|im_end|>\n"; the newline is part of the turn the
    # template adds, so it is labelled too.
    assert spans == ["Hello!<|im_end|>\n", "Yes, more.<|im_end|>\n"]
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(enc.input_ids) == full
    assert enc.input_ids == ids_of(tokenizer, full)      # same tokens as the whole text
    assert not enc.truncated


def test_chat_encoding_keeps_the_templates_default_system_prompt_unlabelled(tokenizer):
    messages = CHAT[1:3]                                   # no system turn
    enc = encode(example({"messages": messages}), tokenizer, "chat", 512)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "<|im_start|>system" in full                    # injected by the template
    assert tokenizer.decode(enc.input_ids) == full
    assert [tokenizer.decode(s) for s in labelled_spans(enc)] == ["Hello!<|im_end|>\n"]


def test_chat_row_under_alpaca_template(tokenizer):
    enc = encode(example({"messages": CHAT}), tokenizer, "alpaca", 512)
    eos = tokenizer.eos_token
    assert tokenizer.decode(enc.input_ids) == (
        "Be brief.\n\n" + ALPACA_NO_INPUT.format(instruction="Hi there") + "Hello!" + eos +
        "\n\n" + ALPACA_NO_INPUT.format(instruction="More?") + "Yes, more." + eos)
    assert [tokenizer.decode(s) for s in labelled_spans(enc)] == ["Hello!" + eos,
                                                                  "Yes, more." + eos]


def test_truncation_sets_the_flag_and_keeps_labels_aligned(tokenizer):
    ex = example({"instruction": "Count.", "output": "one two three four five six seven"})
    full = encode(ex, tokenizer, "alpaca", 4096)
    n_prompt = next(i for i, t in enumerate(full.labels) if t != IGNORE_INDEX)
    assert full.n_response > 3
    cut = encode(ex, tokenizer, "alpaca", n_prompt + 3)
    assert cut.truncated
    assert cut.input_ids == full.input_ids[: n_prompt + 3]
    assert cut.labels == full.labels[: n_prompt + 3]
    assert cut.n_response == 3
    exact = encode(ex, tokenizer, "alpaca", len(full.input_ids))
    assert not exact.truncated and exact.input_ids == full.input_ids


def test_prompt_that_fills_max_length_names_the_row(tokenizer):
    ex = example(GOOD, "pool.jsonl:12")
    n_prompt = len(ids_of(tokenizer, ALPACA_NO_INPUT.format(instruction="Add 2 and 3.")))
    with pytest.raises(DataError, match=r"^pool\.jsonl:12: .*data\.max_length"):
        encode(ex, tokenizer, "alpaca", n_prompt)
    assert encode(ex, tokenizer, "alpaca", n_prompt + 1).n_response == 1


def test_encode_all_skips_and_counts_rows_that_do_not_fit(tokenizer):
    short = example(GOOD, "p.jsonl:1")
    long = example({"instruction": "word " * 100, "output": "x"}, "p.jsonl:2")
    with pytest.raises(DataError, match="p.jsonl:2"):
        encode_all([short, long], tokenizer, "alpaca", 64, "error")
    kept, encoded, report = encode_all([short, long], tokenizer, "alpaca", 64, "skip")
    assert kept == [short]
    assert encoded == [encode(short, tokenizer, "alpaca", 64)]
    assert [w for w, _ in report.skipped] == ["p.jsonl:2"]


def test_resolve_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert resolve_template("auto", tokenizer) == "chat"
    assert resolve_template("auto", plain) == "alpaca"
    assert resolve_template("chat", tokenizer) == "chat"
    assert resolve_template("alpaca", tokenizer) == "alpaca"
    assert resolve_template("alpaca", plain) == "alpaca"
    with pytest.raises(DataError, match="data.template"):
        resolve_template("chat", plain)
    assert tokenizer.chat_template                          # the fixture is untouched


# ----------------------------------------------------------------------------- batches

def test_collate_pads_right():
    pad = 2
    batch = [Encoded([5, 6, 2], [IGNORE_INDEX, 6, 2], False),    # ends with eos == pad id
             Encoded([8, 9, 10, 11], [IGNORE_INDEX, IGNORE_INDEX, 10, 11], False),
             Encoded([7], [7], False)]
    b = collate(batch, pad)
    assert b["input_ids"].tolist() == [[5, 6, 2, 2], [8, 9, 10, 11], [7, 2, 2, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    I = IGNORE_INDEX
    assert b["labels"].tolist() == [[I, 6, 2, I], [I, I, 10, 11], [7, I, I, I]]
    assert all(t.dtype == torch.long for t in b.values())


def test_plan_batches_groups_by_length_ties_by_position():
    # sorted by (length, position): 1(1) 3(1) 2(3) 5(3) 4(4) 0(5)
    assert plan_batches([5, 1, 3, 1, 4, 3], 2) == [[1, 3], [2, 5], [4, 0]]
    assert plan_batches([5, 1, 3, 1, 4, 3], 4) == [[1, 3, 2, 5], [4, 0]]
    assert plan_batches([2, 1], 8) == [[1, 0]]
    assert plan_batches([], 3) == []


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n_batches", range(1, 10))
def test_shard_batches_covers_every_batch_once_with_equal_calls(world_size, n_batches):
    batches = [[10 * i, 10 * i + 1] for i in range(n_batches)]
    shards = [shard_batches(batches, r, world_size) for r in range(world_size)]
    calls = -(-n_batches // world_size)
    assert [len(s) for s in shards] == [calls] * world_size
    real = Counter()
    for r, shard in enumerate(shards):
        flags = [pad for _, pad in shard]
        assert flags == sorted(flags)                    # padding only at the end
        assert [b for b, pad in shard if not pad] == batches[r::world_size]
        assert all(b == batches[0] for b, pad in shard if pad)
        real.update(tuple(b) for b, pad in shard if not pad)
    assert real == Counter(tuple(b) for b in batches)    # each batch exactly once
    if world_size == 1:
        assert not any(pad for _, pad in shards[0])


def test_shard_batches_of_no_batches_is_no_calls():
    # An empty plan (plan_batches of no examples) gives every rank zero calls, in step.
    for world_size in (1, 2, 3, 4):
        for rank in range(world_size):
            assert shard_batches(plan_batches([], 4), rank, world_size) == []


# ----------------------------------------------------------------------------- tokenizer, model path

def tokenizer_copy(smollm_dir: Path, dest: Path, **unset) -> Path:
    """The SmolLM2 tokenizer saved to ``dest`` with the named special tokens removed."""
    tok = AutoTokenizer.from_pretrained(smollm_dir, local_files_only=True)
    for name in unset:
        setattr(tok, name, None)
    tok.save_pretrained(dest)
    shutil.copy(smollm_dir / "config.json", dest / "config.json")
    reloaded = AutoTokenizer.from_pretrained(dest, local_files_only=True)
    assert all(getattr(reloaded, name) is None for name in unset)   # the copy really lacks them
    return dest


def test_load_tokenizer_pads_with_eos_when_there_is_no_pad(smollm_dir, tmp_path):
    tok = load_tokenizer(tokenizer_copy(smollm_dir, tmp_path / "tok", pad_token=None))
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id == tok.eos_token_id == 2
    assert tok.padding_side == "right"


def test_load_tokenizer_without_pad_or_eos_is_an_error(smollm_dir, tmp_path):
    path = tokenizer_copy(smollm_dir, tmp_path / "tok", pad_token=None, eos_token=None)
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        load_tokenizer(path)


def test_fixture_tokenizer_is_as_documented(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    assert tokenizer.padding_side == "right"


def test_resolve_model_path_of_a_missing_dir_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        resolve_model_path(str(missing))


def test_resolve_model_path_of_a_dir_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        resolve_model_path(str(tmp_path))


def test_resolve_model_path_of_an_unknown_embedded_model():
    with pytest.raises(ValueError, match="embedded:nope"):
        resolve_model_path("embedded:nope")


def test_resolve_model_path_of_a_local_dir(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == tiny_model_dir


# ---- multiple-choice eval rows

def test_choice_set_encodes_every_choice_as_the_response(tmp_path, tokenizer):
    from evotune.trainer.data import choice_set
    rows = [dict(GOOD, choices=["4", "5", "6"]), {"instruction": "No choices", "output": "x"},
            {"messages": [{"role": "user", "content": "Pick"},
                          {"role": "assistant", "content": "b"}], "choices": ["b", "a"]}]
    examples, _ = load_examples(write_jsonl(tmp_path / "e.jsonl", rows))
    cs = choice_set(examples, tokenizer, "chat", 64)
    assert (cs.starts, cs.counts, cs.gold, len(cs)) == ([0, 3], [3, 2], [1, 0], 2)
    gold = encode(examples[0], tokenizer, "chat", 64)
    assert cs.encoded[1] == gold                      # the gold choice is the row itself
    first = cs.encoded[0]
    assert tokenizer.decode([t for t in first.labels if t != IGNORE_INDEX]).startswith("4")
    assert first.input_ids[:len(gold.input_ids) - 3] == gold.input_ids[:len(gold.input_ids) - 3]


@pytest.mark.parametrize("choices, fragment", [
    (["5"], "at least 2"), ("5", "at least 2"), (["5", ""], "at least 2"),
    (["5", "5"], "repeats"), (["4", "6"], "is not one of its 'choices'")])
def test_bad_choices_name_the_row(tmp_path, tokenizer, choices, fragment):
    from evotune.trainer.data import choice_set
    path = write_jsonl(tmp_path / "e.jsonl", [GOOD, dict(GOOD, instruction="B", choices=choices)])
    examples, _ = load_examples(path)
    with pytest.raises(DataError, match=fragment) as err:
        choice_set(examples, tokenizer, "chat", 64)
    assert "e.jsonl:2" in str(err.value)


def test_choice_rows_that_do_not_fit_or_are_malformed_are_skipped_when_asked(tmp_path,
                                                                             tokenizer):
    from evotune.trainer.data import choice_set
    rows = [dict(GOOD, choices=["5", "4"]),
            dict(GOOD, instruction="Long", choices=["5", "word " * 200]),
            dict(GOOD, instruction="Bad", choices=["4", "6"])]
    examples, _ = load_examples(write_jsonl(tmp_path / "e.jsonl", rows))
    cs = choice_set(examples, tokenizer, "chat", 64, on_error="skip")
    assert len(cs) == 1
    assert [w.rsplit(":", 1)[1] for w, _ in cs.skipped] == ["2", "3"]
    assert "does not fit" in cs.skipped[0][1]


# ----------------------------------------------------------------------------- bad input at the door

def test_a_byte_order_mark_and_crlf_line_ends_lose_no_row(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in rows).encode())
    examples, report = load_examples(path)
    assert [e.alpaca["instruction"] for e in examples] == ["a", "c"] and not report.skipped
    listed = tmp_path / "bom.json"
    listed.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    assert len(load_examples(listed)[0]) == 2
    listed.write_bytes(b"\xef\xbb\xbf\n \r\n\t" + json.dumps(rows).encode())   # a list after blanks
    assert len(load_examples(listed)[0]) == 2


def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", '
                     b'"output": "d"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at "
                                        r"column 21\)"):
        load_examples(path)


def test_a_folder_that_is_not_a_dataset_says_what_a_folder_can_be(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(DataError, match="is a folder without parquet files or a save_to_disk "
                                        "dataset"):
        load_examples(tmp_path)
    from evotune.trainer.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=f"data.pool: {tmp_path} is a folder without parquet"):
        load_config(None, [f"data.pool={tmp_path}"])


def test_a_conversation_that_starts_with_the_assistant_is_named_as_such(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "system", "content": "s"}, {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    with pytest.raises(DataError, match=r"messages\[1\] is an assistant turn; a conversation "
                                        r"starts with a user turn"):
        load_examples(path)
