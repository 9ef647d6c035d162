"""Score-ranked rules over rows spread across real torch.distributed ranks (gloo, 1, 2 and 3
processes): the distributed top-k, the score filter (with k-center after it), rds, influence
the weighted score/diversity greedy and DEITA's repr filter pick exactly what the one-process
rules pick on the whole pool, on every rank; LIFT
(with and without a score, and with the k-center fill of unscored candidates) picks the same
rows, its row variances equal to summation order. The references are the one-process
functions and ``np.lexsort`` over the whole pool."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import shard_rows, spawn_ranks

from evotune.selectors.base import Features
from evotune.selectors.cluster_quota import ClusterQuotaSelector
from evotune.selectors.filters import ScoredFirst, ScoreFiltered, score_filter
from evotune.selectors.influence import InfluenceSelector
from evotune.selectors.kcenter import KCenterSelector
from evotune.selectors.lift import LiftSelector
from evotune.selectors.rds import RdsSelector
from evotune.selectors.sharded import SingleProcess
from evotune.selectors.repr_filter import RepresentationFilterSelector, repr_filter
from evotune.selectors.weighted import WeightedSelector

TIES = np.array([0.0, -0.0, 1.5, -2.0, np.inf, -np.inf, np.nan, 3.0, 1e-300, -1e-300, 1.5, 1.5])


def top_k_cases() -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(1)
    tied = rng.choice(TIES, size=50)
    dense = rng.normal(size=200)
    few = np.array([np.nan, 2.0, np.nan, 2.0, 1.0])                # rank 2 of 3 has no rows
    return [(tied, 0), (tied, 1), (tied, 7), (tied, 30), (tied, 60), (dense, 13),
            (dense, 200), (few, 2), (few, 5), (np.full(9, np.nan), 3)]


def filter_cases() -> list[dict]:
    rng = np.random.default_rng(2)
    emb = rng.integers(0, 3, size=(40, 2)).astype(np.float32)      # many equal distances
    score = rng.choice(TIES[np.isfinite(TIES) | np.isnan(TIES)], size=40)
    return [{"emb": emb, "score": score, "labeled": [0, 9], "n": 6, "max": 1.5, "top": 0.5,
             "keep": "highest"},
            {"emb": emb, "score": score, "labeled": [3], "n": 12, "max": None, "top": 0.3,
             "keep": "highest"},
            {"emb": emb, "score": score, "labeled": [], "n": 20, "max": 0.0, "top": 1.0,
             "keep": "highest"},
            {"emb": emb, "score": score, "labeled": [0, 9], "n": 6, "max": 1.5, "top": 0.5,
             "keep": "lowest"},
            {"emb": emb, "score": score, "labeled": [3], "n": 12, "max": None, "top": 0.3,
             "keep": "lowest"}]


def rds_cases() -> list[dict]:
    rng = np.random.default_rng(3)
    per = rng.choice([0.1, 0.2, 0.3, 0.5, 0.9, np.nan], size=(60, 3))   # ties everywhere
    per[5] = 0.9                                                        # everyone's favourite
    dense = rng.uniform(-1, 1, size=(90, 2))
    return [{"per": per, "labeled": [1, 2], "n": 10}, {"per": per, "labeled": [], "n": 40},
            {"per": per[:, :1], "labeled": [7], "n": 15}, {"per": dense, "labeled": [0], "n": 30}]


def _unscorable() -> np.ndarray:
    """60 rows of which 10 have no rds score: 55 picks are too many."""
    per = rds_cases()[0]["per"].copy()
    per[10:20] = np.nan
    return per


def _rds_features(per: np.ndarray) -> Features:
    scores = {f"rds:t{s}": per[:, s] for s in range(per.shape[1])}
    scores["rds"] = np.nanmax(np.where(np.isnan(per), -np.inf, per), axis=1)
    scores["rds"][np.isnan(per).all(axis=1)] = np.nan
    return Features(scores=scores)


def influence_cases() -> list[dict]:
    """Per-subtask influence with ties; rows outside the gradient sample (in no shard, NaN in
    the one-process features) and a sampled row the model gave NaN."""
    rng = np.random.default_rng(4)
    per = rng.choice([-0.2, 0.1, 0.3, 0.3, 0.9], size=(50, 3))
    per[7] = np.nan
    sampled = np.setdiff1d(np.arange(50), [0, 4, 11, 12, 13, 30])
    return [{"per": per, "sampled": sampled, "labeled": [1, 2], "n": 8},
            {"per": per, "sampled": sampled, "labeled": [], "n": 43},
            {"per": per[:, :1], "sampled": np.arange(50), "labeled": [5], "n": 20}]


def _influence_features(per: np.ndarray, sampled: np.ndarray) -> Features:
    """The one-process features: NaN outside the sample."""
    per = np.where(np.isin(np.arange(len(per)), sampled)[:, None], per, np.nan)
    scores = {"influence": per.max(axis=1)}
    scores.update({f"influence:t{s}": per[:, s] for s in range(per.shape[1])})
    return Features(scores=scores)


def weighted_cases() -> list[dict]:
    """Integer embeddings (many equal distances), tied and NaN scores; alpha 0 (k-center), 1
    (top score) and between; no labeled row (every distance infinite at first); a constant
    score (no spread)."""
    rng = np.random.default_rng(6)
    emb = rng.integers(0, 3, size=(45, 3)).astype(np.float32)
    score = rng.choice([0.0, 0.5, 0.5, 2.0, -1.0, np.nan], size=45)
    return [{"emb": emb, "score": score, "alpha": 0.5, "labeled": [0, 9], "n": 12},
            {"emb": emb, "score": score, "alpha": 0.0, "labeled": [3], "n": 20},
            {"emb": emb, "score": score, "alpha": 1.0, "labeled": [3], "n": 20},
            {"emb": emb, "score": score, "alpha": 0.3, "labeled": [], "n": 25},
            {"emb": emb, "score": np.full(45, 0.7), "alpha": 0.8, "labeled": [1], "n": 30},
            # more picks than scored candidates: the k-center fill
            {"emb": emb, "score": score, "alpha": 0.5, "labeled": [2], "n": 42}]


def _weighted_rule(alpha: float):
    return ScoredFirst(WeightedSelector(WeightedSelector.Options(score="s", alpha=alpha)), "s")


def repr_cases() -> list[dict]:
    """Near-duplicates (a few directions with noise), tied and NaN scores, a zero row, blocks
    smaller than the walk (block_size 4), a walk that runs out (fill-ins) and one that stops."""
    rng = np.random.default_rng(7)
    emb = (rng.integers(0, 4, size=(50, 1)) == np.arange(4)).astype(np.float32) * 3 \
        + rng.normal(scale=0.4, size=(50, 4)).astype(np.float32)
    emb[17] = 0.0
    score = rng.choice([1.0, 2.0, 2.0, 3.0, np.inf, np.nan], size=50)
    return [{"emb": emb, "score": score, "labeled": [0, 5], "n": 6, "threshold": 0.9, "block": 4},
            {"emb": emb, "score": score, "labeled": [], "n": 30, "threshold": 0.5, "block": 4},
            {"emb": emb, "score": score, "labeled": [2], "n": 12, "threshold": 0.97,
             "block": 256}]


def lift_cases() -> list[dict]:
    """Correlated embeddings with a few far rows, exact duplicates (equal row variances: ties
    to the lowest position) and a score with ties and NaN."""
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(70, 6)) @ rng.normal(size=(6, 6))
    emb[[4, 33, 61]] *= 6.0
    emb[[10, 40, 50]] = emb[25]
    score = rng.choice([0.1, 0.5, 0.5, 0.9, np.nan], size=70)
    features = Features(emb.astype(np.float32), {"q": score})
    return [{"f": features, "options": {"keep": 0.5}, "labeled": [1, 2], "n": 12},
            {"f": features, "options": {"keep": 0.3, "score": "q"}, "labeled": [0], "n": 15},
            # enough scored candidates in all, fewer than n on each of 3 ranks
            {"f": features, "options": {"keep": 0.6, "score": "q"}, "labeled": [], "n": 40},
            {"f": features, "options": {"keep": 0.2, "variance": 1.0}, "labeled": [], "n": 30},
            # 55 picks, fewer candidates scored: the fill is k-center over the unscored ones
            {"f": features, "options": {"keep": 0.5, "score": "q"}, "labeled": [3], "n": 60}]


def knn_cases() -> list[dict]:
    """knn_k over ranks: duplicates (distance 0, many ties), NaN rows, tiles of 2 and 4 rows
    (several per rank), and a k too large for the pool's finite rows."""
    rng = np.random.default_rng(6)
    grid = rng.integers(0, 3, size=(40, 2)).astype(np.float32)
    grid[[4, 17]] = np.nan
    dense = rng.normal(size=(35, 6)).astype(np.float32)
    return [{"emb": grid, "k": 1, "chunk": 4}, {"emb": grid, "k": 6, "chunk": 2},
            {"emb": dense, "k": 3, "chunk": 4}, {"emb": dense, "k": 34, "chunk": 1000},
            {"emb": dense[:5], "k": 5, "chunk": 4}]


