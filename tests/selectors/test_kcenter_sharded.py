"""Sharded k-center over real torch.distributed ranks (gloo, 1, 2 and 3 processes): the picks
and distances are exactly those of the single-process rule on the same embeddings."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import shard_rows, spawn_ranks

from evotune.selectors.kcenter import kcenter_greedy


def cases() -> list[dict]:
    rng = np.random.default_rng(0)
    line = np.array([0, 0, 1, 3, 3, 3, 7, 7, 8, 12, 12, 12, 12, 20, 20, 21, 30, 30],
                    dtype=np.float32)[:, None]                     # many exact ties
    grid = rng.integers(0, 4, size=(60, 3)).astype(np.float32)      # duplicates in 3-D
    dense = rng.normal(size=(300, 16)).astype(np.float32)
    return [
        {"emb": line, "labeled": [2], "n": 10, "chunk": 4},
        {"emb": line, "labeled": [], "n": 17, "chunk": 4096},          # no centre at first
        {"emb": grid, "labeled": [0, 5, 59], "n": 40, "chunk": 7},
        {"emb": dense, "labeled": list(range(0, 300, 37)), "n": 60, "chunk": 16},
        {"emb": dense, "labeled": list(range(3, 300, 7)), "n": 30, "chunk": 8},  # many blocks
        {"emb": dense[:5], "labeled": [1], "n": 4, "chunk": 2},        # ranks with no rows
    ]


def _work(rank: int, world: int, port: int, on_device: bool = False) -> list:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from functools import partial

    import torch
    import torch.distributed as dist
    from evotune.selectors.kcenter import kcenter_sharded
    from evotune.trainer.device_centres import DeviceNearestCentre
    from evotune.trainer.engine import TorchComm
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    for case in cases():
        emb, labeled = case["emb"], set(case["labeled"])
        mine = shard_rows(len(emb), rank, world)
        cand = [p for p in mine if p not in labeled]
        lab = [p for p in mine if p in labeled]
        picks, dists = kcenter_sharded(emb[cand].reshape(len(cand), emb.shape[1]),
                                       np.array(cand, dtype=np.int64),
                                       emb[lab].reshape(len(lab), emb.shape[1]), case["n"],
                                       TorchComm(), case["chunk"],
                                       partial(DeviceNearestCentre, device=torch.device("cpu"))
                                       if on_device else None)
        results.append((picks.tolist(), dists.tolist()))
    dist.destroy_process_group()
    return results


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_kcenter_picks_what_one_process_picks(world):
    got = spawn_ranks(_work, world, timeout=120)
    for k, case in enumerate(cases()):
        labeled = np.array(case["labeled"], dtype=np.int64)
        candidates = np.setdiff1d(np.arange(len(case["emb"])), labeled)
        picks, dists = kcenter_greedy(case["emb"], labeled, candidates, case["n"], case["chunk"])
        for rank in range(world):            # every rank ends with the same picks
            assert got[rank][k][0] == picks.tolist(), (k, rank)
            assert got[rank][k][1] == dists.tolist(), (k, rank)


@pytest.fixture(scope="module")
def device_picks_one_rank():
    return spawn_ranks(_work, 1, True, timeout=120)[0]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_device_form_picks_alike_on_any_rank_count(world, device_picks_one_rank):
    """DeviceNearestCentre (a GPU run's k-center, here on torch's CPU device): the same picks
    and distances bit for bit on 1, 2 and 3 ranks, and the host form's picks on these cases
    (distances to float32 rounding: the device measures in float64)."""
    got = spawn_ranks(_work, world, True, timeout=120) if world > 1 else [device_picks_one_rank]
    for k, case in enumerate(cases()):
        labeled = np.array(case["labeled"], dtype=np.int64)
        candidates = np.setdiff1d(np.arange(len(case["emb"])), labeled)
        picks, dists = kcenter_greedy(case["emb"], labeled, candidates, case["n"], case["chunk"])
        for rank in range(world):
            assert got[rank][k] == device_picks_one_rank[k], (k, rank)
            assert got[rank][k][0] == picks.tolist(), (k, rank)
            assert np.allclose(got[rank][k][1], dists, rtol=1e-6, atol=1e-6), (k, rank)


def test_device_distances_are_the_float64_distances_rounded():
    """Each candidate's squared distance to its nearest centre, against a float64 computation
    of (a - b)² written out here, after initial centres and after added ones."""
    import torch
    from evotune.trainer.device_centres import DeviceNearestCentre
    rng = np.random.default_rng(3)
    cand = rng.normal(size=(50, 7)).astype(np.float32)
    lab = rng.normal(size=(9, 7)).astype(np.float32)
    extra = rng.normal(size=(2, 7)).astype(np.float32)
    near = DeviceNearestCentre(cand, lab, 4, torch.device("cpu"))
    for row in extra:
        near.add_centre(row, float(np.dot(row.astype(np.float64), row)))
    centres = np.concatenate([lab, extra]).astype(np.float64)
    want = ((cand.astype(np.float64)[:, None, :] - centres[None]) ** 2).sum(-1).min(1)
    assert np.allclose(near.sq.numpy(), want.astype(np.float32), rtol=1e-6, atol=1e-9)
    j, sq = near.best()
    assert j == int(np.argmax(want)) and np.isclose(sq, want.max(), rtol=1e-6)
    near.drop(j)
    assert near.best()[0] == int(np.argsort(want)[-2])
    assert np.allclose(near.centre_row(j), np.append(cand[j], (cand[j].astype(np.float64) ** 2)
                                                     .sum()), rtol=1e-6)


def test_the_device_form_comes_from_the_comm():
    """Selectors import no torch: a GPU run's comm hands them the device form."""
    import torch
    from evotune.selectors.kcenter import accelerator
    from evotune.selectors.sharded import SingleProcess
    from evotune.trainer.device_centres import DeviceNearestCentre
    from evotune.trainer.engine import TorchComm

    comm = TorchComm.__new__(TorchComm)            # no process group needed for this
    comm.device = torch.device("cpu")
    assert accelerator(SingleProcess()) is None and accelerator(comm) is None   # gloo: host
    comm.device = torch.device("cuda", 1)
    make = accelerator(comm)
    assert make.func is DeviceNearestCentre and make.keywords == {"device": comm.device}


def test_the_rule_written_out_on_a_line():
    """An independent check of the rule itself on hand-made ties. The centre is position 2
    (value 1). Furthest: 30, 29 away (positions 16 and 17: the lower, 16). Then 12, 11 from 1
    (20 is 10 from 30, 21 is 9): position 9, the lowest of the four 12s. Then 21, 9 from both
    12 and 30 (20 is 8 from 12, 7 is 5 from 12): position 15."""
    line = np.array([0, 0, 1, 3, 3, 3, 7, 7, 8, 12, 12, 12, 12, 20, 20, 21, 30, 30],
                    dtype=np.float32)[:, None]
    picks, dists = kcenter_greedy(line, np.array([2]), np.setdiff1d(np.arange(18), [2]), 3)
    assert picks.tolist() == [16, 9, 15]
    assert dists.tolist() == [29.0, 11.0, 9.0]
