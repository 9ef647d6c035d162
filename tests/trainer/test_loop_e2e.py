"""End-to-end: real DeepSpeed on CPU (gloo), a tiny Llama with the real SmolLM2 tokenizer,
real data; a few rounds, artifacts, kill and resume, two ranks through the launcher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import (REPO, assert_no_shm_leak, find_browser, parse_page, render_page, run_train,
                     shm_buffers, start_run, write_config)

pytestmark = pytest.mark.e2e


def selected_ids(out: Path) -> list[str]:
    """Every selected id, in selection order, from the per-round logs."""
    ids = []
    for d in sorted((out / "rounds").glob("round_*")):
        ids += [json.loads(line)["id"] for line in (d / "selection.jsonl").read_text().splitlines()]
    return ids


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path, atol: float = 1e-5) -> None:
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=atol), k


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir):
    """An uninterrupted 3-round k-center run (ZeRO-0, retrain from base)."""
    d = tmp_path_factory.mktemp("baseline")
    cfg = write_config(d / "cfg.yaml", tiny_model_dir, d / "out")
    proc = run_train(["--config", str(cfg)])
    return d / "out", cfg, proc


def test_run_writes_every_artifact(baseline, tiny_model_dir):
    out, _, proc = baseline
    summaries = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [s["round"] for s in summaries] == [0, 1, 2]
    assert [s["new_examples"] for s in summaries] == [6, 5, 5]
    assert [s["total_examples"] for s in summaries] == [6, 11, 16]
    assert all(s["eval_loss"] is not None and s["train_loss"] > 0 for s in summaries)
    ids = selected_ids(out)
    assert len(ids) == len(set(ids)) == 16
    # data.max_length=160 with on_error=skip: rows whose prompt fills 160 tokens are skipped
    # and listed with their reason; every other row of the 40 is in the pool.
    report = json.loads((out / "data_report.json").read_text())
    assert report["pool_skipped"] and report["pool_rows"] + len(report["pool_skipped"]) == 40
    assert all("max_length=160" in s["reason"] for s in report["pool_skipped"])
    for r in range(3):
        rdir = out / "rounds" / f"round_{r:03d}"
        rows = [json.loads(line) for line in (rdir / "selection.jsonl").read_text().splitlines()]
        assert [row["pick_order"] for row in rows] == list(range(len(rows)))
        assert {row["round"] for row in rows} == {r}
        assert {"id", "source", "selector", "pool_index", "preview"} <= rows[0].keys()
        if r > 0:
            assert rows[0]["selector"] == "kcenter"
            dists = [row["kcenter_distance"] for row in rows]
            assert dists == sorted(dists, reverse=True) and dists[-1] > 0
            features = __import__("numpy").load(rdir / "features.npz")
            assert features["embeddings"].shape[0] == report["pool_rows"]
        state = json.loads((rdir / "state.json").read_text())
        assert state["round_idx"] == r and len(state["selected_ids"]) == [6, 11, 16][r]
        assert (rdir / "adapter" / "adapter_config.json").is_file()
    assert ids == json.loads((out / "rounds" / "round_002" / "state.json").read_text())[
        "selected_ids"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/lr"} <= metrics[0].keys()
    assert all(m["train/grad_norm"] > 0 for m in metrics if "train/loss" in m)   # ZeRO-0 too
    assert any("eval/loss" in m for m in metrics)
    # eval_tiny's rows carry 'choices': accuracy by ranking them, every round; rows whose
    # choices do not all fit in max_length=160 are skipped and listed
    assert report["eval_choice_rows"] > 0
    assert report["eval_choice_rows"] + len(report["eval_choice_skipped"]) <= 10
    assert all(s["eval_choice_rows"] == report["eval_choice_rows"] for s in summaries)
    assert all(0.0 <= s["eval_accuracy"] <= 1.0 for s in summaries)
    assert any("eval/accuracy" in m for m in metrics)
    assert "eval acc" in proc.stderr + proc.stdout
    assert (out / "config.yaml").is_file() and (out / "data_report.json").is_file()
    assert "evotune rounds" in proc.stderr + proc.stdout
    # LoRA at ZeRO-0: three fresh engines (retrain from base), one base-model load
    assert "base model loads this run: 1" in proc.stderr
    # the first log line says the dtype and why (write_config asks for fp32; the console wraps)
    assert "dtype float32 (set in model.precision)" in " ".join(proc.stderr.split())


def test_selected_jsonl_holds_the_pools_own_rows_in_pick_order(baseline):
    """OUT/selected.jsonl: the pool file's rows (by id), in the rounds' pick order, each with
    its round and place; the rows' order and ids match state.json."""
    from helpers import POOL_TINY
    out, _, _ = baseline
    raw = {row["id"]: row for row in map(json.loads, POOL_TINY.read_text().splitlines())}
    got = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    expected = []
    for r in range(3):
        for line in (out / "rounds" / f"round_{r:03d}" / "selection.jsonl").read_text().splitlines():
            pick = json.loads(line)
            expected.append({**raw[pick["id"]], "evotune_round": r,
                             "evotune_pick_order": pick["pick_order"]})
    assert got == expected and len(got) == 16
    state = json.loads((out / "rounds" / "round_002" / "state.json").read_text())
    assert [row["id"] for row in got] == state["selected_ids"]


