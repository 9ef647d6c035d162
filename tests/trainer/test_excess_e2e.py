"""loss_excess in the loop: each row alone through the round's model against its nearest
prompts, the gate in front of k-center, and the same values after a crash and on two ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import POOL_TINY, run_train, write_config

pytestmark = pytest.mark.e2e

SELECTION = {"selector": "kcenter", "filter_score": "loss_excess", "filter_keep": "lowest",
             "filter_top_fraction": 0.5, "rounds": 2}


def npz(out: Path, r: int = 1) -> dict[str, np.ndarray]:
    with np.load(out / "rounds" / f"round_{r:03d}" / "features.npz") as f:
        return {k: f[k] for k in f.files}


def picks(out: Path, r: int = 1) -> list[int]:
    return [json.loads(line)["pool_index"] for line in
            (out / "rounds" / f"round_{r:03d}" / "selection.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("excess")
    out = tmp / "one"
    cfg = write_config(tmp / "one.yaml", tiny_model_dir, out, selection=SELECTION,
                       scoring={"loss_excess": {"k": 3}})
    run_train(["--config", str(cfg)])
    return tmp, cfg, out


def test_loss_excess_is_each_rows_loss_over_its_nearest_prompts(one_rank, tiny_model_dir):
    """Recomputed without the loop: each pool row alone through round 0's adapter, its mean
    response loss and the mean last hidden state over its prompt tokens; neighbours by
    brute force; the excess is the loss minus the median of the 3 nearest prompts' losses."""
    from peft import PeftModel

    from evotune.trainer.data import IGNORE_INDEX, encode_all, load_examples
    from evotune.trainer.model import load_model, load_tokenizer
    from evotune.trainer.passes.forward import response_scores
    _, _, out = one_rank
    examples, _ = load_examples(POOL_TINY)
    kept, encoded, _ = encode_all(examples, load_tokenizer(tiny_model_dir), "chat", 160, "skip")
    model = PeftModel.from_pretrained(load_model(tiny_model_dir, torch.float32),
                                      out / "rounds" / "round_000" / "adapter").eval()
    loss, prompts = [], []
    with torch.no_grad():
        for e in encoded:
            ids = torch.tensor([e.input_ids])
            hidden = model(input_ids=ids, output_hidden_states=True)
            loss.append(float(response_scores(hidden.logits, torch.tensor([e.labels]))
                              ["loss"][0]))
            prompt = torch.tensor([t == IGNORE_INDEX for t in e.labels])
            prompts.append(hidden.hidden_states[-1][0][prompt].mean(0).numpy())
    loss, prompts = np.array(loss), np.array(prompts, dtype=np.float64)
    d = ((prompts[:, None] - prompts[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    expected = [loss[i] - np.median(loss[np.argsort(d[i], kind="stable")[:3]])
                for i in range(len(loss))]
    f = npz(out)
    assert list(f["ids"]) == [ex.id for ex in kept]
    assert f["score_loss"] == pytest.approx(loss, rel=1e-5)
    assert f["score_loss_excess"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert "prompt_embeddings" not in f                 # an input, not saved
    # the gate: k-center ran over the half of the candidates with the lowest excess
    first = set(picks(out, 0))
    cands = [i for i in range(len(loss)) if i not in first]
    passed = set(sorted(cands, key=lambda i: (f["score_loss_excess"][i], i))[:len(cands) // 2])
    assert set(picks(out)) <= passed


def test_loss_excess_is_the_same_after_a_crash_and_on_two_ranks(one_rank, tiny_model_dir):
    tmp, cfg, first = one_rank
    out = tmp / "crashed"
    proc = run_train(["--config", str(cfg), f"output.dir={out}"], check=False,
                     env={"EVOTUNE_CRASH_AT": "embed:1"})
    assert proc.returncode != 0
    run_train(["--config", str(cfg), f"output.dir={out}"])
    assert np.array_equal(npz(out)["score_loss_excess"], npz(first)["score_loss_excess"])
    assert picks(out) == picks(first)
    # Two ranks, round 0 chosen by the rule with the base model (the same model on any number
    # of ranks): the forward pass deals the pool to the ranks, each scores its own rows against
    # every rank's prompts, and the values are one process's, bit for bit; so are the picks.
    runs = {}
    for ranks in (1, 2):
        runs[ranks] = tmp / f"base{ranks}"
        run_train(["--config", str(cfg), f"output.dir={runs[ranks]}", "selection.rounds=1",
                   "selection.first_round=selector", "scoring.base_cache=false"],
                  ranks=None if ranks == 1 else 2)
    a, b = npz(runs[1], 0), npz(runs[2], 0)
    assert np.isfinite(a["score_loss_excess"]).all()
    assert np.array_equal(a["score_loss_excess"], b["score_loss_excess"])
    assert picks(runs[1], 0) == picks(runs[2], 0)
    summary = json.loads((runs[2] / "rounds" / "round_000" / "summary.json").read_text())
    assert summary["selected_on"] == "every rank"


def test_loss_left_is_the_current_loss_over_the_base_models(tmp_path, tiny_model_dir):
    """base_loss: each pool row alone through the base model (no adapter), made once per run
    and kept in the run folder; loss_left: the round's loss over it; the rule ranks by it
    behind the loss_excess gate."""
    from evotune.trainer.data import encode_all, load_examples
    from evotune.trainer.model import load_model, load_tokenizer
    from evotune.trainer.passes.forward import response_scores
    out = tmp_path / "left"
    cfg = write_config(tmp_path / "left.yaml", tiny_model_dir, out, selection={
        **SELECTION, "selector": "weighted", "weighted": {"score": "loss_left", "alpha": 1.0}},
        scoring={"loss_excess": {"k": 3}, "base_cache": False})
    proc = run_train(["--config", str(cfg)])
    examples, _ = load_examples(POOL_TINY)
    _, encoded, _ = encode_all(examples, load_tokenizer(tiny_model_dir), "chat", 160, "skip")
    base = load_model(tiny_model_dir, torch.float32).eval()
    with torch.no_grad():
        expected = [float(response_scores(base(input_ids=torch.tensor([e.input_ids])).logits,
                                          torch.tensor([e.labels]))["loss"][0]) for e in encoded]
    f = npz(out)
    assert f["score_base_loss"] == pytest.approx(expected, rel=1e-5)
    assert np.array_equal(f["score_loss_left"], f["score_loss"] / f["score_base_loss"])
    with np.load(out / "base_loss.npz") as saved:
        assert np.array_equal(saved["values"], f["score_base_loss"])
    first = set(picks(out, 0))
    cands = [i for i in range(len(expected)) if i not in first]
    passed = sorted(cands, key=lambda i: (f["score_loss_excess"][i], i))[:len(cands) // 2]
    best = sorted(passed, key=lambda i: (-f["score_loss_left"][i], i))[:len(picks(out))]
    assert picks(out) == best
    summary = json.loads((out / "rounds" / "round_001" / "summary.json").read_text())
    assert summary["tokens"]["base"] > 0 and "base model" in proc.stdout + proc.stderr
