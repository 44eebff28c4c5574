"""The import order of docs/design.md ("Layers"), enforced by reading every module's imports; and
no production module over 300 lines, unless its docstring says why it is one piece (one such).

Modules are read as text (AST), never imported, so a wrong-way import is found even where it
would only run in a function. The order itself is read from docs/design.md: the document and
the check cannot drift apart.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 300
ONE_PIECE = re.compile(r"^One piece: \S", re.M)  # a docstring paragraph saying why a long module stays whole
STAGE_FOLDERS = ("runtime", "feedback", "agents", "trainer", "evals")


def package_dirs() -> dict[str, Path]:
    """`clora...` package -> folder, as pyproject maps them (the one place the mapping lives)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {package: REPO / folder for package, folder in config["package-dir"].items()}


def module_files() -> dict[str, Path]:
    """Every module of the installed package: dotted name -> file."""
    dirs = package_dirs()
    nested = [p for p in dirs if p != "clora"]
    modules: dict[str, Path] = {}
    for package, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if package == "clora" and parts and f"clora.{parts[0]}" in nested:
                continue  # a folder of that name under clora/ would be shadowed by the mapping
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def read_rules(design: str) -> dict[str, set[str]]:
    """The "Layers" table of docs/design.md: package -> the packages it may import."""
    section = design.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rules: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`clora"):
            continue
        rules[cells[0].strip("`")] = set(re.findall(r"`(clora[\w.]*)`", cells[1]))
    return rules


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int


def imports_of(module: str, source: str, known: set[str], is_package: bool) -> list[Edge]:
    """The modules `module` imports, by name (`from pkg import sub` counts as an import of `pkg.sub`
    when that is a module). Imports of the bare stage folders' names are kept too: they would be
    another namespace."""
    edges = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("clora", *STAGE_FOLDERS):
                edges.append(Edge(module, name, node.lineno))
    return edges


def layer_of(module: str, rules: dict[str, set[str]]) -> str:
    """The longest package of the rules that holds `module`."""
    owners = [p for p in rules if module == p or module.startswith(p + ".")]
    if not owners:
        raise KeyError(f"{module} is in no layer of docs/design.md")
    return max(owners, key=len)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node, or a node importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def violations(sources: dict[str, str], packages: set[str], rules: dict[str, set[str]]) -> list[str]:
    """Every import the written order forbids, and every cycle between modules or between layers."""
    known = set(sources)
    problems: list[str] = []
    module_graph: dict[str, set[str]] = {m: set() for m in sources}
    layer_graph: dict[str, set[str]] = {}
    for module, source in sources.items():
        for edge in imports_of(module, source, known, module in packages):
            if edge.target.split(".")[0] != "clora":
                problems.append(f"{module}:{edge.line} imports `{edge.target}`: outside the clora namespace")
                continue
            target = edge.target
            while target not in known and "." in target:  # `from clora.x import name` of an attribute
                target = target.rpartition(".")[0]
            if target not in known:
                problems.append(f"{module}:{edge.line} imports `{edge.target}`, which does not exist")
                continue
            if target != module:
                module_graph[module].add(target)
            source_layer, target_layer = layer_of(module, rules), layer_of(target, rules)
            if source_layer == target_layer:
                continue
            layer_graph.setdefault(source_layer, set()).add(target_layer)
            if target_layer not in rules[source_layer]:
                problems.append(f"{module}:{edge.line} imports `{edge.target}`: "
                                f"`{source_layer}` may not import `{target_layer}` (docs/design.md, Layers)")
    problems += [f"import cycle between modules: {' <-> '.join(c)}" for c in cycles(module_graph)]
    problems += [f"import cycle between layers: {' <-> '.join(c)}" for c in cycles(layer_graph)]
    return problems


@pytest.fixture(scope="module")
def tree() -> tuple[dict[str, str], set[str], dict[str, set[str]]]:
    files = module_files()
    sources = {m: p.read_text() for m, p in files.items()}
    packages = {m for m, p in files.items() if p.name == "__init__.py"}
    return sources, packages, read_rules((REPO / "docs" / "design.md").read_text())


