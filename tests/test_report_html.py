"""The HTML run report (inspect_rounds.py OUT --html): the data it shows, worked out by hand
on a small run dir with a round in progress, and the page itself rendered by a real headless
Chromium with the network cut off: every pick in the table, no script error, nothing loaded."""

import json
import re

import numpy as np
import pytest

from helpers import find_browser, parse_page, render_page

needs_browser = pytest.mark.skipif(
    find_browser() is None,
    reason="no chromium, chromium-browser or google-chrome on PATH (Debian: apt-get install "
           "chromium; .ci/run installs it)")

PREVIEW_WITH_MARKUP = "ends the block </script><b>x</b> & <!-- too"
# Pool scores of round 1: rows 4 and 11 have no value (NaN).
LOSS = np.array([1, 2, 3, 4, np.nan, 6, 7, 8, 9, 10, 11, np.nan])


def load_tool():
    from evotune.trainer.cli import inspect_rounds
    return inspect_rounds


def pick(r, k, pool_index, source, selector, **numbers):
    return {"id": f"ex-{pool_index:02d}", "source": source, "round": r, "pick_order": k,
            "selector": selector, "pool_index": pool_index, "tokens": 10 + pool_index,
            **numbers, "preview": f"prompt {pool_index}"}


def make_run(out):
    """A 12-row pool; round 0 random (no features), round 1 done (embeddings, a loss score),
    round 2 picked but not trained: no summary yet, its eval only in metrics.jsonl (logged
    twice: the round was redone after a crash) and a metrics line cut short."""
    rounds = out / "rounds"
    picks = {0: [pick(0, k, i, s, "random") for k, (i, s) in
                 enumerate([(0, "gsm8k"), (1, "t0/a"), (2, "t0/b")])],
             1: [pick(1, k, i, s, "weighted", loss=float(LOSS[i]), objective=0.5 - k / 10)
                 for k, (i, s) in enumerate([(3, "gsm8k"), (4, "t0/a"), (5, "gsm8k")])],
             2: [pick(2, k, i, "t0/a", "weighted", objective=0.3) for k, i in enumerate([6, 7])]}
    picks[1][1]["preview"] = PREVIEW_WITH_MARKUP
    for r, rows in picks.items():
        (rounds / f"round_{r:03d}").mkdir(parents=True)
        (rounds / f"round_{r:03d}" / "selection.jsonl").write_text(
            "".join(json.dumps(p) + "\n" for p in rows))
    emb = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float16)
    emb[11] = np.nan
    ids = np.array([f"ex-{i:02d}" for i in range(12)])
    np.savez(rounds / "round_001" / "features.npz", ids=ids, embeddings=emb, score_loss=LOSS)
    np.savez(rounds / "round_002" / "features.npz", ids=ids, embeddings=emb)
    summaries = {
        0: {"round": 0, "selector": "random", "new_examples": 3, "total_examples": 3,
            "train_loss": 2.2, "eval_loss": 2.0, "eval_accuracy": 0.25, "candidates": None,
            "eval_by_source": {"gsm8k": {"loss": 1.5, "accuracy": None},
                               "t0": {"loss": 2.5, "accuracy": 0.25}},
            "seconds": {"select": 0.0, "train": 3.0, "eval": 1.0, "total": 4.5},
            "stopped": None},
        1: {"round": 1, "selector": "weighted", "new_examples": 3, "total_examples": 6,
            "train_loss": 2.0, "eval_loss": 1.8, "eval_accuracy": 0.5, "candidates": 9,
            "eval_by_source": {"gsm8k": {"loss": 1.4, "accuracy": None},
                               "t0": {"loss": 2.2, "accuracy": 0.5}},
            "seconds": {"features": 1.5, "select": 0.1, "train": 3.0, "eval": 1.0,
                        "total": 6.0}, "stopped": None}}
    for r, s in summaries.items():
        (rounds / f"round_{r:03d}" / "summary.json").write_text(json.dumps(s))
        (rounds / f"round_{r:03d}" / "state.json").write_text("{}")
    (out / "config.json").write_text(json.dumps(
        {"model": {"path": "tiny"}, "data": {"pool": "pool.jsonl"}, "eval": {"path": "e.jsonl"},
         "selection": {"selector": "weighted", "rounds": 4}}))
    lines = [{"global_step": 3, "round": 0, "eval/loss": 2.0},
             {"global_step": 8, "round": 2, "train/loss": 1.9},
             {"global_step": 9, "round": 2, "eval/loss": 9.9},
             {"global_step": 9, "round": 2, "eval/loss": 1.7, "eval/accuracy": 0.75,
              "eval/gsm8k/loss": 1.2, "eval/t0/loss": 1.9, "eval/t0/accuracy": 0.75}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines)
                                       + '{"global_step": 10, "rou')
    return [p for r in sorted(picks) for p in picks[r]]