def test_a_parquet_folder_with_its_own_column_names_runs_like_the_jsonl_pool(
        baseline, tmp_path, tiny_model_dir):
    """The baseline's pool as two parquet shards whose columns have other names, mapped with
    data.columns: the same picks and losses as the JSONL run, and selected.jsonl holds the
    parquet rows under their own names, loadable with datasets and exportable as parquet."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers import POOL_TINY
    ref_out, _, _ = baseline
    names = {"instruction": "prompt", "input": "context", "output": "completion", "id": "uid"}
    rows = [{names.get(k, k): v for k, v in json.loads(line).items()}
            for line in POOL_TINY.read_text().splitlines()]
    folder = tmp_path / "pool"
    folder.mkdir()
    for k, part in enumerate((rows[:25], rows[25:])):
        pq.write_table(pa.Table.from_pylist(part), folder / f"train-0000{k}-of-00002.parquet")
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "out",
                       data={"pool": str(folder), "columns": names})
    run_train(["--config", str(cfg)])
    out = tmp_path / "out"
    assert selected_ids(out) == selected_ids(ref_out)
    ref = [json.loads(line) for line in (ref_out / "rounds.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [g["eval_loss"] for g in got] == pytest.approx([r["eval_loss"] for r in ref],
                                                          abs=1e-6)
    by_uid = {row["uid"]: row for row in rows}
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert [row["uid"] for row in selected] == selected_ids(out)
    for row in selected:
        assert {k: v for k, v in row.items() if not k.startswith("evotune_")} == by_uid[row["uid"]]
    # another trainer's loader reads the chosen set as it is written
    loaded = datasets.load_dataset("json", data_files=str(out / "selected.jsonl"),
                                   split="train", cache_dir=str(tmp_path / "hf_cache"))
    assert loaded["uid"] == selected_ids(out) and loaded["completion"][0] == \
        by_uid[loaded["uid"][0]]["completion"]
    script = [sys.executable, str(REPO / "launch" / "export_selection.py"), str(out)]
    for fmt in ("parquet", "alpaca"):
        proc = subprocess.run([*script, "--format", fmt], capture_output=True, text=True,
                              cwd=REPO)
        assert proc.returncode == 0, proc.stderr
    assert pq.read_table(out / "export_round_2.parquet").to_pylist() == selected
    alpaca = [json.loads(line) for line in
              (out / "export_round_2_alpaca.jsonl").read_text().splitlines()]
    assert [(a["id"], a["instruction"], a["output"]) for a in alpaca] == \
        [(r["uid"], r["prompt"], r["completion"]) for r in selected]


def test_final_adapter_loads_with_plain_peft(baseline, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out, _, _ = baseline
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, out / "final" / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)   # trained, not the zero init


def test_resume_after_completion_does_no_more_work_and_more_rounds_extend(baseline, tmp_path):
    out, cfg, _ = baseline
    proc = run_train(["--config", str(cfg)])
    assert "nothing to train" in proc.stderr
    before = (out / "rounds" / "round_002" / "state.json").read_text()
    # Raising selection.rounds is safe: the completed rounds are kept and one more runs.
    import shutil
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    run_train(["--config", str(cfg), f"output.dir={copy}", "selection.rounds=4"])
    assert (copy / "rounds" / "round_002" / "state.json").read_text() == before
    assert len(selected_ids(copy)) == 21


def test_stop_rule_ends_the_run_early_and_a_resume_respects_it(baseline, tmp_path):
    """selection.stop_when: redo rounds 1-2 of the baseline with a rule no run can pass (gain
    below 1 nat per example): the run ends after round 1, exported; a resume trains nothing
    until the rule is switched off."""
    import shutil
    out, cfg, _ = baseline
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    stop = ["selection.stop_when.window=1", "selection.stop_when.min_gain=1.0"]
    run_train(["--config", str(cfg), f"output.dir={copy}", "--resume",
               str(copy / "rounds" / "round_000"), "--overwrite", *stop])
    rounds = copy / "rounds"
    before, after = (json.loads((rounds / f"round_00{r}" / "summary.json").read_text())
                     for r in (0, 1))
    gain = (before["eval_loss"] - after["eval_loss"]) / (after["total_examples"]
                                                         - before["total_examples"])
    assert gain < 1.0 and f"{gain:.3g} per example" in after["stopped"]
    assert before["stopped"] is None and not (rounds / "round_002").exists()
    assert json.loads((rounds / "round_001" / "state.json").read_text())["stopped"]
    assert len((copy / "rounds.jsonl").read_text().splitlines()) == 2
    adapter = "adapter/adapter_model.safetensors"
    assert (copy / "final" / adapter).read_bytes() == (rounds / "round_001" / adapter).read_bytes()
    proc = run_train(["--config", str(cfg), f"output.dir={copy}", *stop])
    assert "stopped after round 1" in proc.stderr and "nothing to train" in proc.stderr
    assert not (rounds / "round_002").exists()
    run_train(["--config", str(cfg), f"output.dir={copy}", "selection.stop_when.window=0"])
    assert (rounds / "round_002" / "state.json").is_file()
    assert (copy / "final" / adapter).read_bytes() == (rounds / "round_002" / adapter).read_bytes()


def test_resume_with_changed_result_setting_is_refused(baseline):
    out, cfg, _ = baseline
    proc = run_train(["--config", str(cfg), "train.lr=0.5"], check=False)
    assert proc.returncode == 2
    assert "train.lr" in proc.stderr and "resume refused" in proc.stderr


def test_resume_never_refuses_non_empty_dir(baseline):
    out, cfg, _ = baseline
    proc = run_train(["--config", str(cfg), "--resume", "never"], check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


def _kill_when(args: list[str], marker: Path, timeout: float = 300) -> None:
    """Start launch/train.py ``args``; SIGKILL its whole process group as soon as ``marker``
    exists."""
    shm_before = shm_buffers()
    proc = start_run("train.py", args, {**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {marker} appeared:\n"
                                 f"{proc.output('stderr')[-3000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {marker}")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.finish().returncode == -signal.SIGKILL
    assert_no_shm_leak(shm_before)


def _assert_resumed_like_baseline(out: Path, ref_out: Path, cfg: Path) -> None:
    proc = run_train(["--config", str(cfg), f"output.dir={out}"])
    assert "resumed after round" in proc.stderr
    assert selected_ids(out) == selected_ids(ref_out)
    assert (out / "selected.jsonl").read_text() == (ref_out / "selected.jsonl").read_text()
    assert_same_adapter(out, ref_out)
    # A redone round logged its steps once: no duplicate metric lines.
    steps = [json.loads(line)["global_step"] for line in
             (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert steps == sorted(set(steps))
    rounds = [json.loads(line)["round"] for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2]


def test_sigkill_during_the_checkpoint_write_then_resume(baseline, tmp_path):
    """Killed while round 1's DeepSpeed checkpoint is being written (its folder has appeared):
    the round is not complete and is redone, with the baseline's results."""
    ref_out, cfg, _ = baseline
    out = tmp_path / "out"
    # The kill comes from outside, so it can land after the round has finished writing (a
    # tiny run's checkpoint takes milliseconds, and a busy machine can delay the kill): then
    # this case did not happen, and the run is tried again from scratch.
    for _ in range(3):
        shutil.rmtree(out, ignore_errors=True)
        _kill_when(["--config", str(cfg), f"output.dir={out}"],
                   out / "rounds" / "round_001" / "checkpoint")
        if not (out / "rounds" / "round_001" / "state.json").exists():
            break
    assert not (out / "rounds" / "round_001" / "state.json").exists()
    _assert_resumed_like_baseline(out, ref_out, cfg)


