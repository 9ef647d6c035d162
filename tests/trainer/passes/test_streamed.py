"""Whole-pool arrays from shards and back (``trainer/passes/streamed.py``) and the base-model
cache's sharded form, on 1, 2 and 3 gloo ranks, checked against the arrays they came from."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
from helpers import spawn_ranks

from evotune.selectors.base import Features
from evotune.trainer.passes import streamed

N, D, BLOCK = 37, 5, 4             # 4 rows a block: blocks cut through every rank's rows
NOBODY = 5                         # the row no rank holds (a row the pass did not measure)
SAMPLE = np.array([1, 4, 6, 7, 12, 20, 21, 22, 30, 36])


def pool() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.normal(size=(N, D)).astype(np.float32), rng.normal(size=N)


def held(rank: int, world: int) -> np.ndarray:
    """A rank's rows as the feature pass deals them: batches of 3 rows, round-robin."""
    return np.array([i for i in range(N) if (i // 3) % world == rank and i != NOBODY])


def contiguous(rank: int, world: int) -> np.ndarray:
    return np.arange(N * rank // world, N * (rank + 1) // world)


def _work(rank: int, world: int, port: int, tmp: str) -> dict:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "EVOTUNE_CACHE": os.path.join(tmp, "cache")})
    import torch.distributed as dist
    from evotune.trainer.config import Config
    from evotune.trainer.engine import Strategy
    from evotune.trainer.passes import cache
    from evotune.trainer.passes.forward import PassStats
    dist.init_process_group("gloo", rank=rank, world_size=world)
    strategy = Strategy(Config())
    strategy.rank, strategy.world_size = rank, world
    streamed.BLOCK_BYTES = BLOCK * D * 4
    sizes, gather = [], strategy.gather_to_rank0

    def spy(obj):                            # the rows rank 0 receives in one step
        found = gather(obj)
        if found is not None:
            sizes.append(sum(len(part[0]) for part in found))
        return found
    strategy.gather_to_rank0 = spy
    emb, score = pool()
    mine = held(rank, world)
    arrays = {"ids": np.array([f"r{i}" for i in range(N)])} if rank == 0 else None
    got = {}
    whole = streamed.RowsPart(mine, emb[mine], N)
    # a second array of another length: the rows of the sample, in sample order
    in_sample = mine[np.isin(mine, SAMPLE)]
    sampled = streamed.RowsPart(np.searchsorted(SAMPLE, in_sample), 2 * emb[in_sample],
                                len(SAMPLE))
    for dtype in ("float16", "float32"):
        got[dtype] = streamed.save_parts(strategy, os.path.join(tmp, f"{dtype}.npz"), arrays,
                                         {"embeddings": whole, "sampled": sampled}, dtype)
    strategy.gather_to_rank0 = gather
    got["most_rows_at_once"] = max(sizes) if sizes else None
    got["no_embeddings"] = streamed.save_parts(strategy, os.path.join(tmp, "none.npz"), arrays,
                                               {"embeddings": None})
    blocked = os.path.join(tmp, "a_file")
    got["error"] = streamed.save_parts(strategy, os.path.join(blocked, "x.npz"), arrays,
                                       {"embeddings": whole})
    part = contiguous(rank, world)
    got["read"] = streamed.read_shard(strategy, os.path.join(tmp, "float32.npz"), "embeddings",
                                      part).tolist()
    got["torn"] = streamed.read_shard(strategy, os.path.join(tmp, "torn.npz"), "embeddings", part)
    # the base-model cache, sharded both ways
    shard = Features(emb[mine], {"loss": score[mine]}, {"loss": {int(mine[0]): "why"}},
                     positions=mine)
    got["save"] = cache.save_shard("k", shard, {"features": PassStats(1.0, 2, 3)}, strategy, N)
    loaded, stats = cache.load_shard("k", strategy, N)
    got["load"] = (loaded.positions.tolist(), loaded.embeddings.tolist(),
                   loaded.scores["loss"].tolist(), loaded.skipped, list(stats))
    got["missing"] = cache.load_shard("absent", strategy, N)
    dist.destroy_process_group()
    return got


@pytest.fixture(scope="module", params=[1, 2, 3])
def ranks(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"streamed{request.param}")
    (tmp / "a_file").write_text("not a folder")
    (tmp / "torn.npz").write_bytes(b"PK\x03\x04 torn")
    return tmp, spawn_ranks(_work, request.param, str(tmp))


def test_the_written_file_is_the_pool_in_order_with_nan_where_no_rank_has_a_row(ranks):
    tmp, got = ranks
    emb, _ = pool()
    for dtype in ("float16", "float32"):
        assert all(g[dtype] is None for g in got)
        with np.load(tmp / f"{dtype}.npz") as f:
            assert sorted(f.files) == ["embeddings", "ids", "sampled"]
            assert f["ids"].tolist() == [f"r{i}" for i in range(N)]
            written, sampled = f["embeddings"], f["sampled"]
        assert written.dtype == np.dtype(dtype) and written.shape == (N, D)
        want = emb.astype(dtype)
        want[NOBODY] = np.nan
        assert np.array_equal(written, want, equal_nan=True)
        assert np.array_equal(sampled, (2 * emb[SAMPLE]).astype(dtype))
    with np.load(tmp / "none.npz") as f:
        assert f.files == ["ids"]


def test_rank_0_receives_one_block_of_rows_at_a_time(ranks):
    _, got = ranks
    assert got[0]["most_rows_at_once"] == BLOCK


def test_a_failed_write_is_reported_on_every_rank(ranks):
    tmp, got = ranks
    assert all(g["error"] and "a_file" in g["error"] for g in got)
    assert {g["error"] for g in got} == {got[0]["error"]}


def test_each_rank_reads_its_rows_back(ranks):
    tmp, got = ranks
    emb, _ = pool()
    want = emb.copy()
    want[NOBODY] = np.nan
    world = len(got)
    for rank, g in enumerate(got):
        assert np.array_equal(np.array(g["read"], dtype=np.float32),
                              want[contiguous(rank, world)], equal_nan=True)
        assert g["torn"] is None


def test_the_base_model_cache_round_trips_sharded(ranks, monkeypatch):
    tmp, got = ranks
    emb, score = pool()
    world = len(got)
    assert all(g["save"] is None and g["missing"] is None for g in got)
    for rank, g in enumerate(got):
        positions, embeddings, loss, skipped, stats = g["load"]
        part = contiguous(rank, world)
        assert positions == part.tolist() and stats == ["features"]
        want_emb, want_loss = emb[part], score[part]
        lost = part == NOBODY
        want_emb[lost], want_loss[lost] = np.nan, np.nan
        assert np.array_equal(np.array(embeddings, dtype=np.float32), want_emb, equal_nan=True)
        assert np.array_equal(np.array(loss), want_loss, equal_nan=True)
        firsts = {int(held(k, world)[0]) for k in range(world)}
        assert skipped == {"loss": {i: "why" for i in firsts if i in part}}
    # the one-process reader sees the same entry whole
    from evotune.trainer.passes import cache
    monkeypatch.setenv("EVOTUNE_CACHE", str(tmp / "cache"))
    whole, _ = cache.load("k")
    want = emb.copy()
    want[NOBODY] = np.nan
    assert np.array_equal(whole.embeddings, want, equal_nan=True)


def test_write_npz_refuses_blocks_that_do_not_fill_the_array(tmp_path):
    rows = np.ones((3, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="2 rows written of 3"):
        streamed.write_npz(tmp_path / "a.npz", {}, [("x", (3, 2), iter([(0, rows[:2])]))])
    with pytest.raises(ValueError, match="does not follow row 0"):
        streamed.write_npz(tmp_path / "b.npz", {}, [("x", (3, 2), iter([(1, rows)]))])
    streamed.write_npz(tmp_path / "c.npz", {"y": np.arange(3)},
                       [("x", (3, 2), iter([(0, rows[:1]), (1, rows[1:])]))])
    with np.load(tmp_path / "c.npz") as f:
        assert np.array_equal(f["x"], rows) and np.array_equal(f["y"], np.arange(3))
    with zipfile.ZipFile(tmp_path / "c.npz") as z:      # stored, as np.savez stores
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
