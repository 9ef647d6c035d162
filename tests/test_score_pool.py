"""launch/score_pool.py and the AUROC evidence: which scores separate the labelled corruptions
of the noisy pool (tests/fixtures/pool_noisy_subset.jsonl) from their clean originals.

On the tiny random model only data-driven scores can separate anything, so this test checks the
machinery and the one thing that must hold for any model: answer length separates truncated and
one-word answers from their originals. The figures for SmolLM2-135M on the whole noisy pool are
in benchmarks/RESULTS.md (benchmarks/noisy_auroc.py).
"""

import json

import pytest

from helpers import FIXTURES, POOL_TINY, run_train, write_config

NOISY = FIXTURES / "pool_noisy_subset.jsonl"


@pytest.mark.e2e
def test_score_pool_writes_scores_and_auroc_table(tmp_path, tiny_model_dir):
    out = tmp_path / "scores"
    proc = run_train([f"model.path={tiny_model_dir}", "model.precision=fp32", f"data.pool={NOISY}",
                      "data.max_length=256",
                      "data.on_error=skip", "--label", "corruption", "--pair", "orig_id",
                      "--out", str(out)], script="score_pool.py")
    assert "AUROC" in proc.stderr and "truncated_output" in proc.stderr   # the rich console
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == summary["rows"] and summary["rows"] + summary["rows_skipped"] == 72
    assert {"loss", "length", "ifd_cherry", "ifd_superfilter", "knn_k", "entropy"} <= set(rows[0])
    assert summary["passes"]["ifd"]["tokens_per_s"] > 0
    table = json.loads((out / "separation.json").read_text())
    assert set(table) == {"truncated_output", "empty_like", "shuffled_output"}
    # Every group's AUROC of every score, against a count over all (clean, bad) pairs of the
    # written scores: bad rows vs the clean rows they were made from (--pair orig_id).
    by_id = {r["id"]: r for r in rows}
    source = [json.loads(line) for line in NOISY.read_text().splitlines()]
    for name, group in table.items():
        bad = [r for r in source if r.get("corruption") == name and r["id"] in by_id]
        clean = sorted({r["orig_id"] for r in bad} & set(by_id))
        assert (group["n_clean"], group["n_bad"]) == (len(clean), len(bad))
        assert len(clean) >= 10 and len(bad) >= 10
        for score in ("length", "loss", "ifd_cherry"):
            c = [by_id[i][score] for i in clean if by_id[i][score] is not None]
            b = [by_id[r["id"]][score] for r in bad if by_id[r["id"]][score] is not None]
            wins = sum((x > y) + 0.5 * (x == y) for x in c for y in b)
            assert group["scores"][score]["auroc"] == pytest.approx(wins / (len(c) * len(b)))
    # Any model: truncated and one-word answers are shorter than their originals.
    assert table["truncated_output"]["scores"]["length"]["auroc"] >= 0.9
    assert table["empty_like"]["scores"]["length"]["auroc"] >= 0.9


def test_score_pool_refuses_unknown_scores_and_options_before_any_work(tmp_path, capsys):
    """Refusals made from the options and the config alone: exit code 2 and one line saying
    why, from ``main`` in this process (nothing is loaded, no process group is made)."""
    from evotune.trainer.cli.score_pool import main
    base = ["model.path=unused", f"data.pool={NOISY}", "--out", str(tmp_path / "o")]

    def refused(*args):
        assert main(base + list(args)) == 2
        return capsys.readouterr().err
    assert "unknown bogus" in refused("--scores", "loss,bogus")
    assert "scoring.reward.model" in refused("--scores", "reward")
    assert "training run" in refused("--scores", "influence")
    assert "--pair needs --label" in refused("--scores", "loss", "--pair", "orig_id")
    assert not (tmp_path / "o").exists()


def test_score_pool_refuses_a_missing_label_and_a_pool_without_rows(tmp_path, tiny_model_dir):
    """Refusals found once the pool is read (a run of launch/score_pool.py each): exit code 2
    and the reason, no traceback."""
    base = [f"model.path={tiny_model_dir}", f"data.pool={NOISY}", "--out", str(tmp_path / "o")]

    def refused(*args):
        proc = run_train(base + list(args), script="score_pool.py", check=False, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        return proc.stderr
    assert "quality" in refused("--scores", "loss", "--label", "quality", "data.on_error=skip")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"nothing": 1}\n{"nothing": 2}\n')
    assert "no usable rows" in refused("--scores", "loss", f"data.pool={empty}",
                                       "data.on_error=skip")


@pytest.mark.e2e
def test_scoring_a_pool_then_training_on_it_tokenises_it_once(tmp_path, tiny_model_dir):
    env = {"EVOTUNE_CACHE": str(tmp_path / "cache")}
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "out",
                       selection={"selector": "random", "rounds": 1, "init_size": 4})
    scored = run_train(["--config", str(cfg), "--scores", "loss,length", "--out",
                        str(tmp_path / "scores")], script="score_pool.py", env=env)
    assert "pool tokens: cached in" in scored.stderr
    trained = run_train(["--config", str(cfg)], env=env)
    assert "pool tokens: reused from the cache" in trained.stderr
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 1
    # every kept row scored, in the pool file's order
    rows = [json.loads(line) for line in (tmp_path / "scores" / "scores.jsonl").open()]
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    source = [json.loads(line)["id"] for line in POOL_TINY.read_text().splitlines()]
    assert [r["id"] for r in rows] == [i for i in source if i in {r["id"] for r in rows}]
    assert len(rows) + summary["rows_skipped"] == len(source)
    assert all(r["length"] is not None and r["length"] > 0 for r in rows)