def test_sigkill_from_outside_during_training_then_resume(baseline, tmp_path):
    ref_out, cfg, _ = baseline
    out = tmp_path / "out"
    _kill_when(["--config", str(cfg), f"output.dir={out}"], out / "rounds" / "round_001" / "selection.jsonl")
    assert not (out / "rounds" / "round_001" / "state.json").exists()
    _assert_resumed_like_baseline(out, ref_out, cfg)


@pytest.mark.parametrize("crash_at", [
    "embed:1",        # pool embedded with the round-0 model, nothing of round 1 written yet
    "train:1",        # after round 1's first optimizer step
    "checkpoint:1",   # round 1's DeepSpeed checkpoint written, exports and state not yet
    "state:1",        # round 1 complete (state.json), run-level logs not yet rebuilt
    "checkpoint:2",   # the last round, before its state.json
])
def test_crash_at_each_phase_then_resume_gives_identical_results(baseline, tmp_path, crash_at):
    ref_out, cfg, _ = baseline
    out = tmp_path / "out"
    proc = run_train(["--config", str(cfg), f"output.dir={out}"], check=False,
                     env={"EVOTUNE_CRASH_AT": crash_at})
    assert proc.returncode == -9          # SIGKILL
    phase, r = crash_at.split(":")
    assert (out / "rounds" / f"round_{int(r):03d}" / "state.json").exists() == (phase == "state")
    _assert_resumed_like_baseline(out, ref_out, cfg)


