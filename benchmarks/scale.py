"""How the sharded parts of selection scale: per-rank peak memory and time, 1 and 2 ranks.

``--parts kcenter``: sharded k-center (``selectors/kcenter.py`` ``kcenter_sharded``) over N
synthetic 576-d float32 embeddings (a seeded normal per block of rows, so each rank makes only
its own rows: nothing N × D is ever in one process unless one rank holds it all), ``--labeled``
initial centres and ``--picks`` picks, on 1 and 2 real gloo ranks (spawned processes). Each
rank reports its peak RSS (VmHWM: Python, torch and its data), the bytes of its own
embeddings, the time of the initial distances and the time per pick; the picks of every world
size are checked to be the same.

Then, from the measured per-pick cost, the estimate for a 10M × 4096 pool on 64 ranks (printed
with its arithmetic).

``--parts lift weighted repr``: the rules that ran on rank 0 over gathered embeddings until
2026-12-01 and now select sharded (``selectors/lift.py`` LIFT's PCA as sums over ranks,
``selectors/weighted.py`` the score/diversity greedy, ``selectors/repr_filter.py`` DEITA's
walk) over the same synthetic rows with a synthetic score, ``--picks`` picks, 1 and 2 ranks:
peak RSS per rank, time, and whether the picks match one rank's. ``--parts cluster``: the same
for ``cluster_quota`` with ``kmeans: minibatch`` (MiniBatchKMeans fed on rank 0 from the
streamed rows; until 2026-12-02 the rule gathered N × D on rank 0 for full KMeans, which
``kmeans: full`` still does).

``--parts tokens``: a pool of N chat rows (the quickstart pool's rows cycled, each made
distinct by its row number) read and tokenised into the token cache (``trainer/tokens.py``)
by one process, as rank 0 does (a batch of rows at a time, since 2026-12-02: before, the rows
were all loaded first): wall time and peak RSS; then 1 and 2 ranks each map the cache
and read their shard's rows (as the feature pass does): peak RSS per rank. For contrast, the
same rows encoded as Python lists (``encode_all``, what every rank did before the cache), at
the smallest N only, and only up to 100k rows.

``--parts examples``: what the pool's rows themselves cost every rank: loaded as Python
objects on every rank (``load_examples``, before 2026-12-02) against mapped from the token
cache (``tokens.CachedExamples``, now), over N cycled chat rows.

``--parts save``: writing a sharded round's embeddings to one whole-pool file on rank 0
(``features.npz``, the base-model cache) from N synthetic rows held by 1 and 2 ranks: gathered
to rank 0 first (``gather_shards``, then ``np.savez``: how it was done until 2026-12-02)
against streamed a block at a time (``trainer/passes/streamed.py``), and read back into
shards (``read_shard``): peak RSS per rank and wall time; the files are checked to be equal.

``--parts features``: the feature pass (``compute_features``, hidden-state embeddings kept on
their ranks as a sharded rule gets them) with the tiny 2-layer, 32-wide test model over the
cached pool, on 1 and 2 ranks set up by the run's own ``Strategy`` (gloo): wall time and peak
RSS per rank. The model is tiny, so this measures evotune's own overhead per row (batching,
collation, the cache reads), not a real model's compute.

``--parts gradients``: the gradient pass (``InfluencePass.run``, gradient embeddings of every
row, kept on their ranks or gathered on rank 0) of the loop's LoRA adapter on the tiny model
(fp32, ``--grad-sizes`` rows) and on SmolLM2-135M (``model.precision: auto``,
``--grad-sizes-smollm2`` rows), each path (``--grad-paths``: batched rows per backward, or one
backward per row): wall time, rows and tokens per second, and peak RSS per rank.

    python benchmarks/scale.py --parts kcenter lift weighted repr tokens features \
        --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

BLOCK = 4096          # rows per seeded block of synthetic embeddings
DIM = 576
REPO = Path(__file__).resolve().parents[1]
SOURCE_POOL = REPO / "configs" / "data" / "quickstart_pool.jsonl"


def rows_of(rank: int, world: int, n: int) -> np.ndarray:
    """The pool positions a rank holds: blocks of BLOCK rows dealt round-robin (as the feature
    pass deals its batches)."""
    blocks = np.arange(rank, -(-n // BLOCK), world)
    return np.concatenate([np.arange(b * BLOCK, min((b + 1) * BLOCK, n)) for b in blocks]) \
        if len(blocks) else np.zeros(0, dtype=np.int64)


def synthetic(positions: np.ndarray, dim: int) -> np.ndarray:
    """The embeddings of these positions, the same whichever rank makes them."""
    out = np.empty((len(positions), dim), dtype=np.float32)
    k = 0
    for b in np.unique(positions // BLOCK):
        rows = positions[(positions // BLOCK) == b]
        block = np.random.default_rng(int(b)).standard_normal((BLOCK, dim), dtype=np.float32)
        out[k: k + len(rows)] = block[rows - b * BLOCK]
        k += len(rows)
    return out


def peak_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _join(rank: int, world: int, port: int):
    """This spawned process as rank ``rank`` of a gloo group of ``world``, one thread; returns
    torch.distributed."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1"})
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return dist


