"""Run state on disk: complete rounds, what a checkpoint holds, and the resume decision."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from evotune.trainer.config import Config
from evotune.trainer.seeding import capture_rng
from evotune.trainer.state import (RUN_MARKER, STATE_FILE, ResumePlan, RoundState,
                                   incomplete_round_dirs, last_completed_round, plan_resume,
                                   read_state, round_dir, write_checkpoint_manifest)

BUDGET = [6, 5, 5, 5]
POOL_HASH = "a" * 64


def make_cfg(zero_stage: int = 0) -> Config:
    cfg = Config()
    cfg.data.pool = "/data/pool.jsonl"
    cfg.selection.rounds = 4
    cfg.selection.init_size = 6
    cfg.selection.per_round = 5
    cfg.deepspeed.zero_stage = zero_stage
    return cfg


def make_state(round_idx: int, cfg: Config, world_size: int = 1) -> RoundState:
    n = sum(BUDGET[: round_idx + 1])
    return RoundState(round_idx=round_idx, global_step=3 * (round_idx + 1),
                      selected_ids=[f"id{i}" for i in range(n)], budget=list(BUDGET),
                      seed=cfg.seed, config_hash=cfg.results_hash(), pool_hash=POOL_HASH,
                      world_size=world_size, zero_stage=cfg.deepspeed.zero_stage,
                      rng={"python": "cafe"})


def make_run(out: Path, cfg: Config, complete=(0, 1), half_written=(), world_size: int = 1
             ) -> Path:
    """A run dir by hand: config.json, complete rounds (with state.json) and crash leftovers."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    for r in complete:
        d = round_dir(out, r)
        d.mkdir(parents=True)
        (d / "selection.jsonl").write_text('{"id": "x"}\n')
        (d / "checkpoint" / "deepspeed").mkdir(parents=True)
        (d / STATE_FILE).write_text(json.dumps(make_state(r, cfg, world_size).to_json()))
    for r in half_written:
        d = round_dir(out, r)
        d.mkdir(parents=True)
        (d / "selection.jsonl").write_text('{"id": "x"}\n')
    return out


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*")}


# ----------------------------------------------------------------------------- RoundState

def test_round_state_json_round_trip():
    st = make_state(2, make_cfg())
    st.rng = capture_rng()
    again = RoundState.from_json(json.loads(json.dumps(st.to_json())))
    assert again == st


def test_read_state_of_a_corrupt_file_says_so(tmp_path):
    d = round_dir(tmp_path, 0)
    d.mkdir(parents=True)
    (d / STATE_FILE).write_text("{not json")
    with pytest.raises(RuntimeError, match="unreadable"):
        read_state(tmp_path, 0)


# ----------------------------------------------------------------------------- complete rounds

def test_last_completed_round_ignores_a_half_written_round(tmp_path):
    out = make_run(tmp_path / "run", make_cfg(), complete=(0, 1), half_written=(2,))
    assert last_completed_round(out) == 1


def test_last_completed_round_stops_at_a_gap(tmp_path):
    out = make_run(tmp_path / "run", make_cfg(), complete=(0, 2))
    assert last_completed_round(out) == 0


def test_last_completed_round_of_an_empty_run_is_minus_one(tmp_path):
    assert last_completed_round(tmp_path) == -1


def test_incomplete_round_dirs(tmp_path):
    out = make_run(tmp_path / "run", make_cfg(), complete=(0, 1), half_written=(2, 3))
    (out / "rounds" / "round_004").write_text("a file, not a round")
    (out / "rounds" / "round_abc").mkdir()
    (out / "rounds" / "notes").mkdir()
    rounds = out / "rounds"
    assert incomplete_round_dirs(out, 1) == [rounds / "round_002", rounds / "round_003"]
    assert incomplete_round_dirs(out, -1) == [rounds / f"round_{i:03d}" for i in range(4)]
    assert incomplete_round_dirs(out, 3) == []
    assert incomplete_round_dirs(tmp_path / "missing", -1) == []


# ----------------------------------------------------------------------------- plan_resume

def plan(out: Path, cfg: Config, mode: str = "auto", overwrite: bool = False,
         budget=BUDGET, pool_hash: str = POOL_HASH, world_size: int = 1):
    return plan_resume(out, mode, overwrite, cfg, list(budget), pool_hash, world_size)


@pytest.mark.parametrize("exists", [False, True])
def test_auto_on_missing_or_empty_dir_starts_at_round_0(tmp_path, exists):
    out = tmp_path / "run"
    if exists:
        out.mkdir()
    p = plan(out, make_cfg())
    assert (p.start_round, p.state, p.discard, p.wipe) == (0, None, [], False)


