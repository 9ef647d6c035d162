"""``evotune inspect`` (and ``launch/inspect_rounds.py``): what an evotune run selected, round
by round.

    evotune inspect OUT                  # rounds overview + per-source composition
    evotune inspect OUT --round 2        # round 2's picks with their numbers
    evotune inspect OUT --diff 1 3       # what rounds 2..3 added on top of round 1
    evotune inspect OUT --plot           # a PNG per round, next to its logs
    evotune inspect OUT --html           # OUT/report.html: the whole run, one file

Reads only the files the run wrote (summary.json, selection.jsonl, state.json, features.npz;
metrics.jsonl and config.json for the HTML report); needs no model, and works on a run in
progress.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from datetime import datetime
from importlib import resources
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

PAGE = "inspect_rounds.html"     # the report's page, package data beside this module
NON_NUMBERS = {"id", "source", "round", "pick_order", "selector", "pool_index", "tokens", "preview"}


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The rows of a JSON-lines file, and how many of its lines could not be read. A line cut
    short (a copy of a run dir still under way, or a crash mid-append, which ``metrics.jsonl``
    can hold) is counted and left out rather than stopping the reader. No file: no rows."""
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def read_json(path: Path, notes: list[str]):
    """A JSON file's content; None when there is no file, or when it cannot be read (cut
    short by a copy under way), which adds a line to ``notes``."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError as e:
        notes.append(f"{path.name} is unreadable ({e}), left out")
        return None


def rounds_of(out: Path) -> list[dict]:
    """Every round folder: its index, whether it is complete (state.json written), its summary
    (None until the round writes it), its picks, and ``notes`` on files that could not be read
    (a round being copied): the readers show what is there instead of stopping."""
    rounds = []
    for d in sorted((out / "rounds").glob("round_[0-9][0-9][0-9]")):
        notes = []
        summary = read_json(d / "summary.json", notes)
        picks, bad = read_jsonl(d / "selection.jsonl")
        if bad:
            notes.append(f"selection.jsonl: {bad} unreadable line(s) left out")
        rounds.append({"round": int(d.name[6:]), "complete": (d / "state.json").is_file(),
                       "summary": summary, "picks": picks, "notes": notes})
    return rounds


def round_state(r: dict) -> str:
    """done (state.json written), picked (selection written, training not finished) or
    started (no selection yet)."""
    return "done" if r["complete"] else ("picked" if r["picks"] else "started")


def round_selector(r: dict) -> str | None:
    return (r["summary"] or {}).get("selector") or (r["picks"][0]["selector"] if r["picks"]
                                                    else None)


def pick_rounds(rounds: list[dict]) -> dict[int, int]:
    """Pool position (``pool_index``) -> the round that picked it."""
    return {p["pool_index"]: r["round"] for r in rounds for p in r["picks"]}


def picks_per(rounds: list[dict], key) -> dict[str, list[int]]:
    """New picks per ``key(pick)`` (its source, its source family...) in each of ``rounds``, in
    their order; the largest total first."""
    counts: dict[str, list[int]] = {}
    for i, r in enumerate(rounds):
        for p in r["picks"]:
            counts.setdefault(key(p), [0] * len(rounds))[i] += 1
    return dict(sorted(counts.items(), key=lambda kv: (-sum(kv[1]), kv[0])))


def family(pick: dict) -> str:
    """A source's family: the part before ``/`` (``t0/ropes_...`` -> ``t0``)."""
    return pick["source"].split("/")[0]


def pick_columns(picks: list[dict], all_columns: bool = False) -> tuple[list[str], list[str], int]:
    """The picks' own columns beyond the fixed ones: text columns (labels a selector adds),
    number columns (scores, distances), and how many per-subtask influence columns
    (``influence:<subtask>``) were left out, which only ``all_columns`` keeps: a pick's
    ``top_subtask`` already says which one drove it."""
    columns = {k for p in picks for k in p if k not in NON_NUMBERS}
    texts = sorted(k for k in columns if any(isinstance(p.get(k), str) for p in picks))
    numbers = sorted(k for k in columns - set(texts) if all_columns or ":" not in k)
    return texts, numbers, len(columns) - len(texts) - len(numbers)


