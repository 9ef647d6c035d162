"""Which scores separate corrupted answers from clean ones, on SmolLM2-135M (issue 3 evidence).

Scores ``pool_noisy.jsonl`` (300 clean rows and one corrupted copy of each: truncated answer,
one-word answer from another row, answer of another row) with ``launch/score_pool.py`` under
both IFD templates, and prints the AUROC table (clean rows vs their own corrupted copies) as
Markdown for benchmarks/RESULTS.md. The per-example scores and tables stay in --out.

    python benchmarks/noisy_auroc.py [--pool ../shared/datasets/pool_noisy.jsonl]
        [--model embedded:smollm2-135m-instruct] [--out runs/bench_noisy_auroc] [--limit N]

About 12 minutes on a 2-core CPU for the 600 rows (both templates).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pool", default=str(REPO.parent / "shared" / "datasets" / "pool_noisy.jsonl"))
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--out", default="runs/bench_noisy_auroc")
    p.add_argument("--limit", type=int, default=0, help="first N rows only (0 = all)")
    args = p.parse_args()
    if not Path(args.pool).is_file():
        print(f"error: --pool {args.pool}: file not found (the labelled noisy pool; see "
              f"benchmarks/RESULTS.md for where it comes from)", file=sys.stderr)
        return 2
    tables, summaries = {}, {}
    for template in ("train", "reference"):
        out = Path(args.out) / template
        scores = "loss,perplexity,length,least_confidence,margin,entropy,knn_k," \
                 "ifd_cherry,ifd_superfilter" if template == "train" else \
                 "ifd_cherry,ifd_superfilter"
        cmd = [sys.executable, str(REPO / "launch" / "score_pool.py"),
               f"model.path={args.model}", f"data.pool={Path(args.pool).resolve()}",
               "data.max_length=512", "data.on_error=skip", f"data.max_examples={args.limit}",
               f"scoring.template={template}", "scoring.max_length=512",
               "selection.batch_size=16", "--scores", scores,
               "--label", "corruption", "--pair", "orig_id", "--out", str(out)]
        t0 = time.time()
        subprocess.run(cmd, check=True)
        print(f"{template}: {time.time() - t0:.0f}s", file=sys.stderr)
        tables[template] = json.loads((out / "separation.json").read_text())
        summaries[template] = json.loads((out / "summary.json").read_text())
    print(markdown(tables, summaries, args))
    return 0


def markdown(tables: dict, summaries: dict, args) -> str:
    groups = list(tables["train"])
    head = "| score | " + " | ".join(
        f"{g} ({tables['train'][g]['n_clean']} vs {tables['train'][g]['n_bad']})"
        for g in groups) + " |"
    lines = [head, "|---|" + "---|" * len(groups)]
    for template, table in tables.items():
        for name in next(iter(table.values()))["scores"]:
            label = name if template == "train" else f"{name} (reference template)"
            if template == "train" and name.startswith("ifd"):
                label = f"{name} (train template)"
            cells = []
            for g in groups:
                s = table[g]["scores"][name]
                a = s["auroc"]
                nan = s["nan_clean"] + s["nan_bad"]
                cells.append("–" if math.isnan(a) else f"{a:.3f}" + (f" ({nan} n/a)" if nan else ""))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    passes = "; ".join(f"{t}: " + ", ".join(f"{k} {v['tokens']} tokens at {v['tokens_per_s']:.0f}/s"
                                          for k, v in s["passes"].items())
                       for t, s in summaries.items())
    return (f"Model {args.model}, pool {args.pool} ({summaries['train']['rows']} rows scored, "
            f"{summaries['train']['rows_skipped']} skipped), data.max_length 512; machine: "
            f"{platform.machine()}, {platform.processor() or 'cpu'}; {time.strftime('%Y-%m-%d')}.\n"
            f"Passes: {passes}.\n\n" + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