def test_never_on_a_non_empty_dir_needs_overwrite(tmp_path):
    out = make_run(tmp_path / "run", make_cfg())
    with pytest.raises(ValueError, match="--overwrite"):
        plan(out, make_cfg(), mode="never")
    p = plan(out, make_cfg(), mode="never", overwrite=True)
    assert (p.start_round, p.state, p.wipe) == (0, None, True)


@pytest.mark.parametrize("mode, overwrite", [("auto", False), ("auto", True),
                                             ("never", False), ("never", True)])
def test_a_dir_that_is_not_a_run_is_never_deleted_and_the_message_offers_no_overwrite(
        tmp_path, mode, overwrite):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an evotune run") as e:
        plan(out, make_cfg(), mode=mode, overwrite=overwrite)
    assert "--overwrite" not in str(e.value)
    # even a plan made by hand refuses to wipe it
    p = ResumePlan(out, 0, None, wipe=True)
    with pytest.raises(ValueError, match="refusing to delete"):
        p.apply()
    assert (out / "notes.txt").read_text() == "mine"


def test_a_run_dir_carries_its_marker_and_one_that_died_before_its_config_starts_over(
        tmp_path):
    out = tmp_path / "run"
    plan(out, make_cfg()).apply()
    assert (out / RUN_MARKER).is_file()
    (out / "metrics.jsonl").write_text("")
    p = plan(out, make_cfg())
    assert p.wipe and p.start_round == 0 and "starting it over" in p.warnings[0]


def test_auto_resumes_after_the_last_complete_round(tmp_path):
    cfg = make_cfg()
    out = make_run(tmp_path / "run", cfg, complete=(0, 1), half_written=(2,))
    p = plan(out, cfg)
    assert p.start_round == 2
    assert p.state == make_state(1, cfg)
    assert p.discard == [out / "rounds" / "round_002"]
    assert p.wipe is False and p.warnings == []


def test_auto_with_only_a_half_written_round_restarts_it(tmp_path):
    cfg = make_cfg()
    out = make_run(tmp_path / "run", cfg, complete=(), half_written=(0,))
    p = plan(out, cfg)
    assert (p.start_round, p.state) == (0, None)
    assert p.discard == [out / "rounds" / "round_000"]


def test_changed_result_key_is_refused_naming_it(tmp_path):
    out = make_run(tmp_path / "run", make_cfg())
    cfg = make_cfg()
    cfg.train.lr = 1e-3
    with pytest.raises(ValueError, match=r"train\.lr"):
        plan(out, cfg)


def test_changed_safe_key_is_a_warning_naming_it(tmp_path):
    out = make_run(tmp_path / "run", make_cfg())
    cfg = make_cfg()
    cfg.train.log_every = 10
    p = plan(out, cfg)
    assert p.start_round == 2
    assert any("train.log_every" in w for w in p.warnings)


def test_a_run_saved_with_a_key_this_version_lacks_is_refused_naming_it(tmp_path):
    """config.json of another version, with a setting since renamed or removed (a flat
    ``selection.alpha`` that became ``selection.weighted.alpha``): its meaning cannot be
    compared, so the resume is refused, naming the key. A key the saved config lacks (added
    since) had its default's behaviour: accepted."""
    out = make_run(tmp_path / "run", make_cfg())
    saved = json.loads((out / "config.json").read_text())
    del saved["selection"]["weighted"]                   # added since: the default
    (out / "config.json").write_text(json.dumps(saved))
    assert plan(out, make_cfg()).start_round == 2
    saved["selection"]["alpha"] = 0.5                    # removed since: refused
    (out / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"does not have: selection\.alpha \(renamed"):
        plan(out, make_cfg())


def test_after_a_random_round_0_the_selection_rule_may_change(tmp_path):
    """Branching from a shared warm-up: only round 0 (random) is complete, so the selector and
    its settings may change; the budget, training and data settings may not; after round 1
    (chosen by the old rule) nothing of the rule may change either."""
    out = make_run(tmp_path / "run", make_cfg(), complete=(0,))
    cfg = make_cfg()
    cfg.selection.selector = "weighted"
    cfg.selection.weighted.alpha = 0.2
    cfg.scoring.knn_k.k = 3
    p = plan(out, cfg)
    assert p.start_round == 1
    assert any("round 0 was a random sample" in w and "selection.weighted.alpha" in w
               and "scoring.knn_k.k" in w for w in p.warnings)
    cfg.train.lr = 1e-3
    with pytest.raises(ValueError, match=r"train\.lr"):
        plan(out, cfg)
    cfg = make_cfg()
    cfg.selection.first_round = "selector"
    with pytest.raises(ValueError, match=r"selection\.first_round"):
        plan(out, cfg)
    later = make_run(tmp_path / "later", make_cfg(), complete=(0, 1))
    cfg = make_cfg()
    cfg.selection.selector = "weighted"
    with pytest.raises(ValueError, match=r"selection\.selector"):
        plan(later, cfg)


