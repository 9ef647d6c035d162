"""Influence selection (LESS, ROSE) in the loop: Adam moments read under every ZeRO stage, the
logged scores against the saved gradient features, 1 vs 2 ranks under ZeRO-3, preference
validation with a candidate sample, and kill-and-resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import EVAL_TINY, FIXTURES, REPO, run_train, write_config

pytestmark = pytest.mark.e2e


def picks(out: Path, r: int) -> list[dict]:
    path = out / "rounds" / f"round_{r:03d}" / "selection.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def ids(out: Path) -> list[str]:
    return [p["id"] for r in (1, 2) for p in picks(out, r)]


@pytest.mark.parametrize("stage, ranks", [(0, 1), (1, 1), (2, 1), (3, 1), (2, 2)])
def test_optimizer_moments_match_a_plain_adamw(tmp_path, tiny_model_dir, stage, ranks):
    out = tmp_path / "moments.json"
    script = str(REPO / "tests" / "scripts" / "check_moments.py")
    if ranks == 1:
        cmd = [sys.executable, script]
    else:
        from helpers import _free_port
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks),
               "--master_port", str(_free_port()), script]
    proc = subprocess.run(cmd + [str(tiny_model_dir), str(stage), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == ranks and result["params"] == 8
    assert result["max_rel_diff"] < 1e-4


def _check_batched(tmp_path, model_dir, stage: int, ranks: int) -> dict:
    out = tmp_path / f"rows-{stage}-{ranks}.npz"
    script = str(REPO / "tests" / "scripts" / "check_batched_grads.py")
    cmd = [sys.executable, script]
    if ranks > 1:
        from helpers import _free_port
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks),
               "--master_port", str(_free_port()), script]
    proc = subprocess.run(cmd + [str(model_dir), str(stage), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_batched_gradients_equal_one_backward_per_row_under_every_zero_stage(
        tmp_path, tiny_model_dir, stage):
    """In a DeepSpeed engine after two steps (Adam's moments read back by the run's code):
    every projected row of the batched path within 1e-5 of the per-row path's; under ZeRO-3
    on 2 ranks too, where each rank computes its own batches (the two runs' models differ by
    the rounding of their training steps' all-reduce, so the rows agree to that; with one
    model on every rank they are bitwise equal: tests/trainer/passes/test_batched_gradients)."""
    one = _check_batched(tmp_path, tiny_model_dir, stage, 1)
    assert int(one["world_size"]) == 1 and float(one["worst"]) < 1e-5
    kinds = {k.rsplit("-", 1)[0] for k in one if k.endswith("batched")}
    assert kinds == {"eval-val", "eval-train", "eval-train-sgd", "preference-val"}
    assert all(len(one[k]) >= 8 for k in one if k not in ("worst", "world_size"))
    if stage == 3:
        two = _check_batched(tmp_path, tiny_model_dir, stage, 2)
        assert int(two["world_size"]) == 2 and float(two["worst"]) < 1e-5
        for k in one:
            if k not in ("worst", "world_size"):
                assert np.allclose(one[k], two[k], rtol=0, atol=1e-5), k


@pytest.fixture(scope="module")
def less_run(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("less")
    cfg = write_config(d / "cfg.yaml", tiny_model_dir, d / "out",
                       selection={"selector": "influence"},
                       influence={"validation": str(EVAL_TINY), "dim": 1024})
    run_train(["--config", str(cfg)])
    return d / "out", cfg


def test_less_scores_are_the_saved_features_mean_per_subtask_then_max(less_run):
    out, _ = less_run
    f = np.load(out / "rounds" / "round_001" / "features.npz")
    train = f["grad_train"].astype(np.float32)
    val = f["grad_val"].astype(np.float32)
    subtasks = list(f["grad_val_subtasks"])
    assert np.allclose(np.linalg.norm(train, axis=1), 1, atol=1e-2)
    assert train.shape[1] == 1024 and len(val) == len(subtasks) >= 6
    sims = train @ val.T
    names = sorted(set(subtasks))
    per = np.stack([sims[:, [i for i, s in enumerate(subtasks) if s == n]].mean(1)
                    for n in names], 1)
    got = f["score_influence"][f["grad_positions"]]
    assert got == pytest.approx(per.max(1), abs=2e-3)
    # The picks are the top candidates by influence, each naming the subtask that drove it.
    rows = picks(out, 1)
    scored = f["grad_positions"]
    best = sorted(scored, key=lambda i: (-f["score_influence"][i], i))[:5]
    assert [r["pool_index"] for r in rows] == [int(i) for i in best]
    for r in rows:
        per_pick = {k.split(":", 1)[1]: v for k, v in r.items() if k.startswith("influence:")}
        assert r["top_subtask"] == max(per_pick, key=per_pick.get)
    summary = json.loads((out / "rounds" / "round_001" / "summary.json").read_text())
    assert summary["tokens"]["influence"] > 0 and summary["influence_tokens_per_s"] > 0
    assert summary["selection_info"]["scored"] == len(scored)


def test_influence_under_two_ranks_and_zero3_picks_like_one_rank(less_run, tmp_path,
                                                                  tiny_model_dir):
    ref_out, _ = less_run
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "out",
                       selection={"selector": "influence"}, deepspeed={"zero_stage": 3},
                       influence={"validation": str(EVAL_TINY), "dim": 1024})
    run_train(["--config", str(cfg)], ranks=2)
    out = tmp_path / "out"
    assert ids(out) == ids(ref_out)
    for r in (1, 2):         # each rank scored its own rows; rank 0 gathered only the scores
        one, two = (json.loads((o / "rounds" / f"round_{r:03d}" / "summary.json").read_text())
                    for o in (ref_out, out))
        assert one["selected_on"] == two["selected_on"] == "every rank"
        assert one["selection_info"] == two["selection_info"]
        assert one["score_skipped"] == two["score_skipped"]
        for p1, p2 in zip(picks(ref_out, r), picks(out, r)):
            assert p1["top_subtask"] == p2["top_subtask"]
            assert {k: pytest.approx(v, abs=1e-5) for k, v in p1.items()
                    if k.startswith("influence")} == {k: v for k, v in p2.items()
                                                      if k.startswith("influence")}
        a, b = (np.load(o / "rounds" / f"round_{r:03d}" / "features.npz") for o in (ref_out, out))
        assert np.array_equal(a["grad_positions"], b["grad_positions"])
        assert np.allclose(a["grad_train"], b["grad_train"], atol=2e-3)    # fp16 on disk
        assert np.isnan(b["score_influence"]).tolist() == np.isnan(a["score_influence"]).tolist()
        ok = ~np.isnan(a["score_influence"])
        assert b["score_influence"][ok] == pytest.approx(a["score_influence"][ok], abs=1e-5)


def test_kill_during_training_then_resume_reads_the_restored_optimizer(less_run, tmp_path):
    ref_out, cfg = less_run
    out = tmp_path / "out"
    proc = run_train(["--config", str(cfg), f"output.dir={out}"], check=False,
                     env={"EVOTUNE_CRASH_AT": "train:1"})
    assert proc.returncode == -9
    proc = run_train(["--config", str(cfg), f"output.dir={out}"])
    assert "resumed after round 0" in proc.stderr
    assert ids(out) == ids(ref_out)        # round 1 re-scored with round 0's restored moments


@pytest.mark.parametrize("ranks", [1, 2])
def test_kill_mid_gradient_pass_then_resume_reuses_finished_batches(less_run, tmp_path, ranks):
    ref_out, cfg = less_run
    out = tmp_path / "out"
    args = ["--config", str(cfg), f"output.dir={out}", "influence.batch_size=4"]
    if ranks == 2:
        args.append("deepspeed.zero_stage=3")
    forked = ranks if ranks > 1 else None
    proc = run_train(args, ranks=forked, check=False, env={"EVOTUNE_CRASH_AT": "grad_train:1"})
    assert proc.returncode != 0
    assert list((out / "partial" / "round_001").glob("train_rank000_00000.npz"))
    proc = run_train(args, ranks=forked)
    batches = 5 if ranks == 1 else 3              # 19 candidates: per rank ceil(19 / 2) = 10
    assert f"reusing 1 of {batches} finished batches" in proc.stderr
    assert ids(out) == ids(ref_out)        # batch size does not change any value
    assert not (out / "partial" / "round_001").exists()   # removed once the round completed


def test_rose_preference_validation_with_a_candidate_sample(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, out,
                       selection={"selector": "influence", "rounds": 2},
                       influence={"validation": str(FIXTURES / "preference_tiny.jsonl"),
                                  "dim": 1024, "candidates": 0.5})
    run_train(["--config", str(cfg)])
    summary = json.loads((out / "rounds" / "round_001" / "summary.json").read_text())
    n_candidates = summary["selection_info"]["scored"] + summary["selection_info"]["unscored"]
    assert summary["selection_info"]["scored"] == n_candidates // 2
    reasons = summary["score_skipped"]["influence"]["examples"]
    assert any("gradient sample" in why for why in reasons)
    rows = picks(out, 1)
    assert {r["top_subtask"] for r in rows} <= {"gsm8k", "t0", "self-instruct-seed"}
    assert all(f"influence:{r['top_subtask']}" in r for r in rows)


@pytest.mark.parametrize("selector, extra", [
    ("cluster_quota", {"cluster_quota": {"pick": "centroid", "n_clusters": 3}}),   # TAGCOS
    ("kcenter", {}),                                                     # diversity on gradients
])
def test_gradient_embeddings_feed_the_diversity_rules(tmp_path, tiny_model_dir, selector, extra):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, out,
                       selection={"selector": selector, "embedding": "gradient", "rounds": 2,
                                  **extra},
                       influence={"dim": 256, "candidates": 0.5})
    run_train(["--config", str(cfg)])
    f = np.load(out / "rounds" / "round_001" / "features.npz")
    emb = f["embeddings"].astype(np.float32)
    rows = np.isfinite(emb).all(axis=1)
    assert emb.shape[1] == 256
    # the sample and the labeled (round-0) examples have a gradient embedding, nothing else
    labeled = [p["pool_index"] for p in picks(out, 0)]
    assert sorted(np.flatnonzero(rows)) == sorted(set(f["grad_sample"]) | set(labeled))
    assert np.allclose(np.linalg.norm(emb[rows], axis=1), 1, atol=1e-2)
    # picks come from the sample only
    assert {p["pool_index"] for p in picks(out, 1)} <= set(f["grad_sample"].tolist())


def test_gradient_embeddings_stay_sharded_and_pick_like_one_rank(tmp_path, tiny_model_dir):
    """Without a validation set a sharded rule keeps each rank's projected gradients there
    (cluster_quota's mini-batch KMeans, TAGCOS's centroid pick): 2 ranks pick what 1 rank picks,
    and features.npz (its embeddings streamed to rank 0) holds the same gradient rows."""
    runs = {}
    for ranks in (1, 2):
        runs[ranks] = tmp_path / f"out{ranks}"
        cfg = write_config(tmp_path / f"cfg{ranks}.yaml", tiny_model_dir, runs[ranks],
                           selection={"selector": "cluster_quota", "embedding": "gradient",
                                      "rounds": 2, "cluster_quota": {
                                          "pick": "centroid", "n_clusters": 3,
                                          "kmeans": "minibatch", "batch_size": 8}},
                           influence={"dim": 256, "candidates": 0.5})
        run_train(["--config", str(cfg)], ranks=ranks if ranks > 1 else None)
    assert [p["pool_index"] for p in picks(runs[1], 1)] == \
        [p["pool_index"] for p in picks(runs[2], 1)]
    a, b = (np.load(o / "rounds" / "round_001" / "features.npz") for o in runs.values())
    assert np.array_equal(a["grad_sample"], b["grad_sample"])
    ea, eb = a["embeddings"].astype(np.float32), b["embeddings"].astype(np.float32)
    assert np.array_equal(np.isfinite(ea), np.isfinite(eb))
    assert np.allclose(ea[np.isfinite(ea)], eb[np.isfinite(eb)], atol=2e-3)   # fp16 in the file
    labeled = [p["pool_index"] for p in picks(runs[2], 0)]
    assert sorted(np.flatnonzero(np.isfinite(eb).all(axis=1))) == \
        sorted(set(b["grad_sample"]) | set(labeled))
    for o in runs.values():
        summary = json.loads((o / "rounds" / "round_001" / "summary.json").read_text())
        assert summary["selected_on"] == "every rank"


@pytest.mark.parametrize("embedding, score", [
    ("hidden", "influence"),      # the influence scores go to the forward pass's rows
    ("gradient", "loss"),         # the loss goes to the gradient rows, scored there too
])
def test_scores_of_the_other_pass_follow_the_embeddings(tmp_path, tiny_model_dir, embedding,
                                                        score):
    """k-center behind a filter on a score of the other pass (the forward pass and the
    gradient pass deal different rows to a rank) stays sharded: 2 ranks pick what 1 rank
    picks, and every pick that passed the filter is in its top half by that score."""
    runs = {}
    for ranks in (1, 2):
        runs[ranks] = tmp_path / f"out{ranks}"
        cfg = write_config(tmp_path / f"cfg{ranks}.yaml", tiny_model_dir, runs[ranks],
                           selection={"selector": "kcenter", "embedding": embedding,
                                      "rounds": 2, "filter_score": score,
                                      "filter_top_fraction": 0.5},
                           influence={"dim": 256, "candidates": 0.5,
                                      "validation": str(EVAL_TINY)})
        run_train(["--config", str(cfg)], ranks=ranks if ranks > 1 else None)
    one, two = picks(runs[1], 1), picks(runs[2], 1)
    assert [p["pool_index"] for p in one] == [p["pool_index"] for p in two]
    a, b = (np.load(o / "rounds" / "round_001" / "features.npz") for o in runs.values())
    for name in (f"score_{score}", "score_influence"):
        assert np.array_equal(np.isnan(a[name]), np.isnan(b[name]))
        assert np.allclose(a[name], b[name], atol=1e-5, equal_nan=True)
    labeled = {p["pool_index"] for p in picks(runs[2], 0)}
    values = b[f"score_{score}"]
    candidates = [i for i in range(len(values)) if i not in labeled]
    if embedding == "gradient":                       # only the sample has embeddings
        candidates = sorted(set(candidates) & set(b["grad_sample"].tolist()))
        assert np.isfinite(b["embeddings"].astype(np.float32)[candidates]).all()
    scored = np.sort(values[candidates][np.isfinite(values[candidates])])[::-1]
    cut = scored[int(len(scored) * 0.5) - 1]
    passed = [p["pool_index"] for p in two if p["passed_filter"] == 1]
    assert passed and all(values[i] >= cut for i in passed)
    assert {p["pool_index"] for p in two} <= set(candidates)
    for o in runs.values():
        summary = json.loads((o / "rounds" / "round_001" / "summary.json").read_text())
        assert summary["selected_on"] == "every rank"


def test_explicit_reference_model_with_label_smoothing(tmp_path, tiny_model_dir):
    """With label smoothing the DPO gradient's sign depends on the reference model: each pair's
    saved direction is the reference-free one times -sign(coef), coef = d loss / d margin =
    beta (-(1-eps)(1-s) + eps s), s = sigmoid(beta (margin - reference margin)), the margins
    computed here from the round-0 adapter and the reference model."""
    import torch
    from peft import PeftModel

    from evotune.trainer.model import load_model, load_tokenizer
    from evotune.trainer.targets import load_targets

    pairs = FIXTURES / "preference_tiny.jsonl"
    beta, eps = 20.0, 0.45
    runs = {}
    for name, extra in (("free", {}), ("ref", {"reference_model": str(tiny_model_dir),
                                               "label_smoothing": eps})):
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, tmp_path / name,
                           selection={"selector": "influence", "rounds": 2},
                           influence={"validation": str(pairs), "dim": 256, "beta": beta,
                                      **extra})
        run_train(["--config", str(cfg)])
        runs[name] = np.load(tmp_path / name / "rounds" / "round_001" / "features.npz")
    tok = load_tokenizer(tiny_model_dir)
    val, _ = load_targets(pairs, tok, "chat", 160, "skip")

    @torch.no_grad()
    def margin(model, it):
        def logp(e):
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1].float()
            target = torch.tensor(e.labels[1:])
            keep = target != -100
            return -torch.nn.functional.cross_entropy(logits[keep], target[keep],
                                                      reduction="sum")
        return float(logp(it.chosen) - logp(it.rejected))
    base = load_model(tiny_model_dir, torch.float32).eval()
    policy = PeftModel.from_pretrained(load_model(tiny_model_dir, torch.float32),
                                       tmp_path / "ref" / "rounds" / "round_000" /
                                       "adapter").eval()
    signs = []
    for it in val:
        s = 1 / (1 + np.exp(-beta * (margin(policy, it) - margin(base, it))))
        signs.append(-np.sign(beta * (-(1 - eps) * (1 - s) + eps * s)))
    free = runs["free"]["grad_val"].astype(np.float64)
    ref = runs["ref"]["grad_val"].astype(np.float64)
    assert len(signs) == len(ref) and -1 in signs and 1 in signs    # the reference mattered
    for k, sign in enumerate(signs):
        assert ref[k] == pytest.approx(sign * free[k], abs=2e-3)
    assert np.isfinite(runs["ref"]["score_influence"][runs["ref"]["grad_sample"]]).all()
    # label smoothing without a reference model is refused before anything is written
    bad = write_config(tmp_path / "bad.yaml", tiny_model_dir, tmp_path / "bad",
                       selection={"selector": "influence"},
                       influence={"validation": str(FIXTURES / "preference_tiny.jsonl"),
                                  "label_smoothing": 0.3})
    proc = run_train(["--config", str(bad)], check=False)
    assert proc.returncode == 2 and "reference_model" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_sum_over_checkpoints_weighted_by_learning_rate(tmp_path, tiny_model_dir):
    """influence.checkpoints=all: round 2 scores each candidate by w1·s1 + w2·s2 per subtask
    (s_c from round c's model, w_c the mean LR of the training that made it), then the max."""
    from evotune.trainer.config import load_config
    from evotune.trainer.fit import lr_at
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, out,
                       selection={"selector": "influence"},
                       influence={"validation": str(EVAL_TINY), "dim": 256,
                                  "checkpoints": "all"})
    run_train(["--config", str(cfg)])
    t = load_config(cfg).train
    terms = {}
    for r in (1, 2):
        with np.load(out / "rounds" / f"round_{r:03d}" / "influence_terms.npz") as f:
            steps = json.loads((out / "rounds" / f"round_{r - 1:03d}" / "summary.json")
                               .read_text())["train_steps"]
            w = sum(lr_at(s, steps, t) for s in range(steps)) / steps
            assert float(f["influence_weight"]) == pytest.approx(w)
            terms[r] = (w, f["influence_terms"])
    final = np.load(out / "rounds" / "round_002" / "features.npz")["score_influence"]
    cand = np.flatnonzero(np.isfinite(final))
    expected = (terms[1][0] * terms[1][1] + terms[2][0] * terms[2][1])[cand].max(axis=1)
    assert final[cand] == pytest.approx(expected, rel=1e-5)
    assert not np.allclose(final[cand], terms[2][1][cand].max(axis=1) * terms[2][0])