def test_report_data_of_a_run_in_progress(tmp_path):
    make_run(tmp_path)
    tool = load_tool()
    data = tool.report_data(tmp_path, tool.rounds_of(tmp_path), bins=2)
    rounds = data["rounds"]
    assert [r["state"] for r in rounds] == ["done", "done", "picked"]
    assert [r["total"] for r in rounds] == [3, 6, 8]
    assert [r["selector"] for r in rounds] == ["random", "weighted", "weighted"]
    assert data["run"]["planned_rounds"] == 4
    assert data["run"]["notes"] == ["metrics.jsonl: 1 unreadable line(s) left out"]
    # Round 2 has no summary: its eval is the last one metrics.jsonl logged for it.
    assert rounds[2]["eval"] == {"loss": 1.7, "accuracy": 0.75, "from": "metrics.jsonl",
                                 "families": {"gsm8k": {"loss": 1.2, "accuracy": None},
                                              "t0": {"loss": 1.9, "accuracy": 0.75}}}
    assert rounds[1]["eval"]["from"] == "summary.json" and rounds[1]["eval"]["loss"] == 1.8
    assert data["composition"] == {"rounds": [0, 1, 2],
                                   "sources": {"t0/a": [1, 1, 2], "gsm8k": [1, 2, 0],
                                               "t0/b": [1, 0, 0]},
                                   "families": {"t0": [2, 1, 2], "gsm8k": [1, 2, 0]}}
    # Round 1's loss over the pool, two bins over [1, 11]: [1, 6) holds 1, 2, 3, 4 (4 picked),
    # [6, 11] holds 6..11 (6 picked); rows 4 and 11 have no value.
    assert rounds[0]["histograms"] == [] and rounds[0]["projection"] is None
    assert rounds[1]["histograms"] == [{"score": "loss", "scored": 10, "missing": 2,
                                        "edges": [1.0, 6.0, 11.0], "pool": [4, 6],
                                        "picks": [1, 1]}]
    # Row 11 has no embedding; a row picked later (6, 7 in round 2) is grey (-1) in round 1.
    p1, p2 = rounds[1]["projection"], rounds[2]["projection"]
    assert p1["rows"] == 11 and p1["pool_index"] == list(range(11))
    assert p1["round"] == [0, 0, 0, 1, 1, 1, -1, -1, -1, -1, -1]
    assert p2["round"] == [0, 0, 0, 1, 1, 1, 2, 2, -1, -1, -1]
    assert len(p1["x"]) == len(p1["y"]) == 11
    keys = [c["key"] for c in data["columns"]]
    assert keys == ["round", "pick_order", "id", "source", "selector", "tokens", "loss",
                    "objective", "pool_index", "preview"]
    assert [c["numeric"] for c in data["columns"]] == [True, True, False, False, False, True,
                                                       True, True, True, False]
    assert len(data["picks"]) == 8
    assert data["picks"][4][keys.index("loss")] is None          # NaN in selection.jsonl
    assert data["picks"][7][keys.index("loss")] is None          # round 2 has no loss column
    json.dumps(data, allow_nan=False)


def test_projection_over_max_points_keeps_every_pick_then_a_fixed_sample(tmp_path):
    make_run(tmp_path)
    tool = load_tool()
    rounds = tool.rounds_of(tmp_path)
    full = tool.report_data(tmp_path, rounds)["rounds"][2]["projection"]
    # 11 embedded rows, 8 picked by round 2: with room for 9, all 8 picks and 1 of 3 others.
    p = tool.report_data(tmp_path, rounds, max_points=9)["rounds"][2]["projection"]
    assert p["rows"] == 11 and len(p["x"]) == 9
    assert set(range(8)) < set(p["pool_index"]) and p["round"].count(-1) == 1
    at = {i: k for k, i in enumerate(full["pool_index"])}
    assert p["x"] == [full["x"][at[i]] for i in p["pool_index"]]
    assert p == tool.report_data(tmp_path, rounds, max_points=9)["rounds"][2]["projection"]
    # With room for fewer than the picks, a sample of the picks only.
    p = tool.report_data(tmp_path, rounds, max_points=4)["rounds"][2]["projection"]
    assert len(p["pool_index"]) == 4 and set(p["pool_index"]) < set(range(8))