def test_rules_cover_every_package(tree):
    sources, _, rules = tree
    assert {"clora.wire", "clora.core", "clora.runtime", "clora.feedback", "clora.agents", "clora.trainer",
            "clora.evals", "clora.stack", "clora.demo", "clora.cli"} <= rules.keys()
    for module in sources:
        layer_of(module, rules)  # raises for a module no layer holds
    assert rules["clora.wire"] == set(), "the lowest layer imports nothing of clora"
    assert "clora.runtime" not in rules["clora.core"]


def test_imports_point_down_only(tree):
    sources, packages, rules = tree
    assert len(sources) > 50
    assert violations(sources, packages, rules) == []


def test_planted_wrong_way_import_is_found(tree):
    sources, packages, rules = tree
    planted = dict(sources)
    planted["clora.core.settings"] += "\nfrom clora.trainer.loop import Trainer\n"
    problems = violations(planted, packages, rules)
    assert any(p.startswith("clora.core.settings:") and "`clora.core` may not import `clora.trainer`" in p
               for p in problems), problems
    assert any("import cycle between layers" in p for p in problems)  # trainer imports core


def test_planted_stage_cycle_and_bare_namespace_are_found(tree):
    sources, packages, rules = tree
    planted = dict(sources)
    planted["clora.feedback.replay"] += "\ndef later():\n    from clora.trainer import loop\n"
    planted["clora.agents.arithmetic"] += "\nimport runtime.gateway\n"
    problems = violations(planted, packages, rules)
    assert any("`clora.feedback` may not import `clora.trainer`" in p for p in problems), problems
    assert any(p.startswith("import cycle between modules") and "clora.feedback.replay" in p for p in problems)
    assert any("`runtime.gateway`: outside the clora namespace" in p for p in problems)


def test_planted_module_cycle_within_a_layer_is_found(tree):
    sources, packages, rules = tree
    planted = dict(sources)
    planted["clora.agents.envs"] += "\nfrom clora.agents.preference import PreferenceEnv\n"
    problems = violations(planted, packages, rules)
    assert any(p.startswith("import cycle between modules") and "clora.agents.envs" in p
               and "clora.agents.preference" in p for p in problems), problems


def oversized(sources: dict[str, str]) -> list[str]:
    """Modules over MAX_MODULE_LINES whose docstring does not say why they are one piece; and more
    than one module kept whole that way."""
    problems, whole = [], []
    for module, source in sorted(sources.items()):
        lines = len(source.splitlines())
        if lines <= MAX_MODULE_LINES:
            continue
        if ONE_PIECE.search(ast.get_docstring(ast.parse(source)) or ""):
            whole.append(module)
        else:
            problems.append(f"{module}: {lines} lines (at most {MAX_MODULE_LINES}, or a docstring paragraph "
                            "'One piece: <why>')")
    if len(whole) > 1:
        problems.append(f"more than one module kept whole past {MAX_MODULE_LINES} lines: {', '.join(whole)}")
    return problems


def test_no_module_is_over_300_lines(tree):
    sources, _, _ = tree
    assert oversized(sources) == []


def test_a_planted_long_module_is_found_unless_it_says_why_and_is_the_only_one(tree):
    sources, _, _ = tree
    body = "\n".join(f"X{i} = {i}" for i in range(296))
    long = '"""A module."""\n\n' + body + "\n"
    assert len(long.splitlines()) == 298
    assert oversized({**sources, "clora.core.long": long}) == []  # 298 lines: fine
    long += "Y = 1\nZ = 2\nW = 3\n"  # 301
    [problem] = oversized({**sources, "clora.core.long": long})
    assert problem.startswith("clora.core.long: 301 lines")
    whole = long.replace('"""A module."""', '"""A module.\n\nOne piece: its parts share one lock."""')
    assert oversized({**sources, "clora.core.long": whole}) == []
    problems = oversized({**sources, "clora.core.long": whole, "clora.core.longer": whole})
    assert problems == ["more than one module kept whole past 300 lines: clora.core.long, clora.core.longer"]
