"""The layers of ``trainer/``: no module imports itself back through others, the
foundations (file writes and hashing, seeding and RNG) import nothing of evotune, and the
layers listed in ``trainer/__init__.py`` are the ones the imports follow.

The rule that keeps ``selectors/`` pure (nothing of ``evotune.trainer``, no model libraries)
is tested in ``tests/selectors/test_registry.py``.
"""

import ast
import re
from pathlib import Path

from helpers import REPO

PACKAGE = "evotune.trainer"
FOUNDATIONS = ("evotune.trainer.files", "evotune.trainer.seeding")


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` under ``root`` (a package's ``__init__.py``
    is the package itself)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join([package, *parts])] = path
    return found


def imported_names(path: Path, module: str, modules=()) -> list[str]:
    """Every module a file imports, as absolute dotted names, wherever the import sits (module
    level, in a function, under ``if TYPE_CHECKING``). ``from P import x`` names ``P.x`` when
    that is one of ``modules``, else ``P``; relative forms are resolved against ``module``."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module
            if node.level:
                # ``from . import x`` in a.b.c means a.b; in a.b's __init__.py it means a.b.
                base = module.split(".")
                base = base[:len(base) - (node.level - 1 if is_package else node.level)]
                source = ".".join(base + ([node.module] if node.module else []))
            found += [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source
                      for a in node.names]
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the modules of ``modules`` it imports (itself excluded)."""
    return {name: {m for m in imported_names(path, name, modules) if m in modules and m != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per group of modules that import each other (Tarjan's
    strongly connected components), groups in order of their first name; [] when there is
    none."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph.get(v, ()):
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    return [shortest_cycle(graph, group) for group in sorted(groups, key=min)]


def shortest_cycle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """The shortest way from the group's first module round to itself (breadth first)."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        step = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    step.append(w)
        frontier = step
    raise AssertionError(f"{sorted(group)} is not a cycle")


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def trainer_modules() -> dict[str, Path]:
    return module_files(REPO / "trainer", PACKAGE)


def layers_of(doc: str) -> dict[str, int]:
    """The numbered list of a layers note: each module named in item n (in double backticks) → n."""
    layers, n = {}, None
    for line in doc.splitlines():
        if item := re.match(r"(\d+)\. ", line):
            n = int(item.group(1))
        elif not line.strip():
            n = None
        if n is not None:
            for name in re.findall(r"``([\w.]+)``", line):
                assert name not in layers, f"{name} is listed twice"
                layers[name] = n
    return layers


def layer_violations(graph: dict[str, set[str]], layers: dict[str, int], package: str
                     ) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a module imports from a later layer. A subpackage's
    layer covers its modules (``passes`` → ``passes.forward``)."""
    def layer(module: str) -> int:
        name = module[len(package) + 1:]
        return layers[name] if name in layers else layers[name.split(".")[0]]
    return sorted((a, b) for a, deps in graph.items() if a != package for b in deps
                  if b != package and layer(b) > layer(a))


def test_trainer_has_no_import_cycle():
    modules = trainer_modules()
    assert len(modules) >= 20 and set(FOUNDATIONS) <= set(modules)
    graph = import_graph(modules)
    assert sum(len(e) for e in graph.values()) >= 50      # the reading found the imports
    found = cycles(graph)
    assert found == [], "import cycles under trainer/: " + "; ".join(
        " -> ".join(c) for c in found)


def test_foundations_import_nothing_of_evotune():
    modules = trainer_modules()
    bad = [(name, m) for name in FOUNDATIONS for m in imported_names(modules[name], name)
           if m == "evotune" or m.startswith("evotune.")]
    assert bad == []


def test_the_layers_note_lists_every_module_and_the_imports_follow_it():
    modules = trainer_modules()
    layers = layers_of(ast.get_docstring(ast.parse(modules[PACKAGE].read_text())))
    short = {m[len(PACKAGE) + 1:] for m in modules if m != PACKAGE}
    unlisted = sorted(m for m in short if m not in layers and m.split(".")[0] not in layers)
    assert unlisted == [], "add these to the layers in trainer/__init__.py's docstring"
    assert sorted(set(layers) - short) == []             # every listed name is a module
    assert {f"{PACKAGE}.{m}" for m, n in layers.items() if n == 1} == set(FOUNDATIONS)
    assert layer_violations(import_graph(modules), layers, PACKAGE) == []


def test_config_and_the_score_registry_do_not_import_data_parsing():
    # Loading and checking a config reads the score registry (names, options, checks), which
    # must not pull in data parsing, the model or training.
    graph = import_graph(trainer_modules())
    names = {m[len(PACKAGE) + 1:] for m in reachable(graph, f"{PACKAGE}.config")}
    assert "scores" in names
    assert names & {"data", "tokens", "targets", "model", "fit", "engine", "loop"} == set()
    assert reachable({"a": {"b"}, "b": {"c", "a"}, "c": set()}, "a") == {"a", "b", "c"}


def test_the_layer_check_flags_an_import_from_a_later_layer():
    doc = ("Layers:\n\n1. ``base`` (an item may run on\n   the next line), ``io``;\n"
           "2. ``sub``, ``run``.\n\n``later`` is after the list.\n")
    assert layers_of(doc) == {"base": 1, "io": 1, "sub": 2, "run": 2}
    graph = {"p": set(), "p.base": {"p"}, "p.io": {"p.base", "p.sub.a"}, "p.sub.a": {"p.run"},
             "p.run": {"p.io", "p.sub.a"}}
    assert layer_violations(graph, layers_of(doc), "p") == [("p.io", "p.sub.a")]


def test_the_reading_resolves_every_form_of_import(tmp_path):
    # A hand-made package: each form of import names the module a reader would say it does.
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for f in ("__init__.py", "a.py", "b.py", "sub/__init__.py", "sub/c.py"):
        (pkg / f).write_text("")
    (pkg / "a.py").write_text("from evotune.trainer import b\n"
                              "def f():\n    from evotune.trainer.sub.c import thing\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\nfrom ..b import g\nimport os\n")
    (pkg / "sub" / "__init__.py").write_text("from . import c\nfrom .c import thing\n")
    (pkg / "b.py").write_text("from evotune.trainer.sub import c\nimport evotune.trainer\n")
    graph = import_graph(module_files(pkg, PACKAGE))
    t = "evotune.trainer"
    assert graph == {t: set(),
                     f"{t}.a": {f"{t}.b", f"{t}.sub.c"},
                     f"{t}.b": {t, f"{t}.sub.c"},
                     f"{t}.sub": {f"{t}.sub.c"},
                     f"{t}.sub.c": {f"{t}.a", f"{t}.b"}}
    # a -> b -> sub.c -> a and, shorter, a -> sub.c -> a (through the function-level import).
    assert cycles(graph) == [[f"{t}.a", f"{t}.sub.c", f"{t}.a"]]


def test_the_cycle_finder_names_each_cycle():
    # Two cycles (a -> b -> c -> a, with a longer way round through d; e -> e) and a chain
    # into them (x -> a) that is not part of any.
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": {"c"}, "e": {"e"}, "x": {"a"},
             "y": set()}
    assert cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set(), "x": {"a", "c"}}) == []
    # The cycle this test was written against: config -> scores -> data -> sources -> state.
    old = {"config": {"scores", "sources"}, "scores": {"data"}, "data": {"sources"},
           "sources": {"state"}, "state": {"config", "sources"}}
    assert cycles(old) == [["config", "sources", "state", "config"]]
