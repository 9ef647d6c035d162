"""A messy instruction pool for selection benchmarks, with clean eval and holdout rows.

Imbalanced task families, corrupted answers and near-duplicate groups, built (standard library
only, no tokenizer, deterministic) from ``../shared/datasets``
(``pool.jsonl`` and ``pool_chat.jsonl``) into an output folder:

``pool.jsonl``     the messy pool: per family a base of unique clean rows (sizes ``SIZES``, from
                   360 GSM8K problems down to 22-32 rows of the smallest families), 24% of the
                   base rows corrupted (``KINDS``: the answer truncated to a tenth, replaced by
                   another row's one-word answer, or by another row's answer), then light copies
                   of seeded originals (2-9 copies each, about 20% of the final pool), shuffled.
                   Extra fields: ``family`` (= ``source``, no "/" in it), ``orig_source``,
                   ``corruption`` (null or the kind), ``donor_id`` (the base row whose answer a
                   corrupted row took, else null), ``group`` (a duplicate group's original id on
                   every member, null outside groups), ``dup_of`` (the original's id on copies).
``eval.jsonl``     24 clean rows per family (20-23 where a family is short);
``holdout.jsonl``  10 clean rows per family (for a reference model);
``manifest.json``  counts per family, the shares, the seeds, ``VERSION``.

No row of eval or holdout shares an id, a normalised instruction (lowercase, whitespace
collapsed; a chat row's instruction is its first user message) or a T0 item (dataset or
adversarial_qa subset, row index: all templates of a dataset hold the same items) with the pool
or with the other split. Every row has at most ``MAX_CHARS`` characters of text (instruction,
input and output, or all message contents; about 256 tokens) and at most ``MAX_EST_TOKENS``
tokens by a tokenizer-free estimate (``est_tokens``: digit-heavy GSM8K solutions need more than
one token per four characters), after corruption and edits too, so that no row is cut at the
runs' max_length of 320 (at most 304 tokens in SmolLM2's chat template).

    python benchmarks/messy_pool.py --out runs/messy_pool
    from messy_pool import build            # from a sibling script (benchmarks/ on sys.path)

Attribution: the files are built, never committed. Their rows keep the licenses of their
sources as listed in ``../shared/datasets/SOURCES.md`` (``orig_source`` names each row's):
GSM8K MIT, self-instruct seed tasks and FastChat Apache-2.0, common_gen MIT, ropes CC BY 4.0,
and adversarial_qa and kilt_tasks_hotpotqa (HotpotQA) CC BY-SA 4.0: a file that ships those
rows must stay CC BY-SA and credit the sources (filter on ``family`` to leave them out).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import random
import re
import sys
from pathlib import Path

VERSION = 1
DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
SEED = "evotune-messy"         # every random step: random.Random(f"{SEED}:{step}")
MAX_CHARS = 900                # ≈ 256 tokens; the runs use max_length 320, nothing is cut
MAX_EST_TOKENS = 305           # est_tokens(): digit-heavy rows fit 900 characters but not 320
HOLDOUT, EVAL, EVAL_MIN = 10, 24, 20
# family -> pool base size (unique clean rows before corruption and copies), imbalanced on
# purpose; a family that cannot fill its size is shrunk and the manifest says so
SIZES = {"gsm8k": 360, "adversarial_qa": 130, "hotpotqa": 100, "ropes": 80, "common_gen": 64,
         "self_instruct": 48, "adversarial_qa_question": 40, "common_gen_concepts": 32,
         "chat": 32}
MIN_RATIO = 10                 # largest family's base ≥ 10 × the smallest's
CORRUPT_SHARE = 0.24           # of the base rows
COPY_SHARE = 0.20              # of the final pool
COPIES = (2, 9)                # copies per duplicate group
KINDS = ("truncated_output", "empty_like", "shuffled_output")   # as in pool_noisy.jsonl
ONE_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]{0,19}$")
PREFIXES = ("Question: ", "Q: ", "Task: ", "Please help: ")
SUFFIXES = (" Thanks.", " Please answer.")
EDITS = ("space", "case", "swap", "prefix", "suffix")
NEAR = 0.8                     # a copy's instruction: difflib ratio ≥ NEAR to the original's
FILES = ("pool", "eval", "holdout", "manifest")
STEPS = ("split:<family>", "corrupt-rows", "corrupt-kinds", "copies", "copy-edits",
         "pool-order")


def rng(step: str) -> random.Random:
    return random.Random(f"{SEED}:{step}")


def family_of(source: str) -> str | None:
    """The family of a row of ``pool.jsonl`` / ``pool_chat.jsonl`` by its ``source``; None for
    sources left out (duorc and quoref: their prompts are about 500 tokens)."""
    if source in ("gsm8k", "self-instruct-seed", "fastchat-dummy"):
        return {"gsm8k": "gsm8k", "self-instruct-seed": "self_instruct",
                "fastchat-dummy": "chat"}[source]
    template = source.removeprefix("t0/")
    if template.startswith("adversarial_qa_"):
        return ("adversarial_qa_question" if template.endswith("_generate_question")
                else "adversarial_qa")
    if template == "common_gen_sentence_to_concepts":
        return "common_gen_concepts"
    for prefix, family in (("common_gen_", "common_gen"), ("ropes_", "ropes"),
                           ("kilt_tasks_hotpotqa_", "hotpotqa")):
        if template.startswith(prefix):
            return family
    return None


def item_key(row_id: str) -> str | None:
    """A T0 row's underlying item, ``<dataset or adversarial_qa subset>:<row index>`` (from its
    id ``t0-<template>-<index>``); None for other rows."""
    m = re.fullmatch(r"t0-(.+)-(\d{3})", row_id)
    if not m:
        return None
    template, index = m.groups()
    if template.startswith("adversarial_qa_"):     # dbert, dbidaf, droberta: different items
        dataset = "_".join(template.split("_")[:3])
    else:
        dataset = next((d for d in ("common_gen", "ropes", "kilt_tasks_hotpotqa")
                        if template.startswith(d + "_")), template)
    return f"{dataset}:{index}"


def instruction(row: dict) -> str:
    """The instruction; a chat row's first user message."""
    if "messages" in row:
        return next(m["content"] for m in row["messages"] if m["role"] == "user")
    return row["instruction"]


