"""Which in-loop forms separate clean answers from corrupted ones on the messy pool, and which
keep every task family when used as a gate? Read off the messy benchmark's own runs.

Every arm of ``benchmarks/messy.py`` at one seed shares the same warm-up model (round 0: the
same seeded random half of the budget), so the round-1 ``features.npz`` of different arms hold
different scores of the same model on the same pool. This script puts them side by side, over
the round's candidates (the pool less the warm-up's picks), and for each form prints:

- its AUROC for "clean" (the probability that a clean row is preferred to a corrupted one;
  every form is signed so that the preferred end is the one a rule would take), overall and
  against each corruption kind;
- as a gate keeping the preferred half of the candidates: the clean share of what passes, and
  the smallest and largest share of a task family's candidates that pass (a gate that keeps
  almost none of a family cannot buy breadth).

Forms: the scores as the loop computes them (``loss``, ``base_loss``, ``reference_loss``,
``loss_excess`` of either model, ``reducible_loss``, ``reducible_share``, ``loss_left``), and
the raw differences the docs discuss (``base_loss − loss``, ``base_loss − reference_loss``).

    python benchmarks/messy.py --budgets 0.1 --seeds 1 --arms kcenter_excess \\
        kcenter_excess_ref reducible reducible_share left    # the runs it reads
    python benchmarks/messy_auroc.py --out runs/bench_messy --seed 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# score -> (arm whose round-1 features.npz holds it, name in that file, "high" or "low": the
# end a rule prefers)
SOURCES = {
    "loss": ("reducible", "score_loss", "low"),
    "base_loss": ("left", "score_base_loss", "low"),
    "reference_loss": ("reducible", "score_reference_loss", "low"),
    "loss_excess (current model)": ("kcenter_excess", "score_loss_excess", "low"),
    "loss_excess (reference)": ("kcenter_excess_ref", "score_loss_excess", "low"),
    "reducible_loss": ("reducible", "score_reducible_loss", "high"),
    "reducible_share": ("reducible_share", "score_reducible_share", "high"),
    "loss_left": ("left", "score_loss_left", "high"),
}


def forms(root: Path, budget: float, seed: int) -> tuple[dict[str, np.ndarray], list[str],
                                                          np.ndarray]:
    """Every form, signed so that higher = preferred, over the pool; the pool's ids; and the
    candidates of round 1 (a boolean mask). Raises FileNotFoundError naming a missing run."""
    values: dict[str, np.ndarray] = {}
    ids, warm = None, None
    for name, (arm, key, end) in SOURCES.items():
        path = root / arm / f"b{budget:g}" / f"seed{seed}" / "rounds" / "round_001" / \
            "features.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: run python benchmarks/messy.py --budgets "
                                    f"{budget:g} --seeds {seed} --arms {arm}")
        with np.load(path) as f:
            if key not in f.files:
                raise ValueError(f"{path}: no {key} (the arm's rule reads other scores)")
            if ids is None:
                ids = [str(i) for i in f["ids"]]
            elif [str(i) for i in f["ids"]] != ids:
                raise ValueError(f"{path}: another pool")
            values[name] = f[key].astype(np.float64) * (1.0 if end == "high" else -1.0)
        first = path.parents[1] / "round_000" / "selection.jsonl"
        picked = {json.loads(line)["id"] for line in first.read_text().splitlines()}
        if warm is None:
            warm = picked
        elif picked != warm:
            raise ValueError(f"{first}: another warm-up; the arms must share one")
    loss, base, ref = -values["loss"], -values["base_loss"], -values["reference_loss"]
    values["base_loss − loss (loss drop)"] = base - loss
    values["base_loss − reference_loss"] = base - ref
    return values, ids, np.array([i not in warm for i in ids])


def table(values: dict[str, np.ndarray], pool: dict[str, dict], ids: list[str],
          candidates: np.ndarray) -> str:
    from evotune.trainer.separation import auroc
    kinds = sorted({r["corruption"] for r in pool.values()} - {None})
    corruption = np.array([pool[i]["corruption"] or "" for i in ids])
    family = np.array([pool[i]["family"] for i in ids])
    clean = candidates & (corruption == "")
    head = ["form (preferred end)", "AUROC clean", *(f"vs {k}" for k in kinds),
            "half gate: clean", "family kept min–max"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in values.items():
        cells = [f"{auroc(v[clean], v[candidates & (corruption != '')]):.3f}"]
        cells += [f"{auroc(v[clean], v[candidates & (corruption == k)]):.3f}" for k in kinds]
        kept = candidates & (v >= np.nanmedian(v[candidates]))
        shares = [kept[candidates & (family == f)].sum() / (candidates & (family == f)).sum()
                  for f in sorted(set(family))]
        cells += [f"{(corruption[kept] == '').mean():.3f}", f"{min(shares):.2f}–{max(shares):.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_messy", help="the messy benchmark's run dirs")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--budget", type=float, default=0.1)
    args = p.parse_args()
    root = Path(args.out).resolve()
    pool = {r["id"]: r for r in map(json.loads, (root / "data" / "pool.jsonl")
                                    .read_text().splitlines())}
    try:
        values, ids, candidates = forms(root, args.budget, args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{int(candidates.sum())} candidates of round 1, seed {args.seed}, "
          f"{args.budget:.0%} budget\n")
    print(table(values, pool, ids, candidates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