def test_changed_pool_is_refused(tmp_path):
    out = make_run(tmp_path / "run", make_cfg())
    with pytest.raises(ValueError, match="pool"):
        plan(out, make_cfg(), pool_hash="b" * 64)


def test_changed_budget_of_a_completed_round_is_refused(tmp_path):
    out = make_run(tmp_path / "run", make_cfg())
    cfg = make_cfg()
    cfg.selection.per_round = 4
    with pytest.raises(ValueError, match="completed rounds"):
        plan(out, cfg, budget=[6, 4, 4, 4])


def test_changed_budget_of_a_later_round_is_a_warning(tmp_path):
    out = make_run(tmp_path / "run", make_cfg())      # rounds 0 and 1 complete
    cfg = make_cfg()
    cfg.selection.per_round = [5, 9, 9]
    p = plan(out, cfg, budget=[6, 5, 9, 9])
    assert p.start_round == 2
    assert any("selection.per_round" in w for w in p.warnings)


def test_world_size_change_is_refused_with_sharded_optimizer_state(tmp_path):
    cfg = make_cfg(zero_stage=2)
    out = make_run(tmp_path / "run", cfg, world_size=2)
    with pytest.raises(ValueError, match="ZeRO-2"):
        plan(out, cfg, world_size=1)


def test_world_size_change_is_a_warning_without_zero(tmp_path):
    cfg = make_cfg(zero_stage=0)
    out = make_run(tmp_path / "run", cfg, world_size=2)
    p = plan(out, cfg, world_size=1)
    assert p.start_round == 2
    assert any("world size" in w for w in p.warnings)


def test_all_rounds_complete_warns_nothing_to_train(tmp_path):
    cfg = make_cfg()
    cfg.selection.rounds = 2
    out = make_run(tmp_path / "run", cfg, complete=(0, 1))
    assert any("nothing to train" in w for w in plan(out, cfg).warnings)


def test_resume_from_an_earlier_round_needs_overwrite(tmp_path):
    cfg = make_cfg()
    out = make_run(tmp_path / "run", cfg, complete=(0, 1), half_written=(2,))
    mode = str(out / "rounds" / "round_000")
    with pytest.raises(ValueError, match="--overwrite"):
        plan(tmp_path / "other", cfg, mode=mode)
    p = plan(tmp_path / "other", cfg, mode=mode, overwrite=True)
    assert p.out_dir == out
    assert p.start_round == 1 and p.state == make_state(0, cfg)
    assert p.discard == [out / "rounds" / "round_001", out / "rounds" / "round_002"]
    assert p.wipe is False


def test_resume_from_the_run_dir_path(tmp_path):
    cfg = make_cfg()
    out = make_run(tmp_path / "run", cfg, complete=(0, 1))
    p = plan(tmp_path / "other", cfg, mode=str(out))
    assert (p.out_dir, p.start_round, p.discard) == (out, 2, [])


def test_resume_from_a_path_that_is_not_a_run(tmp_path):
    with pytest.raises(ValueError, match="not an evotune run"):
        plan(tmp_path / "x", make_cfg(), mode=str(tmp_path))


def test_resume_from_an_incomplete_round_is_refused(tmp_path):
    cfg = make_cfg()
    out = make_run(tmp_path / "run", cfg, complete=(0,), half_written=(1,))
    with pytest.raises(ValueError, match="round 1 is not complete"):
        plan(out, cfg, mode=str(out / "rounds" / "round_001"), overwrite=True)


# ----------------------------------------------------------------------------- ResumePlan.apply

def test_apply_deletes_exactly_the_discarded_rounds(tmp_path):
    cfg = make_cfg()
    out = make_run(tmp_path / "run", cfg, complete=(0, 1, 2), half_written=(3,))
    p = plan(tmp_path / "other", cfg, mode=str(out / "rounds" / "round_000"), overwrite=True)
    before = files_under(out)
    expected = {f for d in p.discard for f in files_under(d) | {d}}
    p.apply()
    assert before - files_under(out) == expected
    assert {d.name for d in p.discard} == {"round_001", "round_002", "round_003"}
    assert read_state(out, 0) == make_state(0, cfg)


