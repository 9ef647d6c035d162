"""The chosen set as a dataset: selected.jsonl holds the pool file's own rows in pick order,
and the alpaca / sharegpt forms carry the same turns (checked against rows written out here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO

from evotune.trainer.data import load_examples
from evotune.trainer.selected import convert, read_selected, write_selected

CHAT = {"id": "c1", "source": "mine", "tag": 7, "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
ALPACA = {"instruction": "Name a colour.", "input": "", "output": "Red.", "extra": [1, 2]}
ODD = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}]}


def _run(tmp_path, rows, picks_by_round, as_array=False):
    """A run dir whose rounds picked ``picks_by_round`` (pool positions) from ``rows``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    pool = tmp_path / ("pool.json" if as_array else "pool.jsonl")
    pool.write_text(json.dumps(rows, indent=1) if as_array else
                    "\n\n".join(json.dumps(r) for r in rows) + "\n")     # blank lines too
    examples, _ = load_examples(pool)
    out = tmp_path / "out"
    for r, picks in enumerate(picks_by_round):
        d = out / "rounds" / f"round_{r:03d}"
        d.mkdir(parents=True)
        d.joinpath("selection.jsonl").write_text("".join(
            json.dumps({"pool_index": p, "pick_order": k}) + "\n" for k, p in enumerate(picks)))
        write_selected(out, r, pool, examples)
    return out


@pytest.mark.parametrize("as_array", [False, True])
def test_selected_rows_are_the_pool_files_own_rows_in_pick_order(tmp_path, as_array):
    rows = [dict(ALPACA, instruction=f"Name colour {i}.") for i in range(6)] + [CHAT, ODD]
    out = _run(tmp_path, rows, [[6, 2], [0, 7, 3]], as_array)
    got = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    expected = [(0, 0, 6), (0, 1, 2), (1, 0, 0), (1, 1, 7), (1, 2, 3)]
    assert got == [{**rows[p], "evotune_round": r, "evotune_pick_order": k}
                   for r, k, p in expected]
    assert read_selected(out, 0) == got[:2]
    with pytest.raises(ValueError, match="rounds 0 to 1"):
        read_selected(out, 2)


def test_alpaca_and_sharegpt_forms():
    chat = {**CHAT, "evotune_round": 1, "evotune_pick_order": 0}
    assert convert(chat, "sharegpt") == {
        "conversations": [{"from": "system", "value": "Be brief."},
                          {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                          {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}],
        "id": "c1", "source": "mine", "evotune_round": 1, "evotune_pick_order": 0}
    assert convert(chat, "alpaca") == {
        "instruction": "2+2?", "input": "", "output": "4", "system": "Be brief.",
        "history": [["Hi", "Hello."]], "id": "c1", "source": "mine", "evotune_round": 1,
        "evotune_pick_order": 0}
    row = {**ALPACA, "input": "ctx", "evotune_round": 0, "evotune_pick_order": 3}
    assert convert(row, "alpaca") == {"instruction": "Name a colour.", "input": "ctx",
                                      "output": "Red.", "evotune_round": 0,
                                      "evotune_pick_order": 3}
    assert convert(row, "sharegpt")["conversations"] == [
        {"from": "human", "value": "Name a colour.\n\nctx"}, {"from": "gpt", "value": "Red."}]
    assert convert(row, "jsonl") == row
    with pytest.raises(ValueError, match="do not alternate"):
        convert(ODD, "alpaca", "x.jsonl:3")
    assert convert(row, "parquet") == row
    with pytest.raises(ValueError, match="unknown format"):
        convert(row, "xml")


def test_export_selection_script(tmp_path, capsys):
    """launch/export_selection.py once as a script (rows to stdout); its other outcomes from
    its ``main`` in this process (a file written, a row it cannot convert, no run)."""
    from evotune.trainer.cli.export_selection import main
    rows = [dict(ALPACA, instruction=f"Name colour {i}.") for i in range(4)] + [CHAT, ODD]
    out = _run(tmp_path, rows, [[1, 4], [0]])
    script = [sys.executable, str(REPO / "launch" / "export_selection.py"), str(out)]
    proc = subprocess.run(script + ["--round", "0", "--format", "sharegpt", "-o", "-"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["conversations"][0]["value"] for line in lines] == ["Name colour 1.",
                                                                      "Be brief."]
    assert main([str(out), "--format", "alpaca"]) == 0
    assert "3 examples (rounds 0-1, alpaca)" in capsys.readouterr().err
    written = (out / "export_round_1_alpaca.jsonl").read_text().splitlines()
    assert [json.loads(line)["instruction"] for line in written] == [
        "Name colour 1.", "2+2?", "Name colour 0."]
    out2 = _run(tmp_path / "b", rows, [[5]])
    assert main([str(out2), "--format", "alpaca"]) == 1
    assert "selected.jsonl:1: its turns do not alternate" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing")]) == 1
    assert "not found" in capsys.readouterr().err