def cluster_cases() -> list[dict]:
    """The streamed mini-batch cluster quotas: tied scores, NaN scores, an unembedded row
    (centroid pick), equal quotas with a surplus, small batches (many gathers)."""
    rng = np.random.default_rng(7)
    emb = rng.normal(size=(80, 3)).astype(np.float32)
    emb[:40] += 4.0
    score = rng.choice([0.1, 0.5, 0.5, 0.9, np.nan], size=80)
    centroid = emb.copy()
    centroid[11] = np.nan
    return [{"emb": emb, "score": score, "pick": "score", "quota": "proportional",
             "labeled": [0, 5], "n": 17, "batch": 8},
            {"emb": emb, "score": score, "pick": "score", "quota": "equal", "labeled": [],
             "n": 50, "batch": 16},
            {"emb": centroid, "score": score, "pick": "centroid", "quota": "proportional",
             "labeled": [3], "n": 12, "batch": 8}]


def _cluster_rule(case: dict):
    return ClusterQuotaSelector(ClusterQuotaSelector.Options(
        "s", n_clusters=5, quota=case["quota"], pick=case["pick"], kmeans="minibatch",
        batch_size=case["batch"], passes=2))


def _lift_rule(options: dict):
    lift = LiftSelector(LiftSelector.Options(**options))
    return ScoredFirst(lift, options["score"]) if "score" in options else lift


