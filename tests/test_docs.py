"""The README matches the code: the commands CI runs, and every config key documented."""

import re

from helpers import REPO

from evotune.trainer.config import Config


def readme() -> str:
    return (REPO / "README.md").read_text()


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


def test_readme_documents_every_config_key():
    section = readme().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_.0-9]+)` \|", section, flags=re.M))
    assert documented == set(Config().flat())


def test_readme_tables_are_the_generated_ones():
    """The configuration, selector and score tables, defaults and docs too, come from the code
    (regenerate: python launch/train.py --help-config-markdown)."""
    from evotune.trainer.config import describe_markdown, scores_markdown, selectors_markdown
    text = readme()
    assert describe_markdown() in section(text, "Configuration")
    assert selectors_markdown() in section(text, "Selectors")
    assert scores_markdown() in section(text, "Scores")


def section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


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