@pytest.mark.parametrize("zero_stage, retrain", [(1, True), (2, False), (3, True)])
def test_zero_stages_and_continue_mode_match_zero_0(tmp_path, tiny_model_dir, baseline,
                                                    zero_stage, retrain):
    """ZeRO 1-3 shard the same computation: the same picks and, up to float summation order,
    the same losses as ZeRO-0 (the baseline's first two rounds; in continue mode a ZeRO-0
    continue run)."""
    def run(name, stage):
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, tmp_path / name,
                           deepspeed={"zero_stage": stage,
                                      "stage3_param_persistence_threshold": 0},
                           train={"retrain_from_base": retrain}, selection={"rounds": 2})
        proc = run_train(["--config", str(cfg)])
        # LoRA: one base-model load per run at every stage (ZeRO-3 keeps the partitioned
        # module and re-draws the adapter gathered)
        assert "base model loads this run: 1" in proc.stderr
        return [json.loads(line) for line in
                (tmp_path / name / "rounds.jsonl").read_text().splitlines()]

    summaries = run("out", zero_stage)
    if retrain:
        ref = [json.loads(line) for line in
               (baseline[0] / "rounds.jsonl").read_text().splitlines()][:2]
        ref_ids = selected_ids(baseline[0])[:11]
    else:
        ref, ref_ids = run("zero0", 0), selected_ids(tmp_path / "zero0")
    assert selected_ids(tmp_path / "out") == ref_ids
    for s, r in zip(summaries, ref):
        assert s["train_loss"] == pytest.approx(r["train_loss"], rel=1e-4)
        assert s["eval_loss"] == pytest.approx(r["eval_loss"], rel=1e-4)
    assert [s["total_examples"] for s in summaries] == [6, 11]
    tensors = adapter(tmp_path / "out")
    assert tensors and all(t.numel() > 0 for t in tensors.values())   # not empty under ZeRO-3
    metrics = [json.loads(line) for line in
               (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["train/grad_norm"] > 0 for m in metrics if "train/loss" in m)
    if not retrain:
        # Continue mode keeps counting optimizer steps on one optimizer: round 1 starts where
        # round 0 stopped (6 examples, batch 4, 2 epochs = 4 steps).
        assert summaries[0]["global_step"] == 4
        assert summaries[1]["global_step"] == 4 + 6


def test_two_ranks_select_like_one_rank(tmp_path, tiny_model_dir, baseline):
    ref_out, cfg, _ = baseline
    out = tmp_path / "out2"
    run_train(["--config", str(cfg), f"output.dir={out}"], ranks=2, launcher=True)
    assert json.loads((out / "rounds" / "round_000" / "state.json").read_text())[
        "world_size"] == 2
    assert selected_ids(out) == selected_ids(ref_out)
    assert_same_adapter(out, ref_out, atol=1e-4)
    acc = [[json.loads(line)["eval_accuracy"] for line in
            (o / "rounds.jsonl").read_text().splitlines()] for o in (out, ref_out)]
    assert acc[0] == acc[1]


def test_bad_model_path_fails_cleanly_and_leaves_output_untouched(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, out)
    proc = run_train(["--config", str(cfg), f"model.path={tmp_path / 'nope'}", "--overwrite"],
                     check=False)
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "local" in proc.stderr
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_bad_lora_target_fails_before_writing_anything(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "out")
    proc = run_train(["--config", str(cfg), "lora.target_modules=[q_proj, wqkv]"], check=False)
    assert proc.returncode == 2 and "['wqkv']" in proc.stderr and "q_proj" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_config_error_exits_2_naming_the_key(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "out")
    proc = run_train(["--config", str(cfg), "selection.per_round=0"], check=False)
    assert proc.returncode == 2 and "selection.per_round" in proc.stderr
    proc = run_train(["--config", str(cfg), "selection.init_size=39"], check=False)
    assert proc.returncode == 2 and "larger than the pool" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_resume_path_reuses_the_runs_own_config(baseline):
    out, _, _ = baseline
    proc = run_train(["--resume", str(out)])
    assert "nothing to train" in proc.stderr


def test_inspect_rounds_shows_rounds_picks_and_diffs(baseline):
    out, _, _ = baseline
    script = str(REPO / "launch" / "inspect_rounds.py")

    def show(*args):
        proc = subprocess.run([sys.executable, script, str(out), *args], capture_output=True,
                              text=True, env={**os.environ, "COLUMNS": "200"})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    overview = show()
    assert "done" in overview and "kcenter" in overview and "gsm8k" in overview
    first = json.loads((out / "rounds" / "round_001" / "selection.jsonl").read_text()
                       .splitlines()[0])
    picks = show("--round", "1", "--sort", "kcenter_distance")
    assert first["id"] in picks and "kcenter_distance" in picks
    diff = show("--diff", "0", "2")
    assert "+10" in diff
    proc = subprocess.run([sys.executable, script, str(out), "--round", "9"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "no round 9" in proc.stderr
    assert "round_002.png" in show("--plot").replace("\n", "")
    assert all((out / "rounds" / f"round_{r:03d}" / f"round_{r:03d}.png").is_file()
               for r in range(3))


@pytest.mark.skipif(find_browser() is None, reason="no chromium, chromium-browser or "
                    "google-chrome on PATH (Debian: apt-get install chromium)")
def test_html_report_of_a_real_run_and_of_one_in_progress(baseline, tmp_path):
    """The page on the baseline's real run dir, rendered by headless Chromium: every pick in
    the table, each selecting round's projection, no problem; then on a copy whose last round
    is cut back to what the loop has written just after selecting (no summary, no state)."""
    import shutil
    out, _, _ = baseline
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoint", "adapter", "final"))
    for name in ("summary.json", "state.json"):
        (copy / "rounds" / "round_002" / name).unlink()
    for run, last in ((out, "done"), (copy, "picked")):
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "inspect_rounds.py"),
                               str(run), "--html", "-o", str(tmp_path / f"{run.name}.html")],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        dom, console = render_page(tmp_path / f"{run.name}.html")
        root = parse_page(dom)
        assert [li.text() for li in root.by_id("problems").iter("li")] == [] and console == []
        cells = [[td.text() for td in tr.iter("td")]
                 for tr in next(root.by_id("picks-table").iter("tbody")).iter("tr")]
        picks = [json.loads(line) for r in range(3) for line in
                 (out / "rounds" / f"round_{r:03d}" / "selection.jsonl").read_text().splitlines()]
        assert sorted((c[0], c[2]) for c in cells) == sorted((str(p["round"]), p["id"])
                                                             for p in picks)
        states = [[td.text() for td in tr.iter("td")][1]
                  for tr in next(root.by_id("rounds-table").iter("tbody")).iter("tr")]
        assert states == ["done", "done", last]
        for r in (1, 2):   # k-center rounds: embeddings of the whole (tiny) pool
            circles = list(next(root.by_id(f"round-{r}").iter("svg")).iter("circle"))
            assert len(circles) == len(np.load(out / "rounds" / f"round_{r:03d}" /
                                               "features.npz")["ids"])
        assert len(list(root.by_id("eval").iter("svg"))) >= 1


@pytest.mark.parametrize("zero_stage, ranks", [(1, None), (3, 2)])
def test_full_finetuning_exports_a_plain_model(tmp_path, tiny_model_dir, zero_stage, ranks):
    from transformers import AutoModelForCausalLM
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "out",
                       lora={"enabled": False}, selection={"rounds": 2},
                       deepspeed={"zero_stage": zero_stage})
    run_train(["--config", str(cfg)], ranks=ranks)
    final = tmp_path / "out" / "final" / "model"
    model = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters())
               if not torch.equal(p, q)]
    assert changed   # every weight was trainable; the export holds the trained ones
    assert (final / "tokenizer_config.json").is_file()