def _kcenter_rank(rank, world, port, n, labeled, picks, out):
    dist = _join(rank, world, port)
    from evotune.selectors.kcenter import kcenter_sharded
    from evotune.trainer.engine import TorchComm
    pos = rows_of(rank, world, n)
    emb = synthetic(pos, DIM)
    is_lab = pos < labeled                   # the first `labeled` rows are the selected set
    cand, lab = emb[~is_lab], emb[is_lab]
    del emb
    comm = TorchComm()
    dist.barrier()
    t0 = time.perf_counter()
    got1, _ = kcenter_sharded(cand, pos[~is_lab], lab, 1, comm)       # initial distances
    t1 = time.perf_counter()
    got, _ = kcenter_sharded(cand, pos[~is_lab], lab, picks, comm)
    t2 = time.perf_counter()
    out.put({"rank": rank, "peak_mib": peak_mib(), "own_mib": cand.nbytes / 2**20,
             "setup_s": t1 - t0, "per_pick_s": ((t2 - t1) - (t1 - t0)) / max(picks - 1, 1),
             "picks": [int(v) for v in got[:20]]})
    dist.destroy_process_group()


def _rule_rank(rank, world, port, rule, n, labeled, picks, out):
    """One rank of ``--parts lift`` / ``weighted`` / ``repr`` / ``cluster``: its own synthetic
    rows and scores, the rule's ``select_sharded`` on them (one thread)."""
    dist = _join(rank, world, port)
    from evotune.selectors.base import Features
    from evotune.selectors.cluster_quota import ClusterQuotaSelector
    from evotune.selectors.lift import LiftSelector
    from evotune.selectors.repr_filter import RepresentationFilterSelector
    from evotune.selectors.weighted import WeightedSelector
    from evotune.trainer.engine import TorchComm
    pos = rows_of(rank, world, n)
    emb = synthetic(pos, DIM)
    score = np.abs(emb[:, 0]).astype(np.float64)      # any score: the same rows on any rank
    shard = Features(emb, {"s": score}, positions=pos)
    selector = {"lift": lambda: LiftSelector(LiftSelector.Options(score="s")),
                "weighted": lambda: WeightedSelector(WeightedSelector.Options(score="s",
                                                                              alpha=0.5)),
                "repr": lambda: RepresentationFilterSelector(
                    RepresentationFilterSelector.Options(score="s", threshold=0.9)),
                "cluster": lambda: ClusterQuotaSelector(ClusterQuotaSelector.Options(
                    score="s", n_clusters=8, kmeans="minibatch"))}[rule]()
    comm = TorchComm()
    dist.barrier()
    t0 = time.perf_counter()
    sel = selector.select_sharded(shard, np.arange(labeled), np.arange(labeled, n), picks,
                                  np.random.default_rng(0), comm)
    seconds = time.perf_counter() - t0
    out.put({"rank": rank, "peak_mib": peak_mib(), "own_mib": emb.nbytes / 2**20,
             "seconds": seconds, "picks": [int(v) for v in sel.positions]})
    dist.destroy_process_group()


