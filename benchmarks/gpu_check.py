"""Does evotune work on this GPU? One command, one table with pass or fail per check.

    python benchmarks/gpu_check.py                       # every check, about 5-8 minutes
    python benchmarks/gpu_check.py --checks kcenter influence --out gpu_check.md

Checks (each on the first CUDA device, one process):

  quickstart  the README's first run (``deepspeed launch/train.py --config
              configs/quickstart.yaml``) in bf16: it finishes, its first log line names the
              CUDA device and bf16, and the held-out loss falls every round
  kcenter     the device k-center (``trainer/device_centres.py``, what a GPU run's k-center
              uses) against the host form on the same embeddings: the same picks
  influence   the gradient pass's batched rows (a batch per backward) against one backward
              per row: each projected row within 1e-5 in fp32, and the rows per second of each
              in bf16 (the batched path must be faster)
  features    the feature pass (embeddings and the forward scores) against a raw forward of the
              model over the same batches: at least 0.8x its tokens per second

Without a CUDA device it says so and exits 2 (``--device cpu`` runs the same checks on the
CPU, for testing this script: its figures say nothing about a GPU). Exit 1 when a check fails.
Record the table in benchmarks/RESULTS.md with the GPU's name.
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
CHECKS = ("quickstart", "kcenter", "influence", "features")
NO_GPU = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[4:]))
    p.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS),
                   help="which checks to run (default: all)")
    p.add_argument("--model", default="embedded:smollm2-135m-instruct",
                   help="model of the kcenter-free checks (default: the embedded SmolLM2)")
    p.add_argument("--rows", type=int, default=256,
                   help="pool rows of the influence and features checks (default 256)")
    p.add_argument("--kcenter-n", type=int, default=200_000,
                   help="candidates of the kcenter check (576 dims; default 200,000)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: run the checks on the CPU, to test this script")
    p.add_argument("--work", help="folder for the quickstart run (default: a temporary one)")
    p.add_argument("--out", help="also write the table (Markdown) here")
    args = p.parse_args(argv)
    if args.rows < 8:
        p.error("--rows must be at least 8")
    if args.kcenter_n < 1000:
        p.error("--kcenter-n must be at least 1000")
    return args


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the checks on a GPU, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return (f"no CUDA device: torch {torch.__version__} sees none "
                f"(torch.version.cuda = {torch.version.cuda}; a CPU build says None)")
    return None


# ----------------------------------------------------------------------------- checks

def check_quickstart(args, work: Path) -> tuple[bool, str, str]:
    out = work / "quickstart"
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "1",
           str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "quickstart.yaml"),
           f"output.dir={out}", "output.tensorboard=false"]
    if args.device == "cpu":
        cmd = [sys.executable, *cmd[3:]]
    if args.model != "embedded:smollm2-135m-instruct":
        cmd.append(f"model.path={args.model}")
    cmd.append("model.precision=bf16" if args.device == "cuda" else "model.precision=fp32")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return False, f"{seconds:.0f} s", f"exit {proc.returncode}: {proc.stderr[-300:]!r}"
    first = next((line for line in proc.stderr.splitlines() if "rank(s), device" in line), "")
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    losses = [r["eval_loss"] for r in rounds]
    falling = len(losses) == 3 and all(b < a for a, b in zip(losses, losses[1:]))
    want_device = "device cuda" if args.device == "cuda" else "device cpu"
    want_dtype = "bfloat16" if args.device == "cuda" else "float32"
    ok = falling and want_device in first and want_dtype in first
    return ok, f"{seconds:.0f} s", (f"eval loss {' > '.join(f'{x:.4f}' for x in losses)}; "
                                    f"log: {first.split('INFO')[-1].strip()[:90]}")


def check_kcenter(args, device) -> tuple[bool, str, str]:
    from functools import partial

    import numpy as np
    import torch

    from evotune.selectors.kcenter import kcenter_sharded
    from evotune.selectors.sharded import SingleProcess
    from evotune.trainer.device_centres import DeviceNearestCentre
    rng = np.random.default_rng(0)
    n, dim, picks = args.kcenter_n, 576, 100
    cand = rng.standard_normal((n, dim), dtype=np.float32)
    lab = rng.standard_normal((1000, dim), dtype=np.float32)
    positions = np.arange(n)
    t0 = time.perf_counter()
    host, host_d = kcenter_sharded(cand, positions, lab, picks, SingleProcess())
    t1 = time.perf_counter()
    dev, dev_d = kcenter_sharded(cand, positions, lab, picks, SingleProcess(),
                                 device=partial(DeviceNearestCentre, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    same = int((host == dev).sum())
    ok = same == picks and np.allclose(host_d, dev_d, rtol=1e-5)
    return ok, f"host {t1 - t0:.1f} s, device {t2 - t1:.1f} s", \
        f"{same} of {picks} picks the same ({n:,} x {dim} candidates, 1,000 centres)"


def _pool(args, model_dir):
    from evotune.trainer.data import encode_all, load_examples
    from evotune.trainer.model import load_tokenizer
    tok = load_tokenizer(model_dir)
    examples, _ = load_examples(POOL, "error", args.rows)
    _, enc, _ = encode_all(examples, tok, "chat", 256, "skip")
    return tok, enc


def check_influence(args, strategy, model_dir) -> tuple[bool, str, str]:
    import contextlib
    import types

    import numpy as np
    import torch

    from evotune.trainer.config import load_config
    from evotune.trainer.model import build_trainable_model
    from evotune.trainer.passes.influence import InfluencePass
    tok, enc = _pool(args, model_dir)
    torch.backends.cuda.matmul.allow_tf32 = False      # fp32 means fp32 for the 1e-5 check
    logger = types.SimpleNamespace(progress=lambda *a, **k: contextlib.nullcontext(
        lambda *a, **k: None))
    found, n = {}, min(args.rows, len(enc))
    for precision, rows in (("fp32", min(n, 64)), ("bf16", n)):
        cfg = load_config(None, [f"data.pool={POOL}", f"model.path={model_dir}",
                                 f"model.precision={precision}", "influence.adam=false",
                                 "influence.dim=8192"])
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        model = build_trainable_model(cfg, model_dir, dtype, 0).to(strategy.device)
        with torch.no_grad():               # B off zero, as after training
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        grads = InfluencePass(cfg, enc, tok, "chat", strategy)
        for batched in (True, False):
            grads.batched = batched
            if strategy.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            features, _ = grads.run(types.SimpleNamespace(module=model), np.arange(rows), 1,
                                    logger, embeddings=True)
            if strategy.device.type == "cuda":
                torch.cuda.synchronize()
            found[(precision, batched)] = (features.embeddings[:rows],
                                           rows / (time.perf_counter() - t0))
        del model
    a, b = found[("fp32", True)][0], found[("fp32", False)][0]
    err = float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())
    fast, slow = found[("bf16", True)][1], found[("bf16", False)][1]
    ok = err <= 1e-5 and fast > slow
    return ok, f"{fast:,.1f} vs {slow:,.1f} rows/s ({fast / slow:.1f}x)", \
        f"bf16, {n} rows; fp32 rows agree within {err:.1e} (1e-5 allowed)"


def check_features(args, strategy, model_dir) -> tuple[bool, str, str]:
    import torch

    from evotune.trainer.data import collate, plan_batches
    from evotune.trainer.model import load_model
    from evotune.trainer.passes.forward import compute_features
    from evotune.trainer.scores import names as score_names
    tok, enc = _pool(args, model_dir)
    model = load_model(model_dir, strategy.dtype).to(strategy.device).eval()
    bs, pad = 16, tok.pad_token_id
    batches = plan_batches([len(e.input_ids) for e in enc], bs)
    tokens = sum(len(e.input_ids) for e in enc)

    def sync():
        if strategy.device.type == "cuda":
            torch.cuda.synchronize()

    def raw():
        with torch.no_grad():
            for b in batches:
                x = collate([enc[i] for i in b], pad)
                model(input_ids=x["input_ids"].to(strategy.device),
                      attention_mask=x["attention_mask"].to(strategy.device))

    def ours():
        compute_features(model, enc, strategy, pad, bs, True, score_names("forward"))

    best = {}
    for _ in range(2):                      # the first round warms both up
        for name, fn in (("raw", raw), ("pass", ours)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    ratio = best["raw"] / best["pass"]
    return ratio >= 0.8, f"{tokens / best['pass']:,.0f} vs {tokens / best['raw']:,.0f} tokens/s " \
        f"({ratio:.2f}x)", f"{strategy.dtype}, {len(enc)} rows, batch {bs}, {tokens:,} tokens"


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        reason = no_gpu_reason()
        if reason:
            print(f"gpu_check: {reason}. These checks need a CUDA GPU; nothing was run "
                  f"(--device cpu runs them on the CPU, to test this script).", file=sys.stderr)
            return NO_GPU
    import torch

    from evotune.trainer.config import load_config
    from evotune.trainer.engine import Strategy
    from evotune.trainer.model import resolve_model_path
    model_dir = resolve_model_path(args.model)
    if args.device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (a script test)"
    rows = []
    with tempfile.TemporaryDirectory(prefix="evotune-gpu-check-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "quickstart" in args.checks:          # its own process, before this one holds the GPU
            rows.append(("quickstart", *check_quickstart(args, work)))
        strategy = None
        if {"influence", "features"} & set(args.checks):
            strategy = Strategy(load_config(None, [f"data.pool={POOL}",
                                                   f"model.path={model_dir}"]))
            strategy.setup()
        device = torch.device(args.device)
        for check in args.checks:
            if check == "kcenter":
                rows.append((check, *check_kcenter(args, device)))
            elif check == "influence":
                rows.append((check, *check_influence(args, strategy, model_dir)))
            elif check == "features":
                rows.append((check, *check_features(args, strategy, model_dir)))
        if strategy is not None:
            strategy.close()
    lines = [f"{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n",
             "| check | result | figure | detail |", "|---|---|---|---|"]
    lines += [f"| {c} | {'pass' if ok else 'FAIL'} | {fig} | {detail} |"
              for c, ok, fig, detail in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if all(ok for _, ok, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