def test_bf16_and_merged_export(tmp_path, tiny_model_dir, baseline):
    """bf16 (the GPU default) through DeepSpeed's bf16 optimizer, here on CPU; merged export."""
    from transformers import AutoModelForCausalLM
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "out",
                       model={"path": str(tiny_model_dir), "precision": "bf16"},
                       selection={"rounds": 2}, deepspeed={"zero_stage": 2},
                       output={"save_merged": True})
    proc = run_train(["--config", str(cfg)])
    assert "dtype bfloat16 (set in model.precision)" in " ".join(proc.stderr.split())
    summaries = [json.loads(line) for line in
                 (tmp_path / "out" / "rounds.jsonl").read_text().splitlines()]
    # round 0 trains on the same random picks as the fp32 baseline: bf16 matmuls and weights
    # change the losses a little, not more
    ref = json.loads((baseline[0] / "rounds" / "round_000" / "summary.json").read_text())
    assert summaries[0]["train_loss"] == pytest.approx(ref["train_loss"], rel=0.01)
    assert summaries[0]["eval_loss"] == pytest.approx(ref["eval_loss"], rel=0.01)
    assert all(np.isfinite(s["eval_loss"]) for s in summaries)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final" / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_mixed_chat_and_alpaca_pool_with_random_selector(tmp_path, tiny_model_dir):
    from helpers import FIXTURES
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "out",
                       data={"pool": str(FIXTURES / "pool_mixed.jsonl"), "max_length": 512},
                       selection={"selector": "random", "rounds": 2, "init_size": 8,
                                  "per_round": 8})
    run_train(["--config", str(cfg)])
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["pool_rows"] == 24 and not report["pool_skipped"]
    rows = [json.loads(line) for line in
            (tmp_path / "out" / "rounds" / "round_001" / "selection.jsonl").read_text()
            .splitlines()]
    assert {r["selector"] for r in rows} == {"random"} and len(rows) == 8
    assert not (tmp_path / "out" / "rounds" / "round_001" / "features.npz").exists()
    # the chosen set in the forms other trainers read, from both row shapes
    raw = {row["id"]: row for row in
           map(json.loads, (FIXTURES / "pool_mixed.jsonl").read_text().splitlines())}
    for fmt in ("alpaca", "sharegpt"):
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "export_selection.py"),
                               str(tmp_path / "out"), "--format", fmt, "-o", "-"],
                              capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        got = [json.loads(line) for line in proc.stdout.splitlines()]
        assert len(got) == 16 and {g["evotune_round"] for g in got} == {0, 1}
        for g in got:
            row = raw[g["id"]]
            turns = row.get("messages") or [
                {"role": "user", "content": row["instruction"]
                 + ("\n\n" + row["input"] if row.get("input", "").strip() else "")},
                {"role": "assistant", "content": row["output"]}]
            if fmt == "sharegpt":
                assert [t["value"] for t in g["conversations"]] == [t["content"] for t in turns]
            elif "messages" in row:
                assert (g["instruction"], g["output"]) == (turns[-2]["content"],
                                                          turns[-1]["content"])
            else:
                assert (g["instruction"], g["input"], g["output"]) == (
                    row["instruction"], row.get("input", ""), row["output"])