def part_rule(args, rule: str) -> str:
    what = {"lift": "LIFT (PCA keeping 95% of the variance, keep 0.5, then a score)",
            "weighted": "weighted (alpha 0.5: score + k-center distance)",
            "repr": "repr_filter (DEITA's walk by score, cosine threshold 0.9)",
            "cluster": "cluster_quota, kmeans: minibatch (8 clusters, batches of 4,096, 3 "
                       "passes, the best score in each)"}[rule]
    lines = [f"{what}: D = {DIM}, {args.labeled} selected rows, {args.picks} picks, synthetic "
             f"fp32 embeddings, one thread per rank\n",
             "| N | ranks | own embeddings per rank | peak RSS per rank | selection | same picks "
             "as 1 rank |", "|---|---|---|---|---|---|"]
    for n in args.sizes:
        first = None
        for world in args.ranks:
            res = _in_process(_rule_rank, rule, n, args.labeled, args.picks, world=world)
            same = "–" if first is None else ("yes" if res[0]["picks"] == first else "NO")
            first = first or res[0]["picks"]
            lines.append(f"| {n:,} | {world} | {max(r['own_mib'] for r in res):,.0f} MiB | "
                         f"{max(r['peak_mib'] for r in res):,.0f} MiB | "
                         f"{max(r['seconds'] for r in res):.1f} s | {same} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_process(target, *args, world: int = 1) -> list[dict]:
    """Run ``target(rank, world, port, *args, out)`` in ``world`` spawned processes; their
    reports by rank."""
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted((out.get(timeout=7200) for _ in procs), key=lambda x: x["rank"])
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a rank failed (exit {p.exitcode})")
    return results


def run_kcenter(n: int, world: int, labeled: int, picks: int) -> list[dict]:
    return _in_process(_kcenter_rank, n, labeled, picks, world=world)


def _ms(seconds: float) -> str:
    """A per-pick time; at small N the setup's run-to-run noise exceeds the picks' own time
    (the difference of two runs can come out negative), so that is said instead."""
    return f"{seconds * 1000:.1f} ms" if seconds > 0 else "below the setup's noise"


def part_kcenter(args) -> str:
    lines = [f"D = {DIM}, {args.labeled} selected rows as centres, {args.picks} picks, synthetic "
             f"fp32 embeddings, one thread per rank; peak = each rank's peak RSS (Python, torch, "
             f"its rows)\n",
             "| N | ranks | own embeddings per rank | peak RSS per rank | initial distances | "
             "per pick | same picks as 1 rank |", "|---|---|---|---|---|---|---|"]
    per_pick = {}
    for n in args.sizes:
        first = None
        for world in args.ranks:
            res = run_kcenter(n, world, args.labeled, args.picks)
            same = "–" if first is None else ("yes" if res[0]["picks"] == first else "NO")
            first = first or res[0]["picks"]
            per_pick[(n, world)] = max(r["per_pick_s"] for r in res)
            lines.append(
                f"| {n:,} | {world} | {max(r['own_mib'] for r in res):,.0f} MiB | "
                f"{max(r['peak_mib'] for r in res):,.0f} MiB | "
                f"{max(r['setup_s'] for r in res):.2f} s | "
                f"{_ms(per_pick[(n, world)])} | {same} |")
            print(lines[-1], flush=True)
    n_max = max(args.sizes)
    one = per_pick.get((n_max, 1))
    if one and one > 0:
        # Per pick each rank streams its rows once (a matrix-vector product and a minimum): a
        # memory-bound pass, time ~ bytes per rank / memory bandwidth.
        bw_cpu = n_max * DIM * 4 / one                # bytes per second, measured (1 thread)
        rows, dim, ranks, hbm = 10_000_000, 4096, 64, 3.0e12
        local = rows / ranks * dim * 4
        lines += ["", f"**10M × 4096 on {ranks} ranks, on paper.** Each rank holds {rows // ranks:,} "
                  f"rows: {local / 2**30:.1f} GiB of fp32 embeddings and "
                  f"{rows / ranks * 4 / 2**20:.1f} MiB of distances, plus every rank's positions "
                  f"({rows * 8 / 2**20:.0f} MiB). A pick is one all-reduce of 8 bytes and one "
                  f"broadcast of {(dim + 1) * 4:,} bytes. The local work streams "
                  f"{local / 2**30:.1f} GiB per pick. evotune does it with numpy on each "
                  f"rank's host on a CPU run: at this CPU's measured {bw_cpu / 1e9:.1f} GB/s "
                  f"(one thread) that is {local / bw_cpu:.2f} s per pick, so a 5% budget (500k "
                  f"picks) would take {500_000 * local / bw_cpu / 3600:.0f} h. On a GPU run the "
                  f"rows and distances stay in the device's memory (DeviceNearestCentre): each "
                  f"block of rows is read in fp32, copied to fp64 and read again by the product "
                  f"(20 bytes an element, five times the fp32 rows), so at an assumed "
                  f"{hbm / 1e12:.0f} TB/s of memory bandwidth {5 * local / hbm * 1000:.1f} ms "
                  f"per pick: about {500_000 * 5 * local / hbm / 60:.0f} min, plus 2 "
                  f"collectives per pick (at 50 µs each on NCCL, another "
                  f"{500_000 * 2 * 50e-6 / 60:.0f} min). Not measured: no GPU here."]
    return "\n".join(lines)



def _save_rank(rank, world, port, n, mode, path, out):
    """One rank of ``--parts save``: its synthetic rows written to ``path`` by ``mode``."""
    dist = _join(rank, world, port)
    from evotune.selectors.base import Features
    from evotune.trainer.config import Config
    from evotune.trainer.engine import Strategy
    from evotune.trainer.passes.forward import gather_shards
    from evotune.trainer.passes.streamed import RowsPart, read_shard, save_parts
    strategy = Strategy(Config())
    strategy.rank, strategy.world_size = rank, world
    pos = rows_of(rank, world, n)
    # the rows this rank holds: its shard to write, or the rows it reads back
    shard = Features(synthetic(pos, DIM) if mode != "read back" else None, positions=pos)
    own_mib = len(pos) * DIM * 4 / 2**20
    dist.barrier()
    t0 = time.perf_counter()
    if mode == "gathered":
        whole = gather_shards(strategy, shard, n)
        if whole is not None:
            np.savez(path, embeddings=whole.embeddings.astype(np.float16))
        del whole
    elif mode == "streamed":
        error = save_parts(strategy, path, {}, {"embeddings": RowsPart(pos, shard.embeddings, n)},
                           np.float16)
        assert error is None, error
    else:                                     # read back: a contiguous run of rows per rank
        mine = np.arange(n * rank // world, n * (rank + 1) // world)
        got = read_shard(strategy, path, "embeddings", mine)
        assert got is not None and len(got) == len(mine)
    dist.barrier()
    out.put({"rank": rank, "peak_mib": peak_mib(), "own_mib": own_mib,
             "seconds": time.perf_counter() - t0})
    dist.destroy_process_group()


def part_save(args, work: Path) -> str:
    lines = [f"A sharded round's embeddings (D = {DIM}, synthetic fp32, written as fp16) to one "
             f"file on rank 0, one thread per rank; peak = each rank's peak RSS (Python, torch, "
             f"its own rows)\n",
             "| N | ranks | how | own rows per rank | peak RSS rank 0 | peak RSS other ranks | "
             "wall |", "|---|---|---|---|---|---|---|"]
    for n in args.sizes:
        for world in args.ranks:
            files = {}
            for mode in ("gathered", "streamed", "read back"):
                path = work / f"save-{n}-{world}-{mode if mode != 'read back' else 'streamed'}.npz"
                files[mode] = path
                res = _in_process(_save_rank, n, mode, str(path), world=world)
                others = [r["peak_mib"] for r in res[1:]]
                lines.append(f"| {n:,} | {world} | {mode} | {res[0]['own_mib']:,.0f} MiB | "
                             f"{res[0]['peak_mib']:,.0f} MiB | "
                             f"{f'{max(others):,.0f} MiB' if others else '–'} | "
                             f"{max(r['seconds'] for r in res):.1f} s |")
                print(lines[-1], flush=True)
            with np.load(files["gathered"]) as a, np.load(files["streamed"]) as b:
                same = np.array_equal(a["embeddings"], b["embeddings"], equal_nan=True)
            lines.append(f"| | | files equal | {'yes' if same else 'NO'} | | | |")
            for path in files.values():
                path.unlink(missing_ok=True)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- tokens, features

def write_pool(path: Path, n: int) -> None:
    """N chat rows: the quickstart pool's rows cycled, each prompt ending with its row number."""
    import json
    rows = [json.loads(line) for line in SOURCE_POOL.read_text().splitlines() if line.strip()]
    with open(path, "w") as f:
        for i in range(n):
            row = dict(rows[i % len(rows)])
            row["id"] = f"row-{i}"
            if "messages" in row:
                msgs = [dict(m) for m in row["messages"]]
                msgs[0]["content"] = f"{msgs[0]['content']} (#{i})"
                row["messages"] = msgs
            else:
                row["instruction"] = f"{row['instruction']} (#{i})"
            f.write(json.dumps(row) + "\n")


def _tokenizer():
    """SmolLM2's tokenizer (the embedded model, converted once into the usual cache; the token
    caches measured here are built under the work folder, by path)."""
    from evotune.trainer.model import load_tokenizer, resolve_model_path
    return load_tokenizer(resolve_model_path("embedded:smollm2-135m-instruct"))


def _build_rank(rank, world, port, pool, cache, out):
    tok = _tokenizer()                # before the clock: the tokenizer load is not the cache's
    from evotune.trainer import tokens
    from evotune.trainer.data import LoadReport, iter_examples
    t0 = time.perf_counter()
    directory = Path(cache) / "bench-tokens"
    report = LoadReport()             # as a run builds it: the rows streamed from the file
    tokens.build(directory, iter_examples(pool, "skip", report=report), tok, "chat", 512,
                 "skip", load_skipped=report.skipped)
    t1 = time.perf_counter()
    pool_tokens = tokens.TokenizedPool(directory)
    out.put({"rank": rank, "build_s": t1 - t0, "peak_mib": peak_mib(),
             "tokens": int(pool_tokens.offsets[-1]),
             "disk_mib": sum(f.stat().st_size for f in directory.iterdir()) / 2**20})


def _read_rank(rank, world, port, cache, out):
    from evotune.trainer import tokens
    from evotune.trainer.data import lengths, plan_batches, shard_batches
    pool = tokens.TokenizedPool(Path(cache) / "bench-tokens")
    t0 = time.perf_counter()
    seen = 0
    for positions, _ in shard_batches(plan_batches(lengths(pool), 64), rank, world):
        seen += sum(len(pool[i].input_ids) for i in positions)
    out.put({"rank": rank, "read_s": time.perf_counter() - t0, "peak_mib": peak_mib(),
             "anon_mib": _status_mib("RssAnon"), "tokens": seen})


def _lists_rank(rank, world, port, pool, out):
    tok = _tokenizer()
    from evotune.trainer.data import encode_all, load_examples
    t0 = time.perf_counter()
    examples, _ = load_examples(pool)
    encode_all(examples, tok, "chat", 512, "skip")
    out.put({"rank": rank, "encode_s": time.perf_counter() - t0, "peak_mib": peak_mib()})


def _status_mib(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _examples_rank(rank, world, port, pool, out):
    """What ``data.pool`` held per rank before the rows were cached: every row loaded."""
    from evotune.trainer.data import load_examples
    before = _status_mib("VmRSS")
    t0 = time.perf_counter()
    examples, _ = load_examples(pool)
    out.put({"rank": rank, "rows": len(examples), "load_s": time.perf_counter() - t0,
             "held_mib": _status_mib("VmRSS") - before})


def _rows_rank(rank, world, port, rows_dir, out):
    """What it holds now: the cached rows mapped, every row decoded once (as a reward pass
    reads them), the ids read at once (as a resume does). RssAnon: this process's own memory;
    the mapped file's pages are the shared page cache."""
    from evotune.trainer.tokens import CachedExamples
    before = _status_mib("RssAnon")
    t0 = time.perf_counter()
    rows = CachedExamples(Path(rows_dir))
    chars = sum(len(ex.messages[-1]["content"]) for ex in rows)
    ids = rows.ids()
    out.put({"rank": rank, "rows": len(rows), "read_s": time.perf_counter() - t0,
             "chars": chars, "ids": len(ids), "held_mib": _status_mib("RssAnon") - before,
             "peak_mib": peak_mib()})


def part_examples(args, work: Path) -> str:
    lines = ["The pool's rows on every rank: before 2026-12-02, ``data.pool`` loaded every row "
             "(``load_examples``: an ``Example`` with its messages per row) on every rank; now "
             "rank 0 writes them into the token cache once and every rank maps them "
             "(``tokens.CachedExamples``). Held = the process's memory after minus before "
             "(RSS for the load; anonymous RSS for the mapped rows, whose file pages are the "
             "shared page cache, while its ids list is still alive); the quickstart pool "
             "cycled\n",
             "| N | file | before: load, held per rank | cache rows on disk | now: decode every "
             "row + ids, held per rank |", "|---|---|---|---|---|"]
    from evotune.trainer.data import load_examples
    from evotune.trainer.tokens import write_rows
    for n in args.sizes:
        pool = work / f"pool{n}.jsonl"
        if not pool.is_file():
            write_pool(pool, n)
        got = _in_process(_examples_rank, str(pool))[0]
        rows_dir = work / f"rows{n}"
        rows_dir.mkdir(exist_ok=True)
        write_rows(rows_dir, load_examples(pool)[0])
        disk = sum(f.stat().st_size for f in rows_dir.iterdir()) / 2**20
        now = _in_process(_rows_rank, str(rows_dir))[0]
        lines.append(f"| {n:,} | {pool.stat().st_size / 2**20:,.0f} MiB | {got['load_s']:.1f} s,"
                     f" {got['held_mib']:,.0f} MiB ({got['held_mib'] * 2**20 / n:,.0f} B a row) "
                     f"| {disk:,.0f} MiB | {now['read_s']:.1f} s, {now['held_mib']:,.0f} MiB |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def part_tokens(args, work: Path) -> str:
    lines = ["Chat rows (the quickstart pool cycled), SmolLM2's tokenizer, max_length 512; peak = "
             "each process's peak RSS, which counts the mapped cache's pages a rank touched (the "
             "page cache, shared by the ranks of a machine); private = its own memory at the "
             "end\n",
             "| N | tokens | read rows, tokenise, write cache | cache on disk | peak RSS, "
             "building | peak RSS per rank reading its shard, 1 rank / 2 ranks | of which "
             "private (RssAnon), 1 rank / 2 ranks |",
             "|---|---|---|---|---|---|---|"]
    contrast = None
    for n in args.sizes:
        cache = work / f"cache{n}"
        pool = work / f"pool{n}.jsonl"
        write_pool(pool, n)
        built = _in_process(_build_rank, str(pool), str(cache))[0]
        reads = {w: _in_process(_read_rank, str(cache), world=w) for w in args.ranks}
        lines.append(
            f"| {n:,} | {built['tokens']:,} | {built['build_s']:.1f} s "
            f"| {built['disk_mib']:,.0f} MiB | {built['peak_mib']:,.0f} MiB | "
            + " / ".join(f"{max(r['peak_mib'] for r in reads[w]):,.0f} MiB" for w in args.ranks)
            + " | "
            + " / ".join(f"{max(r['anon_mib'] for r in reads[w]):,.0f} MiB" for w in args.ranks)
            + " |")
        print(lines[-1], flush=True)
        if contrast is None and n <= 100_000:     # Python lists of 1M rows: ~13 GB, an hour
            lists = _in_process(_lists_rank, str(pool))[0]
            contrast = (f"\nBefore the cache, every rank encoded the pool into Python lists: at "
                        f"{n:,} rows that took {lists['encode_s']:.1f} s and peaked at "
                        f"{lists['peak_mib']:,.0f} MiB per rank (the building process above: "
                        f"{built['peak_mib']:,.0f} MiB, once per machine).")
    return "\n".join(lines + ([contrast] if contrast else []))


def _rank_env(rank: int, world: int, port: int) -> None:
    """The environment a launcher gives rank ``rank`` of ``world`` (for a run's own
    ``Strategy``), one thread."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_SIZE": str(world), "OMP_NUM_THREADS": "1"})


def _features_rank(rank, world, port, cache, model_dir, batch, out):
    _rank_env(rank, world, port)
    import torch
    torch.set_num_threads(1)
    from evotune.trainer import tokens
    from evotune.trainer.config import load_config
    from evotune.trainer.engine import Strategy
    from evotune.trainer.model import load_model, load_tokenizer
    from evotune.trainer.passes.forward import compute_features
    strategy = Strategy(load_config(None, [f"data.pool={SOURCE_POOL}"]))
    strategy.setup()
    model = load_model(model_dir, torch.float32).to(strategy.device)
    pool = tokens.TokenizedPool(Path(cache) / "bench-tokens")
    pad = load_tokenizer(model_dir).pad_token_id
    base = peak_mib()
    t0 = time.perf_counter()
    shard, stats = compute_features(model, pool, strategy, pad, batch, True, (), gather=False)
    out.put({"rank": rank, "seconds": time.perf_counter() - t0, "peak_mib": peak_mib(),
             "before_mib": base, "rows": len(shard.positions),
             "emb_mib": shard.embeddings.nbytes / 2**20, "tokens": stats.tokens})
    strategy.close()


def _cached_pool(work: Path, n: int) -> Path:
    """The token cache of an N-row pool under ``work`` (built once)."""
    cache = work / f"cache{n}"
    if not (cache / "bench-tokens").is_dir():
        pool = work / f"pool{n}.jsonl"
        write_pool(pool, n)
        _in_process(_build_rank, str(pool), str(cache))
    return cache


def _tiny_model(work: Path) -> Path:
    """The tests' tiny model (2 layers, 32 wide, SmolLM2's tokenizer) under ``work``."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import build_tiny_model
    return build_tiny_model(work / "tiny", _tokenizer().name_or_path)


def part_features(args, work: Path) -> str:
    model_dir = _tiny_model(work)
    lines = [f"The tiny test model (2 layers, 32 wide, SmolLM2's 49,152-token vocabulary), "
             f"batch {args.batch} rows, one thread per rank, embeddings kept on their ranks "
             f"(gather=False); peak = each rank's peak RSS, model and torch included\n",
             "| N | ranks | wall | rows per s | own embeddings per rank | peak RSS per rank |",
             "|---|---|---|---|---|---|"]
    for n in args.sizes:
        cache = _cached_pool(work, n)
        for world in args.ranks:
            res = _in_process(_features_rank, str(cache), str(model_dir), args.batch, world=world)
            wall = max(r["seconds"] for r in res)
            lines.append(f"| {n:,} | {world} | {wall:.0f} s | {n / wall:,.0f} | "
                         f"{max(r['emb_mib'] for r in res):,.1f} MiB | "
                         f"{max(r['peak_mib'] for r in res):,.0f} MiB |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def _gradients_rank(rank, world, port, cache, model_dir, precision, n, dim, sharded, batched,
                    out):
    _rank_env(rank, world, port)
    import contextlib
    import types
    import torch
    torch.set_num_threads(1)
    from evotune.trainer import tokens
    from evotune.trainer.config import load_config
    from evotune.trainer.engine import Strategy
    from evotune.trainer.model import build_trainable_model, load_tokenizer
    from evotune.trainer.passes.influence import InfluencePass
    cfg = load_config(None, [f"data.pool={SOURCE_POOL}", f"model.path={model_dir}",
                             f"model.precision={precision}", "influence.adam=false",
                             f"influence.dim={dim}"])
    strategy = Strategy(cfg)
    strategy.setup()
    # the loop's adapter (LoRA r 16 on q, k, v, o), its B factors moved off zero as training
    # would (at zero every A gradient is zero)
    model = build_trainable_model(cfg, model_dir, strategy.dtype, 0).to(strategy.device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    pool = tokens.TokenizedPool(Path(cache) / "bench-tokens")
    grads = InfluencePass(cfg, pool, load_tokenizer(model_dir), "chat", strategy)
    grads.batched = batched
    logger = types.SimpleNamespace(progress=lambda *a, **k: contextlib.nullcontext(
        lambda *a, **k: None))
    base = peak_mib()
    t0 = time.perf_counter()
    grads.run(types.SimpleNamespace(module=model), np.arange(n), 1, logger, embeddings=True,
              sharded=sharded)
    out.put({"rank": rank, "seconds": time.perf_counter() - t0, "peak_mib": peak_mib(),
             "before_mib": base, "dtype": str(strategy.dtype).replace("torch.", ""),
             "tokens": int(sum(len(pool[i].input_ids) for i in range(n)))})
    strategy.close()


def part_gradients(args, work: Path) -> str:
    """The gradient pass per model, size, rank count and path (batched: ``influence.batch_size``
    rows per backward; per row: one backward per row, the path full fine-tuning takes)."""
    from evotune.trainer.model import resolve_model_path
    dim = 8192
    lines = [f"The gradient pass (``InfluencePass.run``, gradient embeddings of every row, "
             f"{dim} dims, plain gradients) of a LoRA adapter (r 16 on q, k, v, o), batches of "
             f"16 rows, one thread per rank: kept on their ranks (sharded) or gathered on rank "
             f"0; peak = each rank's peak RSS, model and torch included\n",
             "| model | dtype | N | ranks | embeddings | path | wall | rows per s | tokens per s | "
             "peak RSS per rank (before the pass) |", "|---|---|---|---|---|---|---|---|---|---|"]
    models = {"tiny": (_tiny_model(work), "fp32", args.grad_sizes),
              "smollm2": (resolve_model_path("embedded:smollm2-135m-instruct"), "auto",
                          args.grad_sizes_smollm2)}
    for name in args.grad_models:
        model_dir, precision, sizes = models[name]
        for n in sizes:
            cache = _cached_pool(work, n)
            for world in args.ranks:
                for sharded in args.grad_embeddings:
                    for path in args.grad_paths:
                        res = _in_process(_gradients_rank, str(cache), str(model_dir), precision,
                                          n, dim, sharded == "sharded", path == "batched",
                                          world=world)
                        wall = max(r["seconds"] for r in res)
                        lines.append(
                            f"| {name} | {res[0]['dtype']} | {n:,} | {world} | {sharded} | "
                            f"{path} | {wall:.0f} s | {n / wall:,.1f} | "
                            f"{res[0]['tokens'] / wall:,.0f} | "
                            + ", ".join(f"{r['peak_mib']:,.0f} ({r['before_mib']:,.0f})"
                                        for r in res) + " MiB |")
                        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["kcenter"],
                   choices=["kcenter", "lift", "weighted", "repr", "cluster", "examples",
                            "tokens", "save", "features", "gradients"])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--labeled", type=int, default=1000)
    p.add_argument("--picks", type=int, default=100)
    p.add_argument("--grad-sizes", type=int, nargs="+", default=[2_000],
                   help="pool sizes of --parts gradients with the tiny model")
    p.add_argument("--grad-sizes-smollm2", type=int, nargs="+", default=[200],
                   help="pool sizes of --parts gradients with SmolLM2-135M")
    p.add_argument("--grad-models", nargs="+", choices=["tiny", "smollm2"],
                   default=["tiny", "smollm2"])
    p.add_argument("--grad-paths", nargs="+", choices=["batched", "per-row"],
                   default=["per-row", "batched"],
                   help="batched: influence.batch_size rows per backward; per-row: one "
                        "backward per row")
    p.add_argument("--grad-embeddings", nargs="+", choices=["sharded", "on rank 0"],
                   default=["sharded"])
    p.add_argument("--batch", type=int, default=64, help="rows per forward call (features)")
    p.add_argument("--work", help="folder for pools, caches and the tiny model (default: a "
                                  "temporary one, removed at the end)")
    p.add_argument("--out", help="also write the report here")
    args = p.parse_args()
    report = [f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs"]
    import tempfile
    with tempfile.TemporaryDirectory(prefix="evotune-scale-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "kcenter" in args.parts:
            report.append(part_kcenter(args))
        for rule in ("lift", "weighted", "repr", "cluster"):
            if rule in args.parts:
                report.append(part_rule(args, rule))
        if "examples" in args.parts:
            report.append(part_examples(args, work))
        if "tokens" in args.parts:
            report.append(part_tokens(args, work))
        if "save" in args.parts:
            report.append(part_save(args, work))
        if "features" in args.parts:
            report.append(part_features(args, work))
        if "gradients" in args.parts:
            report.append(part_gradients(args, work))
    text = "\n".join(report)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
