"""benchmarks/messy_pool.py: the messy pool built from the shared datasets, checked from the
written files against the source rows (every share recomputed here, never read from the
manifest, which is only checked to agree)."""

from __future__ import annotations

import difflib
import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from helpers import REPO, load_module

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
pytestmark = pytest.mark.skipif(
    not ((DATA / "pool.jsonl").is_file() and (DATA / "pool_chat.jsonl").is_file()),
    reason=f"the shared datasets (pool.jsonl, pool_chat.jsonl) are not at {DATA}")

SCRIPT = REPO / "benchmarks" / "messy_pool.py"
NAMES = ("pool.jsonl", "eval.jsonl", "holdout.jsonl", "manifest.json")
ADDED = {"id", "source", "family", "orig_source"}
POOL_ADDED = ADDED | {"corruption", "donor_id", "group", "dup_of"}
# family by original source, written apart from the builder's own mapping: first match wins
FAMILIES = [("gsm8k", "gsm8k"), ("self-instruct-seed", "self_instruct"),
            ("fastchat-dummy", "chat"),
            (r"t0/adversarial_qa_\w+_generate_question", "adversarial_qa_question"),
            (r"t0/adversarial_qa_\w+", "adversarial_qa"), (r"t0/ropes_\w+", "ropes"),
            (r"t0/kilt_tasks_hotpotqa_\w+", "hotpotqa"),
            ("t0/common_gen_sentence_to_concepts", "common_gen_concepts"),
            (r"t0/common_gen_\w+", "common_gen")]
T0_DATASETS = ("adversarial_qa_dbert", "adversarial_qa_dbidaf", "adversarial_qa_droberta",
               "common_gen", "ropes", "kilt_tasks_hotpotqa")
KINDS = ("truncated_output", "empty_like", "shuffled_output")
ONE_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]{0,19}$")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def family(orig_source: str) -> str:
    return next(f for pattern, f in FAMILIES if re.fullmatch(pattern, orig_source))


def src_id(row: dict) -> str:
    return row["id"].split("~")[0]       # <id>, <id>~<kind>, <id>[~<kind>]~dup<k>


def t0_item(row_id: str) -> tuple[str, int] | None:
    m = re.fullmatch(r"t0-(\w+)-(\d+)", row_id)
    if not m:
        return None
    dataset = next(d for d in T0_DATASETS if m[1].startswith(d + "_"))
    return dataset, int(m[2])


def prompt(row: dict) -> str:
    if "messages" in row:
        return next(m["content"] for m in row["messages"] if m["role"] == "user")
    return row["instruction"]


def answer(row: dict) -> str:
    return row["messages"][-1]["content"] if "messages" in row else row["output"]


def norm(text: str) -> str:
    return " ".join(text.lower().split())


def content(row: dict, added: set[str]) -> dict:
    return {k: v for k, v in row.items() if k not in added}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    bench = load_module(SCRIPT)
    out = tmp_path_factory.mktemp("messy")
    files = bench.build(out, DATA)
    assert {p.name for p in files.values()} == set(NAMES)
    return out


@pytest.fixture(scope="module")
def rows(built):
    return {name: read(built / f"{name}.jsonl") for name in ("pool", "eval", "holdout")}


@pytest.fixture(scope="module")
def source():
    return {r["id"]: r for r in read(DATA / "pool.jsonl") + read(DATA / "pool_chat.jsonl")}


def test_pool_size_families_and_imbalance(rows, source):
    pool = rows["pool"]
    assert 1000 <= len(pool) <= 2000
    assert len({r["id"] for r in pool}) == len(pool)
    for r in pool:
        assert r["source"] == r["family"] == family(source[src_id(r)]["source"])
        assert r["orig_source"] == source[src_id(r)]["source"] and "/" not in r["source"]
    assert len({r["source"] for r in pool}) >= 8
    # imbalance of the unique rows (copies aside) and of the pool as a selector sees it
    for counts in (Counter(r["family"] for r in pool if r["dup_of"] is None),
                   Counter(r["family"] for r in pool)):
        assert max(counts.values()) >= 10 * min(counts.values()), counts
    assert {family(source[src_id(r)]["source"]) for r in pool} >= {"gsm8k", "chat", "ropes"}
    assert not any(re.match(r"t0/(duorc|quoref)_", source[src_id(r)]["source"]) for r in pool)


