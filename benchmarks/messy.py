"""Does a chosen few percent beat random picks on a messy pool, every task family weighed alike?

The pool (``benchmarks/messy_pool.py``, built from ``../shared/datasets``): nine task families
of very different sizes (360 GSM8K problems down to a few dozen rows of the smallest), a
quarter of the answers corrupted (truncated, one-word, another row's answer) and a fifth of the
rows light copies of others. Every run is a real ``launch/train.py`` run of SmolLM2-135M-Instruct
with LoRA on this machine (bf16: the CPU has AMX; every arm the same), its final model
evaluated on unseen rows of every family. The measure is the **macro-averaged held-out loss**
(each family's mean loss per answer token, averaged over families with equal weight): what a
budget should buy is a model that does every kind of request in the pool well, not the
commonest kind; the token-weighted loss and the worst family's loss are reported beside it.

Arms (``ARMS``): one-shot arms choose the whole budget at once with the base model (random, the
longest answers); in-loop arms train on a seeded random half first (one warm-up run per budget
and seed, shared: each arm resumes from its round 0) and choose the other half with that model;
``<arm>@rule`` arms choose round 0 with the rule too (``selection.first_round: selector``, base
model), then round 1 with the round-0 model. The final model is trained from the base on every
pick. Arms reading the reference model get the builder's clean holdout
(``scoring.reference.data``); no reward model is available here (none can be downloaded, and
none ships with the embedded model), so the reward arm of the issue is not run.
The base model's features and the reference's pool losses are computed once and reused across
arms and seeds (``scoring.base_cache``). Two runs go side by side, one torch thread each
(``--jobs``).

    python benchmarks/messy.py --budgets 0.1 --seeds 1 2 3            # every arm at 10%
    python benchmarks/messy.py --budgets 0.05 --arms random kcenter    # 5%, two arms
    python benchmarks/messy.py --report                                # tables, no training
    python benchmarks/messy.py --overhead --seeds 1    # a rule's selection seconds, alone

Finished runs are reused when the script starts again; an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from messy_pool import build  # noqa: E402  (sibling scripts)
from selection_quality import exceeds, mean_std  # noqa: E402
import targeted  # noqa: E402
from targeted import finished, preset_rule  # noqa: E402

BASE = {
    "model": {"path": "embedded:smollm2-135m-instruct", "precision": "bf16"},
    "data": {"max_length": 320},
    "eval": {"batch_size": 16},
    "selection": {"batch_size": 16},
    "train": {"epochs": 2, "batch_size": 8, "micro_batch_size": 4, "lr": 5.0e-4,
              "retrain_from_base": True},
    "output": {"save_features": True, "tensorboard": False, "keep_checkpoints": 1},
}
# Quality gates: keep the half of the candidates with the lowest score (0.5: the median, not
# tuned). GATE: the reference's loss; EXCESS: the current model's loss over that of the rows
# with the nearest prompts (no extra pass); EXCESS_REF: the same with the reference's loss.
GATE = {"filter_score": "reference_loss", "filter_keep": "lowest", "filter_top_fraction": 0.5}
EXCESS = {"filter_score": "loss_excess", "filter_keep": "lowest", "filter_top_fraction": 0.5}
REFERENCE = {"reference": {"data": "HOLDOUT"}}
EXCESS_REF = {**REFERENCE, "loss_excess": {"of": "reference_loss"}}
# arm -> (in loop, selection settings, scoring settings); "PRESET": configs/<name>.yaml's rule
ARMS = {
    "random": (False, {}, {}),
    "longest": (False, {"selector": "weighted", "weighted": {"score": "length", "alpha": 1.0}},
                {}),
    "kcenter": (True, {"selector": "kcenter"}, {}),
    "ref_gate": (True, {"selector": "random", **GATE}, REFERENCE),
    "kcenter_ref": (True, {"selector": "kcenter", **GATE}, REFERENCE),
    "reducible": (True, {"selector": "weighted",
                         "weighted": {"score": "reducible_loss", "alpha": 1.0}}, REFERENCE),
    "reducible_share": (True, {"selector": "weighted",
                               "weighted": {"score": "reducible_share", "alpha": 1.0}},
                        REFERENCE),
    "reducible_mix": (True, {"selector": "weighted", "weighted": {
        "score": "reducible_loss", "alpha": 0.5}}, REFERENCE),
    "reducible_gated": (True, {"selector": "weighted", "weighted": {
        "score": "reducible_loss", "alpha": 1.0}, **GATE}, REFERENCE),
    "reducible_kcenter": (True, {"selector": "weighted", "weighted": {
        "score": "reducible_loss", "alpha": 0.5}, **GATE}, REFERENCE),
    "excess_gate": (True, {"selector": "random", **EXCESS}, {}),
    "kcenter_excess": (True, {"selector": "kcenter", **EXCESS}, {}),
    "kcenter_excess_ref": (True, {"selector": "kcenter", **EXCESS}, EXCESS_REF),
    "reducible_excess_ref": (True, {"selector": "weighted", "weighted": {
        "score": "reducible_loss", "alpha": 1.0}, **EXCESS}, EXCESS_REF),
    # the winner's rule with DEITA's representation filter in place of a plain top-k: walk
    # by reducible loss, skipping a row whose cosine to anything picked is above 0.97 (DEITA's
    # 0.9 is for its own encoder: in this model's mean-pooled states 27% of unrelated pairs
    # exceed 0.9, 1.2% exceed 0.97, and 99.8% of the known copy pairs do; measured on seed
    # 1's round-1 k-center embeddings)
    "reducible_repr_ref": (True, {"selector": "repr_filter", "repr_filter": {
        "score": "reducible_loss", "threshold": 0.97}, **EXCESS}, EXCESS_REF),
    "left": (True, {"selector": "weighted", "weighted": {"score": "loss_left", "alpha": 1.0}},
             {}),
    "left_excess": (True, {"selector": "weighted", "weighted": {
        "score": "loss_left", "alpha": 1.0}, **EXCESS}, {}),
    "left_kcenter_excess": (True, {"selector": "weighted", "weighted": {
        "score": "loss_left", "alpha": 0.5}, **EXCESS}, {}),
    "cluster": (True, {"selector": "cluster_quota", "cluster_quota": {
        "quota": "equal", "pick": "centroid"}}, {}),
    "cluster_excess": (True, {"selector": "cluster_quota", "cluster_quota": {
        "quota": "equal", "pick": "centroid"}, **EXCESS}, {}),
    "ifd_mix": (True, "PRESET", "ifd_mix"),
    "evotune": (True, "PRESET", "evotune"),
}


def arm_spec(arm: str) -> tuple[str, bool, bool]:
    """(rule, in loop, round 0 by the rule) of an arm name such as ``kcenter@rule``."""
    rule, _, first = arm.partition("@")
    if rule not in ARMS or first not in ("", "rule"):
        raise ValueError(f"unknown arm {arm!r}")
    in_loop = ARMS[rule][0]
    if first and not in_loop:
        raise ValueError(f"{arm}: {rule} is one-shot, round 0 is its only round")
    return rule, in_loop, bool(first)


# ----------------------------------------------------------------------------- runs

def _fill(value, files: dict[str, Path]):
    if value == "HOLDOUT":
        return str(files["holdout"])
    if isinstance(value, dict):
        return {k: _fill(v, files) for k, v in value.items()}
    return value


def arm_config(arm: str, budget: float, seed: int, files: dict[str, Path], out: Path,
               pool_rows: int) -> dict:
    rule, in_loop, by_rule = arm_spec(arm)
    _, selection, scoring = ARMS[rule]
    if selection == "PRESET":
        selection, scoring = preset_rule(scoring)
    n = max(2, round(budget * pool_rows))
    cfg = json.loads(json.dumps(BASE))
    cfg["seed"] = seed
    cfg["data"]["pool"] = str(files["pool"])
    cfg["eval"]["path"] = str(files["eval"])
    first = "selector" if by_rule or (not in_loop and rule != "random") else "random"
    cfg["selection"] = {**cfg["selection"], **_fill(selection, files),
                        "rounds": 2 if in_loop else 1,
                        "init_size": n // 2 if in_loop else n, "per_round": n - n // 2,
                        "first_round": first}
    if scoring:
        cfg["scoring"] = _fill(scoring, files)
    cfg["output"] = {**cfg["output"], "dir": str(out)}
    return cfg


def warmup_config(budget: float, seed: int, files, out: Path, pool_rows: int) -> dict:
    """Round 0 of every in-loop arm whose round 0 is random: a seeded random half of the budget
    (not evaluated: only the final models are compared)."""
    cfg = arm_config("kcenter", budget, seed, files, out, pool_rows)
    cfg["selection"]["rounds"] = 1
    del cfg["eval"]["path"]
    return cfg


def train(cfg: dict, out: Path, log_file: Path) -> None:
    """One ``launch/train.py`` run on one torch thread (two go side by side on 2 cores)."""
    targeted.train(cfg, out, log_file, threads=1)


def run_dir(root: Path, arm: str, budget: float, seed: int) -> Path:
    return root / arm / f"b{budget:g}" / f"seed{seed}"


def run_arm(arm: str, budget: float, seed: int, files, root: Path, pool_rows: int,
            log_file: Path) -> Path:
    out = run_dir(root, arm, budget, seed)
    if finished(out):
        return out
    _, in_loop, by_rule = arm_spec(arm)
    if in_loop and not by_rule:
        warm = root / "_warmup" / f"b{budget:g}" / f"seed{seed}"
        if not finished(warm):
            raise RuntimeError(f"warm-up {warm} is not finished")
        if not (out / "rounds" / "round_000" / "state.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(warm, out)
            shutil.rmtree(out / "final")
    train(arm_config(arm, budget, seed, files, out, pool_rows), out, log_file)
    return out


def prime_caches(files, root: Path, log_file: Path) -> None:
    """The reference model's and the base model's pool losses into the cache before runs go
    side by side (else the first two would both make them): one ``launch/score_pool.py``
    call."""
    cfg = arm_config("kcenter_ref", 0.1, 1, files, root / "_prime", 100)
    args = [f"model.path={cfg['model']['path']}", f"model.precision={cfg['model']['precision']}",
            f"data.pool={files['pool']}", f"data.max_length={cfg['data']['max_length']}",
            f"scoring.reference.data={files['holdout']}",
            f"selection.batch_size={cfg['selection']['batch_size']}",
            *(f"train.{k}={v}" for k, v in cfg["train"].items()),
            f"output.dir={root / '_prime'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    with open(log_file, "a") as log:
        log.write("\n==== prime: reference losses\n")
        log.flush()
        subprocess.run([sys.executable, str(REPO / "launch" / "score_pool.py"), *args,
                        "--scores", "reference_loss,base_loss", "--out", str(root / "_prime")],
                       check=True, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_all(jobs: list[tuple[str, float, int]], files, root: Path, pool_rows: int,
            log_file: Path, workers: int) -> None:
    """Every job, ``workers`` at a time; a job whose warm-up is not finished waits for it (the
    warm-ups are jobs too). One failed run is reported and the rest go on."""
    warmups = sorted({(b, s) for arm, b, s in jobs
                      if arm_spec(arm)[1] and not arm_spec(arm)[2]
                      and not finished(run_dir(root, arm, b, s))})
    todo: queue.Queue = queue.Queue()
    done_warm: dict[tuple[float, int], threading.Event] = {}
    for b, s in warmups:
        done_warm[(b, s)] = threading.Event()
        todo.put(("_warmup", b, s))
    for job in jobs:
        todo.put(job)
    started = time.time()
    lock = threading.Lock()

    def worker():
        while True:
            try:
                arm, b, s = todo.get_nowait()
            except queue.Empty:
                return
            t0 = time.time()
            try:
                if arm == "_warmup":
                    warm = root / "_warmup" / f"b{b:g}" / f"seed{s}"
                    try:
                        if not finished(warm):
                            train(warmup_config(b, s, files, warm, pool_rows), warm, log_file)
                    finally:
                        done_warm[(b, s)].set()
                else:
                    if (b, s) in done_warm and arm_spec(arm)[1] and not arm_spec(arm)[2]:
                        done_warm[(b, s)].wait()
                    if finished(run_dir(root, arm, b, s)):
                        continue
                    run_arm(arm, b, s, files, root, pool_rows, log_file)
                status = f"{time.time() - t0:.0f} s"
            except (subprocess.CalledProcessError, RuntimeError) as e:
                status = f"FAILED ({e}; see {log_file})"
            with lock:
                print(f"[{(time.time() - started) / 60:5.1f} min] {arm} budget={b:g} seed={s}: "
                      f"{status}", flush=True)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def overhead(arms: list[str], budget: float, seed: int, files, root: Path, pool_rows: int,
             log_file: Path) -> str:
    """What a rule's selection costs on top of another's: each arm's selecting round (round 1,
    from the shared warm-up) run again alone on the machine, one after the other, one thread;
    a Markdown table of the round's seconds by phase (``summary.json``)."""
    warm = root / "_warmup" / f"b{budget:g}" / f"seed{seed}"
    if not finished(warm):
        train(warmup_config(budget, seed, files, warm, pool_rows), warm, log_file)
    rows = ["| arm | features s | select s | train s | eval s | round total s | "
            "features + select, share of the round |", "|---|---|---|---|---|---|---|"]
    for arm in arms:
        out = root / "_overhead" / arm
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(warm, out)
        shutil.rmtree(out / "final")
        train(arm_config(arm, budget, seed, files, out, pool_rows), out, log_file)
        sec = json.loads((out / "rounds" / "round_001" / "summary.json").read_text())["seconds"]
        rows.append(f"| `{arm}` | {sec['features']:.1f} | {sec['select']:.1f} | "
                    f"{sec['train']:.1f} | {sec.get('eval', 0.0):.1f} | {sec['total']:.1f} | "
                    f"{(sec['features'] + sec['select']) / sec['total']:.1%} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- results

def _picks(out: Path, rounds: int) -> list[dict]:
    return [json.loads(x) for r in range(rounds) for x in
            (out / "rounds" / f"round_{r:03d}" / "selection.jsonl").read_text().splitlines()]


def read_run(out: Path, arm: str, pool: dict[str, dict], families: list[str]) -> dict:
    """One finished run's figures (the module docstring says what each means)."""
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    last = rounds[-1]
    _, in_loop, by_rule = arm_spec(arm)
    picks = _picks(out, len(rounds))
    own = [p for p in picks if p["round"] > 0 or by_rule or (not in_loop and arm != "random")]
    groups = last["eval_by_source"]
    missing = [f for f in families if f not in groups]
    if missing:
        raise ValueError(f"{out}: no eval figures for {', '.join(missing)}")
    losses = {f: groups[f]["loss"] for f in families}

    def clean(rows):
        return sum(pool[p["id"]]["corruption"] is None for p in rows) / len(rows) if rows \
            else None

    def redundant(rows):
        """Share of ``rows`` whose duplicate group already had a pick before them (pick order
        over every round: the warm-up's picks count as earlier ones)."""
        if not rows:
            return None
        seen, extra = set(), 0
        mine = {id(p) for p in rows}
        for p in picks:
            g = pool[p["id"]]["group"]
            if g is not None:
                if g in seen and id(p) in mine:
                    extra += 1
                seen.add(g)
        return extra / len(rows)

    tokens = {k: sum(s["tokens"].get(k, 0) for s in rounds) for k in
              {k for s in rounds for k in s["tokens"] if not k.endswith("_padded")}}
    seconds = {k: sum(s["seconds"].get(k, 0.0) for s in rounds) for k in
               {k for s in rounds for k in s["seconds"]}}
    share = {f: sum(pool[p["id"]]["family"] == f for p in picks) / len(picks) for f in families}
    return {"macro_loss": statistics.fmean(losses.values()), "worst_loss": max(losses.values()),
            "worst_family": max(losses, key=losses.get), "token_loss": last["eval_loss"],
            "family_loss": losses, "clean": clean(picks), "clean_own": clean(own),
            "dup": redundant(picks), "dup_own": redundant(own), "examples": len(picks),
            "own": len(own), "share": share,
            "select_tokens": sum(v for k, v in tokens.items() if k != "train"),
            "select_seconds": sum(seconds.get(k, 0.0) for k in ("features", "select",
                                                                "reference", "base")),
            "train_seconds": seconds.get("train", 0.0), "eval_seconds": seconds.get("eval", 0.0),
            "total_seconds": seconds.get("total", 0.0) + seconds.get("reference", 0.0)
            + seconds.get("base", 0.0),
            "cached": sorted({p for s in rounds for p in s.get("cached_passes", [])})}


METRICS = [("macro_loss", "macro-averaged held-out loss (every family weighted alike; lower "
                          "is better)", 4),
           ("worst_loss", "the worst family's held-out loss (lower is better)", 4),
           ("token_loss", "token-weighted held-out loss (lower is better)", 4),
           ("clean", "clean share, all picks", 3),
           ("clean_own", "clean share, the rule's own picks", 3),
           ("dup", "redundant share, all picks (a pick whose duplicate group was already "
                   "picked)", 3),
           ("dup_own", "redundant share, the rule's own picks", 3)]


def table(results: dict, budget: float, arms: list[str]) -> str:
    """One Markdown table per budget: every metric of every arm, mean ± std over seeds, with
    Δ against random and ``*`` where |Δ| exceeds twice its standard error (Welch)."""
    head = ["arm", "seeds"] + [m for m, _, _ in METRICS] + ["select tokens", "select s",
                                                            "total s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = results.get(("random", budget), [])
    for arm in arms:
        runs = results.get((arm, budget), [])
        if not runs:
            continue
        cells = [f"`{arm}`", str(len(runs))]
        for metric, _, digits in METRICS:
            vals = [r[metric] for r in runs if r[metric] is not None]
            if not vals:
                cells.append("–")
                continue
            m, s = mean_std(vals)
            cell = f"{m:.{digits}f} ± {s:.{digits}f}" if len(vals) > 1 else f"{m:.{digits}f}"
            base = [r[metric] for r in ref if r[metric] is not None]
            if arm != "random" and base:
                cell += (f" (Δ {m - mean_std(base)[0]:+.{digits}f}"
                         f"{'*' if exceeds(vals, base) else ''})")
            cells.append(cell)
        cells += [f"{statistics.fmean(r['select_tokens'] for r in runs):,.0f}",
                  f"{min(r['select_seconds'] for r in runs):.0f}",
                  f"{min(r['total_seconds'] for r in runs):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def family_table(results: dict, budget: float, arms: list[str], families: list[str]) -> str:
    """Per family: held-out loss (mean over seeds) and the share of the picks."""
    head = ["arm"] + families
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        runs = results.get((arm, budget), [])
        if runs:
            lines.append(f"| `{arm}` | " + " | ".join(
                f"{statistics.fmean(r['family_loss'][f] for r in runs):.3f} "
                f"({statistics.fmean(r['share'][f] for r in runs):.0%})" for f in families)
                + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_messy", help="run dirs (reused when present)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--arms", nargs="+", help=f"default: {' '.join(ARMS)}; <arm>@rule: round 0 "
                                              f"chosen by the rule too")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1])
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    p.add_argument("--report", action="store_true",
                   help="train nothing: the tables from the runs already finished")
    p.add_argument("--overhead", action="store_true",
                   help="time the selecting round of --arms (default: kcenter kcenter_excess) "
                        "alone, one after the other, at the first budget and seed")
    args = p.parse_args()
    arms = args.arms or list(ARMS)
    for arm in arms:
        arm_spec(arm)                                         # an unknown arm fails now
    root = Path(args.out).resolve()
    files = build(root / "data")
    pool = {r["id"]: r for r in map(json.loads, files["pool"].read_text().splitlines())}
    families = sorted({r["family"] for r in pool.values()})
    log_file = root / "runs.log"
    if args.overhead:
        print(overhead(args.arms or ["kcenter", "kcenter_excess"], args.budgets[0],
                       args.seeds[0], files, root, len(pool), log_file))
        return 0
    jobs = [(arm, b, s) for s in args.seeds for b in args.budgets for arm in arms]
    t_all = time.time()
    if not args.report:
        prime_caches(files, root, log_file)
        run_all(jobs, files, root, len(pool), log_file, args.jobs)
    results: dict = {}
    for arm, b, s in jobs:
        out = run_dir(root, arm, b, s)
        if not finished(out):
            print(f"missing: {arm} budget={b:g} seed={s}")
            continue
        results.setdefault((arm, b), []).append(read_run(out, arm, pool, families))
    report = [f"{time.strftime('%Y-%m-%d')}, {len(pool)}-row pool, seeds {args.seeds}"]
    for b in args.budgets:
        report += [f"\n### {b:.0%} of the pool\n", table(results, b, arms),
                   "\nper family: held-out loss (share of the picks)\n",
                   family_table(results, b, arms, families)]
    (root / "results.json").write_text(json.dumps(
        {f"{a}|{b}": v for (a, b), v in results.items()}, indent=1))
    report.append(f"\nthis invocation: {(time.time() - t_all) / 60:.1f} min")
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