def test_apply_wipe_empties_the_dir(tmp_path):
    out = make_run(tmp_path / "run", make_cfg())
    (tmp_path / "sibling.txt").write_text("keep")
    p = plan(out, make_cfg(), mode="never", overwrite=True)
    p.apply()
    assert out.is_dir() and [f.name for f in out.iterdir()] == [RUN_MARKER]
    assert (tmp_path / "sibling.txt").read_text() == "keep"


def test_apply_creates_a_missing_dir(tmp_path):
    p = plan(tmp_path / "a" / "run", make_cfg())
    p.apply()
    assert (tmp_path / "a" / "run").is_dir()


def test_resume_needs_the_checkpoint_of_the_round_it_resumes_after(tmp_path):
    cfg = make_cfg()
    out = make_run(tmp_path / "run", cfg, complete=(0, 1))
    shutil.rmtree(round_dir(out, 1) / "checkpoint")
    with pytest.raises(ValueError, match="round 1 .* has no DeepSpeed checkpoint"):
        plan(out, cfg)


# ----------------------------------------------------------------------------- power loss

def test_a_checkpoint_cut_short_after_its_state_was_written_is_redone(tmp_path):
    """state.json is the commit point, but after a power loss the files it vouches for may not
    all be on disk: the manifest (sizes of every file) tells, and such a round is redone."""
    cfg = make_cfg()
    out = make_run(tmp_path / "run", cfg, complete=(0, 1))
    for r in (0, 1):
        ck = round_dir(out, r) / "checkpoint"
        (ck / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
        write_checkpoint_manifest(ck)
    assert plan(out, cfg).start_round == 2
    (round_dir(out, 1) / "checkpoint" / "deepspeed" / "mp_rank_00_model_states.pt"
     ).write_bytes(b"x" * 10)                                  # cut short
    p = plan(out, cfg)
    assert p.start_round == 1 and p.discard == [round_dir(out, 1)]
    assert "incomplete checkpoint" in p.warnings[0]
    # and with round 0's checkpoint pruned, there is nothing to fall back on
    import shutil
    shutil.rmtree(round_dir(out, 0) / "checkpoint")
    with pytest.raises(ValueError, match="round 1's is incomplete"):
        plan(out, cfg)


def test_a_torn_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    from evotune.trainer.logs import drop_metrics_after
    (tmp_path / "metrics.jsonl").write_text('{"round": 0, "x": 1}\n{"round": 1, "x": 2}\n'
                                            '{"round": 1, "x"')
    with caplog.at_level("WARNING", logger="evotune"):
        drop_metrics_after(tmp_path, 1)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [
        '{"round": 0, "x": 1}', '{"round": 1, "x": 2}']
    assert "metrics.jsonl:3" in caplog.text


def test_stale_gradient_batches_are_removed_and_the_next_rounds_kept(tmp_path):
    cfg = make_cfg()
    out = make_run(tmp_path / "run", cfg, complete=(0, 1))
    for r in (1, 2):
        (out / "partial" / f"round_{r:03d}").mkdir(parents=True)
    p = plan(out, cfg)
    p.apply()
    assert [d.name for d in (out / "partial").iterdir()] == ["round_002"]


def test_inputs_that_moved_with_the_same_content_resume(tmp_path):
    cfg = make_cfg()
    pool = tmp_path / "a" / "pool.jsonl"
    pool.parent.mkdir()
    pool.write_text('{"instruction": "x", "output": "y"}\n')
    cfg.data.pool = str(pool)
    out = make_run(tmp_path / "run", cfg)
    moved = tmp_path / "b" / "pool.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(pool.read_bytes())
    cfg2 = make_cfg()
    cfg2.data.pool = str(moved)
    p = plan(out, cfg2)
    assert p.start_round == 2 and any("same content" in w for w in p.warnings)
    moved.write_text('{"instruction": "x", "output": "z"}\n')
    with pytest.raises(ValueError, match=r"data\.pool"):
        plan(out, cfg2)


def test_a_torn_gradient_shard_is_recomputed_not_a_crash(tmp_path):
    from evotune.trainer.passes.influence import _load_shards, _save_shard, _shard_path
    rows = np.ones((2, 3), dtype=np.float32)
    _save_shard(tmp_path, "train", 0, 0, "key", rows)
    _save_shard(tmp_path, "train", 0, 1, "key", rows)
    _shard_path(tmp_path, "train", 0, 1).write_bytes(b"PK\x03\x04 cut short")
    done = _load_shards(tmp_path, "train", 0, "key", [[1, 2], [3, 4], [5, 6]])
    assert len(done) == 1 and np.array_equal(done[0], rows)
