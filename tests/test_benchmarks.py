"""The benchmark scripts' own logic (configs per arm, statistics, tables, plots) on synthetic
results; the benchmarks themselves are scripts with recorded results, never timed tests."""

import importlib.util

import numpy as np
import pytest
import yaml

from helpers import REPO


def load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arm", ["random", "longest", "kcenter", "ifd_proxy", "ifd_loop",
                                 "evotune", "full"])
def test_every_arm_is_a_valid_config_with_the_budget_it_names(tmp_path, arm):
    from evotune.trainer.config import load_config, resolve_budget
    bench = load("selection_quality")
    cfg_dict = bench.run_config(arm, 0.1, 3, 200, tmp_path / "out")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg_dict))
    cfg = load_config(tmp_path / "c.yaml")
    budget = resolve_budget(cfg, 200)
    assert sum(budget) == (200 if arm == "full" else 20)
    assert len(budget) == (2 if arm in bench.IN_LOOP else 1)
    assert cfg.seed == 3 and cfg.data.max_examples == 200
    # every arm trains its final model the same way: from the base, same epochs and batch
    assert (cfg.train.retrain_from_base, cfg.train.epochs, cfg.train.batch_size) == (True, 2, 4)


def test_exceeds_needs_a_difference_beyond_twice_the_standard_error():
    bench = load("selection_quality")
    assert bench.exceeds([1.0, 1.1, 0.9], [2.0, 2.1, 1.9])
    assert not bench.exceeds([1.0, 1.5, 0.5], [1.2, 1.7, 0.7])
    assert not bench.exceeds([1.0], [2.0])          # one seed: no noise estimate, no claim
    # no spread over seeds: only a difference beyond the resolution (one eval row) counts
    assert not bench.exceeds([0.3125] * 3, [0.2917] * 3, resolution=1 / 48)
    assert bench.exceeds([0.3333] * 3, [0.2917] * 3, resolution=1 / 48)


def test_tables_and_plots_from_synthetic_results(tmp_path):
    bench = load("selection_quality")

    def run(loss, acc):
        return {"loss": loss, "accuracy": acc, "examples": 10, "scored": 200,
                "per_round": [(0, 5, loss + 0.1, acc), (1, 10, loss, acc)],
                "tokens": {"train": 1000, "features": 500}, "by_source": {},
                "seconds": {"features": 1.0, "select": 0.1, "train": 2.0, "eval": 1.0,
                            "total": 5.0}}
    budgets = [0.05, 0.1]
    results = {(arm, b): [run(base + d, 0.3) for d in (0.0, 0.01, -0.01)]
               for arm, base in (("random", 1.5), ("kcenter", 1.2)) for b in budgets}
    results[("full", None)] = [run(1.0, 0.4)] * 3
    text = bench.tables(results, budgets, ["random", "kcenter", "full"])
    assert "| kcenter | 1.2000 ± 0.0100 (Δ -0.3000*)" in text
    assert "| full (100%) | 1.0000 ± 0.0000 |" in text
    assert "| kcenter | 5% | 10 | 200 | 500 | 1,000 | 1 | 2 | 1 | 5 |" in text
    files = bench.plot(results, budgets, ["random", "kcenter", "full"], tmp_path)
    assert [f.name for f in files] == ["quality_vs_budget.png", "quality_vs_round.png"]
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files)


def _files(tmp_path):
    """Stand-ins for the targeted benchmark's data files (the configs only check they exist)."""
    files = {}
    for name in ("pool", "targets", "eval", "noisy"):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text('{"instruction": "a", "output": "b"}\n')
    return files