def test_the_page_is_one_file_that_loads_nothing_and_keeps_previews_as_data(tmp_path):
    make_run(tmp_path)
    tool = load_tool()
    assert tool.main([str(tmp_path), "--html"]) == 0
    page = (tmp_path / "report.html").read_text()
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//|"""
                         r"""url\(\s*["']?\s*(?:https?:)?//|@import""", page)
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    # The data block ends at its own </script>; the preview's markup is escaped inside it.
    block = re.search(r'<script type="application/json" id="report-data">(.*?)</script>',
                      page, re.S)[1]
    assert "<" not in block
    data = json.loads(block)
    preview = [c["key"] for c in data["columns"]].index("preview")
    assert data["picks"][4][preview] == PREVIEW_WITH_MARKUP
    out = tmp_path / "elsewhere" / "r.html"
    out.parent.mkdir()
    assert tool.main([str(tmp_path), "--html", "-o", str(out)]) == 0 and out.is_file()
    with pytest.raises(SystemExit):
        tool.main([str(tmp_path), "--html", "--round", "1"])
    with pytest.raises(SystemExit):
        tool.main([str(tmp_path), "-o", str(out)])


def picks_table(root):
    """The rendered picks table: its header labels and, per body row, (hidden, cell texts)."""
    table = root.by_id("picks-table")
    heads = [th.text() for th in table.iter("th")]
    body = next(table.iter("tbody"))
    return heads, [("hidden" in tr.attrs, [td.text() for td in tr.iter("td")])
                   for tr in body.iter("tr")]


def problems(root):
    return [li.text() for li in root.by_id("problems").iter("li")]


def render_report(out, fragment=""):
    """The report of the run in ``out`` as headless Chromium renders it (opened at
    ``#fragment``), checked to list no problem and to log nothing to the console."""
    tool = load_tool()
    path = tool.write_report(out, tool.rounds_of(out), out / "report.html")
    dom, console = render_page(path, fragment)
    root = parse_page(dom)
    assert problems(root) == [] and console == []
    return root


@needs_browser
def test_every_pick_is_in_the_rendered_table_and_the_page_reports_no_problem(tmp_path):
    picks = make_run(tmp_path)
    root = render_report(tmp_path)
    heads, rows = picks_table(root)
    assert heads == ["round", "#", "id", "source", "selector", "tokens", "loss", "objective",
                     "pool index", "preview"]
    assert sorted((cells[0], cells[2]) for _, cells in rows) == \
        sorted((str(p["round"]), p["id"]) for p in picks)
    assert not any(hidden for hidden, _ in rows)
    by_id = {cells[2]: cells for _, cells in rows}
    assert by_id["ex-04"][-1] == PREVIEW_WITH_MARKUP      # shown as text, not as markup
    assert by_id["ex-04"][6] == "" and by_id["ex-05"][6] == "6"
    # Per round: no embeddings in round 0; round 1's 11 embedded rows as points and its loss
    # histogram (2 + 2 bars: pool and picks, 20 bins of which few are filled).
    assert "No embeddings this round" in root.by_id("round-0").text()
    card = root.by_id("round-1")
    charts = list(card.iter("svg"))
    assert len(charts) == 2 and len(list(charts[0].iter("circle"))) == 11
    assert sum(1 for _ in charts[1].iter("rect")) == 10 + 2   # non-empty pool bins + pick bins
    assert len(list(root.by_id("eval").iter("svg"))) == 2     # loss and accuracy
    rounds_text = root.by_id("rounds-table").text()
    assert "picked" in rounds_text and "eval from metrics.jsonl" in rounds_text
    assert "round 2 not complete" in root.by_id("run").text()


@needs_browser
def test_a_run_that_has_not_picked_yet(tmp_path):
    (tmp_path / "rounds" / "round_000").mkdir(parents=True)
    root = render_report(tmp_path)
    assert picks_table(root)[1] == [] and root.by_id("count").text() == "0 picks"
    assert "No selection yet" in root.by_id("round-0").text()
    assert "No eval set" in root.by_id("eval").text()
    assert "No picks yet" in root.by_id("composition").text()


