"""The docs match the code: the commands CI runs, the generated reference tables, every relative
link, and a README and docs pages for users (short, no dates, no commit ids); the benchmark
results open with a summary of every section."""

import re
import unicodedata

from helpers import REPO

from evotune.trainer.config import Config

DOCS = REPO / "docs"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
# a commit-like id: 7 to 40 hex digits with at least one letter and one digit in them
COMMIT = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")


def readme() -> str:
    return (REPO / "README.md").read_text()


def page(name: str) -> str:
    return (DOCS / name).read_text()


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = next(line for block in bash_blocks(readme()) for line in block.splitlines()
                        if "pytest" in line)
    ci = (REPO / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_readme_main_command_installs_pinned_torch_first_and_runs_the_quickstart():
    main = bash_blocks(readme())[0].strip()
    assert main.index("pip install torch==2.13.0") < main.index("pip install -e .")
    assert main.endswith("deepspeed launch/train.py --config configs/quickstart.yaml")


def test_configuration_page_documents_every_config_key():
    documented = set(re.findall(r"^\| `([a-z_.0-9]+)` \|", page("configuration.md"), flags=re.M))
    assert documented == set(Config().flat())


def test_reference_tables_are_the_generated_ones():
    """The configuration, selector and score tables, defaults and docs too, come from the code
    (regenerate: python launch/train.py --help-config-markdown)."""
    from evotune.trainer.config import describe_markdown, scores_markdown, selectors_markdown
    assert describe_markdown() in page("configuration.md")
    assert selectors_markdown() in page("selectors.md")
    assert scores_markdown() in page("scores.md")


def test_readme_is_short():
    assert len(readme().splitlines()) <= 300


def test_undated_patterns_catch_dates_and_commit_ids():
    """The two patterns below find what they are for, and leave alone what a page may hold."""
    assert DATE.search("measured on 2026-12-01") and COMMIT.search("at commit 004dac9,")
    assert COMMIT.search("9b1c983") and COMMIT.search("ca3b4e1") and COMMIT.search("a" * 39 + "1")
    for fine in ("1000000 rows", "deadbeef", "fp16", "2026 rows", "sha256", "int64"):
        assert not DATE.search(fine) and not COMMIT.search(fine), fine


def user_pages():
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def test_readme_and_docs_hold_no_dates_or_commit_ids():
    assert len(user_pages()) >= 10
    for path in user_pages():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not DATE.search(line), f"{path.name}:{n}: a date: {line}"
            assert not COMMIT.search(line), f"{path.name}:{n}: a commit id: {line}"


def prose(text: str) -> str:
    """``text`` without fenced blocks and code spans, where brackets are not links."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def links(text: str) -> list[str]:
    return re.findall(r"!?\[[^\]\n]*\]\(([^)\s]+)\)", prose(text))


def anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    title = title.strip().lower()
    kept = "".join(c for c in title if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_anchor_matches_githubs_rules():
    assert anchor("Does RDS+ match LESS at a fraction of its cost?") == \
        "does-rds-match-less-at-a-fraction-of-its-cost"
    assert anchor("What does `loss_excess` add to a round?") == "what-does-loss_excess-add-to-a-round"
    assert anchor("The pool's rows and tokens at scale") == "the-pools-rows-and-tokens-at-scale"
    assert anchors("# A\n```\n# not a heading\n```\n## B c\n") == {"a", "b-c"}


def test_every_relative_link_resolves():
    """Every relative link and image in the README, docs/ and RESULTS.md names a file that
    exists, and a heading there when it has an anchor."""
    checked = 0
    for path in [*user_pages(), RESULTS]:
        text = path.read_text()
        for target in links(text):
            if re.match(r"[a-z]+:", target):
                continue                        # https:, mailto:
            file, _, frag = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            assert dest.exists(), f"{path.name}: {target}: no such file"
            if frag:
                assert frag in anchors(dest.read_text()), f"{path.name}: {target}: no heading"
            checked += 1
    assert checked >= 50


def test_link_check_sees_broken_links_and_ignores_code():
    assert links("[a](x.md) `[b](y.md)` ![c](d.png)\n```\n[e](f.md)\n```\n") == ["x.md", "d.png"]


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_results_open_with_a_summary_of_every_section():
    """RESULTS.md's summary has one row per section, in order, each linking to it with a
    command; every section has one provenance line and a table."""
    text = RESULTS.read_text()
    found = sections(text)
    assert next(iter(found)) == "Summary"
    rows = [line for line in found["Summary"].splitlines() if line.startswith("| [")]
    targets = [re.match(r"\| \[[^\]]+\]\(#([^)]+)\)", row).group(1) for row in rows]
    questions = [title for title in found if title != "Summary"]
    assert targets == [anchor(q) for q in questions]
    for row in rows:
        command = row.rstrip(" |").rsplit("|", 1)[1]
        for script in re.findall(r"benchmarks/(\w+\.py)", command):
            assert (REPO / "benchmarks" / script).exists(), row
    for title, body in found.items():
        if title == "Summary":
            continue
        provenance = [line for line in body.splitlines() if line.startswith("Measured: ")]
        assert len(provenance) == 1 and DATE.search(provenance[0]), title
        assert re.search(r"^\|---", body, flags=re.M), title


def test_every_dependency_has_an_upper_bound_that_the_tested_install_meets():
    """pyproject.toml bounds each dependency from above (a new major or minor release cannot
    break a fresh install silently), and the versions installed here, the ones the suite
    tests, lie inside every range."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] +
            project["optional-dependencies"]["dev"]]
    assert len(reqs) >= 10
    for req in reqs:
        assert any(s.operator in ("<", "<=", "~=", "==") for s in req.specifier), req
        installed = importlib.metadata.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), (req, installed)