def test_two_ranks_under_zero3_with_partitioned_adapters(tmp_path, tiny_model_dir):
    # selection.batch_size 3 makes an odd number of feature batches, so one rank runs a
    # padding call (decoder and LM head) to keep ZeRO-3's gathers in step. The eval set mixes
    # multiple-choice rows (5 fit in 160 tokens: an odd number, one rank pads) with 3 plain
    # rows of other sources.
    from helpers import EVAL_TINY, POOL_TINY
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(EVAL_TINY.read_text().splitlines(True)[:7])
                         + "".join(POOL_TINY.read_text().splitlines(True)[:3]))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "out",
                       deepspeed={"zero_stage": 3, "stage3_param_persistence_threshold": 0},
                       selection={"rounds": 2, "selector": "weighted",
                                  "weighted": {"score": "entropy"}, "batch_size": 3},
                       eval={"path": str(eval_file), "batch_size": 2},
                       train={"retrain_from_base": False})
    run_train(["--config", str(cfg)], ranks=2)
    tensors = adapter(tmp_path / "out")
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    state = json.loads((tmp_path / "out" / "rounds" / "round_001" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["selected_ids"]) == 11
    summary = json.loads((tmp_path / "out" / "rounds" / "round_001" / "summary.json")
                         .read_text())
    assert summary["eval_choice_rows"] == 5 and np.isfinite(summary["eval_loss"])
    assert set(summary["eval_by_source"]) >= {"t0"} and len(summary["eval_by_source"]) >= 2


def test_two_ranks_crash_and_resume(baseline, tmp_path):
    """A rank dies (the launcher then stops the other); the 2-rank resume ends like the run
    that was never interrupted."""
    ref_out, cfg, _ = baseline
    out = tmp_path / "out"
    proc = run_train(["--config", str(cfg), f"output.dir={out}"], ranks=2, launcher=True,
                     check=False, env={"EVOTUNE_CRASH_AT": "checkpoint:1"})
    assert proc.returncode != 0
    assert not (out / "rounds" / "round_001" / "state.json").exists()
    proc = run_train(["--config", str(cfg), f"output.dir={out}"], ranks=2, launcher=True)
    assert "resumed after round 0" in proc.stderr
    assert selected_ids(out) == selected_ids(ref_out)
    assert_same_adapter(out, ref_out, atol=1e-4)


def test_resume_from_an_earlier_round_redoes_the_later_ones(baseline, tmp_path):
    import shutil
    ref_out, _, _ = baseline
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    later = out / "rounds" / "round_001"
    proc = run_train(["--resume", str(out / "rounds" / "round_000")], check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and later.is_dir()
    # The baseline keeps every checkpoint (keep_checkpoints 0), so round 0's is there.
    proc = run_train(["--resume", str(out / "rounds" / "round_000"), "--overwrite"])
    assert "resumed after round 0" in proc.stderr
    assert selected_ids(out) == selected_ids(ref_out)
    assert (out / "selected.jsonl").read_text() == (ref_out / "selected.jsonl").read_text()
    assert_same_adapter(out, ref_out)


def test_weighted_selector_reads_scores_computed_in_the_pass(baseline, tmp_path, tiny_model_dir):
    ref_out, cfg, _ = baseline
    out = tmp_path / "out"
    run_train(["--config", str(cfg), f"output.dir={out}", "selection.selector=weighted",
               "selection.weighted.score=perplexity", "selection.weighted.alpha=1.0"])
    import numpy as np
    rdir = out / "rounds" / "round_001"
    rows = [json.loads(line) for line in (rdir / "selection.jsonl").read_text().splitlines()]
    pool_scores = np.load(rdir / "features.npz")["score_perplexity"]
    # alpha = 1 is top-score: the 5 highest-perplexity candidates, in descending order.
    round0 = {json.loads(line)["pool_index"] for line in
              (out / "rounds" / "round_000" / "selection.jsonl").read_text().splitlines()}
    cand = [i for i in range(len(pool_scores)) if i not in round0]
    best = sorted(cand, key=lambda i: (-pool_scores[i], i))[:5]
    assert [r["pool_index"] for r in rows] == best
    assert [r["perplexity"] for r in rows] == pytest.approx([pool_scores[i] for i in best])
    summary = json.loads((rdir / "summary.json").read_text())
    assert summary["selection_info"] == {"nan_scores": 0} and summary["selector"] == "weighted"
    # Round 0 (random) is the same as the k-center baseline's: only later rounds differ.
    assert selected_ids(out)[:6] == selected_ids(ref_out)[:6]


def test_selection_candidates_measures_a_new_sample_each_round(baseline, tmp_path):
    """selection.candidates=8: each selecting round embeds and scores 8 of the unselected rows
    and the selected ones, nothing else; the picks come from the 8; the next round draws anew."""
    _, cfg, _ = baseline
    out = tmp_path / "out"
    run_train(["--config", str(cfg), f"output.dir={out}", "selection.candidates=8",
               "selection.selector=weighted", "selection.weighted.score=ifd_cherry",
               "selection.weighted.alpha=0.5", "selection.rounds=3"])
    selected, samples = [], []
    for r in range(3):
        rdir = out / "rounds" / f"round_{r:03d}"
        picks = [json.loads(line)["pool_index"]
                 for line in (rdir / "selection.jsonl").read_text().splitlines()]
        summary = json.loads((rdir / "summary.json").read_text())
        if r:
            f = np.load(rdir / "features.npz")
            measured = np.flatnonzero(np.isfinite(f["embeddings"].astype(np.float32)).all(axis=1))
            ifd = f["score_ifd_cherry"]
            sample = sorted(set(measured.tolist()) - set(selected))
            assert len(sample) == 8 and set(selected) <= set(measured.tolist())
            assert set(picks) <= set(sample) and summary["candidates"] == 8
            # IFD ran over the measured rows only: none outside, the same rows inside
            assert np.isfinite(ifd).sum() > 0 and set(np.flatnonzero(np.isfinite(ifd))) <= set(
                measured.tolist())
            skipped = summary["score_skipped"]["ifd_cherry"]
            assert skipped["count"] >= len(ifd) - len(measured)
            assert any("selection.candidates" in e for e in skipped["examples"])
            samples.append(sample)
        else:
            assert summary["candidates"] is None          # round 0: random
        selected += picks
    assert samples[0] != samples[1]


def test_selection_candidates_too_few_for_the_round_is_refused_at_start(tmp_path,
                                                                        tiny_model_dir):
    message = _refused(tmp_path, tiny_model_dir, selection={"candidates": 3})
    assert "selection.candidates: round 1 measures 3 of its" in message and "must pick 5" in message


PRESETS = sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name != "quickstart.yaml")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs(preset, tmp_path, tiny_model_dir):
    """Each preset's selection rule, scores and filters run in the loop (tiny model, tiny data,
    2 rounds: the budget and model are overridden, the method is the preset's)."""
    from helpers import POOL_TINY, EVAL_TINY
    overrides = [f"model.path={tiny_model_dir}", "model.precision=fp32",
                 f"data.pool={POOL_TINY}",
                 f"eval.path={EVAL_TINY}", "data.on_error=skip", "data.max_length=160",
                 "selection.rounds=2", "selection.init_size=6", "selection.per_round=5",
                 "train.epochs=1", "train.batch_size=4", "train.micro_batch_size=2",
                 "lora.target_modules=[q_proj, v_proj]", f"output.dir={tmp_path / 'out'}",
                 "selection.cluster_quota.n_clusters=3",
                 "selection.pre_experienced.n_clusters=3", "scoring.max_length=160"]
    import yaml
    spec = yaml.safe_load((REPO / "configs" / preset).read_text())
    if spec.get("scoring", {}).get("model"):
        overrides.append(f"scoring.model={tiny_model_dir}")
    run_train(["--config", str(REPO / "configs" / preset), *overrides])
    rounds = tmp_path / "out" / "rounds"
    rows = [json.loads(line) for line in
            (rounds / "round_001" / "selection.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and len({r["id"] for r in rows}) == 5
    first = [json.loads(line) for line in
             (rounds / "round_000" / "selection.jsonl").read_text().splitlines()]
    expected = {"random": "random", "pre_experienced": "pre_experienced",
                "selector": spec["selection"]["selector"]}[
        spec["selection"].get("first_round", "random")]
    assert len(first) == 6 and {r["selector"] for r in first} == {expected}
    # the preset's scores were computed, have values for its picks, and chose them: no pick
    # is an unscored fill-in, and a filter let some candidates through
    from evotune.selectors.registry import build
    from evotune.trainer.config import load_config
    selector = build(load_config(REPO / "configs" / preset, overrides).selection)
    summary = json.loads((rounds / "round_001" / "summary.json").read_text())
    for name in selector.scores:
        assert all(np.isfinite(r[name]) for r in rows), (name, [r.get(name) for r in rows])
    assert all(r.get("scored", 1) == 1 for r in rows)
    assert summary["selection_info"].get("unscored_fill", 0) == 0
    if spec["selection"].get("filter_score"):
        assert any(r["passed_filter"] == 1 for r in rows)


def test_base_model_features_are_reused_across_runs_and_keyed_by_their_settings(
        tmp_path, tiny_model_dir):
    """Round 0 chosen by the base model: a second run (another seed) on the same pool reads the
    first run's features from the cache; a changed pass setting computes them again. The rule
    (weighted) selects sharded: a 2-rank run reads a 1-rank run's entry, and writes one that a
    1-rank run reads, each rank's rows streamed through rank 0 (passes/streamed.py)."""
    env = {"EVOTUNE_CACHE": str(tmp_path / "cache")}
    selection = {"selector": "weighted", "weighted": {"score": "length", "alpha": 1.0},
                 "first_round": "selector", "rounds": 1, "init_size": 6}

    def run(name, seed, ranks=None, **extra):
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, tmp_path / name,
                           seed=seed, selection={**selection, **extra})
        proc = run_train(["--config", str(cfg)], env=env, ranks=ranks)
        rdir = tmp_path / name / "rounds" / "round_000"
        with np.load(rdir / "features.npz") as f:
            arrays = {k: f[k] for k in f.files}
        arrays["picks"] = [json.loads(line)["pool_index"] for line in
                           (rdir / "selection.jsonl").read_text().splitlines()]
        return proc, json.loads((rdir / "summary.json").read_text()), arrays

    _, first, a = run("a", 1)
    proc, second, b = run("b", 2, ranks=2)
    assert first["cached_passes"] == [] and second["cached_passes"] == ["features"]
    assert "reused from the cache" in proc.stderr
    assert second["tokens"]["features"] == first["tokens"]["features"] > 0
    for key in ("embeddings", "score_length", "ids", "picks"):
        assert np.array_equal(a[key], b[key])
    assert len(list((tmp_path / "cache" / "features").glob("*.npz"))) == 1
    _, third, c = run("c", 1, ranks=2, pooling="last")
    assert third["cached_passes"] == [] and not np.array_equal(a["embeddings"], c["embeddings"])
    assert len(list((tmp_path / "cache" / "features").glob("*.npz"))) == 2
    _, fourth, d = run("d", 3, pooling="last")
    assert fourth["cached_passes"] == ["features"]
    for key in ("embeddings", "score_length", "picks"):
        assert np.array_equal(c[key], d[key])


# ----------------------------------------------------------------------------- refused at the door

def _refused(tmp_path, tiny_model_dir, **sections) -> str:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "out", **sections)
    proc = run_train(["--config", str(cfg)], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()          # refused before anything was written
    return proc.stderr


@pytest.mark.parametrize("sections, message", [
    ({"selection": {"selector": "influence"},
      "influence": {"validation": "EVAL", "candidates": 3}},
     "influence.candidates: round 1 takes gradients of 3 of its 19 candidates but must pick 5"),
    ({"selection": {"selector": "weighted", "weighted": {"score": "knn_k"}},
      "scoring": {"knn_k": {"k": 40}}}, "scoring.knn_k.k: 40 neighbours"),
    ({"selection": {"selector": "facility_location",
                    "facility_location": {"max_candidates": 10}}},
     "selection.facility_location.max_candidates: round 1 has 19 candidates"),
    ({"train": {"lr": float("nan")}}, "train.lr: must be a finite number, got nan"),
])
def test_settings_that_would_fail_after_a_pass_are_refused_at_start(
        tmp_path, tiny_model_dir, sections, message):
    from helpers import EVAL_TINY
    if "influence" in sections:
        sections["influence"]["validation"] = str(EVAL_TINY)
    assert message in _refused(tmp_path, tiny_model_dir, **sections)


def test_a_score_no_candidate_has_is_refused_not_filled_in(tmp_path, tiny_model_dir):
    """Cherry's reference IFD template reads Alpaca rows only: on a pool of chat rows the score
    has no value anywhere, and a selector that ranks by it must not silently become k-center."""
    from helpers import POOL_TINY
    chat = tmp_path / "chat.jsonl"
    rows = [json.loads(line) for line in POOL_TINY.read_text().splitlines()]
    chat.write_text("".join(json.dumps({"id": r["id"], "messages": [
        {"role": "user", "content": r["instruction"] + ("\n" + r["input"] if r["input"] else "")},
        {"role": "assistant", "content": r["output"]}]}) + "\n" for r in rows))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "out",
                       data={"pool": str(chat), "max_length": 160, "on_error": "skip"},
                       selection={"selector": "weighted", "weighted": {"score": "ifd_cherry"},
                                  "rounds": 2},
                       scoring={"template": "reference", "max_length": 160})
    proc = run_train(["--config", str(cfg)], check=False)
    assert proc.returncode == 2
    assert "score 'ifd_cherry' has no value for any of the" in proc.stderr
    assert "chat row" in proc.stderr                     # the reason, from the pass


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path, tiny_model_dir):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, mine)
    proc = run_train(["--config", str(cfg), "--resume", "never", "--overwrite"], check=False)
    assert proc.returncode == 2 and "not an evotune run" in proc.stderr
    assert "--overwrite" not in proc.stderr.split("not an evotune run", 1)[1]
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_a_checkpoint_that_does_not_restore_the_adapter_is_refused(baseline, tmp_path):
    """Resume loads LoRA checkpoints non-strictly (the frozen weights are left out); if the
    adapter's tensors are not in it (renamed by a peft upgrade, say), the run must not go on
    from a fresh adapter: it compares with the round's export and refuses."""
    import shutil
    out, cfg, _ = baseline
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    states = copy / "rounds" / "round_001" / "checkpoint" / "deepspeed" / \
        "mp_rank_00_model_states.pt"
    ckpt = torch.load(states, weights_only=False)
    ckpt["module"] = {k.replace("lora_A", "lora_renamed"): v for k, v in ckpt["module"].items()}
    torch.save(ckpt, states)
    from evotune.trainer.state import write_checkpoint_manifest
    write_checkpoint_manifest(states.parent.parent)
    proc = run_train(["--config", str(cfg), f"output.dir={copy}", "--resume",
                      str(copy / "rounds" / "round_001"), "--overwrite"], check=False)
    assert proc.returncode == 2 and "did not restore the adapter" in proc.stderr