def _part(features: Features, rows: list[int]) -> Features:
    rows = np.array(rows, dtype=np.int64)
    emb = None if features.embeddings is None else features.embeddings[rows]
    return Features(emb, {k: v[rows] for k, v in features.scores.items()}, positions=rows)


def _work(rank: int, world: int, port: int) -> dict:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch.distributed as dist
    from evotune.selectors.filters import score_filter_sharded
    from evotune.selectors.repr_filter import repr_filter_sharded
    from evotune.selectors.sharded import top_k
    from evotune.trainer.engine import TorchComm
    dist.init_process_group("gloo", rank=rank, world_size=world)
    comm, got = TorchComm(), {"top_k": [], "filter": [], "filtered_kcenter": [], "rds": []}
    for values, k in top_k_cases():
        mine = shard_rows(len(values), rank, world)
        pos, val = top_k(values[mine], np.array(mine, dtype=np.int64), k, comm)
        got["top_k"].append((pos.tolist(), val.tolist()))
    rng = np.random.default_rng(0)
    for case in filter_cases():
        mine = shard_rows(len(case["emb"]), rank, world)
        features = Features(case["emb"], {"s": case["score"]})
        cands = np.setdiff1d(np.arange(len(case["emb"])), case["labeled"])
        passed, info = score_filter_sharded(case["score"][mine], np.array(mine), cands,
                                            case["max"], case["top"], comm, case["keep"])
        got["filter"].append((passed.tolist(), info))
        rule = ScoreFiltered(KCenterSelector(), "s", case["max"], case["top"], case["keep"])
        sel = rule.select_sharded(_part(features, mine), np.array(case["labeled"]), cands,
                                  case["n"], rng, comm)
        got["filtered_kcenter"].append((sel.positions.tolist(),
                                        {k: v.tolist() for k, v in sel.numbers.items()},
                                        sel.info))
    for case in rds_cases():
        mine = shard_rows(len(case["per"]), rank, world)
        cands = np.setdiff1d(np.arange(len(case["per"])), case["labeled"])
        sel = RdsSelector().select_sharded(_part(_rds_features(case["per"]), mine),
                                           np.array(case["labeled"]), cands, case["n"], rng,
                                           comm)
        got["rds"].append((sel.positions.tolist(), sel.numbers["rds"].tolist(), sel.info,
                           sel.labels))
    got["influence"] = []
    for case in influence_cases():
        mine = [p for p in shard_rows(len(case["per"]), rank, world) if p in case["sampled"]]
        cands = np.setdiff1d(np.arange(len(case["per"])), case["labeled"])
        shard = _part(_influence_features(case["per"], case["sampled"]), mine)
        sel = InfluenceSelector().select_sharded(shard, np.array(case["labeled"]), cands,
                                                 case["n"], rng, comm)
        got["influence"].append((sel.positions.tolist(), sel.numbers["influence"].tolist(),
                                 sel.info, sel.labels))
    got["weighted"] = []
    for case in weighted_cases():
        mine = shard_rows(len(case["emb"]), rank, world)
        cands = np.setdiff1d(np.arange(len(case["emb"])), case["labeled"])
        sel = _weighted_rule(case["alpha"]).select_sharded(
            _part(Features(case["emb"], {"s": case["score"]}), mine), np.array(case["labeled"]),
            cands, case["n"], rng, comm)
        got["weighted"].append((sel.positions.tolist(), {k: v.tolist() for k, v in
                                                         sel.numbers.items()}, sel.info))
    # the greedy itself on the device form (torch's CPU device here; a GPU run's k-center
    # distances), the scored candidates only
    from functools import partial

    import torch
    from evotune.selectors.weighted import weighted_sharded
    from evotune.trainer.device_centres import DeviceNearestCentre
    device = partial(DeviceNearestCentre, device=torch.device("cpu"))
    got["weighted_device"] = []
    for case in weighted_cases():
        mine = np.array(shard_rows(len(case["emb"]), rank, world), dtype=np.int64)
        is_lab = np.isin(mine, case["labeled"])
        scored = mine[~is_lab & np.isfinite(case["score"][mine])]
        total = comm.sum_int64(len(scored))
        picks, numbers = weighted_sharded(
            case["emb"][scored], scored, case["score"][scored], case["emb"][mine[is_lab]],
            min(case["n"], total), case["alpha"], comm, 4, device)
        got["weighted_device"].append((picks.tolist(), {k: v.tolist()
                                                        for k, v in numbers.items()}))
    got["repr"] = []
    for case in repr_cases():
        mine = shard_rows(len(case["emb"]), rank, world)
        cands = np.setdiff1d(np.arange(len(case["emb"])), case["labeled"])
        part = _part(Features(case["emb"], {"s": case["score"]}), mine)
        sel = repr_filter_sharded(part.embeddings, part.scores["s"], part.positions,
                                  np.array(case["labeled"]), cands, case["n"], comm,
                                  case["threshold"], case["block"])
        got["repr"].append((sel.positions.tolist(), {k: v.tolist() for k, v in
                                                     sel.numbers.items()}, sel.info))
    rule = ScoredFirst(RepresentationFilterSelector(RepresentationFilterSelector.Options("s")),
                       "s")
    case = repr_cases()[0]
    sel = rule.select_sharded(_part(Features(case["emb"], {"s": case["score"]}),
                                    shard_rows(50, rank, world)), np.array([1]),
                              np.arange(2, 50), 45, rng, comm)
    got["repr_fill"] = (sel.positions.tolist(), sel.info)
    got["lift"] = []
    for case in lift_cases():
        mine = shard_rows(len(case["f"].embeddings), rank, world)
        cands = np.setdiff1d(np.arange(len(case["f"].embeddings)), case["labeled"])
        sel = _lift_rule(case["options"]).select_sharded(
            _part(case["f"], mine), np.array(case["labeled"]), cands, case["n"], rng, comm)
        got["lift"].append((sel.positions.tolist(), {k: v.tolist() for k, v in
                                                     sel.numbers.items()}, sel.info))
    try:
        LiftSelector().select_sharded(_part(lift_cases()[0]["f"], shard_rows(70, rank, world)),
                                      np.array([], dtype=np.int64), np.arange(70), 71, rng, comm)
    except ValueError as e:
        got["lift_error"] = str(e)
    try:                                     # too many picks: the same error on every rank
        per = _unscorable()
        RdsSelector().select_sharded(_part(_rds_features(per), shard_rows(len(per), rank, world)),
                                     np.array([], dtype=np.int64), np.arange(len(per)), 55, rng,
                                     comm)
        got["error"] = None
    except ValueError as e:
        got["error"] = str(e)
    got["cluster"] = []
    for case in cluster_cases():
        mine = shard_rows(len(case["emb"]), rank, world)
        cands = np.setdiff1d(np.arange(len(case["emb"])), case["labeled"])
        sel = _cluster_rule(case).select_sharded(
            _part(Features(case["emb"], {"s": case["score"]}), mine), np.array(case["labeled"]),
            cands, case["n"], np.random.default_rng(2), comm)
        got["cluster"].append((sel.positions.tolist(), {k: v.tolist() for k, v in
                                                        sel.numbers.items()}, sel.info))
    from evotune.trainer.scores import knn_distance
    got["knn"] = []
    for case in knn_cases():
        mine = shard_rows(len(case["emb"]), rank, world)
        try:
            got["knn"].append(knn_distance(case["emb"][mine], case["k"], case["chunk"],
                                           comm=comm).tolist())
        except ValueError as e:
            got["knn"].append(str(e))
    from evotune.trainer.scores import knn_values
    got["knn_values"] = []
    for case in knn_cases()[:3]:
        mine = shard_rows(len(case["emb"]), rank, world)
        values = np.arange(len(case["emb"]), dtype=np.float64) % 7
        got["knn_values"].append(knn_values(case["emb"][mine], np.array(mine), values[mine],
                                            case["k"], case["chunk"], comm=comm))
    dist.destroy_process_group()
    return got


