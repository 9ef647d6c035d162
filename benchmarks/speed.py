"""Speed of evotune's own work, each figure as a ratio measured in the same run.

    python benchmarks/speed.py                 # every part (about 10 minutes on a 2-core CPU)
    python benchmarks/speed.py --parts pass ifd

Parts:
  pass     the embedding/scoring pass vs the model's raw forward on the same tokens (the
           hardware limit for this work), with and without length bucketing
  ifd      IFD scoring (evotune's batched passes) vs a batch-size-1 loop written the way the
           reference IFD scripts are (one forward per example for the conditioned loss, one for
           the direct loss), on the same examples; the IFD values are compared too
  kcenter  k-center greedy on N x D embeddings (N in --kcenter-n, D = 576): time and peak memory,
           against a version that builds the N x N distance matrix (run only where it fits)
  train    training steps of the round loop (trainer.fit.train_round) vs a plain DeepSpeed
           loop on the same model, data and batches
  reselect reselection cost per round (features + select) as a fraction of the round's wall
           time, per arm, read from benchmarks/selection_quality.py's runs (--quality-dir)

Model: the embedded SmolLM2-135M-Instruct, fp32; data: the bundled pool
(configs/data/quickstart_pool.jsonl, max_length 256). Timings alternate the compared variants
and keep the best of --repeats runs, since a shared machine is noisy. Prints Markdown for
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POOL = REPO / "configs" / "data" / "quickstart_pool.jsonl"


def best_of(repeats: int, *fns):
    """Run each function ``repeats`` times, alternating; the best (min) seconds of each, and
    each function's last return value."""
    best = [float("inf")] * len(fns)
    out = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            out[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best, out


_STRATEGY = None


def setup(n_examples: int):
    """Config, strategy (one rank), tokenizer, pool and its encodings."""
    from evotune.trainer.config import load_config
    from evotune.trainer.data import encode_all, load_examples, resolve_template
    from evotune.trainer.engine import Strategy
    from evotune.trainer.model import load_tokenizer, resolve_model_path
    cfg = load_config(str(REPO / "configs" / "quickstart.yaml"),
                      [f"data.pool={POOL}", f"data.max_examples={n_examples}",
                       "output.tensorboard=false"])
    global _STRATEGY
    if _STRATEGY is None:           # one process group for every part
        _STRATEGY = Strategy(cfg)
        _STRATEGY.setup()
    strategy = _STRATEGY
    strategy.cfg = cfg              # this part's settings (the DeepSpeed config reads them)
    path = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(path)
    template = resolve_template(cfg.data.template, tok)
    examples, _ = load_examples(cfg.data.pool, "error", n_examples)
    pool, enc, _ = encode_all(examples, tok, template, cfg.data.max_length, "error")
    return cfg, strategy, path, tok, template, pool, enc


# ----------------------------------------------------------------------------- pass

def part_pass(args) -> str:
    import torch

    import evotune.trainer.passes.forward as forward_mod
    from evotune.trainer.scores import names as score_names
    from evotune.trainer.data import collate, plan_batches
    from evotune.trainer.model import backbone, load_model
    cfg, strategy, path, tok, _, _, enc = setup(args.pass_n)
    model = load_model(path, strategy.dtype).eval()
    bs, pad = cfg.selection.batch_size, tok.pad_token_id
    lengths = [len(e.input_ids) for e in enc]
    bucketed = plan_batches(lengths, bs)
    in_order = [list(range(i, min(i + bs, len(enc)))) for i in range(0, len(enc), bs)]

    def raw(batches, decoder_only):
        def fn():
            with torch.no_grad():
                for b in batches:
                    x = collate([enc[i] for i in b], pad)
                    if decoder_only:
                        backbone(model)(input_ids=x["input_ids"], attention_mask=x["attention_mask"])
                    else:
                        model(input_ids=x["input_ids"], attention_mask=x["attention_mask"])
        return fn

    def ours(batches):
        def fn():
            saved = forward_mod.plan_batches
            forward_mod.plan_batches = lambda lengths, size: batches
            try:
                return forward_mod.compute_features(model, enc, strategy, pad, bs, True,
                                                    score_names("forward"))
            finally:
                forward_mod.plan_batches = saved
        return fn

    real = sum(lengths)
    padded = {name: sum(len(b) * max(lengths[i] for i in b) for b in batches)
              for name, batches in (("bucketed", bucketed), ("in order", in_order))}
    secs, _ = best_of(args.repeats, ours(bucketed), raw(bucketed, False), raw(bucketed, True),
                      ours(in_order), raw(in_order, False))
    names = ["evotune pass (embeddings + 6 scores), bucketed",
             "raw forward, full model (LM head on every position), bucketed",
             "raw forward, decoder only (no LM head), bucketed",
             "evotune pass, pool order (no bucketing)",
             "raw forward, full model, pool order"]
    lines = [f"{len(enc)} examples, {real:,} real tokens, batch {bs}; padding: bucketed "
             f"{padded['bucketed'] / real - 1:.1%}, pool order {padded['in order'] / real - 1:.1%}"
             f"; best of {args.repeats}\n",
             "| pass | seconds | real tokens/s | vs raw full-model forward, same batches |",
             "|---|---|---|---|"]
    for k, (name, s) in enumerate(zip(names, secs)):
        ref = secs[1] if k < 3 else secs[4]
        lines.append(f"| {name} | {s:.1f} | {real / s:,.0f} | {ref / s:.2f}× |")
    lines.append(f"\nevotune pass vs the decoder-only forward (the tightest limit: embeddings "
                 f"need no LM head): {secs[2] / secs[0]:.2f}×; bucketing speeds the evotune pass "
                 f"up {secs[3] / secs[0]:.2f}×.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- ifd

def part_ifd(args) -> str:
    import numpy as np
    import torch

    from evotune.trainer.passes.features import FeaturePass
    from evotune.trainer.logs import ProgressBars
    from evotune.trainer.model import load_model
    cfg, strategy, path, tok, template, pool, enc = setup(args.ifd_n)
    model = load_model(path, strategy.dtype).eval()

    class Request:
        name, scores, needs_embeddings = "bench", ("ifd_cherry",), True

    fp = FeaturePass(cfg, Request(), pool, enc, tok, template, strategy)
    quiet = ProgressBars(False, None)
    pairs = fp.ifd.inputs["shared"]

    def ours():
        result = fp.run(model, quiet)
        return result.features.scores["ifd_cherry"], result.stats

    def one_at_a_time():
        # As the reference scripts: per example, a forward of the whole text with labels on the
        # answer, then a forward of the answer alone; batch size 1, HF's own loss.
        out = []
        with torch.no_grad():
            for cond, direct in pairs:
                losses = []
                for e in (cond, direct):
                    labels = torch.tensor([e.labels])
                    losses.append(float(model(input_ids=torch.tensor([e.input_ids]),
                                              labels=labels).loss))
                out.append(losses[0] / losses[1])
        return np.array(out)

    secs, ((a, stats), b) = best_of(args.repeats, ours, one_at_a_time)
    diff = float(np.nanmax(np.abs(a - b)))
    extra = stats["ifd"].seconds
    tokens = sum(len(c.input_ids) + len(d.input_ids) for c, d in pairs)
    return (f"{len(pairs)} examples ({tokens:,} tokens in the two passes), best of "
            f"{args.repeats}\n\n| IFD scoring | seconds | examples/s |\n|---|---|---|\n"
            f"| evotune (embedding pass, which also yields the conditioned loss, + one batched "
            f"direct pass, batch "
            f"{cfg.selection.batch_size}) | {secs[0]:.1f} | {len(pairs) / secs[0]:.1f} |\n"
            f"| batch-size-1 loop, two forwards per example (reference scripts' shape) | "
            f"{secs[1]:.1f} | {len(pairs) / secs[1]:.1f} |\n"
            f"| evotune's extra cost for IFD: the direct pass alone (the conditioned loss comes "
            f"from the embedding pass a round runs anyway) | {extra:.1f} | "
            f"{len(pairs) / extra:.1f} |\n\nevotune's whole pass (embeddings and IFD) is "
            f"{secs[1] / secs[0]:.1f}× faster than the batch-size-1 loop; IFD's extra cost in a "
            f"round is {secs[1] / extra:.1f}× less than that loop. Largest IFD difference between "
            f"the two: {diff:.1e}.")


# ----------------------------------------------------------------------------- kcenter

KCENTER_CHILD = r"""
import json, sys, time
import numpy as np, torch
from evotune.selectors.kcenter import kcenter_greedy
n, d, labeled, picks, mode, chunk = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                     int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
rng = np.random.default_rng(0)
x = rng.standard_normal((n, d), dtype=np.float32)
lab = np.arange(labeled)
cand = np.arange(labeled, n)

def peak_mib():   # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
t0 = time.perf_counter()
if mode == "ours":
    got, _ = kcenter_greedy(x, lab, cand, picks, chunk)
else:   # the N x N way: every pairwise distance first, then the same greedy rule
    t = torch.from_numpy(x)
    full = torch.cdist(t, t)
    mind = full[:, lab].min(dim=1).values
    got = []
    for _ in range(picks):
        mind[lab] = -1
        mind[torch.as_tensor(got, dtype=torch.long)] = -1
        j = int(mind.argmax())
        got.append(j)
        mind = torch.minimum(mind, full[:, j])
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_mib": peak_mib(),
                  "data_mib": x.nbytes / 2**20, "picks": [int(v) for v in got][:5]}))
"""


def part_kcenter(args) -> str:
    total_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    d, labeled, picks = 576, args.kcenter_labeled, args.kcenter_picks
    lines = [f"D = {d}, {labeled} labeled, {picks} picks, random fp32 embeddings; peak = the "
             f"process's peak RSS (Python + torch + the data); machine RAM {total_mib / 1024:.0f}"
             f" GiB\n", "| N | embeddings | evotune k-center: seconds | peak | N×N version: "
             "seconds | peak |", "|---|---|---|---|---|---|"]
    for n in args.kcenter_n:
        row = []
        for mode in ("ours", "nxn"):
            need = n * n * 4 / 2**20
            if mode == "nxn" and need > 0.6 * total_mib:
                row.append(f"not run: the matrix alone needs {need / 1024:,.0f} GiB | –")
                continue
            proc = subprocess.run([sys.executable, "-c", KCENTER_CHILD, str(n), str(d),
                                   str(labeled), str(picks), mode, "4096"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                row.append(f"failed ({proc.stderr.strip().splitlines()[-1][:60]}) | –")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            row.append(f"{r['seconds']:.2f} | {r['peak_mib']:,.0f} MiB")
            data = r["data_mib"]
        lines.append(f"| {n:,} | {data:,.0f} MiB | " + " | ".join(row) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- train

def part_train(args) -> str:
    from evotune.trainer.data import collate
    from evotune.trainer.fit import logits_window, plan_steps, token_loss_sum, train_round
    from evotune.trainer.logs import RunLogger
    from evotune.trainer.model import build_trainable_model
    cfg, strategy, path, tok, _, _, enc = setup(args.train_n)
    cfg.train.epochs = 1
    engine = strategy.prepare(build_trainable_model(cfg, path, strategy.dtype, 0))
    positions = list(range(len(enc)))
    pad, micro = tok.pad_token_id, cfg.train.micro_batch_size
    tmp = Path(tempfile.mkdtemp())
    from rich.console import Console
    logger = RunLogger(tmp, True, False, Console(file=open(os.devnull, "w")))
    steps = plan_steps(positions, 1, cfg.train.batch_size, cfg.seed, 0)

    def loop():
        train_round(engine, strategy, cfg.train, enc, positions, 0, 0, pad, logger, cfg.seed)

    def plain(same_batches: bool):
        # the loop one writes from DeepSpeed's docs: forward with labels, backward, step
        def fn():
            for batch in steps:
                if same_batches:
                    batch = sorted(batch, key=lambda i: (len(enc[i].input_ids), i))
                for g in range(0, len(batch), micro):
                    b = collate([enc[i] for i in batch[g: g + micro]], pad)
                    if same_batches:   # the same micro-batches and loss as the round loop
                        out = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                     logits_to_keep=logits_window(b["labels"]))
                        loss = token_loss_sum(out.logits, b["labels"]) / max(
                            1, int((b["labels"] != -100).sum()))
                    else:
                        loss = engine(**b).loss
                    engine.backward(loss)
                    engine.step()
        return fn

    loop()    # warm-up (allocations, first-call costs)
    secs, _ = best_of(args.repeats, loop, plain(True), plain(False))
    tokens = sum(len(e.input_ids) for e in enc)
    return (f"{len(enc)} examples ({tokens:,} tokens), {len(steps)} optimizer steps of "
            f"{cfg.train.batch_size} (micro-batch {micro}), LoRA r {cfg.lora.r}, ZeRO-"
            f"{cfg.deepspeed.zero_stage}, one rank; best of {args.repeats}\n\n"
            "| training loop | seconds | vs round loop |\n|---|---|---|\n"
            f"| evotune round loop (`train_round`: progress bar, metrics.jsonl, per-step LR, "
            f"loss all-reduce, crash points) | {secs[0]:.1f} | 1.00× |\n"
            f"| plain DeepSpeed loop, the same micro-batches and loss | {secs[1]:.1f} | "
            f"{secs[1] / secs[0]:.2f}× |\n"
            f"| plain DeepSpeed loop as usually written (`engine(**batch).loss`, batches in "
            f"data order, logits on every position) | {secs[2]:.1f} | {secs[2] / secs[0]:.2f}× "
            f"|\n\nRound-loop overhead over the same work: {secs[0] / secs[1] - 1:+.1%}.")


# ----------------------------------------------------------------------------- reselect

def part_reselect(args) -> str:
    root = Path(args.quality_dir)
    rows: dict[str, list[tuple[float, float]]] = {}
    for f in sorted(root.glob("*/*/seed*/rounds.jsonl")):
        arm = f.parts[-4]
        for line in f.read_text().splitlines():
            s = json.loads(line)
            sec = s["seconds"]
            if "features" not in sec:
                continue
            rows.setdefault(arm, []).append((sec["features"] + sec.get("select", 0.0),
                                             sec["total"]))
    if not rows:
        return f"no selection rounds under {root} (run benchmarks/selection_quality.py first)"
    lines = [f"From the runs of benchmarks/selection_quality.py in {root}: every round that "
             "selected with a model (round 0 of the one-round scored arms, round 1 of the "
             "in-loop arms); whole-round time includes training and eval\n",
             "| arm | rounds | reselection s (mean) | round s (mean) | fraction |",
             "|---|---|---|---|---|"]
    for arm, vals in rows.items():
        sel = sum(v[0] for v in vals) / len(vals)
        tot = sum(v[1] for v in vals) / len(vals)
        lines.append(f"| {arm} | {len(vals)} | {sel:.1f} | {tot:.1f} | {sel / tot:.1%} |")
    return "\n".join(lines)


PARTS = {"pass": part_pass, "ifd": part_ifd, "kcenter": part_kcenter, "train": part_train,
         "reselect": part_reselect}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--pass-n", type=int, default=120, help="pool rows for the pass part")
    p.add_argument("--ifd-n", type=int, default=64, help="pool rows for the ifd part")
    p.add_argument("--train-n", type=int, default=32, help="pool rows for the train part")
    p.add_argument("--kcenter-n", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--kcenter-labeled", type=int, default=100)
    p.add_argument("--kcenter-picks", type=int, default=100)
    p.add_argument("--quality-dir", default="runs/bench_quality")
    args = p.parse_args()
    import torch
    print(f"# speed — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU threads, torch "
          f"{torch.__version__}, {torch.get_num_threads()} intra-op threads\n")
    for name in args.parts:
        t0 = time.time()
        text = PARTS[name](args)
        print(f"## {name} ({time.time() - t0:.0f} s)\n\n{text}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
