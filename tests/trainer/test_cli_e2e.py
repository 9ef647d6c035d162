"""End-to-end: ``evotune train`` picks what ``launch/train.py`` picks, and runs on two ranks
through the real ``deepspeed`` launcher in the form the docs give (``--no_python evotune``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, _free_port, assert_no_shm_leak, run_train, shm_buffers, write_config

pytestmark = pytest.mark.e2e

EVOTUNE = Path(sys.executable).with_name("evotune")
DEEPSPEED = Path(sys.executable).with_name("deepspeed")


def evotune(args: list, timeout: int = 600) -> subprocess.CompletedProcess:
    """``evotune ARGS`` as its own process (the installed console script)."""
    proc = subprocess.run([str(EVOTUNE), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tiny_model_dir):
    """A 2-round k-center run of ``evotune train`` in one process."""
    d = tmp_path_factory.mktemp("evotune-train")
    cfg = write_config(d / "cfg.yaml", tiny_model_dir, d / "out", selection={"rounds": 2})
    proc = evotune(["train", "--config", cfg])
    return d / "out", cfg, proc


def selection_files(out: Path) -> dict[str, bytes]:
    files = sorted((out / "rounds").glob("round_*/selection.jsonl")) + [out / "selected.jsonl"]
    return {str(f.relative_to(out)): f.read_bytes() for f in files}


def test_evotune_train_picks_what_deepspeed_launch_train_picks(one_rank, tmp_path):
    out, cfg, proc = one_rank
    assert "evotune: 1 rank(s)" in proc.stderr
    ref = tmp_path / "ref"
    run_train(["--config", str(cfg), f"output.dir={ref}"], launcher=True)
    ours, theirs = selection_files(out), selection_files(ref)
    assert list(ours) == ["rounds/round_000/selection.jsonl",
                          "rounds/round_001/selection.jsonl", "selected.jsonl"]
    assert ours == theirs
    losses = [[json.loads(line)["eval_loss"] for line in (o / "rounds.jsonl").read_text()
               .splitlines()] for o in (out, ref)]
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_evotune_train_on_two_ranks_through_the_deepspeed_launcher(one_rank, tmp_path):
    """deepspeed --no_python evotune train: the launcher puts --local_rank=N before the command
    and sets RANK/LOCAL_RANK/WORLD_SIZE; both ranks join, the run finishes with every file, and
    it picks what one rank picks."""
    ref, cfg, _ = one_rank
    out = tmp_path / "out"
    shm_before = shm_buffers()
    proc = subprocess.run([str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(_free_port()),
                           "--no_python", str(EVOTUNE), "train", "--config", str(cfg),
                           f"output.dir={out}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "--local_rank=1', 'train'" in log          # the command the launcher spawned
    assert "evotune: 2 rank(s)" in log
    assert_no_shm_leak(shm_before)
    for r in range(2):
        state = json.loads((out / "rounds" / f"round_{r:03d}" / "state.json").read_text())
        assert state["world_size"] == 2 and state["round_idx"] == r
    summaries = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [s["total_examples"] for s in summaries] == [6, 11]
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    picked = [[json.loads(line)["id"] for line in (o / "selected.jsonl").read_text()
               .splitlines()] for o in (out, ref)]
    assert picked[0] == picked[1] and len(picked[0]) == 11