def _two_ranks_with_selector(tmp_path, tiny_model_dir, name: str, select_body: str,
                             method: str = "select", base: str = "SkipTop",
                             **sections) -> tuple[int, str]:
    """Run two ranks through the real launcher with a test selector ``name`` (a ``base``,
    SkipTop or KCenterSelector, whose ``method(self, *args)`` is ``select_body``) registered
    from a launch script; returns the launcher's exit code and its output."""
    from helpers import _free_port
    script = tmp_path / f"launch_{name}.py"
    script.write_text(f"""
import sys, time
sys.path.insert(0, {str(REPO / "tests")!r})
sys.path.insert(0, {str(REPO / "launch")!r})
from test_extending import SkipTop
from evotune.selectors.kcenter import KCenterSelector
from evotune.selectors.registry import register

class Selector({base}):
    name = {name!r}
    def {method}(self, *args):
{select_body}

register(Selector)
import train
sys.exit(train.main(sys.argv[1:]))
""")
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "out",
                       selection={"selector": name, "rounds": 2}, **sections)
    deepspeed = Path(sys.executable).with_name("deepspeed")
    proc = subprocess.run([str(deepspeed), "--num_gpus", "2", "--master_port",
                           str(_free_port()), str(script), "--config", str(cfg)], cwd=REPO,
                          capture_output=True, text=True, timeout=400)
    return proc.returncode, proc.stdout + proc.stderr