def answer(row: dict) -> str:
    """The answer; a chat row's last assistant message."""
    if "messages" in row:
        return row["messages"][-1]["content"]
    return row["output"]


def texts(row: dict) -> list[str]:
    """The row's texts: instruction, input and output, or every message's content."""
    if "messages" in row:
        return [m["content"] for m in row["messages"]]
    return [row["instruction"], row.get("input", ""), row["output"]]


def est_tokens(text: str) -> float:
    """A tokenizer-free estimate of tokens, meant to run high: 1.5 per word (a run of letters)
    and 1 per other non-space character. Characters alone are not enough: digits and symbols
    are about one token each in SmolLM2's tokenizer, and GSM8K's ``<<48/2=24>>`` annotations
    are full of them (42 usable rows of at most 900 characters take 321-443 tokens in the chat
    template).

    A row's estimate is the sum over its texts (size()); every usable row with an estimate of
    at most MAX_EST_TOKENS takes at most 304 tokens in the chat template, about 30 of them the
    template's (measured with SmolLM2's tokenizer on the shared data of SOURCES.md)."""
    return 1.5 * len(re.findall(r"[A-Za-z]+", text)) + len(re.findall(r"[^A-Za-z\s]", text))


def size(row: dict) -> tuple[int, float]:
    """Characters and estimated tokens (est_tokens) of all the row's texts."""
    parts = texts(row)
    return sum(map(len, parts)), sum(map(est_tokens, parts))


def fits(chars: int, tokens: float) -> bool:
    return chars <= MAX_CHARS and tokens <= MAX_EST_TOKENS


def squash(text: str) -> str:
    """Lowercase, whitespace collapsed: how instructions and answers are compared."""
    return " ".join(text.lower().split())


