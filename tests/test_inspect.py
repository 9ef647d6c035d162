"""inspect_rounds on a hand-made run dir: filters, sorting, histograms."""

import json
import re

import numpy as np
import pytest
from rich.console import Console


def load_tool():
    from evotune.trainer.cli import inspect_rounds
    return inspect_rounds


PICKS = [{"id": "a", "source": "gsm8k", "round": 1, "pick_order": 0, "selector": "weighted",
          "pool_index": 0, "tokens": 10, "loss": 3.0, "preview": "first"},
         {"id": "b", "source": "t0/x", "round": 1, "pick_order": 1, "selector": "weighted",
          "pool_index": 2, "tokens": 20, "loss": 1.0, "preview": "second"}]


def test_where_filters_on_numbers_and_text():
    tool = load_tool()
    assert [p["id"] for p in tool.filter_picks(PICKS, ["loss>2"])] == ["a"]
    assert [p["id"] for p in tool.filter_picks(PICKS, ["source=t0/x"])] == ["b"]
    assert tool.filter_picks(PICKS, ["loss>2", "tokens>=20"]) == []
    with pytest.raises(SystemExit, match="COLUMN<OP>VALUE"):
        tool.filter_picks(PICKS, ["loss"])


def test_histogram_counts_the_pool_and_the_picks(tmp_path):
    rdir = tmp_path / "rounds" / "round_001"
    rdir.mkdir(parents=True)
    (rdir / "selection.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PICKS))
    np.savez(rdir / "features.npz", ids=np.array(list("abcd")),
             score_loss=np.array([3.0, np.nan, 1.0, 2.0]))
    console = Console(record=True, width=120)
    load_tool().histograms(console, tmp_path, 1, bins=2)
    text = console.export_text()
    assert "3 scored, 1 without a value" in text
    # Two bins over [1, 3]: [1, 2) holds 1.0 (picked), [2, 3] holds 2.0 and 3.0 (3.0 picked).
    rows = [re.findall(r"\d+(?:\.\d+)?", line) for line in text.splitlines() if line.startswith("│") and "▇" in line]
    assert rows == [["1", "2", "1", "1"], ["2", "3", "2", "1"]]   # from, to, pool, picks


def test_plot_writes_a_png_per_round_with_and_without_features(tmp_path):
    import matplotlib.image
    rng = np.random.default_rng(0)
    r0 = [dict(PICKS[0], round=0, selector="random", pool_index=1, id="x")]
    for r, picks in ((0, r0), (1, PICKS)):
        rdir = tmp_path / "rounds" / f"round_{r:03d}"
        rdir.mkdir(parents=True)
        (rdir / "selection.jsonl").write_text("".join(json.dumps(p) + "\n" for p in picks))
    emb = rng.standard_normal((4, 8)).astype(np.float16)
    emb[3] = np.nan                   # a row without an embedding (e.g. not sampled) is left out
    np.savez(tmp_path / "rounds" / "round_001" / "features.npz", ids=np.array(list("abcd")),
             embeddings=emb, score_loss=np.array([3.0, np.nan, 1.0, 2.0]),
             score_length=np.array([5.0, 6.0, 7.0, 8.0]))
    tool = load_tool()
    written = tool.plot_rounds(tmp_path, tool.rounds_of(tmp_path))
    assert [p.name for p in written] == ["round_000.png", "round_001.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    # round 1 has score histograms below the projection: a taller image than round 0's
    h0, h1 = (matplotlib.image.imread(p).shape[0] for p in written)
    assert h1 > h0
    assert tool.plot_rounds(tmp_path, tool.rounds_of(tmp_path), only=1) == written[1:]
    assert tool.main([str(tmp_path), "--plot", "--round", "0"]) == 0
    with pytest.raises(SystemExit, match="no round 7"):
        tool.main([str(tmp_path), "--plot", "--round", "7"])


def test_a_round_cut_short_is_read_as_far_as_it_goes(tmp_path):
    """A run dir being copied (or a line cut short by a crash): the readers keep what they can
    read, say what they left out, and do not stop."""
    rdir = tmp_path / "rounds" / "round_001"
    rdir.mkdir(parents=True)
    lines = [json.dumps(p) for p in PICKS]
    (rdir / "selection.jsonl").write_text(lines[0] + "\n" + lines[1][:25])
    (rdir / "summary.json").write_text('{"round": 1, "eval_lo')
    np.savez(rdir / "features.npz", ids=np.array(list("abcd")), score_loss=np.arange(4.0))
    (rdir / "features.npz").write_bytes((rdir / "features.npz").read_bytes()[:100])
    tool = load_tool()
    [r] = tool.rounds_of(tmp_path)
    assert [p["id"] for p in r["picks"]] == ["a"] and r["summary"] is None
    assert r["notes"] == ["summary.json is unreadable (Unterminated string starting at: line 1 "
                          "column 14 (char 13)), left out",
                          "selection.jsonl: 1 unreadable line(s) left out"]
    console = Console(record=True, width=200)
    tool.overview(console, tmp_path, [r])
    assert "round 1: selection.jsonl: 1 unreadable line(s) left out" in console.export_text()
    with pytest.raises(SystemExit, match="features.npz is unreadable"):
        tool.histograms(console, tmp_path, 1)
    assert [p.name for p in tool.plot_rounds(tmp_path, [r])] == ["round_001.png"]


def test_projection_finds_the_direction_the_rows_spread_along():
    # Rows on the line t * (3, 4, 0) / 5 plus a smaller spread along (0, 0, 1), uncorrelated
    # with t; one row without an embedding. The first axis recovers t - mean(t) (up to sign),
    # the second the spread.
    t = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    emb = np.zeros((6, 3))
    emb[:5] = np.outer(t, [0.6, 0.8, 0.0])
    emb[:5, 2] = [0.1, -0.2, 0.2, -0.2, 0.1]
    emb[5] = np.nan
    pos, xy = load_tool().project(emb)
    assert pos.tolist() == [0, 1, 2, 3, 4]
    assert np.abs(xy[:, 0]) == pytest.approx(np.abs(t))
    assert np.abs(xy[:, 1]) == pytest.approx([0.1, 0.2, 0.2, 0.2, 0.1])
    pos, xy = load_tool().project(emb[5:])
    assert len(pos) == 0 and xy.shape == (0, 2)