def test_no_row_is_over_900_characters_or_cut_at_320_tokens(rows, tokenizer):
    # the runs use max_length 320; the builder bounds tokens without a tokenizer, so count
    # them here with the real one, in the chat template the runs use
    from evotune.trainer.data import encode, parse_row

    def chars(r):
        if "messages" in r:
            return sum(len(m["content"]) for m in r["messages"])
        return len(r["instruction"]) + len(r["input"]) + len(r["output"])
    for name, part in rows.items():
        assert max(chars(r) for r in part) <= 900, name
        tokens = max(len(encode(parse_row(r, name, "x"), tokenizer, "chat", 10 ** 6).input_ids)
                     for r in part)
        assert tokens <= 320, name


def test_clean_rows_equal_their_source_rows(rows, source):
    clean = [r for r in rows["pool"] if r["corruption"] is None and r["dup_of"] is None]
    assert clean
    for r in clean:
        assert r["id"] == src_id(r) and r["donor_id"] is None
        assert content(r, POOL_ADDED) == content(source[r["id"]], {"id", "source"})


def test_corrupted_rows_differ_from_their_original_as_their_kind_says(rows, source):
    pool = rows["pool"]
    corrupted = [r for r in pool if r["corruption"] is not None]
    assert len(corrupted) >= 0.20 * len(pool)
    base_ids = {src_id(r) for r in pool}
    kinds = Counter()
    for r in corrupted:
        orig = source[src_id(r)]
        before, after = answer(orig), answer(r)
        assert after != before and after
        # everything but the answer (and a copy's instruction) is the clean row's
        if r["dup_of"] is None:
            assert r["id"] == f"{orig['id']}~{r['corruption']}"
            if "messages" in r:
                assert r["messages"][:-1] == orig["messages"][:-1]
            else:
                assert (r["instruction"], r["input"]) == (orig["instruction"], orig["input"])
        kind = r["corruption"]
        kinds[kind] += 1
        if kind == "truncated_output":
            assert len(before) >= 50 and after == before[: len(before) // 10]
            assert r["donor_id"] is None
            continue
        donor = r["donor_id"]
        assert donor != orig["id"] and donor in base_ids and answer(source[donor]) == after
        if kind == "empty_like":
            assert ONE_WORD.match(after) and len(before.split()) >= 3
        else:
            assert kind == "shuffled_output" and norm(after) != norm(before)
    assert set(kinds) == set(KINDS)


def test_copies_are_near_edits_of_their_original_with_its_answer(rows):
    pool = rows["pool"]
    by_id = {r["id"]: r for r in pool}
    copies = [r for r in pool if r["dup_of"] is not None]
    assert len(copies) >= 0.15 * len(pool)
    groups = defaultdict(list)
    for c in copies:
        orig = by_id[c["dup_of"]]
        assert orig["dup_of"] is None and orig["group"] == orig["id"] == c["group"]
        assert re.fullmatch(re.escape(orig["id"]) + r"~dup\d+", c["id"])
        assert answer(c) == answer(orig) and c["corruption"] == orig["corruption"]
        a, b = prompt(orig), prompt(c)
        assert b != a and difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() >= 0.8
        if "messages" in c:     # the first user message is the chat row's instruction
            i = next(i for i, m in enumerate(c["messages"]) if m["role"] == "user")
            assert c["messages"][:i] + c["messages"][i + 1:] == \
                orig["messages"][:i] + orig["messages"][i + 1:]
        else:
            assert (c["input"], c["output"]) == (orig["input"], orig["output"])
        groups[orig["id"]].append(b)
    assert all(2 <= len(g) <= 9 and len(set(g)) == len(g) for g in groups.values())
    assert {r["id"] for r in pool if r["group"] is not None and r["dup_of"] is None} \
        == set(groups)


def test_eval_and_holdout_are_clean_rows_of_every_family(rows, source):
    families = {r["family"] for r in rows["pool"]}
    for name, least in (("eval", 20), ("holdout", 10)):
        counts = Counter(r["family"] for r in rows[name])
        assert set(counts) == families and min(counts.values()) >= least, (name, counts)
        for r in rows[name]:
            orig = source[r["id"]]
            assert set(r) - set(orig) == ADDED - {"id", "source"}
            assert r["source"] == r["family"] == family(orig["source"])
            assert r["orig_source"] == orig["source"]
            assert content(r, ADDED) == content(orig, {"id", "source"})


def test_pool_eval_and_holdout_share_no_row_instruction_or_t0_item(rows):
    keys = {name: ({src_id(r) for r in part}, {norm(prompt(r)) for r in part},
                   {t0_item(src_id(r)) for r in part} - {None})
            for name, part in rows.items()}
    assert all(items for _, _, items in keys.values())
    for a, b in (("pool", "eval"), ("pool", "holdout"), ("eval", "holdout")):
        for what, x, y in zip(("id", "instruction", "T0 item"), keys[a], keys[b]):
            assert not x & y, f"{a} and {b} share a {what}: {sorted(x & y)[:3]}"


def test_manifest_agrees_with_the_files(built, rows):
    info = json.loads((built / "manifest.json").read_text())
    pool = rows["pool"]
    for fam, f in info["families"].items():
        mine = [r for r in pool if r["family"] == fam]
        assert f["pool"] == len(mine)
        assert f["base"] == sum(r["dup_of"] is None for r in mine)
        assert f["clean"] == sum(r["corruption"] is None for r in mine)
        assert f["corrupted"] == {k: sum(r["corruption"] == k for r in mine) for k in KINDS}
        assert f["copies"] == sum(r["dup_of"] is not None for r in mine)
        assert f["groups"] == len({r["group"] for r in mine} - {None})
        assert (f["eval"], f["holdout"]) == tuple(
            sum(r["family"] == fam for r in rows[n]) for n in ("eval", "holdout"))
        assert (f["shrunk"] is None) == (f["base"] == f["base_target"])
    assert set(info["families"]) == {r["family"] for r in pool}
    n = len(pool)
    assert info["totals"]["pool"] == n
    assert info["shares"]["copies"] == pytest.approx(
        sum(r["dup_of"] is not None for r in pool) / n, abs=1e-4)
    assert info["shares"]["corrupted"] == pytest.approx(
        sum(r["corruption"] is not None for r in pool) / n, abs=1e-4)
    assert info["largest_to_smallest"]["ratio"] >= 10
    assert all(s.startswith("evotune-messy:") for s in info["seeds"].values())
    assert isinstance(info["version"], int)


def test_a_second_build_is_byte_identical_and_a_finished_one_is_reused(built, tmp_path):
    bench = load_module(SCRIPT)
    bench.build(tmp_path / "again", DATA)
    for name in NAMES:
        assert (tmp_path / "again" / name).read_bytes() == (built / name).read_bytes(), name
    stamps = {name: (built / name).stat().st_mtime_ns for name in NAMES}
    bench.build(built, DATA)
    assert {name: (built / name).stat().st_mtime_ns for name in NAMES} == stamps
    # another version in the manifest, or a missing file: built again, the same bytes
    manifest = tmp_path / "again" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": -1}))
    (tmp_path / "again" / "eval.jsonl").unlink()
    bench.build(tmp_path / "again", DATA)
    for name in NAMES:
        assert (tmp_path / "again" / name).read_bytes() == (built / name).read_bytes(), name


def test_the_command_line_builds_the_same_files_in_a_new_process(built, tmp_path):
    # a new interpreter has another string hash seed: the output must not depend on it
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "cli"),
                           "--data", str(DATA)], capture_output=True, text=True, timeout=120,
                          check=True)
    assert "| gsm8k |" in done.stdout and "copies" in done.stdout
    for name in NAMES:
        assert (tmp_path / "cli" / name).read_bytes() == (built / name).read_bytes(), name
