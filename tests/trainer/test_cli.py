"""The ``evotune`` command (trainer/cli/): its commands, the same options as launch/'s scripts,
clear errors, the console script an install puts on PATH, and the report page an install
carries."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from helpers import REPO, load_module

EVOTUNE = Path(sys.executable).with_name("evotune")      # the script `pip install` writes
# command -> the launch script with the same options
SCRIPTS = {"train": "train.py", "score": "score_pool.py", "inspect": "inspect_rounds.py",
           "export": "export_selection.py"}


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "100"}, **kw)


def test_the_console_script_is_installed_and_points_at_main():
    from evotune.trainer import cli
    (ep,) = entry_points(group="console_scripts", name="evotune")
    assert ep.value == "evotune.trainer.cli:main" and ep.load() is cli.main
    assert EVOTUNE.is_file() and os.access(EVOTUNE, os.X_OK)


def test_help_lists_the_four_commands():
    proc = run([EVOTUNE, "--help"])
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.split("commands:\n")[1].split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in listed] == ["train", "score", "inspect", "export"]


@pytest.mark.parametrize("command", SCRIPTS)
def test_each_command_has_the_options_of_its_launch_script(command):
    """``evotune COMMAND --help`` and ``python launch/SCRIPT --help`` print the same text, bar
    the program's name (and where a longer name wraps the usage line); and the launch script
    runs the package's ``main``, not a copy of it."""
    script = REPO / "launch" / SCRIPTS[command]
    ours, theirs = run([EVOTUNE, command, "--help"]), run([sys.executable, script, "--help"])
    assert ours.returncode == theirs.returncode == 0, ours.stderr + theirs.stderr
    assert f"usage: evotune {command} " in ours.stdout
    assert (" ".join(ours.stdout.replace(f"evotune {command}", SCRIPTS[command]).split())
            == " ".join(theirs.stdout.split()))
    module = importlib.import_module(f"evotune.trainer.cli.{script.stem}")
    assert load_module(script).main is module.main


def test_help_config_through_the_command_equals_the_scripts():
    ours = run([EVOTUNE, "train", "--help-config"])
    theirs = run([sys.executable, REPO / "launch" / "train.py", "--help-config"])
    assert ours.returncode == 0 and ours.stdout == theirs.stdout
    assert "selection.rounds" in ours.stdout


@pytest.mark.parametrize("argv, message", [
    (["bogus"], "invalid choice: 'bogus' (choose from 'train', 'score', 'inspect', 'export')"),
    ([], "the following arguments are required: COMMAND"),
    (["--config", "c.yaml"], "invalid choice"),
])
def test_no_command_or_an_unknown_one_exits_2_naming_the_commands(argv, message, capsys):
    from evotune.trainer.cli import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_what_follows_the_command_is_its_own_and_a_launchers_local_rank_is_taken(
        tmp_path, capsys, monkeypatch):
    """A launcher's ``--local_rank=N`` before the command (deepspeed --no_python / --module)
    is accepted; the arguments after the command reach it untouched, a ``--`` included (here
    it lets a run dir named ``-odd`` through)."""
    from evotune.trainer.cli import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-odd").mkdir()
    assert main(["--local_rank=1", "inspect", "--", "-odd"]) == 2
    assert "error: -odd has no rounds/ folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--round", "0"]) == 1
    assert "selected.jsonl" in capsys.readouterr().err
    proc = run([sys.executable, "-m", "evotune.trainer.cli", "--local_rank=0", "inspect",
                tmp_path], cwd=tmp_path)
    assert proc.returncode == 2 and "has no rounds/ folder" in proc.stderr


def test_a_built_wheel_carries_the_command_and_the_report_page(tmp_path):
    """Build a wheel of the project (as ``pip install .`` does), install it by unpacking, and
    write an HTML report with the installed ``evotune inspect``: the page is package data,
    found without the source tree."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (src / name).write_bytes((REPO / name).read_bytes())
    for name in ("trainer", "selectors"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # With the venv's setuptools when it has one as recent as pyproject asks for (no download);
    # else in pip's isolated build env, which fetches it as `pip install .` does.
    try:
        from setuptools import __version__ as have
        offline = int(have.split(".")[0]) >= 68
    except ImportError:
        offline = False
    proc = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist",
                *(["--no-build-isolation", "--no-index"] if offline else []), src])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("evotune-*.whl")
    page = REPO / "trainer" / "cli" / "inspect_rounds.html"
    with zipfile.ZipFile(wheel) as z:
        assert z.read("evotune/trainer/cli/inspect_rounds.html") == page.read_bytes()
        (info,) = {n.split("/")[0] for n in z.namelist() if ".dist-info/" in n}
        assert "evotune = evotune.trainer.cli:main" in z.read(f"{info}/entry_points.txt").decode()
        z.extractall(tmp_path / "site")
    run_dir = tmp_path / "run"
    (run_dir / "rounds" / "round_000").mkdir(parents=True)
    pick = {"id": "a", "source": "s", "round": 0, "pick_order": 0, "selector": "random",
            "pool_index": 0, "tokens": 3, "preview": "hi"}
    (run_dir / "rounds" / "round_000" / "selection.jsonl").write_text(json.dumps(pick) + "\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    where = subprocess.run([sys.executable, "-c", "import evotune.trainer.cli as m; "
                            "print(m.__file__)"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "site")
    proc = subprocess.run([sys.executable, "-m", "evotune.trainer.cli", "inspect", run_dir,
                           "--html"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report, template = (run_dir / "report.html").read_text(), page.read_text()
    assert report.startswith(template[:template.index("{{")]) and "{{" not in report
    assert "<title>run: evotune run report</title>" in report and '"name":"run"' in report
