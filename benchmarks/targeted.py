"""Does evotune's choice beat random picks? Targeted selection and noisy pools, with seeds.

Two suites, each a set of arms (selection rules) × budgets × seeds, every run a real
``launch/train.py`` run of SmolLM2-135M-Instruct with LoRA on this machine (bf16: the CPU has
AMX; every arm the same), the final model evaluated on held-out rows:

``targeted`` — a pool of 1,200 rows from ``../shared/datasets`` (300 GSM8K, 650 T0 tasks, 100
self-instruct seed tasks, 150 FastChat chat rows, at most 256 tokens each) and two target tasks:
GSM8K (16 target rows from ``eval/gsm8k_test.jsonl``; held-out loss on the other 166 rows of it
that fit in 320 tokens) and the T0 held-out tasks, which no pool row comes from (16 target rows
from ``eval/t0_heldout.jsonl``, four per dataset; loss and multiple-choice accuracy on the other
184). The eval set is one file; the runs report each task's figures apart
(``eval_by_source``).

``quality`` — ``pool_noisy.jsonl`` (300 clean rows and a corrupted copy of each: truncated,
one-word or another row's answer; the 71 pairs with a row over 256 tokens dropped, 458 rows
left): the share of clean rows among the picks at 10%, and the held-out loss after training
on them (same eval set).

Arms (``ARMS``): one-shot arms choose the whole budget in round 0 (random, or with the base
model: ``first_round: selector``); in-loop arms train on a seeded random half first (one
warm-up run per budget and seed, shared: each arm resumes from its round 0) and choose the
other half with that model. ``rds_ifd`` is RDS+ behind Cherry's IFD ≤ 1 filter (the filter
removes answers that do not fit their prompt); ``kcenter_ifd`` is k-center behind the
same filter (filter-then-diversify); ``ifd_mix`` is ``configs/ifd_mix.yaml``'s rule;
``evotune`` is whatever ``configs/evotune.yaml`` says when the script runs (the runs recorded
in RESULTS.md as ``ifd_mix`` ran as ``evotune``, when the default was that rule). The base
model's features are computed once and reused across arms, budgets and seeds
(``scoring.base_cache``). Costs per arm come from the runs' summaries.

    python benchmarks/targeted.py                          # everything (about 7 h here)
    # as recorded in RESULTS.md (2026-12-01):
    python benchmarks/targeted.py --suite targeted --seeds 1 --budgets 0.05
    python benchmarks/targeted.py --suite targeted --budgets 0.05 --seeds 2 3 \
        --arms random kcenter rds_once rds_loop ifd_mix
    python benchmarks/targeted.py --suite quality --seeds 1 --arms random kcenter ifd_mix
    python benchmarks/targeted.py --suite quality --arms longest ifd_loop rds_once rds_loop
    python benchmarks/targeted.py --report                 # tables and plots, no training

Finished runs are reused when the script starts again; an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from selection_quality import exceeds, mean_std  # noqa: E402  (a sibling script)

POOL_TOKENS, EVAL_TOKENS = 256, 320   # 320: 166 GSM8K test rows fit besides the 16 targets
BASE = {
    "model": {"path": "embedded:smollm2-135m-instruct", "precision": "bf16"},
    "data": {"max_length": EVAL_TOKENS},
    "eval": {"batch_size": 16},
    "selection": {"batch_size": 16},
    "train": {"epochs": 2, "batch_size": 8, "micro_batch_size": 4, "lr": 5.0e-4,
              "retrain_from_base": True},
    "output": {"save_features": True, "tensorboard": False},
}
RDS = {"selector": "rds", "pooling": "weighted_mean"}
IFD_FILTER = {"filter_score": "ifd_cherry", "filter_max": 1.0}
# arm -> (in_loop, selection settings, scoring settings, influence settings); "PRESET", name:
# the selection and scoring settings of configs/<name>.yaml
ARMS = {
    "random": (False, {}, {}, {}),
    "longest": (False, {"selector": "weighted", "weighted": {"score": "length", "alpha": 1.0}},
                {}, {}),
    "kcenter": (True, {"selector": "kcenter"}, {}, {}),
    "kcenter_ifd": (True, {"selector": "kcenter", **IFD_FILTER}, {}, {}),
    "ifd_loop": (True, {"selector": "weighted", "weighted": {"score": "ifd_cherry", "alpha": 1.0},
                        **IFD_FILTER}, {}, {}),
    "less": (True, {"selector": "influence"}, {},
             {"validation": "TARGETS", "candidates": 0.5, "dim": 4096}),
    "rds_once": (False, RDS, {"rds": {"targets": "TARGETS"}}, {}),
    "rds_loop": (True, RDS, {"rds": {"targets": "TARGETS"}}, {}),
    "rds_ifd": (True, {**RDS, **IFD_FILTER}, {"rds": {"targets": "TARGETS"}}, {}),
    "ifd_mix": (True, "PRESET", "ifd_mix", {}),       # the old default
    "evotune": (True, "PRESET", "evotune", {}),
}
SUITES = {"targeted": ["random", "longest", "kcenter", "kcenter_ifd", "ifd_loop", "less",
                       "rds_once", "rds_loop", "rds_ifd", "ifd_mix", "evotune"],
          "quality": ["random", "longest", "kcenter", "kcenter_ifd", "ifd_loop", "less",
                      "rds_once", "rds_loop", "rds_ifd", "ifd_mix", "evotune"]}
BUDGETS = {"targeted": [0.05, 0.1], "quality": [0.1]}


# ----------------------------------------------------------------------------- data

def _tokens(row: dict, tokenizer) -> int:
    from evotune.trainer.data import encode, parse_row
    return len(encode(parse_row(row, "row", "x"), tokenizer, "chat", 10 ** 6).input_ids)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_data(where: Path) -> dict[str, Path]:
    """The suites' files under ``where`` (deterministic; rebuilt only when missing)."""
    files = {name: where / f"{name}.jsonl" for name in ("pool", "targets", "eval", "noisy")}
    if all(f.is_file() for f in files.values()):
        return files
    from evotune.trainer.model import load_tokenizer, resolve_model_path
    tok = load_tokenizer(resolve_model_path("embedded:smollm2-135m-instruct"))
    rng = random.Random("evotune-targeted-benchmark")

    def fits(rows, limit=POOL_TOKENS):
        return [r for r in rows if _tokens(r, tok) <= limit]

    pool_rows = _read(DATA / "pool.jsonl")
    families = {"gsm8k": [r for r in pool_rows if r["source"] == "gsm8k"],
                "t0": [r for r in pool_rows if r["source"].startswith("t0/")],
                "self-instruct-seed": [r for r in pool_rows
                                       if r["source"] == "self-instruct-seed"]}
    pool = []
    for family, n in (("gsm8k", 300), ("t0", 650), ("self-instruct-seed", 100)):
        rows = families[family][:]
        rng.shuffle(rows)
        pool += fits(rows[: n * 2])[:n]
    chat = _read(DATA / "pool_chat.jsonl")
    rng.shuffle(chat)
    pool += fits(chat)[:150]
    rng.shuffle(pool)

    gsm = fits(_read(DATA / "eval" / "gsm8k_test.jsonl"), EVAL_TOKENS)
    t0 = fits(_read(DATA / "eval" / "t0_heldout.jsonl"), EVAL_TOKENS)
    target_ids = {r["id"] for r in gsm[:16]}
    per_dataset: dict[str, int] = {}
    for r in t0:
        dataset = r["source"].split("/")[1].split("_")[0]
        if per_dataset.get(dataset, 0) < 4:
            per_dataset[dataset] = per_dataset.get(dataset, 0) + 1
            target_ids.add(r["id"])
    keep = ("id", "source", "instruction", "input", "output")
    targets = [{**{k: r[k] for k in keep}, "subtask": "gsm8k" if r["source"] == "gsm8k" else "t0"}
               for r in gsm + t0 if r["id"] in target_ids]
    evals = [{k: v for k, v in r.items() if k != "final_answer"} for r in gsm + t0
             if r["id"] not in target_ids]
    # The noisy pool keeps a clean row and its corrupted copy together or drops both (71 pairs
    # have a row over POOL_TOKENS), so the clean share stays 50%.
    noisy = _read(DATA / "pool_noisy.jsonl")
    too_long = {r["orig_id"] for r in noisy if _tokens(r, tok) > POOL_TOKENS}
    noisy = [r for r in noisy if r["orig_id"] not in too_long]
    where.mkdir(parents=True, exist_ok=True)
    for name, rows in (("pool", pool), ("targets", targets), ("eval", evals), ("noisy", noisy)):
        files[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return files


# ----------------------------------------------------------------------------- runs

def preset_rule(name: str) -> tuple[dict, dict]:
    """configs/<name>.yaml's selection rule and scoring settings (budget and rounds aside)."""
    spec = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    selection = {k: v for k, v in spec.get("selection", {}).items()
                 if k not in ("rounds", "init_size", "per_round", "first_round")}
    return selection, spec.get("scoring", {})


def _fill(value, files: dict[str, Path]):
    if value == "TARGETS":
        return str(files["targets"])
    if isinstance(value, dict):
        return {k: _fill(v, files) for k, v in value.items()}
    return value


def arm_config(arm: str, suite: str, budget: float, seed: int, files: dict[str, Path],
               out: Path, pool_rows: int) -> dict:
    in_loop, selection, scoring, influence = ARMS[arm]
    if selection == "PRESET":                       # the rule of configs/<scoring>.yaml
        selection, scoring = preset_rule(scoring)
        if "rds" in scoring:
            scoring = {**scoring, "rds": {**scoring["rds"], "targets": "TARGETS"}}
    n = max(2, round(budget * pool_rows))
    cfg = json.loads(json.dumps(BASE))
    cfg["seed"] = seed
    cfg["data"]["pool"] = str(files["pool" if suite == "targeted" else "noisy"])
    cfg["eval"]["path"] = str(files["eval"])
    sel = {**selection, "rounds": 2 if in_loop else 1, "init_size": n // 2 if in_loop else n,
           "per_round": n - n // 2,
           "first_round": "random" if in_loop or arm == "random" else "selector"}
    cfg["selection"] = _fill(sel, files)
    if scoring:
        cfg["scoring"] = _fill(scoring, files)
    if influence:
        cfg["influence"] = _fill(influence, files)
    cfg["output"] = {**cfg["output"], "dir": str(out)}
    return cfg


def warmup_config(suite: str, budget: float, seed: int, files, out: Path, pool_rows: int):
    """Round 0 of every in-loop arm: a seeded random half of the budget (not evaluated: only
    the final models are compared; eval.path may change on resume)."""
    cfg = arm_config("kcenter", suite, budget, seed, files, out, pool_rows)
    cfg["selection"]["rounds"] = 1
    del cfg["eval"]["path"]
    return cfg


def train(cfg: dict, out: Path, log_file: Path, threads: int | None = None) -> None:
    """One ``launch/train.py`` run of ``cfg`` into ``out`` (resumed when it was started),
    its output appended to ``log_file``; ``threads``: torch's CPU threads (default: all)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg_file = out.parent / f"{out.name}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
                            if threads else {})}
    with open(log_file, "a") as log:
        log.write(f"\n==== {out}\n")
        log.flush()
        subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config",
                        str(cfg_file), "--resume", "auto"], check=True, stdout=log,
                       stderr=subprocess.STDOUT, env=env)


def finished(out: Path) -> bool:
    return (out / "final").is_dir() and (out / "rounds.jsonl").is_file()


def run_arm(arm, suite, budget, seed, files, root: Path, pool_rows: int, log_file: Path) -> Path:
    out = root / suite / arm / f"b{budget:g}" / f"seed{seed}"
    if finished(out):
        return out
    if ARMS[arm][0]:
        warm = root / suite / "_warmup" / f"b{budget:g}" / f"seed{seed}"
        if not finished(warm):
            train(warmup_config(suite, budget, seed, files, warm, pool_rows), warm, log_file)
        if not (out / "rounds" / "round_000" / "state.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(warm, out)
            shutil.rmtree(out / "final")
    train(arm_config(arm, suite, budget, seed, files, out, pool_rows), out, log_file)
    return out


# ----------------------------------------------------------------------------- results

def read_run(out: Path, pool: dict[str, dict]) -> dict:
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    last = rounds[-1]
    tokens: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for s in rounds:
        for k, v in s["tokens"].items():
            if not k.endswith("_padded"):
                tokens[k] = tokens.get(k, 0) + v
        for k, v in s["seconds"].items():
            seconds[k] = seconds.get(k, 0.0) + v
    picks = [json.loads(x) for r in range(len(rounds)) for x in
             (out / "rounds" / f"round_{r:03d}" / "selection.jsonl").read_text().splitlines()]
    chosen = [p for p in picks if p["round"] > 0 or len(rounds) == 1 and p["selector"] != "random"]
    clean = lambda rows: (sum(pool[p["id"]].get("corruption") is None for p in rows) / len(rows)
                          if rows else None)
    groups = last.get("eval_by_source", {})
    return {"loss": last["eval_loss"], "accuracy": last["eval_accuracy"],
            "gsm8k_loss": groups.get("gsm8k", {}).get("loss"),
            "t0_loss": groups.get("t0", {}).get("loss"),
            "t0_accuracy": groups.get("t0", {}).get("accuracy"),
            "t0_choice_rows": groups.get("t0", {}).get("choice_rows", 0),
            "clean": clean(picks), "clean_chosen": clean(chosen),
            "by_source": last["total_by_source"], "examples": last["total_examples"],
            "tokens": tokens, "seconds": seconds,
            "cached": sorted({p for s in rounds for p in s.get("cached_passes", [])})}


METRICS = {"targeted": [("gsm8k_loss", "GSM8K held-out loss (lower is better)", 4),
                        ("t0_loss", "T0 held-out loss (lower is better)", 4),
                        ("t0_accuracy", "T0 held-out multiple-choice accuracy", 3)],
           "quality": [("clean", "share of clean rows among all picks", 3),
                       ("clean_chosen", "share of clean rows among the rule's picks (in-loop "
                                        "arms: round 1; one-shot arms: all)", 3),
                       ("loss", "held-out loss, GSM8K + T0 (lower is better)", 4)]}


def tables(suite: str, results: dict, budgets: list[float], arms: list[str]) -> str:
    lines = []
    for metric, label, digits in METRICS[suite]:
        rows = max((r.get("t0_choice_rows", 0) for v in results.values() for r in v), default=0)
        resolution = 1.0 / rows if metric == "t0_accuracy" and rows else 0.0
        lines += [f"\n**{label}** — mean ± std over seeds; Δ = arm − random; `*` = |Δ| exceeds "
                  f"twice its standard error over seeds (Welch)"
                  + (f" and one eval row ({resolution:.4f})" if resolution else "") + "\n",
                  "| arm | " + " | ".join(f"{b:.0%} of pool" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for arm in arms:
            cells = []
            for b in budgets:
                vals = [r[metric] for r in results.get((arm, b), []) if r[metric] is not None]
                ref = [r[metric] for r in results.get(("random", b), []) if r[metric] is not None]
                if not vals:
                    cells.append("-")
                    continue
                m, s = mean_std(vals)
                cell = f"{m:.{digits}f} ± {s:.{digits}f}"
                if arm != "random" and ref:
                    cell += (f" (Δ {m - mean_std(ref)[0]:+.{digits}f}"
                             f"{'*' if exceeds(vals, ref, resolution) else ''})")
                cells.append(cell)
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["\n**cost per run** (mean over seeds; scoring tokens = real tokens of every "
              "scoring pass, forward, IFD, reward and gradient (forward + backward), over all "
              "rounds, cached base-model passes counted as if computed; trained tokens over all "
              "rounds, the shared warm-up included; seconds: this machine, the fastest seed's)\n",
              "| arm | budget | examples | scoring tokens | of which gradient | trained tokens | "
              "select s | train s | eval s | total s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        for b in budgets:
            runs = results.get((arm, b), [])
            if not runs:
                continue

            def avg(f):
                return statistics.fmean(f(r) for r in runs)

            def fastest(phase):
                return min(sum(r["seconds"].get(k, 0.0) for k in phase) for r in runs)
            lines.append(
                f"| {arm} | {b:.0%} | {avg(lambda r: r['examples']):.0f} | "
                f"{avg(lambda r: sum(v for k, v in r['tokens'].items() if k != 'train')):,.0f} | "
                f"{avg(lambda r: r['tokens'].get('influence', 0)):,.0f} | "
                f"{avg(lambda r: r['tokens'].get('train', 0)):,.0f} | "
                f"{fastest(('features', 'select')):.0f} | {fastest(('train',)):.0f} | "
                f"{fastest(('eval',)):.0f} | {fastest(('total',)):.0f} |")
    return "\n".join(lines)


def composition(results: dict, budgets: list[float], arms: list[str]) -> str:
    """Share of each source family among the picks (targeted suite)."""
    lines = ["\n**what each arm picked** (share of the picks by source family, mean over seeds)\n",
             "| arm | budget | gsm8k | t0 | self-instruct | chat |", "|---|---|---|---|---|---|"]
    for arm in arms:
        for b in budgets:
            runs = results.get((arm, b), [])
            if not runs:
                continue
            share = {}
            for fam in ("gsm8k", "t0", "self-instruct-seed", "fastchat-dummy"):
                share[fam] = statistics.fmean(
                    sum(v for k, v in r["by_source"].items() if k.split("/")[0] == fam)
                    / r["examples"] for r in runs)
            lines.append(f"| {arm} | {b:.0%} | " + " | ".join(f"{v:.0%}" for v in share.values())
                         + " |")
    return "\n".join(lines)


def plot(results: dict, suite: str, budgets: list[float], arms: list[str], where: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = METRICS[suite]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 4.2))
    for ax, (metric, label, _) in zip(axes, metrics):
        for i, arm in enumerate(arms):
            pts = [(b, [r[metric] for r in results.get((arm, b), []) if r[metric] is not None])
                   for b in budgets]
            pts = [(b, mean_std(v)) for b, v in pts if v]
            if not pts:
                continue
            shift = (i - len(arms) / 2) * 0.08
            ax.errorbar([100 * b + shift for b, _ in pts], [m for _, (m, _) in pts],
                        yerr=[s for _, (_, s) in pts], marker="o", capsize=3, label=arm,
                        color=f"C{i}", ls="-" if len(pts) > 1 else "none")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("budget (% of pool)")
        ax.set_xticks([100 * b for b in budgets])
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"{suite}: SmolLM2-135M LoRA, mean ± std over seeds")
    fig.tight_layout()
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{suite}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_targeted", help="run dirs (reused when present)")
    p.add_argument("--suite", choices=["both", *SUITES], default="both")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: the suite's arms")
    p.add_argument("--budgets", type=float, nargs="+",
                   help="shares of the pool; default: the suite's (targeted 0.05 0.1, quality 0.1)")
    p.add_argument("--plots", default=str(REPO / "benchmarks" / "plots"))
    p.add_argument("--report", action="store_true",
                   help="train nothing: tables and plots from the runs already finished")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="model.precision of every run (give each its own --out)")
    args = p.parse_args()
    BASE["model"]["precision"] = args.precision
    root = Path(args.out).resolve()
    files = build_data(root / "data")
    log_file = root / "runs.log"
    suites = list(SUITES) if args.suite == "both" else [args.suite]
    t_all = time.time()
    report = [f"{time.strftime('%Y-%m-%d')}, seeds {args.seeds}"]
    for suite in suites:
        pool_file = files["pool" if suite == "targeted" else "noisy"]
        pool = {r["id"]: r for r in _read(pool_file)}
        arms = [a for a in SUITES[suite] if not args.arms or a in args.arms]
        results: dict = {}
        budgets = [b for b in BUDGETS[suite] if not args.budgets or b in args.budgets]
        jobs = [(arm, b, s) for s in args.seeds for b in budgets for arm in arms]
        for k, (arm, b, seed) in enumerate(jobs):
            out = root / suite / arm / f"b{b:g}" / f"seed{seed}"
            if not finished(out):
                if args.report:
                    print(f"missing: {suite} {arm} budget={b} seed={seed}")
                    continue
                t0 = time.time()
                print(f"[{suite} {k + 1}/{len(jobs)}] {arm} budget={b} seed={seed} ...",
                      end=" ", flush=True)
                try:
                    run_arm(arm, suite, b, seed, files, root, len(pool), log_file)
                except subprocess.CalledProcessError as e:      # one arm's failure: go on
                    print(f"FAILED (exit {e.returncode}; see {log_file})", flush=True)
                    continue
                print(f"{time.time() - t0:.0f} s", flush=True)
            results.setdefault((arm, b), []).append(read_run(out, pool))
        report.append(f"\n### {suite} ({len(pool)}-row pool)\n")
        report.append(tables(suite, results, budgets, arms))
        if suite == "targeted":
            report.append(composition(results, budgets, arms))
        if results:
            report.append(f"\nplot: {plot(results, suite, budgets, arms, Path(args.plots))}")
        (root / f"{suite}_results.json").write_text(json.dumps(
            {f"{a}|{b}": v for (a, b), v in results.items()}, indent=1))
    report.append(f"\nthis invocation: {(time.time() - t_all) / 60:.1f} min")
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