@pytest.fixture(scope="module", params=[1, 2, 3])
def ranks(request):
    return spawn_ranks(_work, request.param)


def test_distributed_top_k_is_the_whole_pool_lexsort(ranks):
    for i, (values, k) in enumerate(top_k_cases()):
        ranked = np.flatnonzero(~np.isnan(values))
        order = ranked[np.lexsort((ranked, -values[ranked]))][:k]
        for got in ranks:
            assert got["top_k"][i] == (order.tolist(), values[order].tolist()), i


def test_sharded_score_filter_and_kcenter_after_it_pick_what_one_process_picks(ranks):
    rng = np.random.default_rng(0)
    for i, case in enumerate(filter_cases()):
        cands = np.setdiff1d(np.arange(len(case["emb"])), case["labeled"])
        passed, info = score_filter(case["score"], cands, case["max"], case["top"], case["keep"])
        rule = ScoreFiltered(KCenterSelector(), "s", case["max"], case["top"], case["keep"])
        sel = rule.select(Features(case["emb"], {"s": case["score"]}),
                          np.array(case["labeled"]), cands, case["n"], rng)
        for got in ranks:
            assert got["filter"][i] == (passed.tolist(), info), i
            positions, numbers, sel_info = got["filtered_kcenter"][i]
            assert positions == sel.positions.tolist(), i
            assert numbers == {k: v.tolist() for k, v in sel.numbers.items()}, i
            assert sel_info == sel.info, i
    assert any(sel_info["filled"] for _, _, sel_info in ranks[0]["filtered_kcenter"])


