"""Target sets (influence's validation sets, RDS's query sets): SFT rows, prompt-only rows and
preference pairs, and their errors."""

import json

import pytest

from helpers import EVAL_TINY, FIXTURES

from evotune.trainer.data import IGNORE_INDEX, DataError, encode_prompt
from evotune.trainer.targets import load_targets


def write(tmp_path, rows, name="val.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_rows_take_subtask_or_source(tokenizer):
    items, skipped = load_targets(EVAL_TINY, tokenizer, "chat", 512)
    assert not skipped and all(it.kind == "sft" and it.encoded.n_response > 0 for it in items)
    assert {it.subtask for it in items} == {json.loads(line)["source"] for line in
                                            EVAL_TINY.read_text().splitlines()}


def test_preference_pairs_encode_both_answers_after_the_same_prompt(tokenizer):
    items, _ = load_targets(FIXTURES / "preference_tiny.jsonl", tokenizer, "chat", 1024)
    assert len(items) == 36 and {it.kind for it in items} == {"preference"}
    it = items[0]
    first = lambda e: next(i for i, t in enumerate(e.labels) if t != IGNORE_INDEX)
    assert it.chosen.input_ids[:first(it.chosen)] == it.rejected.input_ids[:first(it.rejected)]
    assert it.subtask in {"gsm8k", "t0", "self-instruct-seed"}


@pytest.mark.parametrize("row, match", [
    ({"prompt": "p", "chosen": "a"}, "without field 'rejected'"),
    ({"prompt": "p", "chosen": "a", "rejected": ""}, "'rejected' must be a non-empty string"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "the same text"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a non-empty string"),
])
def test_malformed_pairs_name_the_line_and_field(tmp_path, tokenizer, row, match):
    path = write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError, match=match) as e:
        load_targets(path, tokenizer, "chat", 512)
    assert f"{path}:2" in str(e.value)


def test_mixed_kinds_and_duplicates_are_refused(tmp_path, tokenizer):
    mixed = write(tmp_path, [{"instruction": "i", "output": "o"},
                             {"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="not both"):
        load_targets(mixed, tokenizer, "chat", 512)
    dup = write(tmp_path, [{"id": "x", "prompt": "q", "chosen": "a", "rejected": "b"},
                           {"id": "x", "prompt": "r", "chosen": "a", "rejected": "b"}], "d.jsonl")
    with pytest.raises(DataError, match="duplicate validation id 'x'"):
        load_targets(dup, tokenizer, "chat", 512)


def test_too_long_rows_raise_or_are_skipped(tmp_path, tokenizer):
    path = write(tmp_path, [{"instruction": "word " * 400, "output": "o"},
                            {"instruction": "short", "output": "fine"}])
    with pytest.raises(DataError, match="no response token fits"):
        load_targets(path, tokenizer, "chat", 64)
    items, skipped = load_targets(path, tokenizer, "chat", 64, on_error="skip")
    assert len(items) == 1 and len(skipped) == 1 and f"{path}:1" in skipped[0][0]


@pytest.mark.parametrize("preset", ["less.yaml", "rose.yaml"])
def test_preset_validation_sets_fit_their_max_length(preset, tokenizer):
    """Every row of a preset's validation set encodes under the preset's own data.max_length
    with the default model's chat template (a row that does not would stop the run)."""
    from evotune.trainer.config import load_config
    from helpers import REPO
    cfg = load_config(REPO / "configs" / preset)
    items, skipped = load_targets(cfg.influence.validation, tokenizer, "chat",
                                     cfg.data.max_length)
    assert len(items) >= 16 and not skipped


def test_prompt_rows_are_the_prompt_as_the_model_sees_it_before_answering(tmp_path, tokenizer):
    path = write(tmp_path, [{"prompt": "Add 2 and 3.", "subtask": "math", "id": 7},
                            {"instruction": "Say hi.", "output": "Hi."}])
    items, _ = load_targets(path, tokenizer, "chat", 512)
    assert [(it.kind, it.subtask, it.id) for it in items][0] == ("prompt", "math", "7")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Add 2 and 3."}],
                                         tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert items[0].encoded.input_ids == tokenizer(text, add_special_tokens=False).input_ids
    assert set(items[0].encoded.labels) == {IGNORE_INDEX} and items[1].kind == "sft"
    alpaca = encode_prompt("Add 2 and 3.", tokenizer, "alpaca", 512)
    assert tokenizer.decode(alpaca.input_ids).endswith("### Instruction:\nAdd 2 and 3.\n\n"
                                                       "### Response:")


@pytest.mark.parametrize("row, match", [
    ({"prompt": ""}, "'prompt' must be a non-empty string"),
    ({"prompt": "p", "subtask": ["a"]}, "'subtask' must be a non-empty string"),
    ({"prompt": "p", "id": True}, "'id' must be a non-empty string"),
])
def test_malformed_prompt_rows_name_the_field(tmp_path, tokenizer, row, match):
    with pytest.raises(DataError, match=match):
        load_targets(write(tmp_path, [row]), tokenizer, "chat", 512)


def test_prompt_rows_and_pairs_do_not_mix(tmp_path, tokenizer):
    path = write(tmp_path, [{"prompt": "p"}, {"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="not both"):
        load_targets(path, tokenizer, "chat", 512)


def test_malformed_rows_are_skipped_and_counted_with_on_error_skip(tmp_path, tokenizer):
    path = tmp_path / "v.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n[1, 2]\n'
                    '{"instruction": "c", "output": "d", "subtask": {"x": 1}}\n')
    with pytest.raises(DataError, match="malformed JSON"):
        load_targets(path, tokenizer, "chat", 512)
    items, skipped = load_targets(path, tokenizer, "chat", 512, on_error="skip")
    assert len(items) == 1 and len(skipped) == 3
    assert "expected a JSON object" in skipped[1][1] and "'subtask' must be" in skipped[2][1]


def test_pairs_that_share_a_prompt_and_an_answer_are_distinct_items(tmp_path, tokenizer):
    rows = [{"prompt": "p", "chosen": "good", "rejected": f"bad {k}"} for k in range(3)]
    items, _ = load_targets(write(tmp_path, rows), tokenizer, "chat", 512)
    assert len({it.id for it in items}) == 3
    with pytest.raises(DataError, match="duplicate validation id"):
        load_targets(write(tmp_path, rows + rows[:1], "dup.jsonl"), tokenizer, "chat", 512)