def test_a_failure_on_rank_0_stops_every_rank(tmp_path, tiny_model_dir):
    """An unexpected error on rank 0 (a selector's bug) must end the other rank too, not leave
    it waiting in a collective: the launcher returns, with the error in its output."""
    rc, out = _two_ranks_with_selector(tmp_path, tiny_model_dir, "buggy",
                                       '        raise KeyError("a bug in the selector")')
    assert rc != 0
    assert "a bug in the selector" in out and "rank 0 failed" in out


def test_a_failure_on_one_rank_in_a_sharded_selection_stops_every_rank(tmp_path, tiny_model_dir):
    """Inside a sharded selection every rank selects; one that raises (here rank 1 alone)
    exits, and the launcher stops the other, which would otherwise wait in the next
    collective: the run ends promptly (well inside the 30-minute timeout) with the error."""
    import time
    start = time.monotonic()
    rc, out = _two_ranks_with_selector(
        tmp_path, tiny_model_dir, "shardbug",
        "        import torch.distributed as dist\n"
        "        if dist.get_rank() == 1:\n"
        "            raise KeyError('a bug on rank 1')\n"
        "        return super().select_sharded(*args)",
        method="select_sharded", base="KCenterSelector")
    assert rc != 0
    assert "a bug on rank 1" in out
    assert time.monotonic() - start < 300


def test_no_rank_waits_in_a_collective_longer_than_the_timeout(tmp_path, tiny_model_dir):
    """deepspeed.timeout_minutes reaches the process group: rank 0 selecting for longer than
    the timeout (here a selector that sleeps 60 s against 0.1 min) makes the waiting rank fail
    with a timeout, instead of the run hanging on or silently succeeding."""
    rc, out = _two_ranks_with_selector(
        tmp_path, tiny_model_dir, "slow",
        "        time.sleep(60)\n        return super().select(*args)",
        deepspeed={"zero_stage": 0, "timeout_minutes": 0.1})
    assert rc != 0, out[-3000:]
    assert "timed out" in out.lower() or "timeout" in out.lower(), out[-3000:]