def test_sharded_rds_picks_what_one_process_picks(ranks):
    rng = np.random.default_rng(0)
    for i, case in enumerate(rds_cases()):
        cands = np.setdiff1d(np.arange(len(case["per"])), case["labeled"])
        sel = RdsSelector().select(_rds_features(case["per"]), np.array(case["labeled"]),
                                   cands, case["n"], rng)
        for got in ranks:
            positions, rds, info, labels = got["rds"][i]
            assert positions == sel.positions.tolist(), i
            assert rds == sel.numbers["rds"].tolist(), i
            assert info == sel.info and labels == sel.labels, i
    with pytest.raises(ValueError) as one:
        per = _unscorable()
        RdsSelector().select(_rds_features(per), np.array([], dtype=np.int64),
                             np.arange(len(per)), 55, rng)
    assert [got["error"] for got in ranks] == [str(one.value)] * len(ranks)


def test_sharded_influence_picks_what_one_process_picks(ranks):
    rng = np.random.default_rng(0)
    for i, case in enumerate(influence_cases()):
        cands = np.setdiff1d(np.arange(len(case["per"])), case["labeled"])
        sel = InfluenceSelector().select(_influence_features(case["per"], case["sampled"]),
                                         np.array(case["labeled"]), cands, case["n"], rng)
        for got in ranks:
            positions, values, info, labels = got["influence"][i]
            assert positions == sel.positions.tolist(), i
            assert values == sel.numbers["influence"].tolist(), i
            assert info == sel.info and labels == sel.labels, i