def test_sum_over_checkpoints_on_two_ranks_without_saved_features(tmp_path, tiny_model_dir):
    """The same sum with the scores sharded over 2 ranks and no features.npz: rank 0 sends the
    earlier rounds' terms to the ranks; the picks are the top candidates by the sum."""
    from evotune.trainer.config import load_config
    from evotune.trainer.fit import lr_at
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, out,
                       selection={"selector": "influence"}, output={"save_features": False},
                       influence={"validation": str(EVAL_TINY), "dim": 256,
                                  "checkpoints": "all"})
    run_train(["--config", str(cfg)], ranks=2)
    t = load_config(cfg).train
    total = 0
    for r in (1, 2):
        with np.load(out / "rounds" / f"round_{r:03d}" / "influence_terms.npz") as f:
            steps = json.loads((out / "rounds" / f"round_{r - 1:03d}" / "summary.json")
                               .read_text())["train_steps"]
            total = total + sum(lr_at(s, steps, t) for s in range(steps)) / steps \
                * f["influence_terms"]
    assert not (out / "rounds" / "round_002" / "features.npz").exists()
    expected = total.max(axis=1)
    cand = np.flatnonzero(np.isfinite(expected))
    rows = picks(out, 2)
    best = sorted(cand, key=lambda i: (-expected[i], i))[:len(rows)]
    assert [row["pool_index"] for row in rows] == [int(i) for i in best]
    assert [row["influence"] for row in rows] == pytest.approx(expected[best], rel=1e-5)
    summary = json.loads((out / "rounds" / "round_002" / "summary.json").read_text())
    assert summary["selected_on"] == "every rank" and summary["world_size"] == 2


