"""Does influence selection find the target task? (issue 4 evidence, SmolLM2-135M)

Runs ``configs/less.yaml`` (or another influence preset) for two rounds on the bundled pool:
round 0 trains on a random 5%, round 1 scores every remaining candidate's Adam-preconditioned
LoRA gradient against the validation set and picks the top ones. With a validation set drawn
from one source (configs/data/less_val_gsm8k.jsonl: GSM8K), the picks should hold that source
far above its share of the candidates. Prints a Markdown table for benchmarks/RESULTS.md.

    python benchmarks/influence_source.py [--config configs/less.yaml] [--out runs/bench_less]
        [--per-round 24] [KEY=VALUE ...]

About 10 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def family(source: str) -> str:
    return source.split("/")[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "less.yaml"))
    p.add_argument("--out", default="runs/bench_less")
    p.add_argument("--per-round", type=int, default=24)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    t0 = time.time()
    subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", args.config,
                    f"output.dir={args.out}", "selection.rounds=2",
                    f"selection.per_round={args.per_round}", "--resume", "never", "--overwrite",
                    *args.overrides], check=True)
    wall = time.time() - t0
    out = Path(args.out)
    rounds = out / "rounds"
    r0 = [json.loads(x) for x in (rounds / "round_000" / "selection.jsonl").read_text().splitlines()]
    r1 = [json.loads(x) for x in (rounds / "round_001" / "selection.jsonl").read_text().splitlines()]
    pool = [json.loads(x) for x in Path(json.loads((out / "config.json").read_text())["data"]["pool"])
            .read_text().splitlines()]
    taken = {x["id"] for x in r0}
    candidates = Counter(family(x["source"]) for x in pool if x["id"] not in taken)
    picked = Counter(family(x["source"]) for x in r1)
    summary = json.loads((rounds / "round_001" / "summary.json").read_text())
    n_cand, n_pick = sum(candidates.values()), sum(picked.values())
    lines = ["| source | share of candidates | share of influence picks | ratio |", "|---|---|---|---|"]
    for src, c in candidates.most_common():
        base, got = c / n_cand, picked.get(src, 0) / n_pick
        lines.append(f"| {src} | {base:.1%} ({c}) | {got:.1%} ({picked.get(src, 0)}) | "
                     f"{got / base:.2f}× |")
    top = Counter(x.get("top_subtask") for x in r1)
    print(f"Config {args.config} (2 rounds, {n_pick} influence picks from {n_cand} candidates); "
          f"{time.strftime('%Y-%m-%d')}; wall {wall / 60:.1f} min; gradient pass "
          f"{summary['seconds']['features']:.0f} s, {summary.get('influence_tokens_per_s', 0):.0f} "
          f"tokens/s; top_subtask of the picks: {dict(top)}.\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