def test_sharded_lift_picks_what_one_process_picks(ranks):
    rng = np.random.default_rng(0)
    for i, case in enumerate(lift_cases()):
        cands = np.setdiff1d(np.arange(len(case["f"].embeddings)), case["labeled"])
        sel = _lift_rule(case["options"]).select(case["f"], np.array(case["labeled"]), cands,
                                                 case["n"], rng)
        for got in ranks:
            positions, numbers, info = got["lift"][i]
            assert positions == sel.positions.tolist(), i
            assert info == sel.info, i
            assert numbers.keys() == sel.numbers.keys(), i
            for name, values in sel.numbers.items():
                np.testing.assert_allclose(numbers[name], values, rtol=1e-9, atol=0,
                                           equal_nan=True, err_msg=f"case {i}: {name}")
    assert ranks[0]["lift"][4][2]["unscored_fill"] > 0                  # the fill was reached
    assert len({tuple(ranks[0]["lift"][0][0])} | {tuple(g["lift"][0][0]) for g in ranks}) == 1
    with pytest.raises(ValueError) as one:
        LiftSelector().select(lift_cases()[0]["f"], np.array([], dtype=np.int64),
                              np.arange(70), 71, rng)
    assert [got["lift_error"] for got in ranks] == [str(one.value)] * len(ranks)


def test_sharded_weighted_greedy_picks_what_one_process_picks(ranks):
    rng = np.random.default_rng(0)
    for i, case in enumerate(weighted_cases()):
        cands = np.setdiff1d(np.arange(len(case["emb"])), case["labeled"])
        sel = _weighted_rule(case["alpha"]).select(Features(case["emb"], {"s": case["score"]}),
                                                   np.array(case["labeled"]), cands, case["n"],
                                                   rng)
        for got in ranks:
            positions, numbers, info = got["weighted"][i]
            assert positions == sel.positions.tolist(), i
            assert numbers.keys() == sel.numbers.keys(), i
            for name, values in sel.numbers.items():       # bit for bit, NaN where filled
                np.testing.assert_array_equal(numbers[name], values, err_msg=f"{i}: {name}")
            assert info == sel.info, i
    assert any(info.get("unscored_fill") for _, _, info in ranks[0]["weighted"])


def test_weighted_greedy_on_the_device_form_picks_what_the_host_picks(ranks):
    """Integer embeddings: every distance is exact in float32 and float64 alike, so the device
    form (float64 on the device) gives the host's picks and numbers bit for bit."""
    from evotune.selectors.weighted import weighted_sharded
    for i, case in enumerate(weighted_cases()):
        lab = np.array(case["labeled"], dtype=np.int64)
        rest = np.setdiff1d(np.arange(len(case["emb"])), lab)
        scored = rest[np.isfinite(case["score"][rest])]
        picks, numbers = weighted_sharded(case["emb"][scored], scored, case["score"][scored],
                                          case["emb"][lab], min(case["n"], len(scored)),
                                          case["alpha"], SingleProcess(), 4)
        for got in ranks:
            positions, values = got["weighted_device"][i]
            assert positions == picks.tolist(), i
            for name, v in numbers.items():
                np.testing.assert_array_equal(values[name], v, err_msg=f"{i}: {name}")