@pytest.mark.parametrize("suite", ["targeted", "quality"])
def test_every_targeted_arm_is_a_valid_config_that_can_share_the_warmup(tmp_path, suite):
    from evotune.trainer.config import load_config, resolve_budget, safe_keys
    from evotune.trainer.state import is_rule_key
    bench = load("targeted")
    files = _files(tmp_path)
    rows = 1200 if suite == "targeted" else 600
    for arm in bench.SUITES[suite]:
        for budget in bench.BUDGETS[suite]:
            spec = bench.arm_config(arm, suite, budget, 2, files, tmp_path / "o", rows)
            (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
            cfg = load_config(tmp_path / "c.yaml")
            plan = resolve_budget(cfg, rows)
            assert sum(plan) == round(budget * rows) and cfg.seed == 2
            in_loop = bench.ARMS[arm][0]
            assert len(plan) == (2 if in_loop else 1)
            assert cfg.selection.first_round == ("random" if in_loop or arm == "random"
                                                 else "selector")
            assert cfg.model.precision == "bf16" and cfg.train.retrain_from_base
            if not in_loop:
                continue
            # an in-loop arm differs from the shared warm-up in selection settings only, which
            # a resume after a random round 0 accepts (trainer/state.py), and in settings a
            # resume may always change
            warm = bench.warmup_config(suite, budget, 2, files, tmp_path / "o", rows)
            (tmp_path / "w.yaml").write_text(yaml.safe_dump(warm))
            a, w = cfg.flat(), load_config(tmp_path / "w.yaml").flat()
            diff = {k for k in a if a[k] != w[k]} - safe_keys()
            assert all(is_rule_key(k) for k in diff), diff


def test_the_evotune_arm_follows_the_default_preset(tmp_path):
    bench = load("targeted")
    spec = bench.arm_config("evotune", "targeted", 0.1, 1, _files(tmp_path), tmp_path / "o",
                            1200)
    preset = yaml.safe_load((REPO / "configs" / "evotune.yaml").read_text())["selection"]
    assert spec["selection"]["selector"] == preset["selector"]
    assert spec["selection"].get(preset["selector"]) == preset.get(preset["selector"])


def test_targeted_tables_and_plot_from_synthetic_results(tmp_path):
    bench = load("targeted")

    def run(gsm, clean):
        return {"loss": gsm, "accuracy": 0.3, "gsm8k_loss": gsm, "t0_loss": 1.0,
                "t0_accuracy": 0.3, "t0_choice_rows": 184, "clean": clean,
                "clean_chosen": clean, "examples": 60,
                "by_source": {"gsm8k": 30, "t0/qa": 30}, "tokens": {"train": 900, "features": 500,
                                                                  "influence": 100},
                "seconds": {"features": 1.0, "select": 0.1, "train": 2.0, "eval": 1.0,
                            "total": 5.0}, "cached": []}
    results = {(arm, 0.05): [run(base + d, c) for d in (0.0, 0.01, -0.01)]
               for arm, base, c in (("random", 1.5, 0.5), ("rds_loop", 1.2, 0.9))}
    text = bench.tables("targeted", results, [0.05], ["random", "rds_loop"])
    assert "| rds_loop | 1.2000 ± 0.0100 (Δ -0.3000*) |" in text
    assert "| rds_loop | 5% | 60 | 600 | 100 | 900 | 1 | 2 | 1 | 5 |" in text
    assert "| rds_loop | 5% | 50% | 50% | 0% | 0% |" in bench.composition(results, [0.05],
                                                                          ["rds_loop"])
    quality = bench.tables("quality", {(a, 0.1): v for (a, _), v in results.items()}, [0.1],
                           ["random", "rds_loop"])
    assert "| rds_loop | 0.900 ± 0.000 (Δ +0.400*) |" in quality
    png = bench.plot(results, "targeted", [0.05], ["random", "rds_loop"], tmp_path)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_scale_shards_cover_the_pool_once_and_rows_do_not_depend_on_the_rank():
    bench = load("scale")
    n = 3 * bench.BLOCK + 17
    for world in (1, 2, 3):
        parts = [bench.rows_of(r, world, n) for r in range(world)]
        assert sorted(np.concatenate(parts).tolist()) == list(range(n))
        assert all((np.diff(p) > 0).all() for p in parts if len(p) > 1)
    whole = bench.synthetic(np.arange(n), 4)
    part = bench.rows_of(1, 2, n)
    assert np.array_equal(bench.synthetic(part, 4), whole[part])


def test_scale_pool_cycles_the_quickstart_rows_each_made_distinct(tmp_path):
    from evotune.trainer.data import load_examples
    bench = load("scale")
    source, _ = load_examples(bench.SOURCE_POOL)
    bench.write_pool(tmp_path / "pool.jsonl", len(source) + 5)
    examples, report = load_examples(tmp_path / "pool.jsonl")
    assert len(examples) == len(source) + 5 and not report.skipped
    prompts = [next(m["content"] for m in e.messages if m["role"] == "user") for e in examples]
    assert len(set(prompts)) == len(prompts)
    first = next(m["content"] for m in source[0].messages if m["role"] == "user")
    assert prompts[len(source)] == f"{first} (#{len(source)})"


def _messy_files(tmp_path):
    files = {}
    for name in ("pool", "eval", "holdout"):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text('{"instruction": "a", "output": "b"}\n')
    return files


def test_every_messy_arm_is_a_valid_config_that_can_share_the_warmup(tmp_path):
    from evotune.trainer.config import load_config, resolve_budget, safe_keys
    from evotune.trainer.state import is_rule_key
    bench = load("messy")
    files = _messy_files(tmp_path)
    arms = [a for rule in bench.ARMS for a in (rule, f"{rule}@rule") if
            bench.ARMS[rule][0] or "@" not in a]
    with pytest.raises(ValueError, match="one-shot"):
        bench.arm_spec("longest@rule")
    for arm in arms:
        spec = bench.arm_config(arm, 0.1, 2, files, tmp_path / "o", 1065)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
        cfg = load_config(tmp_path / "c.yaml")
        plan = resolve_budget(cfg, 1065)
        rule, in_loop, by_rule = bench.arm_spec(arm)
        assert sum(plan) == 106 and len(plan) == (2 if in_loop else 1) and cfg.seed == 2
        assert cfg.selection.first_round == ("selector" if by_rule or (not in_loop and
                                                                       rule != "random")
                                             else "random")
        assert cfg.model.precision == "bf16" and cfg.train.retrain_from_base
        if cfg.scoring.reference.data:
            assert cfg.scoring.reference.data == str(files["holdout"])
        if not in_loop or by_rule:
            continue
        warm = bench.warmup_config(0.1, 2, files, tmp_path / "o", 1065)
        (tmp_path / "w.yaml").write_text(yaml.safe_dump(warm))
        a, w = cfg.flat(), load_config(tmp_path / "w.yaml").flat()
        diff = {k for k in a if a[k] != w[k]} - safe_keys()
        assert all(is_rule_key(k) for k in diff), (arm, diff)


def _messy_run(tmp_path, rounds: list[list[str]], losses: dict[str, float]):
    """A finished run folder as the loop writes one: rounds.jsonl and each round's picks."""
    import json
    out = tmp_path / "run"
    for r, ids in enumerate(rounds):
        d = out / "rounds" / f"round_{r:03d}"
        d.mkdir(parents=True)
        d.joinpath("selection.jsonl").write_text("".join(
            json.dumps({"id": i, "round": r}) + "\n" for i in ids))
    summary = {"eval_loss": 1.5, "eval_by_source": {f: {"loss": v} for f, v in losses.items()},
               "tokens": {"train": 10, "features": 100, "reference": 7},
               "seconds": {"features": 2.0, "select": 0.5, "train": 3.0, "total": 9.0}}
    out.joinpath("rounds.jsonl").write_text("".join(json.dumps(summary) + "\n" for _ in rounds))
    return out


def test_messy_figures_of_a_run_written_out_by_hand(tmp_path):
    bench = load("messy")
    pool = {"a": {"family": "x", "corruption": None, "group": "g"},
            "b": {"family": "x", "corruption": "truncated_output", "group": "g"},
            "c": {"family": "y", "corruption": None, "group": None},
            "d": {"family": "y", "corruption": None, "group": "g"},
            "e": {"family": "y", "corruption": "empty_like", "group": "h"},
            "f": {"family": "x", "corruption": None, "group": "h"}}
    out = _messy_run(tmp_path, [["a", "c"], ["b", "d", "e", "f"]], {"x": 1.0, "y": 3.0})
    got = bench.read_run(out, "kcenter", pool, ["x", "y"])
    assert got["macro_loss"] == 2.0 and got["worst_loss"] == 3.0 and got["worst_family"] == "y"
    assert got["token_loss"] == 1.5
    assert got["clean"] == 4 / 6 and got["clean_own"] == 2 / 4          # own: round 1 only
    # redundant: b and d (group g was picked with a), f (h picked with e): 3 of 6, all own
    assert got["dup"] == 3 / 6 and got["dup_own"] == 3 / 4
    assert got["share"] == {"x": 3 / 6, "y": 3 / 6}
    assert got["select_tokens"] == 2 * 107 and got["select_seconds"] == 2 * 2.5
    one_shot = bench.read_run(_messy_run(tmp_path / "1", [["a", "b"]], {"x": 1.0, "y": 1.0}),
                              "random", pool, ["x", "y"])
    assert one_shot["clean_own"] is None and one_shot["dup"] == 0.5
    with pytest.raises(ValueError, match="no eval figures for y"):
        bench.read_run(_messy_run(tmp_path / "2", [["a"]], {"x": 1.0}), "random", pool,
                       ["x", "y"])


def test_messy_table_marks_a_difference_beyond_twice_the_standard_error():
    bench = load("messy")

    def run(macro, clean):
        return {"macro_loss": macro, "worst_loss": macro + 1, "token_loss": macro,
                "clean": clean, "clean_own": clean, "dup": 0.1, "dup_own": 0.0,
                "select_tokens": 100, "select_seconds": 2.0, "total_seconds": 9.0,
                "family_loss": {"x": macro}, "share": {"x": 1.0}}
    results = {("random", 0.1): [run(2.0 + d, 0.8) for d in (0.0, 0.01, -0.01)],
               ("kcenter", 0.1): [run(1.5 + d, 0.9) for d in (0.0, 0.01, -0.01)]}
    text = bench.table(results, 0.1, ["random", "kcenter"])
    assert "| `kcenter` | 3 | 1.5000 ± 0.0100 (Δ -0.5000*) |" in text
    assert "| `random` | 3 | 2.0000 ± 0.0100 |" in text
    assert "| `kcenter` | 1.500 (100%) |" in bench.family_table(results, 0.1, ["kcenter"], ["x"])


def test_messy_auroc_table_on_hand_made_scores():
    """messy_auroc.table against figures worked out by hand: 6 candidates of two families
    (one warm-up row left out), a form that ranks every clean row above every corrupted one
    and another that ranks them exactly the wrong way."""
    auroc_mod = load("messy_auroc")
    pool = {"a": {"corruption": None, "family": "f1"}, "b": {"corruption": None, "family": "f1"},
            "c": {"corruption": "truncated_output", "family": "f1"},
            "d": {"corruption": None, "family": "f2"},
            "e": {"corruption": "empty_like", "family": "f2"},
            "f": {"corruption": "empty_like", "family": "f2"},
            "w": {"corruption": None, "family": "f2"}}
    ids = list("abcdefw")
    candidates = np.array([True] * 6 + [False])
    good = np.array([5.0, 4.0, 1.0, 6.0, 2.0, 0.0, -9.0])
    text = auroc_mod.table({"good": good, "bad": -good}, pool, ids, candidates)
    rows = {line.split(" | ")[0].strip("| "): line.strip("|").split(" | ")[1:]
            for line in text.splitlines()[2:]}
    # columns: AUROC clean, vs empty_like, vs truncated_output, half gate clean, family kept
    # the gate keeps values >= the median (3.0): a, b, d, all clean; f1 2 of 3, f2 1 of 3
    assert [c.strip() for c in rows["good"]] == ["1.000", "1.000", "1.000", "1.000", "0.33–0.67"]
    # the wrong way round: 0 everywhere; the gate (values >= the median, 2.5 negated: -2.5)
    # keeps c, e, f (all corrupted): f1 1 of 3, f2 2 of 3
    assert [c.strip() for c in rows["bad"]] == ["0.000", "0.000", "0.000", "0.000", "0.33–0.67"]


def test_gpu_check_arguments():
    check = load("gpu_check")
    args = check.parse_args([])
    assert args.checks == list(check.CHECKS) and args.device == "cuda"
    assert check.parse_args(["--checks", "kcenter", "features"]).checks == ["kcenter", "features"]
    for bad in (["--checks", "nope"], ["--rows", "3"], ["--kcenter-n", "10"],
                ["--device", "tpu"]):
        with pytest.raises(SystemExit) as e:
            check.parse_args(bad)
        assert e.value.code == 2


def test_gpu_check_refuses_without_a_gpu_and_exits_non_zero():
    import subprocess
    import sys

    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "nothing was run" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.e2e
def test_gpu_check_runs_every_check_on_the_cpu_with_the_tiny_model(tmp_path, tiny_model_dir):
    """--device cpu: the same code as on a GPU (the table, each check's criteria) with the
    tiny model; only the figures mean nothing here."""
    import subprocess
    import sys
    out = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"),
                           "--device", "cpu", "--model", str(tiny_model_dir), "--rows", "24",
                           "--kcenter-n", "3000", "--work", str(tmp_path / "work"),
                           "--out", str(out), "--checks", "quickstart", "kcenter", "influence",
                           "features"], capture_output=True, text=True, timeout=600, cwd=REPO)
    table = out.read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in table.splitlines()[4:]}
    assert set(rows) == {"quickstart", "kcenter", "influence", "features"}, table
    assert rows["kcenter"] == "pass" and rows["quickstart"] == "pass", table
    assert "agree within" in table and "tokens/s" in table
    assert proc.returncode == (0 if set(rows.values()) == {"pass"} else 1), proc.stderr[-2000:]
