"""docs/extending.md's "Without editing evotune", end to end: a selector and a score defined in
this file, registered from a launch script of one's own, run in the loop on the tiny model."""

import json
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
from helpers import POOL_TINY, REPO, write_config

from evotune.selectors.base import Features, Selection, option, options_dict


def _neg_length(tokens) -> float:
    """Minus the number of response tokens: the shortest responses score highest."""
    return -float(len(tokens.targets))


class SkipTop:
    """The candidates with the highest score, after skipping the ``skip`` best ones."""
    name = "skip_top"
    doc = "the best-scored candidates after the `skip` best ones"
    logs = "the score"
    needs_embeddings = False

    @dataclass
    class Options:
        score: str = option("loss", "the score to rank by", score=True)
        skip: int = option(0, "how many of the best candidates to pass over")

        def check(self) -> None:
            if self.skip < 0:
                raise ValueError(f"skip: must be >= 0, got {self.skip}")

    def __init__(self, options=None):
        self.options = options or self.Options()
        self.scores = (self.options.score,)

    def select(self, features: Features, labeled, candidates, n, rng) -> Selection:
        s = features.scores[self.options.score]
        ranked = sorted(candidates, key=lambda i: (-s[i], i))
        picks = np.array(ranked[self.options.skip: self.options.skip + n], dtype=np.int64)
        return Selection(picks, {self.options.score: s[picks]})

    def state_dict(self) -> dict:
        return {"name": self.name, **options_dict(self.options)}


def launch(argv: list[str]) -> int:
    """A launch script of one's own: register, then run evotune's launcher."""
    from evotune.selectors.registry import register
    from evotune.trainer.scores import Score
    from evotune.trainer.scores import register as register_score

    register(SkipTop)
    register_score(Score("neg_length", "forward", "minus the response length", _neg_length))
    from evotune.trainer.cli.train import main          # what `evotune train` runs
    return main(argv)


def run_launch(args: list[str]) -> subprocess.CompletedProcess:
    code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import test_extending; "
            "sys.exit(test_extending.launch(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, str(REPO / "tests"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_a_selector_and_a_score_registered_from_outside_run_in_the_loop(
        tmp_path, tiny_model_dir, tokenizer):
    from evotune.trainer.data import encode_all, load_examples
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, out, selection={
        "selector": "skip_top", "skip_top": {"score": "neg_length", "skip": 2}, "rounds": 2})
    proc = run_launch(["--config", str(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Independently: the response lengths of the pool, from the data layer alone.
    examples, _ = load_examples(POOL_TINY, "skip")
    kept, encoded, _ = encode_all(examples, tokenizer, "chat", 160, "skip")
    length = [sum(t != -100 for t in e.labels[1:]) for e in encoded]
    rows = [json.loads(x) for x in
            (out / "rounds" / "round_001" / "selection.jsonl").read_text().splitlines()]
    first = {json.loads(x)["pool_index"] for x in
             (out / "rounds" / "round_000" / "selection.jsonl").read_text().splitlines()}
    ranked = sorted((i for i in range(len(kept)) if i not in first), key=lambda i: (length[i], i))
    assert [r["pool_index"] for r in rows] == ranked[2:7]        # the options reached the rule
    assert [r["neg_length"] for r in rows] == [-length[i] for i in ranked[2:7]]
    assert {r["selector"] for r in rows} == {"skip_top"}
    state = json.loads((out / "rounds" / "round_001" / "selector_state.json").read_text())
    assert state == {"name": "skip_top", "score": "neg_length", "skip": 2}
    # the registered settings are config keys like any other: checked, and saved with the run
    saved = json.loads((out / "config.json").read_text())
    assert saved["selection"]["skip_top"] == {"score": "neg_length", "skip": 2}
    bad = run_launch(["--config", str(cfg), "selection.skip_top.skip=-1",
                      f"output.dir={tmp_path / 'bad'}"])
    assert bad.returncode == 2 and "selection.skip_top.skip: must be >= 0" in bad.stderr
