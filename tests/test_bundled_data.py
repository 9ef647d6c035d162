"""The bundled data files keep the promises configs/data/ATTRIBUTION.md makes about them: the
reference holdout of configs/rho_loss.yaml is clean rows of the shared pool that appear in no
other bundled file, so its reference model never sees a pool or eval row."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "configs" / "data"
SHARED = REPO.parent / "shared" / "datasets" / "pool.jsonl"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def instruction(row: dict) -> str:
    if "messages" in row:
        return row["messages"][0]["content"].strip().lower()
    return " ".join(row.get("instruction", "").split()).lower()


def test_the_reference_holdout_shares_no_row_or_instruction_with_the_other_bundled_files():
    holdout = rows(DATA / "quickstart_holdout.jsonl")
    assert len(holdout) == 32
    others = [r for f in DATA.glob("*.jsonl") if f.name != "quickstart_holdout.jsonl"
              for r in rows(f)]
    assert not {r["id"] for r in holdout} & {r.get("id") for r in others}
    pool = rows(DATA / "quickstart_pool.jsonl")
    assert not {instruction(r) for r in holdout} & {instruction(r) for r in pool}
    families = [r["source"].split("/")[0] for r in holdout]
    assert {f: families.count(f) for f in set(families)} == {
        "gsm8k": 12, "t0": 16, "self-instruct-seed": 4}


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/datasets is not on this machine")
def test_the_reference_holdout_rows_are_the_shared_pools_own_clean_rows():
    shared = {r["id"]: r for r in rows(SHARED)}
    for row in rows(DATA / "quickstart_holdout.jsonl"):
        assert row["id"] in shared
        assert {k: shared[row["id"]][k] for k in ("instruction", "input", "output")} == \
            {k: row[k] for k in ("instruction", "input", "output")}