def _with_answer(row: dict, text: str) -> dict:
    if "messages" in row:
        return {**row, "messages": row["messages"][:-1]
                + [{**row["messages"][-1], "content": text}]}
    return {**row, "output": text}


def _with_instruction(row: dict, text: str) -> dict:
    if "messages" in row:
        first = next(i for i, m in enumerate(row["messages"]) if m["role"] == "user")
        messages = [dict(m) for m in row["messages"]]
        messages[first]["content"] = text
        return {**row, "messages": messages}
    return {**row, "instruction": text}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _write(path: Path, rows: list[dict]) -> None:
    # as the shared files: UTF-8, but the three line separators str.splitlines() knows are
    # escaped, so a record is always one line
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    for ch in ("\u2028", "\u2029", "\u0085"):
        text = text.replace(ch, f"\\u{ord(ch):04x}")
    path.write_text(text, encoding="utf-8")


def _row(raw: dict, family: str) -> dict:
    """A source row with ``source`` = its family and the original source kept."""
    content = {k: v for k, v in raw.items() if k not in ("id", "source")}
    return {"id": raw["id"], "source": family, "family": family, "orig_source": raw["source"],
            **content}


# ----------------------------------------------------------------------------- splits

def candidates(data_dir: Path) -> dict[str, list[dict]]:
    """Every usable source row per family (those that fit; chat rows that end with an
    assistant turn), in file order."""
    out: dict[str, list[dict]] = {f: [] for f in SIZES}
    for raw in _read(data_dir / "pool.jsonl") + _read(data_dir / "pool_chat.jsonl"):
        family = family_of(raw["source"])
        if family is None or not fits(*size(raw)):
            continue
        if "messages" in raw and raw["messages"][-1]["role"] != "assistant":
            continue
        out[family].append(_row(raw, family))
    return out


def deal(cands: dict[str, list[dict]]) -> dict[str, dict[str, list[dict]]]:
    """Per family: holdout, eval and pool-base rows, dealt by a seeded shuffle.

    Rows that share a T0 item or a normalised instruction form one unit (union-find across
    families: common_gen and common_gen_concepts share items), and a unit goes to one split
    only. Eval and holdout take one row per unit, the pool one row per instruction. The
    smallest families deal first (they have no rows to spare); a short family keeps
    ``EVAL_MIN`` eval rows and shrinks its pool. Raises ValueError when a family cannot fill
    its holdout or ``EVAL_MIN`` eval rows.
    """
    parent: dict[str, str] = {}

    def find(k: str) -> str:
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def keys(row: dict) -> list[str]:
        item = item_key(row["id"])
        return [f"inst:{squash(instruction(row))}"] + ([f"item:{item}"] if item else [])

    for rows in cands.values():
        for row in rows:
            first, *rest = keys(row)
            for k in rest:
                parent[find(k)] = find(first)
    unit = {row["id"]: find(keys(row)[0]) for rows in cands.values() for row in rows}

    assigned: dict[str, str] = {}      # unit -> split
    out = {}
    for family in sorted(SIZES, key=lambda f: (SIZES[f], f)):
        rows = cands[family][:]
        rng(f"split:{family}").shuffle(rows)
        used: set[str] = set()

        def take(split: str, n: int) -> list[dict]:
            got, seen = [], set()
            for row in rows:
                u = unit[row["id"]]
                k = u if split != "pool" else squash(instruction(row))
                if len(got) == n:
                    break
                if row["id"] in used or assigned.get(u, split) != split or k in seen:
                    continue
                seen.add(k)
                used.add(row["id"])
                assigned[u] = split
                got.append(row)
            return got

        holdout = take("holdout", HOLDOUT)
        free = len({unit[r["id"]] for r in rows
                    if r["id"] not in used and assigned.get(unit[r["id"]], "eval") == "eval"})
        evals = take("eval", max(EVAL_MIN, min(EVAL, free - SIZES[family])))
        if len(holdout) < HOLDOUT or len(evals) < EVAL_MIN:
            raise ValueError(f"family {family}: only {len(holdout)} holdout and {len(evals)} "
                             f"eval rows (need {HOLDOUT} and {EVAL_MIN}) from "
                             f"{len(rows)} usable rows")
        out[family] = {"holdout": holdout, "eval": evals, "pool": take("pool", SIZES[family])}
    return {f: out[f] for f in SIZES}