def read_features(out: Path, idx: int) -> dict[str, np.ndarray] | None:
    """Round ``idx``'s features.npz: ``ids`` and, when saved, ``embeddings`` (float32, pool
    rows x dim; a row of NaN has none) and ``score_<name>`` (one value per pool row, NaN
    without one), all in pool order (``pool_index``). None when the round has no file (a
    random round 0, a selector that reads no features, ``output.save_features=false``).

    Raises:
        ValueError: naming the file, when it cannot be read (a copy cut short).
    """
    path = out / "rounds" / f"round_{idx:03d}" / "features.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            return {k: data[k].astype(np.float32) if k == "embeddings" else data[k]
                    for k in data.files if k in ("ids", "embeddings") or k.startswith("score_")}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e}); a copy still under "
                         f"way?") from e


def score_names(features: dict[str, np.ndarray] | None) -> list[str]:
    return [k[len("score_"):] for k in features or {} if k.startswith("score_")]


def project(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D PCA of the rows of ``emb`` (rows x dim) whose values are all finite: their row
    positions, and their coordinates on the first two principal axes (n x 2; a zero second
    column when the rows span one direction only)."""
    pos = np.flatnonzero(np.isfinite(emb).all(axis=1))
    xy = np.zeros((len(pos), 2))
    if len(pos):
        x = emb[pos].astype(np.result_type(emb.dtype, np.float32))   # fp16 sums overflow
        x -= x.mean(axis=0)
        # Eigenvectors of the dim x dim covariance rather than an SVD of the rows: the same
        # axes, without another rows x dim matrix in memory for a large pool.
        axes = np.linalg.eigh((x.T @ x).astype(np.float64))[1][:, ::-1][:, :2]
        xy[:, :axes.shape[1]] = x @ axes
    return pos, xy


def score_histogram(values: np.ndarray, picked, bins: int) -> dict | None:
    """A score over the pool in ``bins`` equal-width bins: ``edges`` (bins + 1), ``pool`` and
    ``picks`` (counts of the pool rows with a value, and of those among ``picked``, pool
    positions), ``scored`` and ``missing`` (rows with and without a value); None when no row
    has one."""
    finite = np.isfinite(values)
    if not finite.any():
        return None
    pool, edges = np.histogram(values[finite], bins=bins)
    picks = np.histogram(values[[i for i in sorted(set(picked)) if finite[i]]], bins=edges)[0]
    return {"edges": edges, "pool": pool, "picks": picks, "scored": int(finite.sum()),
            "missing": int((~finite).sum())}


def _column(table: Table, name: str, numeric: bool) -> None:
    """One line per row: numbers keep their full width, long text is cut with an ellipsis and
    the preview takes whatever width is left."""
    if numeric:
        table.add_column(name, justify="right", no_wrap=True, min_width=len(name))
    else:
        # Wrappable for rich's width planning (so these columns, not the numbers, give way in a
        # narrow terminal); the cells themselves are one line (see _cell).
        table.add_column(name, min_width=min(len(name), 8),
                         max_width=None if name == "preview" else 32)


def _cell(text: str) -> Text:
    return Text(text, no_wrap=True, overflow="ellipsis")


def _f(v, digits=4):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def overview(console: Console, out: Path, rounds: list[dict]) -> None:
    """One line per round; `state` is done (state.json written), picked (selection written,
    training not finished) or started."""
    table = Table(title=f"rounds of {out}")
    accuracy = any((r["summary"] or {}).get("eval_accuracy") is not None for r in rounds)
    for col in ("round", "state", "selector", "new", "total", "train loss", "eval loss") \
            + (("eval acc",) if accuracy else ()) + ("time s",):
        _column(table, col, numeric=col not in ("state", "selector"))
    for r in rounds:
        s = r["summary"] or {}
        table.add_row(str(r["round"]), round_state(r), round_selector(r) or "-",
                      str(s.get("new_examples", len(r["picks"]))), _f(s.get("total_examples")),
                      _f(s.get("train_loss")), _f(s.get("eval_loss")),
                      *((_f(s.get("eval_accuracy"), 3),) if accuracy else ()),
                      _f(s.get("seconds", {}).get("total"), 1))
    console.print(table)
    console.print("seconds per phase: --round N", style="dim")
    for r in rounds:
        for note in r["notes"]:
            console.print(f"round {r['round']}: {note}", style="yellow")
    composition(console, rounds)


def composition(console: Console, rounds: list[dict]) -> None:
    """New picks per source per round, with the total."""
    table = Table(title="new picks per source (by round)")
    table.add_column("source")
    for r in rounds:
        table.add_column(f"r{r['round']}", justify="right")
    table.add_column("total", justify="right")
    for src, counts in picks_per(rounds, lambda p: p["source"]).items():
        table.add_row(src, *map(str, counts), str(sum(counts)))
    console.print(table)


def show_round(console: Console, rounds: list[dict], idx: int, limit: int, sort: str | None,
               where: list[str] = (), all_columns: bool = False) -> None:
    r = _get(rounds, idx)
    picks = filter_picks(r["picks"], where)
    texts, numbers, hidden = pick_columns(picks, all_columns)
    if sort:
        if sort not in pick_columns(picks, all_columns=True)[1] + ["tokens", "pick_order"]:
            raise SystemExit(f"--sort {sort}: round {idx} has no such column; have: "
                             f"{', '.join(['pick_order', 'tokens'] + numbers)}")
        picks = sorted(picks, key=lambda p: (p.get(sort) is None, -(p.get(sort) or 0)))
    s = r["summary"] or {}
    title = (f"round {idx}: {len(r['picks'])} picks by {picks[0]['selector'] if picks else '-'}"
             + ("" if r["complete"] else " (round not complete)"))
    table = Table(title=title)
    for col in ["#", "id", "source", *texts, "tokens", *numbers, "preview"]:
        _column(table, col, numeric=col in ("#", "tokens", *numbers))
    for p in picks[:limit]:
        table.add_row(str(p["pick_order"]), _cell(p["id"]), _cell(p["source"]),
                      *[_cell(str(p.get(k, "-"))) for k in texts],
                      str(p.get("tokens", "-")), *[_f(p.get(k)) for k in numbers],
                      _cell(p.get("preview", "")))
    console.print(table)
    if hidden:
        console.print(f"{hidden} per-subtask columns hidden (--all-columns shows them)",
                      style="dim")
    if len(picks) > limit:
        console.print(f"... {len(picks) - limit} more (--limit N to show more)")
    if s:
        console.print(f"train loss {_f(s.get('train_loss'))}, eval loss {_f(s.get('eval_loss'))}, "
                      f"seconds {s.get('seconds')}")


def histograms(console: Console, out: Path, idx: int, bins: int = 12, width: int = 40) -> None:
    """Per score of round ``idx``: a text histogram over the pool (from features.npz), with
    how many of the round's picks fall in each bin."""
    try:
        features = read_features(out, idx)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    if features is None:
        raise SystemExit(f"round {idx} has no features.npz (round 0, a selector that reads no "
                         f"scores, or output.save_features=false)")
    names = score_names(features)
    if not names:
        console.print(f"round {idx}: no scores were computed (the selector read embeddings only)")
        return
    picked = [p["pool_index"] for p in _get(rounds_of(out), idx)["picks"]]
    for name in names:
        h = score_histogram(features[f"score_{name}"], picked, bins)
        if h is None:
            console.print(f"{name}: no finite values")
            continue
        table = Table(title=f"round {idx}: {name} over the pool ({h['scored']} scored, "
                            f"{h['missing']} without a value); ▇ pool, picks counted")
        for col in ("from", "to", "pool", "", "picks"):
            table.add_column(col, justify="right" if col != "" else "left", no_wrap=True)
        top = h["pool"].max()
        for lo, hi, c, k in zip(h["edges"][:-1], h["edges"][1:], h["pool"], h["picks"]):
            table.add_row(f"{lo:.4g}", f"{hi:.4g}", str(c), "▇" * int(round(width * c / top)),
                          str(k) if k else "")
        console.print(table)


def plot_rounds(out: Path, rounds: list[dict], only: int | None = None,
                max_scores: int = 4) -> list[Path]:
    """One PNG per round, ``rounds/round_XXX/round_XXX.png``: a 2-D PCA projection of the pool's
    embeddings in that round (features.npz) coloured by the round each example was picked in,
    the composition of the picks by source up to that round, and histograms of the round's
    scores over the pool with its picks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked_in = pick_rounds(rounds)
    families = sorted({family(p) for r in rounds for p in r["picks"]})
    cmap = plt.get_cmap("viridis", max(2, len(rounds)))
    written = []
    for r in rounds:
        idx = r["round"]
        if only is not None and idx != only:
            continue
        try:
            features, unreadable = read_features(out, idx), None
        except ValueError as e:
            features, unreadable = None, str(e)
        names = score_names(features)[:max_scores]
        ncols = max(2, len(names))
        fig = plt.figure(figsize=(4.2 * ncols, 8.4 if names else 4.4))
        grid = fig.add_gridspec(2 if names else 1, ncols)
        ax = fig.add_subplot(grid[0, : ncols // 2 + ncols % 2])
        if features is not None and "embeddings" in features:
            pos, xy = project(features["embeddings"])
            when = np.array([picked_in.get(int(i), -1) for i in pos])
            later = (when == -1) | (when > idx)
            if later.any():
                ax.scatter(xy[later, 0], xy[later, 1], s=6, c="lightgrey",
                           label="not picked (yet)")
            for k in range(idx + 1):
                sel = when == k
                if sel.any():
                    ax.scatter(xy[sel, 0], xy[sel, 1], s=28 if k == idx else 12,
                               color=cmap(k), edgecolors="black" if k == idx else "none",
                               linewidths=0.5, label=f"round {k}")
            ax.set_title(f"pool embeddings in round {idx} (PCA, {len(pos)} rows)")
            ax.legend(fontsize=7, markerscale=1.2)
        else:
            ax.text(0.5, 0.5, unreadable or f"round {idx}: no embeddings saved\n(random round, a "
                    "selector without embeddings,\nor output.save_features=false)",
                    ha="center", va="center", wrap=True)
            ax.set_axis_off()
        ax = fig.add_subplot(grid[0, ncols // 2 + ncols % 2:])
        upto = [q for q in rounds if q["round"] <= idx]
        per_family = picks_per(upto, family)
        bottom = np.zeros(len(upto))
        for f_i, fam in enumerate(families):
            counts = np.array(per_family.get(fam, [0] * len(upto)))
            ax.bar([q["round"] for q in upto], counts, bottom=bottom, label=fam,
                   color=plt.get_cmap("tab10")(f_i % 10))
            bottom += counts
        ax.set_xticks([q["round"] for q in upto])
        ax.set_xlabel("round")
        ax.set_ylabel("new picks")
        ax.set_title("picks by source")
        ax.legend(fontsize=7)
        mine = [p["pool_index"] for p in r["picks"]]
        for k, name in enumerate(names):
            ax = fig.add_subplot(grid[1, k])
            h = score_histogram(features[f"score_{name}"], mine, bins=20)
            if h is not None:
                ax.stairs(h["pool"], h["edges"], fill=True, color="lightgrey", label="pool")
                ax.stairs(h["picks"], h["edges"], fill=True, color=cmap(idx),
                          label=f"round {idx} picks")
                ax.legend(fontsize=7)
            ax.set_title(f"{name} ({h['scored'] if h else 0} scored)")
        fig.suptitle(f"{out.name}: round {idx} ({len(r['picks'])} picks"
                     + (f" by {r['picks'][0]['selector']}" if r["picks"] else "") + ")")
        fig.tight_layout()
        target = out / "rounds" / f"round_{idx:03d}" / f"round_{idx:03d}.png"
        fig.savefig(target, dpi=100)
        plt.close(fig)
        written.append(target)
    return written


def report_data(out: Path, rounds: list[dict], max_points: int = 5000, bins: int = 20) -> dict:
    """Everything the HTML report shows, as JSON values (a missing or non-finite number is
    None): the run (``run``), per round its state, losses, accuracy, seconds, a 2-D projection
    of the pool's embeddings (at most ``max_points`` points: every pick so far, then a fixed
    sample of the rest) and a ``bins``-bin histogram of each score over the pool with the
    round's picks (``rounds``), new picks per source and per source family (``composition``),
    and every pick as one row under ``columns`` (``picks``). Reads the same files as the text
    views; a file it cannot read becomes a note, not an error."""
    notes = []
    config = read_json(out / "config.json", notes) or {}
    metrics, bad = read_jsonl(out / "metrics.jsonl")
    if bad:
        notes.append(f"metrics.jsonl: {bad} unreadable line(s) left out")
    # The last eval line of each round: a round redone after a crash logs its own anew.
    evals = {m["round"]: m for m in metrics if "round" in m and "eval/loss" in m}
    picked_in = pick_rounds(rounds)
    texts, numbers, hidden = pick_columns([p for r in rounds for p in r["picks"]])
    keys = ["round", "pick_order", "id", "source", "selector", *texts, "tokens", *numbers,
            "pool_index", "preview"]
    numeric = {"round", "pick_order", "tokens", *numbers, "pool_index"}
    data = {
        "run": {"name": out.resolve().name, "path": str(out.resolve()),
                "generated": datetime.now().astimezone().isoformat(timespec="seconds"),
                "model": config.get("model", {}).get("path"),
                "pool": config.get("data", {}).get("pool"),
                "eval_set": config.get("eval", {}).get("path"),
                "selector": config.get("selection", {}).get("selector"),
                "planned_rounds": config.get("selection", {}).get("rounds"),
                "notes": notes},
        "rounds": [],
        "composition": {"rounds": [r["round"] for r in rounds],
                        "sources": picks_per(rounds, lambda p: p["source"]),
                        "families": picks_per(rounds, family)},
        "columns": [{"key": k, "numeric": k in numeric,
                     "label": {"pick_order": "#", "pool_index": "pool index"}.get(k, k)}
                    for k in keys],
        "hidden_columns": hidden,
        "picks": [[_json_value(p.get(k)) for k in keys] for r in rounds for p in r["picks"]],
        "max_points": max_points,
    }
    total = 0
    for r in rounds:
        s, idx = r["summary"] or {}, r["round"]
        total += len(r["picks"])
        entry = {"round": idx, "state": round_state(r), "selector": round_selector(r),
                 "picks": len(r["picks"]), "total": s.get("total_examples", total),
                 "train_loss": s.get("train_loss"), "seconds": s.get("seconds") or {},
                 "candidates": s.get("candidates"), "stopped": s.get("stopped"),
                 "eval": _round_eval(s, evals.get(idx)), "notes": list(r["notes"]),
                 "projection": None, "histograms": []}
        try:
            features = read_features(out, idx)
        except ValueError as e:
            features = None
            entry["notes"].append(str(e))
        if features is not None and "embeddings" in features:
            entry["projection"] = _projection(features["embeddings"], picked_in, idx,
                                              max_points)
        mine = [p["pool_index"] for p in r["picks"]]
        for name in score_names(features):
            h = score_histogram(features[f"score_{name}"], mine, bins)
            entry["histograms"].append(
                {"score": name, "scored": 0, "missing": len(features[f"score_{name}"])}
                if h is None else
                {"score": name, "scored": h["scored"], "missing": h["missing"],
                 "edges": h["edges"].tolist(), "pool": h["pool"].tolist(),
                 "picks": h["picks"].tolist()})
        data["rounds"].append(_json_value(entry))
    return data


def _round_eval(summary: dict, line: dict | None) -> dict | None:
    """A round's held-out loss and accuracy, overall and per source family: from its summary,
    else from its metrics.jsonl line (a round evaluated but not yet saved); None without."""
    if summary.get("eval_loss") is not None:
        return {"loss": summary["eval_loss"], "accuracy": summary.get("eval_accuracy"),
                "from": "summary.json",
                "families": {f: {"loss": v.get("loss"), "accuracy": v.get("accuracy")}
                             for f, v in (summary.get("eval_by_source") or {}).items()}}
    if line is None:
        return None
    families: dict[str, dict] = {}
    for k, v in line.items():
        parts = k.split("/")
        if len(parts) == 3 and parts[0] == "eval" and parts[2] in ("loss", "accuracy"):
            families.setdefault(parts[1], {"loss": None, "accuracy": None})[parts[2]] = v
    return {"loss": line["eval/loss"], "accuracy": line.get("eval/accuracy"),
            "from": "metrics.jsonl", "families": families}


def _projection(emb: np.ndarray, picked_in: dict[int, int], idx: int, max_points: int) -> dict:
    """Round ``idx``'s 2-D PCA of the pool: per shown point ``x``, ``y``, ``pool_index`` and
    ``round`` (the round that picked it, -1 when not picked by round ``idx``); ``rows`` with
    an embedding. Over ``max_points`` rows, every pick so far is shown (a fixed sample of
    them when they alone are too many) and a fixed sample of the others fills the rest, so
    the same run gives the same page."""
    pos, xy = project(emb)
    when = np.array([picked_in.get(int(i), -1) for i in pos], dtype=np.int64)
    when[when > idx] = -1
    shown = np.arange(len(pos))
    if len(pos) > max_points:
        rng = np.random.default_rng(idx)
        picked, others = np.flatnonzero(when >= 0), np.flatnonzero(when < 0)
        shown = np.sort(rng.choice(picked, max_points, replace=False)
                        if len(picked) >= max_points else
                        np.concatenate([picked, rng.choice(others, max_points - len(picked),
                                                           replace=False)]))
    return {"rows": len(pos), "x": [float(f"{v:.4g}") for v in xy[shown, 0]],
            "y": [float(f"{v:.4g}") for v in xy[shown, 1]],
            "pool_index": pos[shown].tolist(), "round": when[shown].tolist()}


def _json_value(v):
    """``v`` with every non-finite float (NaN: a score without a value) replaced by None,
    which JSON can hold."""
    if isinstance(v, float):
        return v if np.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


def write_report(out: Path, rounds: list[dict], target: Path, max_points: int = 5000) -> Path:
    """The HTML report of the run in ``out``, one self-contained file: the page
    (inspect_rounds.html beside this module, installed with the package: its style and script
    inline) with ``report_data`` inlined as JSON, so it opens from disk with nothing loaded
    from anywhere. Returns ``target``."""
    import html
    import re
    page = resources.files(__package__).joinpath(PAGE).read_text(encoding="utf-8")
    payload = json.dumps(report_data(out, rounds, max_points), ensure_ascii=False,
                         allow_nan=False, separators=(",", ":"))
    # Inside <script> only "</script" (or "<!--") ends or confuses the block: with every "<"
    # (and ">", "&") escaped, a preview holding them stays data. JSON.parse undoes \u003c.
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    fill = {"TITLE": html.escape(f"{out.resolve().name}: evotune run report"), "DATA": payload}
    target.write_text(re.sub(r"\{\{(TITLE|DATA)\}\}", lambda m: fill[m[1]], page),
                      encoding="utf-8")
    return target


def filter_picks(picks: list[dict], where: list[str]) -> list[dict]:
    """Keep picks matching every ``COLUMN<OP>VALUE`` (ops: <, <=, >, >=, =, !=)."""
    import operator
    import re
    ops = {"<=": operator.le, ">=": operator.ge, "!=": operator.ne, "<": operator.lt,
           ">": operator.gt, "=": operator.eq}
    for cond in where:
        m = re.fullmatch(r"\s*([\w./-]+)\s*(<=|>=|!=|<|>|=)\s*(.+?)\s*", cond)
        if not m:
            raise SystemExit(f"--where {cond!r}: expected COLUMN<OP>VALUE, e.g. loss>2.5")
        col, op, raw = m.groups()
        try:
            value = float(raw)
        except ValueError:
            value = raw
        picks = [p for p in picks if col in p and p[col] is not None and
                 isinstance(p[col], type(value) if isinstance(value, str) else (int, float))
                 and ops[op](p[col], value)]
    return picks


def diff(console: Console, rounds: list[dict], a: int, b: int) -> None:
    """What the selected set after round ``b`` has that the set after round ``a`` has not."""
    lo, hi = sorted((a, b))
    _get(rounds, lo), _get(rounds, hi)
    added = [p for r in rounds if lo < r["round"] <= hi for p in r["picks"]]
    before = sum(len(r["picks"]) for r in rounds if r["round"] <= lo)
    console.print(f"after round {lo}: {before} selected; after round {hi}: "
                  f"{before + len(added)} selected (+{len(added)})")
    by_source: dict[str, int] = {}
    for p in added:
        by_source[p["source"]] = by_source.get(p["source"], 0) + 1
    table = Table(title=f"added in rounds {lo + 1}..{hi}, per source")
    table.add_column("source")
    table.add_column("added", justify="right")
    for src, n in sorted(by_source.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(src, str(n))
    console.print(table)
    table = Table(title="added examples")
    for col in ("round", "#", "id", "source", "preview"):
        _column(table, col, numeric=col in ("round", "#"))
    for p in added:
        table.add_row(str(p["round"]), str(p["pick_order"]), _cell(p["id"]),
                      _cell(p["source"]), _cell(p.get("preview", "")))
    console.print(table)


def _get(rounds: list[dict], idx: int) -> dict:
    for r in rounds:
        if r["round"] == idx:
            return r
    raise SystemExit(f"no round {idx}; this run has rounds "
                     f"{', '.join(str(r['round']) for r in rounds) or '(none)'}")


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The options of ``evotune inspect`` and ``launch/inspect_rounds.py`` (``prog``: the name
    in the usage line; the script's file name when None)."""
    p = argparse.ArgumentParser(prog=prog,
                                description="Inspect an evotune run's per-round selections.")
    p.add_argument("out", type=Path, help="the run's output dir")
    p.add_argument("--round", type=int, help="show one round's picks")
    p.add_argument("--diff", type=int, nargs=2, metavar=("A", "B"),
                   help="what changed between the selected sets after rounds A and B")
    p.add_argument("--limit", type=int, default=50, help="rows to show with --round")
    p.add_argument("--sort", help="with --round: sort picks by this column, descending")
    p.add_argument("--all-columns", action="store_true",
                   help="with --round: also show the per-subtask influence columns")
    p.add_argument("--where", action="append", default=[], metavar="COND",
                   help="with --round: keep picks matching COND, e.g. loss>2.5 or source=gsm8k "
                        "(repeatable)")
    p.add_argument("--hist", action="store_true",
                   help="with --round: histograms of every score over the pool, with the picks")
    p.add_argument("--plot", action="store_true",
                   help="write rounds/round_XXX/round_XXX.png for every round (or --round N): "
                        "embedding projection by pick round, picks by source, score histograms")
    p.add_argument("--html", action="store_true",
                   help="write one self-contained HTML report of every round (rounds, eval, "
                        "composition, projections, histograms, a searchable table of picks)")
    p.add_argument("-o", "--output", type=Path, metavar="FILE",
                   help="with --html: where to write it (default OUT/report.html)")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Show or write what ``argv`` asks for (sys.argv[1:] when None); the exit code: 0, or 2
    when OUT is not a run dir. A bad option or a round the run lacks exits with a message."""
    p = parser(prog)
    args = p.parse_args(argv)
    if not (args.out / "rounds").is_dir():
        print(f"error: {args.out} has no rounds/ folder; is it an evotune output dir?",
              file=sys.stderr)
        return 2
    if args.output is not None and not args.html:
        p.error("-o/--output goes with --html")
    if args.html and args.round is not None:
        p.error("--html reports every round; leave out --round")
    console = Console()
    rounds = rounds_of(args.out)
    if args.html:
        target = write_report(args.out, rounds, args.output or args.out / "report.html")
        print(f"wrote {target}")
    elif args.plot:
        if args.round is not None:
            _get(rounds, args.round)
        for path in plot_rounds(args.out, rounds, args.round):
            console.print(f"wrote {path}")
    elif args.round is not None and args.hist:
        histograms(console, args.out, args.round)
    elif args.round is not None:
        show_round(console, rounds, args.round, args.limit, args.sort, args.where,
                   args.all_columns)
    elif args.diff:
        diff(console, rounds, *args.diff)
    else:
        overview(console, args.out, rounds)
    return 0