@needs_browser
def test_the_address_filters_and_sorts_the_table(tmp_path):
    make_run(tmp_path)
    # Numbers largest first, a blank (no value) last whichever the direction.
    for fragment, order in [("sort=loss&desc=1", ["ex-05", "ex-03"]),
                            ("sort=loss", ["ex-03", "ex-05"])]:
        _, rows = picks_table(render_report(tmp_path, fragment))
        ids = [cells[2] for _, cells in rows]
        assert ids[:2] == order and len(ids) == 8
        assert set(ids[2:]) == {"ex-00", "ex-01", "ex-02", "ex-04", "ex-06", "ex-07"}
    # Two words: rows holding both, in any cell (the source and the selector here).
    root = render_report(tmp_path, "q=T0/A%20weighted&sort=objective&desc=1")
    _, rows = picks_table(root)
    assert [cells[2] for hidden, cells in rows if not hidden] == ["ex-04", "ex-06", "ex-07"]
    assert sum(hidden for hidden, _ in rows) == 5
    assert root.by_id("count").text() == "3 of 8 picks match"


@needs_browser
def test_a_script_error_or_a_load_from_the_web_is_caught(tmp_path):
    """The checks above can fail: a page that throws, or that tries to load something from the
    web, lists it on the page and in the console."""
    make_run(tmp_path)
    tool = load_tool()
    page = tool.write_report(tmp_path, tool.rounds_of(tmp_path), tmp_path / "r.html").read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("function renderPicks() {",
                                   "function renderPicks() { null.rows;", 1))
    dom, _ = render_page(broken)
    root = parse_page(dom)
    assert any("picks section failed" in p for p in problems(root))
    assert picks_table(root)[1] == []
    loads = tmp_path / "loads.html"
    loads.write_text(page.replace("<main>", '<main><img src="https://example.com/x.png">', 1))
    dom, console = render_page(loads)
    assert any("blocked loading https://example.com/x.png" in p
               for p in problems(parse_page(dom)))
    assert console


@needs_browser
def test_a_large_run_renders_every_pick_and_samples_the_projection(tmp_path):
    """20,000 picks over 4 rounds of a 25,000-row pool: the table holds every one (the first
    1,000 displayed), the projections show 5,000 points each and say which."""
    rng = np.random.default_rng(0)
    order = rng.permutation(25_000)
    bounds = np.cumsum([0, 2000, 2000, 8000, 8000])
    for r in range(4):
        rdir = tmp_path / "rounds" / f"round_{r:03d}"
        rdir.mkdir(parents=True)
        rows = [{"id": f"row-{i}", "source": f"src{i % 7}/t{i % 3}", "round": r, "pick_order": k,
                 "selector": "kcenter" if r else "random", "pool_index": int(i), "tokens": 50,
                 "kcenter_distance": float(rng.random()) if r else None, "preview": f"text {i}"}
                for k, i in enumerate(order[bounds[r]:bounds[r + 1]])]
        (rdir / "selection.jsonl").write_text("".join(json.dumps(p) + "\n" for p in rows))
        if r:
            np.savez(rdir / "features.npz", ids=np.arange(25_000).astype(str),
                     embeddings=rng.standard_normal((25_000, 8)).astype(np.float16))
    root = render_report(tmp_path)
    _, rows = picks_table(root)
    assert len(rows) == 20_000 and len({cells[2] for _, cells in rows}) == 20_000
    assert sum(not hidden for hidden, _ in rows) == 1000
    assert root.by_id("count").text() == "20000 picks, showing the first 1000"
    # By round 1, 4,000 picks: all of them and 1,000 other rows (grey); from round 2 on the
    # picks alone are over 5,000: a sample of them, nothing grey.
    for r, grey, caption in ((1, 1000, "every pick so far and a fixed sample of the rest"),
                             (2, 0, "a fixed sample of the picks so far"),
                             (3, 0, "a fixed sample of the picks so far")):
        card = root.by_id(f"round-{r}")
        circles = list(next(card.iter("svg")).iter("circle"))
        assert len(circles) == 5000
        assert sum(c.attrs["fill"] == "#c8ccd4" for c in circles) == grey
        assert f"Showing 5000 of 25000 rows (over 5000): {caption}" in card.text()