def test_sharded_repr_filter_picks_what_one_process_picks(ranks):
    for i, case in enumerate(repr_cases()):
        cands = np.setdiff1d(np.arange(len(case["emb"])), case["labeled"])
        sel = repr_filter(case["emb"], case["score"], case["labeled"], cands, case["n"],
                          case["threshold"], case["block"])
        for got in ranks:
            positions, numbers, info = got["repr"][i]
            assert positions == sel.positions.tolist(), i
            assert numbers.keys() == sel.numbers.keys(), i
            for name, values in sel.numbers.items():       # bit for bit
                np.testing.assert_array_equal(numbers[name], values, err_msg=f"{i}: {name}")
            assert info == sel.info, i
    infos = [info for _, _, info in ranks[0]["repr"]]
    assert infos[1]["filled"] > 0 and infos[0]["rejected_by_threshold"] > 0
    assert all(info["zero_embeddings"] == 1 for info in infos)
    rule = ScoredFirst(RepresentationFilterSelector(RepresentationFilterSelector.Options("s")),
                       "s")
    case = repr_cases()[0]
    sel = rule.select(Features(case["emb"], {"s": case["score"]}), np.array([1]),
                      np.arange(2, 50), 45, np.random.default_rng(0))
    assert sel.info["unscored_fill"] > 0
    for got in ranks:                        # more picks than scored rows: k-center fills
        assert got["repr_fill"] == (sel.positions.tolist(), sel.info)


def test_sharded_knn_distance_is_one_process_and_brute_force(ranks):
    """knn_k over ranks: each rank's rows get the values one process gives them (bit for bit:
    squared distances summed in float64, rounded to float32), which are the k-th smallest
    distances to the pool's other finite rows; too large a k fails on every rank alike."""
    from evotune.trainer.scores import knn_distance
    for i, case in enumerate(knn_cases()):
        emb, k = case["emb"], case["k"]
        ok = np.isfinite(emb).all(axis=1)
        if ok.sum() <= k:
            for got in ranks:
                assert got["knn"][i] == f"knn_k={k} needs more than {k} embedded examples, " \
                                        f"got {int(ok.sum())}"
            continue
        one = knn_distance(emb, k, case["chunk"])
        x = emb.astype(np.float64)
        full = np.sqrt(((x[:, None, :] - x[None]) ** 2).sum(-1))
        full[:, ~ok] = np.inf
        np.fill_diagonal(full, np.inf)
        brute = np.where(ok, np.sort(full, axis=1)[:, k - 1], np.nan)
        assert one == pytest.approx(brute, rel=1e-6, abs=1e-6, nan_ok=True), i
        for rank, got in enumerate(ranks):
            mine = shard_rows(len(emb), rank, len(ranks))
            assert np.array_equal(got["knn"][i], one[mine], equal_nan=True), (i, rank)


def test_sharded_knn_values_are_one_process_and_brute_force(ranks):
    """loss_excess's neighbours over ranks: each row's k nearest other rows (ties to the lower
    pool position, whichever rank holds it) and their values, as one process finds them."""
    from evotune.trainer.scores import knn_values
    for i, case in enumerate(knn_cases()[:3]):
        emb, k = case["emb"], case["k"]
        values = np.arange(len(emb), dtype=np.float64) % 7
        one = knn_values(emb, np.arange(len(emb)), values, k, case["chunk"])
        ok = np.flatnonzero(np.isfinite(emb).all(axis=1))
        for r in ok:
            d = sorted((float(((emb[r].astype(np.float64) - emb[j]) ** 2).sum()), j)
                       for j in ok if j != r)
            assert one[r].tolist() == [values[j] for _, j in d[:k]], (i, r)
        for rank, got in enumerate(ranks):
            mine = shard_rows(len(emb), rank, len(ranks))
            assert np.array_equal(got["knn_values"][i], one[mine], equal_nan=True), (i, rank)


def test_sharded_minibatch_cluster_quota_picks_what_one_process_picks(ranks):
    """kmeans: minibatch over ranks: the rows reach rank 0's MiniBatchKMeans in the same
    batches for any rank count, so the clusters, quotas, picks and logged numbers are one
    process's (the centroid cosines to summation order of the cluster sums)."""
    for i, case in enumerate(cluster_cases()):
        cands = np.setdiff1d(np.arange(len(case["emb"])), case["labeled"])
        one = _cluster_rule(case).select(Features(case["emb"], {"s": case["score"]}),
                                         np.array(case["labeled"]), cands, case["n"],
                                         np.random.default_rng(2))
        for got in ranks:
            positions, numbers, info = got["cluster"][i]
            assert positions == one.positions.tolist(), i
            assert info == one.info, i
            for key, values in one.numbers.items():
                assert numbers[key] == pytest.approx(values.tolist(), rel=1e-12), (i, key)
    assert any(info["filled"] for _, _, info in ranks[0]["cluster"])
    assert ranks[0]["cluster"][2][2]["nan_scores"] == 1          # the unembedded row
