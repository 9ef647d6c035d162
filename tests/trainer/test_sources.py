"""Inputs beyond JSON: CSV, parquet files, folders and patterns, save_to_disk folders, column
mappings and ShareGPT rows. The JSONL reader (tested on its own in test_data.py) is the
reference: the same rows in another form must give the same examples."""

import csv
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import FIXTURES, POOL_TINY

from evotune.trainer.data import DataError, load_examples, parse_row
from evotune.trainer.selected import convert
from evotune.trainer.sources import files_of, input_hash, read_rows

MIXED = FIXTURES / "pool_mixed.jsonl"       # Alpaca and chat rows


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def table(rows: list[dict]) -> pa.Table:
    """The rows as one table, a column per field any row has (null where a row has none), as
    a dataset hub export has them."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({k: [r.get(k) for r in rows] for k in names})


def same_examples(got, expected) -> None:
    assert [(e.id, e.source, e.messages, e.alpaca, e.extra) for e in got] == \
        [(e.id, e.source, e.messages, e.alpaca, e.extra) for e in expected]


@pytest.fixture(scope="module")
def mixed():
    return load_examples(MIXED)[0]


def test_a_parquet_file_a_folder_of_shards_and_a_pattern_read_like_the_jsonl(tmp_path, mixed):
    rows = rows_of(MIXED)
    pq.write_table(table(rows), tmp_path / "one.parquet")
    folder = tmp_path / "shards" / "data"
    folder.mkdir(parents=True)
    pq.write_table(table(rows[:10]), folder / "train-00000-of-00002.parquet")
    pq.write_table(table(rows[10:]), folder / "train-00001-of-00002.parquet")
    (tmp_path / "shards" / "README.md").write_text("a dataset card, not data")
    for path in (tmp_path / "one.parquet", tmp_path / "shards",
                 f"{tmp_path}/shards/**/train-*.parquet"):
        got, report = load_examples(path)
        same_examples(got, mixed)
        assert not report.skipped
    got, _ = load_examples(tmp_path / "shards")
    assert got[12].where == f"{folder / 'train-00001-of-00002.parquet'}: row 2"


def test_a_save_to_disk_folder_reads_like_the_jsonl(tmp_path, mixed):
    import datasets
    datasets.Dataset(table(rows_of(MIXED))).save_to_disk(str(tmp_path / "saved"), num_shards=3)
    assert len([p for p in (tmp_path / "saved").iterdir() if p.suffix == ".arrow"]) > 1
    got, _ = load_examples(tmp_path / "saved")
    same_examples(got, mixed)
    assert got[5].where == f"{tmp_path / 'saved'}: row 5"
    datasets.DatasetDict({"train": datasets.Dataset(table(rows_of(MIXED)[:4])),
                          "test": datasets.Dataset(table(rows_of(MIXED)[4:8]))}).save_to_disk(
        str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"a DatasetDict with the splits train, test; give one "
                                        r"split's folder \(e.g. .*dict/train\)"):
        load_examples(tmp_path / "dict")
    got, _ = load_examples(tmp_path / "dict" / "test")
    same_examples(got, mixed[4:8])


def test_a_csv_file_reads_like_the_jsonl_and_names_the_line_a_record_starts_on(tmp_path):
    rows = rows_of(POOL_TINY)
    path = tmp_path / "pool.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "source", "instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows)
    got, _ = load_examples(path)
    same_examples(got, load_examples(POOL_TINY)[0])
    # Records span lines (quoted newlines): the first starts on line 2 (after the header), the
    # second after the first one's embedded newlines.
    embedded = sum(str(v).count("\n") for v in rows[0].values())
    assert embedded > 0
    assert (got[0].where, got[1].where) == (f"{path}:2", f"{path}:{3 + embedded}")
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("instruction\toutput\nName a colour.\tRed.\nToo\tmany\tfields\n"
                   "Empty answer\t\n")
    with pytest.raises(DataError, match=r"bad\.tsv:3: 3 fields, but the header names 2"):
        load_examples(tsv)
    got, report = load_examples(tsv, on_error="skip")
    assert [e.messages[1]["content"] for e in got] == ["Red."]
    assert [where for where, _ in report.skipped] == [f"{tsv}:3", f"{tsv}:4"]
    assert "field 'output' is missing" in report.skipped[1][1]      # an empty cell is a null


def test_a_bad_row_in_a_shard_is_named_by_shard_and_row(tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    pq.write_table(table([{"instruction": "a", "output": "b"}] * 1 + [
        {"instruction": "c", "output": "d"}]), folder / "part-0.parquet")
    pq.write_table(table([{"instruction": "e", "output": "f"},
                          {"instruction": "g", "output": " "}]), folder / "part-1.parquet")
    with pytest.raises(DataError, match=r"part-1\.parquet: row 1: field 'output' is empty"):
        load_examples(folder)
    got, report = load_examples(folder, on_error="skip")
    assert len(got) == 3 and report.skipped[0][0] == f"{folder / 'part-1.parquet'}: row 1"
    (folder / "part-2.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"part-2\.parquet: not a readable parquet file"):
        load_examples(folder, on_error="skip")


def test_folders_and_patterns_that_are_not_one_input_are_refused(tmp_path):
    hub = tmp_path / "snapshot" / "data"
    hub.mkdir(parents=True)
    for name in ("train-00000-of-00001.parquet", "test-00000-of-00001.parquet"):
        pq.write_table(table([{"instruction": name, "output": "x"}]), hub / name)
    with pytest.raises(DataError, match=r"parquet shards of the splits test, train; read one of "
                                        r"them with a pattern, e.g. .*snapshot/\*\*/train-\*"):
        files_of(tmp_path / "snapshot")
    assert len(load_examples(f"{tmp_path}/snapshot/**/train-*.parquet")[0]) == 1
    (hub / "notes.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="a pattern reads parquet files only"):
        files_of(f"{hub}/*")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        files_of(f"{hub}/validation-*.parquet")
    with pytest.raises(FileNotFoundError) as e:
        load_examples(tmp_path / "HuggingFaceH4" / "ultrachat_200k")
    assert "if 'HuggingFaceH4/ultrachat_200k' is a Hugging Face Hub id" in str(e.value)
    assert "nothing is downloaded" in str(e.value)


def test_the_pool_hash_covers_every_shard_and_the_column_mapping(tmp_path):
    single = tmp_path / "pool.jsonl"
    single.write_bytes(POOL_TINY.read_bytes())
    assert input_hash(single) == hashlib.sha256(POOL_TINY.read_bytes()).hexdigest()
    assert input_hash(single, {"output": "completion"}) != input_hash(single)
    folder = tmp_path / "shards"
    folder.mkdir()
    rows = rows_of(POOL_TINY)
    pq.write_table(table(rows[:20]), folder / "a.parquet")
    pq.write_table(table(rows[20:]), folder / "b.parquet")
    before = input_hash(folder)
    pq.write_table(table(rows[20:39]), folder / "b.parquet")       # the last shard lost a row
    assert input_hash(folder) != before
    pq.write_table(table(rows[20:]), folder / "b.parquet")
    assert input_hash(folder) == before
    pq.write_table(table(rows[:1]), folder / "c.parquet")          # a shard more
    assert input_hash(folder) != before


def test_column_mapping_reads_other_names_and_errors_name_the_inputs_column(tmp_path, mixed):
    names = {"instruction": "prompt", "input": "context", "output": "completion",
             "messages": "turns", "id": "uid"}
    rows = [{names.get(k, k): v for k, v in r.items()} for r in rows_of(MIXED)]
    pq.write_table(table(rows), tmp_path / "renamed.parquet")
    got, _ = load_examples(tmp_path / "renamed.parquet", columns=names)
    same_examples(got, mixed)
    with pytest.raises(DataError, match=r"renamed\.parquet: row 0: field 'prompt' \(data.columns"
                                        r"\.instruction\) is missing"):
        load_examples(tmp_path / "renamed.parquet", columns={**names, "messages": "chat"})
    with pytest.raises(DataError, match=r"row 3: has both 'prompt' \(data.columns.instruction\) "
                                        r"and 'instruction'"):
        parse_row({"prompt": "a", "instruction": "b", "output": "c"}, "row 3", "x",
                  {"instruction": "prompt"})
    from evotune.trainer.config import ConfigError, load_config
    cfg = load_config(None, [f"data.pool={tmp_path / 'renamed.parquet'}",
                             "data.columns.instruction=prompt", "data.columns.output=completion"])
    assert cfg.data.columns.mapping() == {"instruction": "prompt", "output": "completion"}
    with pytest.raises(ConfigError, match=r"data.columns.output: column 'prompt' is also "
                                          r"data.columns.instruction"):
        load_config(None, [f"data.pool={tmp_path / 'renamed.parquet'}",
                           "data.columns.instruction=prompt", "data.columns.output=prompt"])
    with pytest.raises(ConfigError, match="did you mean 'instruction'"):
        load_config(None, [f"data.pool={tmp_path / 'renamed.parquet'}",
                           "data.columns.instructions=prompt"])


def test_sharegpt_and_llama_factory_alpaca_rows_become_conversations():
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}]
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."},
                                  {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello."},
                                  {"from": "human", "value": "2+2?"},
                                  {"from": "gpt", "value": "4"}]}
    assert parse_row(sharegpt, "w", "s").messages == turns
    top_system = {"system": "Be brief.", "conversations": sharegpt["conversations"][1:]}
    assert parse_row(top_system, "w", "s").messages == turns
    alpaca = {"system": "Be brief.", "history": [["Hi", "Hello."]], "instruction": "2+2?",
              "output": "4"}
    ex = parse_row(alpaca, "w", "s")
    assert ex.messages == turns and ex.alpaca is None
    # the alpaca export of a conversation reads back as the same conversation
    exported = convert({"messages": turns, "evotune_round": 0, "evotune_pick_order": 0},
                       "alpaca")
    assert parse_row(exported, "w", "s").messages == turns
    with pytest.raises(DataError, match=r"w: conversations\[1\]\.from is 'bing'; expected one "
                                        r"of human, user, gpt, assistant, system"):
        parse_row({"conversations": [{"from": "human", "value": "a"},
                                     {"from": "bing", "value": "b"}]}, "w", "s")
    with pytest.raises(DataError, match="has both field 'system' and a system turn"):
        parse_row({**sharegpt, "system": "x"}, "w", "s")
    with pytest.raises(DataError, match=r"field 'history' must be a list of \[instruction, "
                                        r"response\] pairs"):
        parse_row({**alpaca, "history": [["only one"]]}, "w", "s")


def test_nulls_are_absent_row_fields_but_other_columns_keep_them(tmp_path):
    ex = parse_row({"instruction": "a", "input": None, "output": "b", "id": None,
                    "label": None}, "w", "s")
    assert ex.alpaca == {"instruction": "a", "input": "", "output": "b"}
    assert ex.id.startswith("h") and ex.extra == {"label": None}
    rows = list(read_rows(MIXED))
    assert rows[0] == (f"{MIXED}:1", rows_of(MIXED)[0])


def test_a_moved_folder_is_the_same_input_and_another_folder_is_not(tmp_path):
    """A resume accepts an input path that changed when the content is the same (a copied
    project); two folders of different shards are not the same input."""
    import shutil
    from evotune.trainer.state import same_input
    rows = rows_of(POOL_TINY)
    a = tmp_path / "a"
    a.mkdir()
    pq.write_table(table(rows[:20]), a / "part-0.parquet")
    pq.write_table(table(rows[20:]), a / "part-1.parquet")
    shutil.copytree(a, tmp_path / "copy")
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(table(rows[:20]), other / "part-0.parquet")
    assert same_input(str(a), str(tmp_path / "copy"))
    assert not same_input(str(a), str(other))
    assert same_input(f"{a}/*.parquet", str(tmp_path / "copy"))
    assert not same_input(str(POOL_TINY), str(MIXED))
