"""The pool's token cache: batched tokenisation gives exactly the per-row encodings, the
memory-mapped pool reads back what was written, and a run builds the cache once and reuses it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import FIXTURES, POOL_TINY, run_train, write_config

from evotune.trainer import tokens
from evotune.trainer.data import (DataError, LoadReport, encode, encode_all, iter_examples,
                                  load_examples)

POOLS = [POOL_TINY, FIXTURES / "pool_mixed.jsonl"]


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("template, max_length", [("chat", 160), ("alpaca", 64), ("chat", 40)])
def test_batched_encoding_is_the_per_row_encoding(tokenizer, pool, template, max_length,
                                                   monkeypatch):
    monkeypatch.setattr(tokens, "BATCH_ROWS", 7)          # several batches, a short last one
    examples, _ = load_examples(pool, "skip")
    pairs = list(tokens.encode_batched(iter(examples), tokenizer, template, max_length))
    assert [ex for ex, _ in pairs] == examples              # every row, in order, once
    for ex, got in pairs:
        try:
            want = encode(ex, tokenizer, template, max_length)
        except DataError as e:
            assert isinstance(got, DataError) and str(got) == str(e)
            continue
        assert got == want


@pytest.mark.parametrize("pool", POOLS)
def test_the_cache_reads_back_what_encode_all_gives(tokenizer, pool, tmp_path):
    examples, _ = load_examples(pool, "skip")
    kept, encoded, report = encode_all(examples, tokenizer, "chat", 96, "skip")
    assert report.skipped                                   # the test covers skipped rows
    where = tmp_path / "cache"
    tokens.build(where, examples, tokenizer, "chat", 96, "skip",
                 load_skipped=[("elsewhere:1", "a row the loading skipped")])
    got_kept, pool_tokens, got_report = tokens.open_cached(where)
    # the rows themselves come back from the cache, every field as loaded
    assert len(got_kept) == len(kept) and list(got_kept) == kept
    assert got_kept[-1] == kept[-1] and got_kept[1:3] == kept[1:3]
    assert got_kept.ids() == [e.id for e in kept]
    assert len(pool_tokens) == len(encoded)
    assert list(pool_tokens) == encoded
    assert pool_tokens.lengths.tolist() == [len(e.input_ids) for e in encoded]
    assert got_report.skipped == [("elsewhere:1", "a row the loading skipped"),
                                  *report.skipped]
    assert pool_tokens[-1] == encoded[-1]
    assert pool_tokens.tokens.dtype == np.int32 and pool_tokens.is_label.dtype == np.uint8
    # 5 bytes per token on disk (plus the offsets and flags)
    assert pool_tokens.tokens.nbytes + pool_tokens.is_label.nbytes == 5 * sum(
        len(e.input_ids) for e in encoded)


def test_a_bad_row_is_refused_as_encode_all_refuses_it(tokenizer, tmp_path):
    examples, _ = load_examples(POOL_TINY, "skip")
    with pytest.raises(DataError) as want:
        encode_all(examples, tokenizer, "chat", 60, "error")
    with pytest.raises(DataError) as got:
        tokens.build(tmp_path / "cache", examples, tokenizer, "chat", 60, "error")
    assert str(got.value) == str(want.value)
    assert not (tmp_path / "cache").exists() and not list(tmp_path.iterdir())   # nothing left


def test_the_cache_builds_from_rows_read_as_they_come(tokenizer, tmp_path):
    """What a run does: the rows streamed from the file into the cache, the loader's skips
    reported as it meets them; the same entry as from a loaded list."""
    lines = POOL_TINY.read_text().splitlines()
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(lines[:3] + ['{"broken": '] + lines[3:]) + "\n")
    examples, loaded = load_examples(pool, "skip")
    tokens.build(tmp_path / "a", examples, tokenizer, "chat", 96, "skip",
                 load_skipped=loaded.skipped)
    report = LoadReport()
    rows = iter_examples(pool, "skip", report=report)
    tokens.build(tmp_path / "b", rows, tokenizer, "chat", 96, "skip",
                 load_skipped=report.skipped)
    a, b = tokens.open_cached(tmp_path / "a"), tokens.open_cached(tmp_path / "b")
    assert list(a[0]) == list(b[0]) == [ex for ex in examples if ex in list(b[0])]
    assert list(a[1]) == list(b[1]) and a[2].skipped == b[2].skipped
    assert b[2].skipped[0][0] == f"{pool}:4" and len(b[2].skipped) > 1   # loading's, then more
    assert next(rows, None) is None                                      # read once


def test_the_key_follows_every_input(tokenizer):
    base = tokens.cache_key("h", "p", tokenizer, "chat", 256, "skip", 0)
    assert base == tokens.cache_key("h", "p", tokenizer, "chat", 256, "skip", 0)
    assert len({base, tokens.cache_key("h2", "p", tokenizer, "chat", 256, "skip", 0),
                tokens.cache_key("h", "p", tokenizer, "alpaca", 256, "skip", 0),
                tokens.cache_key("h", "p", tokenizer, "chat", 128, "skip", 0),
                tokens.cache_key("h", "p", tokenizer, "chat", 256, "error", 0),
                tokens.cache_key("h", "p", tokenizer, "chat", 256, "skip", 10),
                tokens.cache_key("h", "elsewhere/p", tokenizer, "chat", 256, "skip", 0)}) == 7
    assert base == tokens.cache_key("h", Path("p").resolve(), tokenizer, "chat", 256, "skip", 0)
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = original + " "
        assert tokens.cache_key("h", "p", tokenizer, "chat", 256, "skip", 0) != base
    finally:
        tokenizer.chat_template = original


@pytest.mark.e2e
def test_a_run_builds_the_cache_once_and_the_next_reuses_it(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "out",
                       selection={"selector": "random", "rounds": 1, "init_size": 4})
    env = {"EVOTUNE_CACHE": str(tmp_path / "cache")}
    first = run_train(["--config", str(cfg)], env=env)
    entries = list((tmp_path / "cache" / "tokens").iterdir())
    assert len(entries) == 1 and "pool tokens: cached in" in first.stderr
    stamp = (entries[0] / "tokens.npy").stat().st_mtime_ns
    second = run_train(["--config", str(cfg), f"output.dir={tmp_path / 'out2'}"], env=env)
    assert "pool tokens: reused from the cache" in second.stderr
    assert (entries[0] / "tokens.npy").stat().st_mtime_ns == stamp
    # the same rows and picks either way
    report = [json.loads((tmp_path / d / "data_report.json").read_text()) for d in ("out", "out2")]
    assert report[0] == report[1]
    # the same rows in another file: a new entry, whose rows name that file (selected.jsonl is
    # written from them)
    moved = Path(shutil.copy(POOL_TINY, tmp_path / "moved.jsonl"))
    third = run_train(["--config", str(cfg), f"output.dir={tmp_path / 'out3'}",
                       f"data.pool={moved}"], env=env)
    assert "pool tokens: cached in" in third.stderr
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 2
    skipped = json.loads((tmp_path / "out3" / "data_report.json").read_text())
    assert str(moved) in json.dumps(skipped) and str(POOL_TINY) not in json.dumps(skipped)
    assert (tmp_path / "out3" / "selected.jsonl").is_file()