# ----------------------------------------------------------------------------- mess

def corrupt(base: list[dict]) -> list[dict]:
    """``base`` with ``round(CORRUPT_SHARE * len(base))`` seeded rows corrupted (same order).

    The kind is uniform among those that fit the row: ``truncated_output`` (answer ≥ 50
    characters: its first ``len // 10``), ``empty_like`` (answer ≥ 3 words: another base row's
    one-word answer), ``shuffled_output`` (another base row's answer that differs case- and
    whitespace-insensitively and with which the row still fits). Donors are clean base rows of
    any family; the corrupted row's id is ``<id>~<kind>``.
    """
    chosen = rng("corrupt-rows").sample(range(len(base)), round(CORRUPT_SHARE * len(base)))
    pick = rng("corrupt-kinds")
    one_word = [r for r in base if ONE_WORD.match(answer(r))]
    sizes = {r["id"]: (size(r), (len(answer(r)), est_tokens(answer(r)))) for r in base}
    out = [{**r, "corruption": None, "donor_id": None} for r in base]
    for i in chosen:
        row = base[i]
        text = answer(row)
        (chars, tokens), (a_chars, a_tokens) = sizes[row["id"]]
        donors = {"shuffled_output": [
            d for d in base if d["id"] != row["id"] and squash(answer(d)) != squash(text)
            and fits(chars - a_chars + sizes[d["id"]][1][0],
                     tokens - a_tokens + sizes[d["id"]][1][1])]}
        if len(text.split()) >= 3:
            donors["empty_like"] = [d for d in one_word
                                    if d["id"] != row["id"] and answer(d) != text]
        kinds = [k for k in KINDS
                 if (len(text) >= 50 if k == "truncated_output" else donors.get(k))]
        if not kinds:
            continue
        kind = pick.choice(kinds)
        donor = pick.choice(donors[kind]) if kind != "truncated_output" else None
        new = text[: len(text) // 10] if donor is None else answer(donor)
        out[i] = {**_with_answer(row, new), "id": f"{row['id']}~{kind}", "corruption": kind,
                  "donor_id": donor and donor["id"]}
    return out


def light_edit(text: str, kind: str, r: random.Random) -> str:
    """``text`` with one light edit of ``kind`` (one of EDITS): a whitespace run doubled or
    collapsed, the first letter's case flipped, two adjacent letters swapped inside a word
    (its first and last letters stay), a neutral prefix or a neutral suffix."""
    if kind == "space":
        runs = list(re.finditer(r"\s+", text))
        if not runs:
            return text + " "
        m = r.choice(runs)
        run = m.group()
        return text[: m.start()] + (run[0] if len(run) > 1 else run * 2) + text[m.end():]
    if kind == "case":
        i = next((i for i, ch in enumerate(text) if ch.isalpha()), None)
        return text if i is None else text[:i] + text[i].swapcase() + text[i + 1:]
    if kind == "swap":
        words = list(re.finditer(r"[A-Za-z]{4,}", text))
        if not words:
            return text
        w = r.choice(words)
        i = r.randrange(w.start() + 1, w.end() - 2)
        return text[:i] + text[i + 1] + text[i] + text[i + 2:]
    if kind == "prefix":
        return r.choice(PREFIXES) + text
    if kind == "suffix":
        return text + r.choice(SUFFIXES)
    raise ValueError(f"unknown edit {kind!r}; expected one of {EDITS}")


def near(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def duplicate(rows: list[dict], forbidden: set[str]) -> list[dict]:
    """``rows`` (marked ``group`` / ``dup_of``) plus copies of seeded originals, 2-9 each, until
    the copies are about COPY_SHARE of the result.

    A copy is its original (a corrupted one included) with one or two light edits to the
    instruction, the answer unchanged, id ``<original id>~dup<k>``. Edits are drawn again until
    the copy differs from the original and the group's other copies, stays NEAR to the
    original, still fits, and its normalised instruction is neither another pool row's nor
    in ``forbidden`` (eval and holdout); an original that cannot get its copies this way (too
    short to edit lightly) is passed over.
    """
    target = round(COPY_SHARE / (1 - COPY_SHARE) * len(rows))
    order = rows[:]
    r, edits = rng("copies"), rng("copy-edits")
    r.shuffle(order)
    taken = {squash(instruction(row)) for row in rows}
    groups: dict[str, list[dict]] = {}
    n_copies = 0
    for orig in order:
        if n_copies >= target:
            break
        k = r.randint(*COPIES)
        base_text = instruction(orig)
        seen = {base_text}
        copies = []
        for _ in range(50 * k):
            if len(copies) == k:
                break
            text = base_text
            # in EDITS order: a prefix or suffix comes last, so the other edit never lands
            # inside it ("Tsak: ")
            for kind in sorted(edits.sample(EDITS, edits.choice((1, 2))), key=EDITS.index):
                text = light_edit(text, kind, edits)
            copy = _with_instruction(orig, text)
            s = squash(text)
            if (text in seen or near(base_text, text) < NEAR or not fits(*size(copy))
                    or s in forbidden or (s in taken and s != squash(base_text))):
                continue
            seen.add(text)
            copies.append({**copy, "id": f"{orig['id']}~dup{len(copies) + 1}",
                           "group": orig["id"], "dup_of": orig["id"]})
        if len(copies) == k:
            groups[orig["id"]] = copies
            taken |= {squash(instruction(c)) for c in copies}
            n_copies += k
    out = [{**row, "group": row["id"] if row["id"] in groups else None, "dup_of": None}
           for row in rows]
    return out + [c for row in rows for c in groups.get(row["id"], [])]


# ----------------------------------------------------------------------------- build

def manifest(splits: dict, pool: list[dict], cands: dict, data_dir: Path) -> dict:
    """Counts per family and in total, the shares and the seeds."""
    families = {}
    for family, parts in splits.items():
        rows = [r for r in pool if r["family"] == family]
        base = len(parts["pool"])
        distinct = len({squash(instruction(r)) for r in cands[family]})
        families[family] = {
            "orig_sources": sorted({r["orig_source"] for r in cands[family]}),
            "usable_rows": len(cands[family]),
            "base_target": SIZES[family],
            "base": base,
            "shrunk": (None if base == SIZES[family] else
                       f"{base} of {SIZES[family]}: {len(cands[family])} rows that fit "
                       f"({MAX_CHARS} characters, {MAX_EST_TOKENS} estimated tokens), "
                       f"{distinct} distinct instructions; "
                       f"{len(parts['holdout'])} went to holdout and {len(parts['eval'])} to "
                       f"eval"),
            "pool": len(rows),
            "clean": sum(r["corruption"] is None for r in rows),
            "corrupted": {k: sum(r["corruption"] == k for r in rows) for k in KINDS},
            "copies": sum(r["dup_of"] is not None for r in rows),
            "groups": sum(r["group"] == r["id"] for r in rows),
            "eval": len(parts["eval"]),
            "holdout": len(parts["holdout"]),
        }
    n = len(pool)
    totals = {k: sum(f[k] for f in families.values())
              for k in ("base", "pool", "clean", "copies", "groups", "eval", "holdout")}
    totals["corrupted"] = {k: sum(f["corrupted"][k] for f in families.values()) for k in KINDS}
    corrupted = sum(totals["corrupted"].values())
    bases = {f: v["base"] for f, v in families.items()}
    largest, smallest = max(bases, key=bases.get), min(bases, key=bases.get)
    return {
        "version": VERSION,
        "built_by": "benchmarks/messy_pool.py",
        "sources": {name: hashlib.sha256((data_dir / name).read_bytes()).hexdigest()
                    for name in ("pool.jsonl", "pool_chat.jsonl")},
        "seeds": {step: f"{SEED}:{step}" for step in STEPS},
        "max_chars": MAX_CHARS,
        "max_est_tokens": MAX_EST_TOKENS,
        "families": families,
        "totals": totals,
        "shares": {"copies": round(totals["copies"] / n, 4),
                   "corrupted": round(corrupted / n, 4),
                   "corrupted_base": round(sum(r["corruption"] is not None and r["dup_of"] is None
                                               for r in pool) / totals["base"], 4)},
        "largest_to_smallest": {"largest": largest, "smallest": smallest,
                                "ratio": round(bases[largest] / bases[smallest], 2),
                                "counted_on": "base rows"},
    }


def build(out_dir: Path, data_dir: Path | None = None) -> dict[str, Path]:
    """Write ``pool.jsonl``, ``eval.jsonl``, ``holdout.jsonl`` and ``manifest.json`` under
    ``out_dir`` from ``data_dir`` (default: ``../shared/datasets`` beside the repo) and return
    their paths by name (``pool``, ``eval``, ``holdout``, ``manifest``).

    Deterministic: the same data give byte-identical files. Nothing is rebuilt when all four
    files exist and the manifest's version is VERSION. Raises FileNotFoundError without the
    source files, ValueError when the data cannot give the splits or the imbalance.
    """
    out_dir, data_dir = Path(out_dir), Path(data_dir or DATA)
    files = {name: out_dir / (f"{name}.json" if name == "manifest" else f"{name}.jsonl")
             for name in FILES}
    if all(f.is_file() for f in files.values()):
        try:
            if json.loads(files["manifest"].read_text()).get("version") == VERSION:
                return files
        except json.JSONDecodeError:
            pass
    for name in ("pool.jsonl", "pool_chat.jsonl"):
        if not (data_dir / name).is_file():
            raise FileNotFoundError(f"{data_dir / name} not found (see SOURCES.md beside it)")
    cands = candidates(data_dir)
    splits = deal(cands)
    sizes = {f: len(p["pool"]) for f, p in splits.items()}
    if max(sizes.values()) < MIN_RATIO * min(sizes.values()):
        raise ValueError(f"pool base sizes {sizes}: the largest is under {MIN_RATIO}x the "
                         f"smallest")
    held = [r for p in splits.values() for r in p["eval"] + p["holdout"]]
    pool = duplicate(corrupt([r for p in splits.values() for r in p["pool"]]),
                     {squash(instruction(r)) for r in held})
    rng("pool-order").shuffle(pool)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(files["pool"], pool)
    for name in ("eval", "holdout"):
        _write(files[name], [r for p in splits.values() for r in p[name]])
    # the manifest last: an interrupted build has none and is built again
    files["manifest"].write_text(json.dumps(manifest(splits, pool, cands, data_dir), indent=1)
                                 + "\n")
    return files


def table(info: dict) -> str:
    """The manifest's counts as a Markdown table, with the shares below it."""
    lines = ["| family | base (target) | pool | clean | truncated | one-word | shuffled | "
             "copies (groups) | eval | holdout |", "|---" * 10 + "|"]
    for family, f in [*info["families"].items(), ("total", info["totals"])]:
        target = f" ({f['base_target']})" if "base_target" in f else ""
        lines.append(f"| {family} | {f['base']}{target} | {f['pool']} | {f['clean']} | "
                     + " | ".join(str(f["corrupted"][k]) for k in KINDS)
                     + f" | {f['copies']} ({f['groups']}) | {f['eval']} | {f['holdout']} |")
    s, ratio = info["shares"], info["largest_to_smallest"]
    lines.append(f"\ncopies {s['copies']:.1%} of the pool; corrupted {s['corrupted']:.1%} "
                 f"({s['corrupted_base']:.1%} of the base rows); {ratio['largest']} / "
                 f"{ratio['smallest']} = {ratio['ratio']}x (base rows)")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the pool, eval, holdout, manifest")
    p.add_argument("--data", default=str(DATA), help="the shared datasets folder")
    args = p.parse_args()
    files = build(Path(args.out), Path(args.data))
    print(table(json.loads(files["manifest"].read_text())))
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
