"""The reference model (RHO-LOSS's): trained once per run on a clean holdout, its pool losses
against each row alone through the exported adapter, the learnability scores made from them,
the quality gate, resume, the cache, two ranks under ZeRO-3, full fine-tuning, score_pool."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import FIXTURES, POOL_TINY, run_train, write_config

pytestmark = pytest.mark.e2e

GATE = {"filter_score": "reference_loss", "filter_keep": "lowest", "filter_top_fraction": 0.5}


def holdout(tmp_path: Path) -> Path:
    """16 clean rows that are not in the tiny pool."""
    pool_ids = {json.loads(line)["id"] for line in POOL_TINY.read_text().splitlines()}
    rows = [json.loads(line) for line in
            (FIXTURES / "pool_noisy_subset.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["corruption"] is None and r["id"] not in pool_ids][:16]
    assert len(rows) == 16
    path = tmp_path / "holdout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path: Path, model_dir: Path, name: str, selection: dict | None = None,
           reference: dict | None = None, **sections) -> tuple[Path, Path]:
    out = tmp_path / name
    sel = {"selector": "weighted", "weighted": {"score": "reducible_loss", "alpha": 1.0},
           **GATE, "rounds": 2, **(selection or {})}
    scoring = {"reference": {"data": str(holdout(tmp_path)), "epochs": 2, "lr": 5e-3,
                             **(reference or {})}, **sections.pop("scoring", {})}
    cfg = write_config(tmp_path / f"{name}.yaml", model_dir, out, selection=sel,
                       scoring=scoring, **sections)
    return cfg, out


def npz(out: Path, r: int = 1) -> dict[str, np.ndarray]:
    with np.load(out / "rounds" / f"round_{r:03d}" / "features.npz") as f:
        return {k: f[k] for k in f.files}


def reference_values(out: Path) -> np.ndarray:
    with np.load(out / "reference.npz") as f:
        return f["values"]


@torch.no_grad()
def mean_losses(model, encoded) -> list[float]:
    """Each row alone through ``model``: the mean NLL of its response tokens."""
    from evotune.trainer.passes.forward import response_scores
    return [float(response_scores(model(input_ids=torch.tensor([e.input_ids])).logits,
                                  torch.tensor([e.labels]))["loss"][0]) for e in encoded]


def encode(path: Path, model_dir: Path):
    from evotune.trainer.data import encode_all, load_examples
    from evotune.trainer.model import load_tokenizer
    examples, _ = load_examples(path, "skip")
    return encode_all(examples, load_tokenizer(model_dir), "chat", 160, "skip")[:2]


@pytest.fixture(scope="module")
def one_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("reference")
    cfg, out = config(tmp, tiny_model_dir, "run", scoring={"base_cache": False})
    proc = run_train(["--config", str(cfg)])
    return tmp, out, proc


def test_reference_loss_is_each_row_alone_through_the_trained_adapter(one_run,
                                                                       tiny_model_dir):
    from peft import PeftModel

    from evotune.trainer.model import load_model
    tmp, out, _ = one_run
    kept, encoded = encode(POOL_TINY, tiny_model_dir)
    f = npz(out)
    assert list(f["ids"]) == [ex.id for ex in kept]
    base = load_model(tiny_model_dir, torch.float32).eval()
    reference = PeftModel.from_pretrained(load_model(tiny_model_dir, torch.float32),
                                          out / "reference" / "adapter").eval()
    expected = mean_losses(reference, encoded)
    assert f["score_reference_loss"] == pytest.approx(expected, rel=1e-5)
    assert reference_values(out) == pytest.approx(expected, rel=1e-5)
    # The adapter learnt its holdout: lower loss there than the base model's.
    _, held = encode(tmp / "holdout.jsonl", tiny_model_dir)
    assert np.mean(mean_losses(reference, held)) < np.mean(mean_losses(base, held)) - 1e-3
    # The current model's loss (round 0's adapter) and RHO-LOSS's difference from it
    current = PeftModel.from_pretrained(load_model(tiny_model_dir, torch.float32),
                                        out / "rounds" / "round_000" / "adapter").eval()
    some = list(range(0, len(encoded), 5))
    assert f["score_loss"][some] == pytest.approx(
        mean_losses(current, [encoded[i] for i in some]), rel=1e-5)
    assert np.array_equal(f["score_reducible_loss"], f["score_loss"] - f["score_reference_loss"])


def test_the_gate_keeps_the_lowest_reference_losses_then_the_highest_reducible(one_run):
    _, out, proc = one_run
    f = npz(out)
    picked = [json.loads(line) for line in
              (out / "rounds" / "round_001" / "selection.jsonl").read_text().splitlines()]
    first = {json.loads(line)["pool_index"] for line in
             (out / "rounds" / "round_000" / "selection.jsonl").read_text().splitlines()}
    cands = [i for i in range(len(f["ids"])) if i not in first]
    ref = f["score_reference_loss"]
    passed = sorted(cands, key=lambda i: (ref[i], i))[:len(cands) // 2]
    best = sorted(passed, key=lambda i: (-f["score_reducible_loss"][i], i))[:len(picked)]
    assert [p["pool_index"] for p in picked] == best
    assert all(p["passed_filter"] == 1 for p in picked)
    summary = json.loads((out / "rounds" / "round_001" / "summary.json").read_text())
    assert summary["tokens"]["reference"] > 0 and summary["seconds"]["reference"] > 0
    assert "reference: train" in proc.stdout + proc.stderr
    metrics = (out / "metrics.jsonl").read_text()
    assert "reference" not in metrics          # its steps are not the run's


def test_a_resumed_run_reads_the_reference_back_and_a_crash_retrains_it_alike(
        one_run, tmp_path, tiny_model_dir):
    _, first, _ = one_run
    # killed after the adapter is trained and exported, before its losses are written
    cfg, out = config(tmp_path, tiny_model_dir, "crashed", scoring={"base_cache": False})
    proc = run_train(["--config", str(cfg)], check=False, env={"EVOTUNE_CRASH_AT": "reference:0"})
    assert proc.returncode != 0 and not (out / "reference.npz").exists()
    proc = run_train(["--config", str(cfg)], env={"EVOTUNE_CRASH_AT": "embed:1"}, check=False)
    assert proc.returncode != 0 and (out / "reference.npz").exists()
    assert np.array_equal(reference_values(out), reference_values(first))
    proc = run_train(["--config", str(cfg)])
    assert "reused from the run folder" in proc.stdout + proc.stderr
    assert np.array_equal(npz(out)["score_reference_loss"], npz(first)["score_reference_loss"])
    assert npz(out)["score_reducible_loss"] == pytest.approx(npz(first)["score_reducible_loss"])


def test_runs_of_other_seeds_share_one_cached_reference(tmp_path, tiny_model_dir, one_run,
                                                        monkeypatch):
    _, first, _ = one_run
    monkeypatch.setenv("EVOTUNE_CACHE", str(tmp_path / "cache"))
    outs = []
    for seed in (7, 8):
        cfg, out = config(tmp_path, tiny_model_dir, f"seed{seed}", seed=seed,
                          selection={"rounds": 1, "first_round": "selector"})
        proc = run_train(["--config", str(cfg)])
        outs.append(out)
        said = proc.stdout + proc.stderr
        assert ("reused from the cache" in said) == (seed == 8)
    assert np.array_equal(reference_values(outs[0]), reference_values(outs[1]))
    assert np.array_equal(reference_values(outs[0]), reference_values(first))
    assert (outs[0] / "reference" / "adapter").is_dir()
    assert not (outs[1] / "reference").exists()          # it trained none


def test_score_pool_and_full_fine_tuning_make_the_same_reference(tmp_path, tiny_model_dir,
                                                                  one_run):
    _, first, _ = one_run
    cfg, out = config(tmp_path, tiny_model_dir, "full", lora={"enabled": False},
                      scoring={"base_cache": False})
    run_train(["--config", str(cfg)])
    assert np.array_equal(reference_values(out), reference_values(first))
    run_train(["--config", str(cfg), "--scores", "loss,reference_loss,reducible_loss",
               "--out", str(tmp_path / "scores")], script="score_pool.py")
    rows = [json.loads(line) for line in (tmp_path / "scores" / "scores.jsonl").read_text()
            .splitlines()]
    assert [r["reference_loss"] for r in rows] == pytest.approx(
        reference_values(first).tolist(), rel=1e-6)
    assert [r["reducible_loss"] for r in rows] == pytest.approx(
        [r["loss"] - r["reference_loss"] for r in rows])


def test_two_ranks_under_zero3_give_the_one_rank_reference_and_picks(tmp_path, tiny_model_dir,
                                                                     one_run):
    _, first, _ = one_run
    cfg, out = config(tmp_path, tiny_model_dir, "two", deepspeed={"zero_stage": 3},
                      scoring={"base_cache": False})
    run_train(["--config", str(cfg)], ranks=2)
    assert reference_values(out) == pytest.approx(reference_values(first), abs=1e-4)
    picks = [[json.loads(line)["id"] for line in
              (o / "rounds" / "round_001" / "selection.jsonl").read_text().splitlines()]
             for o in (out, first)]
    assert picks[0] == picks[1]


@pytest.mark.parametrize("override, expected", [
    (["scoring.reference.data="], "scoring.reference.data"),
    (["scoring.reference.data=/nonexistent/holdout.jsonl"], "scoring.reference.data"),
    (["scoring.reference.epochs=0"], "scoring.reference.epochs")])
def test_a_reference_without_usable_settings_is_refused_before_the_run(tmp_path, tiny_model_dir,
                                                                       override, expected):
    cfg, out = config(tmp_path, tiny_model_dir, "bad")
    proc = run_train(["--config", str(cfg), *override], check=False)
    assert proc.returncode == 2 and expected in proc.stderr
    assert not out.exists()


def test_a_holdout_without_usable_rows_is_refused_before_the_run(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"instruction": "x" * 4000, "output": "y"}) + "\n")
    cfg, out = config(tmp_path, tiny_model_dir, "bad", reference={"data": str(empty)},
                      data={"on_error": "skip"})
    proc = run_train(["--config", str(cfg)], check=False)
    assert proc.returncode == 2 and "no usable rows" in proc.stderr
    assert not out.exists()