def _lora_grad(model, params, enc) -> np.ndarray:
    """The gradient of one example's mean answer-token loss w.r.t. the LoRA weights, flattened
    in name order: written out here, with autograd, one example at a time."""
    import torch
    import torch.nn.functional as F
    model.zero_grad()
    logits = model(input_ids=torch.tensor([enc.input_ids])).logits[0, :-1]
    target = torch.tensor(enc.labels[1:])
    keep = target != -100
    F.cross_entropy(logits[keep], target[keep]).backward()
    return np.concatenate([p.grad.detach().reshape(-1).numpy() for _, p in params])


def test_gradient_features_match_autograd_one_example_at_a_time(tmp_path, tiny_model_dir):
    """The saved, projected gradient features (plain gradients: influence.adam=false) against
    gradients taken here from the round-0 adapter: a random projection keeps cosines, so the
    cosine of any two saved rows is the cosine of the two true gradients, within JL noise."""
    import torch
    from peft import PeftModel

    from evotune.trainer.data import encode_all, load_examples
    from evotune.trainer.model import load_model, load_tokenizer
    from evotune.trainer.targets import load_targets
    from helpers import POOL_TINY

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, out,
                       selection={"selector": "influence", "rounds": 2},
                       influence={"validation": str(EVAL_TINY), "adam": False, "dim": 8192})
    run_train(["--config", str(cfg)])
    f = np.load(out / "rounds" / "round_001" / "features.npz")
    model = PeftModel.from_pretrained(load_model(tiny_model_dir, torch.float32),
                                      out / "rounds" / "round_000" / "adapter").eval()
    params = sorted((n, p) for n, p in model.named_parameters() if "lora_" in n)
    for _, p in params:
        p.requires_grad_(True)
    tok = load_tokenizer(tiny_model_dir)
    _, encoded, _ = encode_all(load_examples(POOL_TINY)[0], tok, "chat", 160, "skip")
    val, _ = load_targets(EVAL_TINY, tok, "chat", 160, "skip")
    train_rows = {int(i): k for k, i in enumerate(f["grad_positions"])}
    picks = list(train_rows)[:4]
    true = [_lora_grad(model, params, encoded[i]) for i in picks] + \
        [_lora_grad(model, params, it.encoded) for it in val[:3]]
    saved = [f["grad_train"][train_rows[i]] for i in picks] + list(f["grad_val"][:3])
    saved = [s.astype(np.float64) for s in saved]

    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    pairs = [(a, b) for a in range(len(true)) for b in range(a + 1, len(true))]
    errors = [abs(cos(true[a], true[b]) - cos(saved[a], saved[b])) for a, b in pairs]
    assert max(errors) < 0.06, errors
    # and they are not all alike: the check has something to compare
    assert max(cos(true[a], true[b]) for a, b in pairs) - \
        min(cos(true[a], true[b]) for a, b in pairs) > 0.2
