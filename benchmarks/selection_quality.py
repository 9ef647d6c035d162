"""Selection quality: does a small, chosen subset train as well as random picks or all the data?

Trains SmolLM2-135M-Instruct (LoRA) on the same pool with every arm below, at several budgets
(fractions of the pool) and seeds, and evaluates each final model on the held-out set: per-token
loss on the gold answers and multiple-choice accuracy (the eval rows' ``choices`` ranked by
summed log-likelihood). Every arm trains its final model from the base weights for the same
number of epochs over its selected examples (same optimizer steps per example).

Arms (one round unless said; in-loop arms: round 0 is a seeded random half of the budget, round
1 adds the other half chosen with the round-0 model, and the final model is retrained from the
base on both halves, as DiverseEvol does):

    random        a seeded random sample
    longest       the longest responses (``length``; Zhao et al. 2024's baseline)
    kcenter       k-center on the current model's embeddings, in loop (DiverseEvol)
    ifd_proxy     Superfiltering: a frozen proxy (the base model itself: no GPT-2 here) scores
                  IFD once with its reference template; keep IFD <= 1, take the top
    ifd_loop      Cherry-style IFD from the current model (training template), in loop: keep
                  IFD <= 1, take the top
    evotune       evotune's default when recorded (now configs/ifd_mix.yaml): IFD <= 1, then
                  a greedy mix of normalised IFD and k-center distance, in loop
    full          every pool example (one run per seed, no budget)

Writes one run dir per (arm, budget, seed) under --out (a finished run is reused when the
script is started again), then prints Markdown tables for benchmarks/RESULTS.md and writes
PNG plots next to them (--plots). Cost per arm: examples scored, tokens forwarded by the scoring
passes, tokens trained, wall seconds per phase, all read from the runs' summaries.

    python benchmarks/selection_quality.py                      # the recorded configuration
    python benchmarks/selection_quality.py --seeds 1 --budgets 0.1 --arms random kcenter

The recorded configuration (3 seeds x 2 budgets x 6 arms + full, 39 runs) takes about 1 h 45 min
on a 2-core CPU; see benchmarks/RESULTS.md. More budgets: --budgets 0.05 0.1 0.2.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "model": {"path": "embedded:smollm2-135m-instruct"},
    "data": {"pool": str(REPO / "configs" / "data" / "quickstart_pool.jsonl"),
             "max_length": 256},
    "eval": {"path": str(REPO / "configs" / "data" / "quickstart_eval.jsonl"), "batch_size": 8},
    "train": {"epochs": 2, "batch_size": 4, "micro_batch_size": 4, "lr": 5.0e-4,
              "retrain_from_base": True},
    "output": {"save_features": False, "tensorboard": False},
}

# arm -> (rounds, first_round, selection/scoring settings)
ARMS = {
    "random": (1, "random", {}, {}),
    "longest": (1, "selector", {"selector": "weighted",
                                "weighted": {"score": "length", "alpha": 1.0}}, {}),
    "kcenter": (2, "random", {"selector": "kcenter"}, {}),
    "ifd_proxy": (1, "selector", {"selector": "weighted",
                                  "weighted": {"score": "ifd_superfilter", "alpha": 1.0},
                                  "filter_score": "ifd_superfilter", "filter_max": 1.0},
                  {"model": "embedded:smollm2-135m-instruct", "template": "reference",
                   "max_length": 256}),
    "ifd_loop": (2, "random", {"selector": "weighted",
                               "weighted": {"score": "ifd_cherry", "alpha": 1.0},
                               "filter_score": "ifd_cherry", "filter_max": 1.0}, {}),
    "evotune": (2, "random", {"selector": "weighted",
                              "weighted": {"score": "ifd_cherry", "alpha": 0.5},
                              "filter_score": "ifd_cherry", "filter_max": 1.0}, {}),
    "full": (1, "random", {}, {}),
}
IN_LOOP = ("kcenter", "ifd_loop", "evotune")
COLORS = {arm: f"C{i}" for i, arm in enumerate(ARMS)}    # the same colour per arm in every plot


def run_config(arm: str, budget: float, seed: int, pool_size: int, out: Path) -> dict:
    rounds, first, selection, scoring = ARMS[arm]
    n = pool_size if arm == "full" else max(2, round(budget * pool_size))
    cfg = json.loads(json.dumps(BASE))
    cfg["seed"] = seed
    cfg["data"]["max_examples"] = pool_size
    sel = {"rounds": rounds, "first_round": first, **selection}
    if rounds == 1:
        sel["init_size"] = n
    else:
        sel["init_size"] = n // 2
        sel["per_round"] = n - n // 2
    cfg["selection"] = sel
    if scoring:
        cfg["scoring"] = scoring
    cfg["output"] = dict(cfg["output"], dir=str(out))
    return cfg


def run_dir(root: Path, arm: str, budget: float, seed: int) -> Path:
    return root / arm / ("all" if arm == "full" else f"b{budget:g}") / f"seed{seed}"


def train(cfg: dict, out: Path, log_file: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg_file = out.parent / f"{out.name}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with open(log_file, "a") as log:
        subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config",
                        str(cfg_file), "--resume", "auto"], check=True, stdout=log,
                       stderr=subprocess.STDOUT)


def read_run(out: Path) -> dict:
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
    pool_rows = json.loads((out / "data_report.json").read_text())["pool_rows"]
    scored = pool_rows * sum("features" in s["seconds"] for s in rounds)   # each pass: the pool
    return {"loss": last["eval_loss"], "accuracy": last["eval_accuracy"],
            "per_round": [(s["round"], s["total_examples"], s["eval_loss"], s["eval_accuracy"])
                          for s in rounds],
            "examples": last["total_examples"], "tokens": tokens, "seconds": seconds,
            "choice_rows": last.get("eval_choice_rows", 0),
            "scored": scored, "by_source": last["total_by_source"]}


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def exceeds(a: list[float], b: list[float], resolution: float = 0.0) -> bool:
    """Is mean(a) - mean(b) larger than twice its standard error over seeds (Welch), and larger
    than the metric's resolution (accuracy: one eval row; identical accuracies in every seed
    have no spread, and a one-row difference would otherwise always count)?"""
    if len(a) < 2 or len(b) < 2:
        return False
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    se = math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))
    return abs(ma - mb) > max(2 * se, resolution + 1e-9)


def tables(results: dict, budgets: list[float], arms: list[str]) -> str:
    lines = []
    for metric, label, better in (("loss", "held-out loss on gold answers (lower is better)",
                                   "lower"),
                                  ("accuracy", "multiple-choice accuracy (higher is better)",
                                   "higher")):
        rows = max((r.get("choice_rows", 0) for v in results.values() for r in v), default=0)
        resolution = 1.0 / rows if metric == "accuracy" and rows else 0.0
        lines += [f"\n**{label}** — mean ± std over seeds; Δ = arm − random; `*` = |Δ| exceeds "
                  f"twice its standard error over seeds (Welch)"
                  + (f" and one eval row ({resolution:.4f})" if resolution else "") + "\n",
                  "| arm | " + " | ".join(f"{b:.0%} of pool" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for arm in arms:
            if arm == "full":
                continue
            cells = []
            for b in budgets:
                vals = [r[metric] for r in results.get((arm, b), [])]
                ref = [r[metric] for r in results.get(("random", b), [])]
                if not vals:
                    cells.append("-")
                    continue
                m, s = mean_std(vals)
                cell = f"{m:.4f} ± {s:.4f}" if metric == "loss" else f"{m:.3f} ± {s:.3f}"
                if arm != "random" and ref:
                    d = m - mean_std(ref)[0]
                    cell += f" (Δ {d:+.4f}{'*' if exceeds(vals, ref, resolution) else ''})"
                cells.append(cell)
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        full = [r[metric] for r in results.get(("full", None), [])]
        if full:
            m, s = mean_std(full)
            lines.append(f"| full (100%) | {m:.4f} ± {s:.4f} |" + " |" * (len(budgets) - 1))
    lines += ["\n**cost per run** (counts: mean over seeds; scored = examples forwarded by the "
              "scoring passes, summed over rounds; scoring tokens = real tokens of the feature/IFD "
              "passes; seconds: features+select / train / eval / whole run, the fastest seed's, "
              "since runs may share the machine)\n",
              "| arm | budget | examples | scored | scoring tokens | trained tokens | "
              "select s | train s | eval s | total s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        for b in ([None] if arm == "full" else budgets):
            runs = results.get((arm, b), [])
            if not runs:
                continue
            def avg(f):
                return statistics.fmean(f(r) for r in runs)

            def fastest(phase):
                return min(sum(r["seconds"].get(k, 0.0) for k in phase) for r in runs)
            lines.append(
                f"| {arm} | {'100%' if b is None else f'{b:.0%}'} | {avg(lambda r: r['examples']):.0f} | "
                f"{avg(lambda r: r['scored']):.0f} | "
                f"{avg(lambda r: sum(v for k, v in r['tokens'].items() if k != 'train')):,.0f} | "
                f"{avg(lambda r: r['tokens'].get('train', 0)):,.0f} | "
                f"{fastest(('features', 'select')):.0f} | {fastest(('train',)):.0f} | "
                f"{fastest(('eval',)):.0f} | {fastest(('total',)):.0f} |")
    return "\n".join(lines)


def plot(results: dict, budgets: list[float], arms: list[str], where: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    where.mkdir(parents=True, exist_ok=True)
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "loss", "held-out loss (gold answers)"),
                              (axes[1], "accuracy", "multiple-choice accuracy")):
        for arm in arms:
            if arm == "full":
                vals = [r[metric] for r in results.get(("full", None), [])]
                if vals:
                    m, s = mean_std(vals)
                    ax.axhline(m, color="black", ls="--", lw=1, label=f"full ({m:.3f})")
                    ax.axhspan(m - s, m + s, color="black", alpha=0.08)
                continue
            pts = [(b, mean_std([r[metric] for r in results[(arm, b)]]))
                   for b in budgets if results.get((arm, b))]
            if pts:
                ax.errorbar([100 * b for b, _ in pts], [m for _, (m, _) in pts],
                            yerr=[s for _, (_, s) in pts], marker="o", capsize=3, label=arm,
                            color=COLORS[arm])
        ax.set_xlabel("budget (% of pool)")
        ax.set_ylabel(label)
        ax.set_xticks([100 * b for b in budgets])
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M LoRA: final model vs budget (mean ± std over seeds)")
    fig.tight_layout()
    files.append(where / "quality_vs_budget.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(budgets), figsize=(4 * len(budgets), 3.8), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        for arm in IN_LOOP:
            runs = results.get((arm, b), [])
            if not runs:
                continue
            rounds = sorted({p[0] for r in runs for p in r["per_round"]})
            ms = [mean_std([p[2] for r in runs for p in r["per_round"] if p[0] == k])
                  for k in rounds]
            ax.errorbar(rounds, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o",
                        capsize=3, label=arm, color=COLORS[arm])
        if results.get(("random", b)):
            m = mean_std([r["loss"] for r in results[("random", b)]])[0]
            ax.axhline(m, color=COLORS["random"], ls="--", lw=1,
                       label=f"random, {b:.0%} at once")
        ax.set_title(f"budget {b:.0%}")
        ax.set_xlabel("round")
        ax.set_xticks([0, 1])
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=8)
    fig.suptitle("in-loop arms: held-out loss after each round (round 0 = random half)")
    fig.tight_layout()
    files.append(where / "quality_vs_round.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_quality", help="run dirs (reused when present)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--pool-size", type=int, default=200,
                   help="first N rows of configs/data/quickstart_pool.jsonl")
    p.add_argument("--plots", default=str(REPO / "benchmarks" / "plots"))
    p.add_argument("--report", action="store_true",
                   help="train nothing: tables and plots from the runs already finished")
    args = p.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    log_file = root / "runs.log"
    jobs = [(arm, None if arm == "full" else b, s) for s in args.seeds for arm in args.arms
            for b in ([None] if arm == "full" else args.budgets)]
    results: dict = {}
    t_all = time.time()
    for k, (arm, b, seed) in enumerate(jobs):
        out = run_dir(root, arm, b or 0.0, seed)
        done = (out / "final").is_dir() and (out / "rounds.jsonl").is_file()
        if not done and args.report:
            print(f"missing: {arm} budget={b} seed={seed}")
            continue
        if not done:
            t0 = time.time()
            print(f"[{k + 1}/{len(jobs)}] {arm} budget={b} seed={seed} ...", end=" ", flush=True)
            train(run_config(arm, b or 1.0, seed, args.pool_size, out), out, log_file)
            print(f"{time.time() - t0:.0f} s", flush=True)
        results.setdefault((arm, b), []).append(read_run(out))
    print(f"\n{len(jobs)} runs; this invocation {(time.time() - t_all) / 60:.1f} min; "
          f"{time.strftime('%Y-%m-%d')}; pool: first {args.pool_size} rows of "
          f"configs/data/quickstart_pool.jsonl; seeds {args.seeds}")
    print(tables(results, args.budgets, args.arms))
    for f in plot(results, args.budgets, args.arms, Path(args.plots)):
        print(f"plot: {f}")
    (root / "results.json").write_text(json.dumps(
        {f"{a}|{b}": v for (a, b), v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
