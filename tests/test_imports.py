"""The package imports nothing outside its dependencies, and nothing in it imports in a circle.

DESIGN.md: "The package imports nothing outside itself, and nothing in it imports
in a circle." Two checks:

* every module of ``spanfill`` is imported in a fresh Python whose ``__import__``
  records what each spanfill module imports: at import time only the standard
  library, torch, triton, numpy and spanfill itself (and an integration's own
  package);
* every ``import`` statement of the package's source, at module level or inside a
  function, names only those or one of the optional, lazily imported packages
  (transformers, matplotlib, tqdm; ``spanfill.integrations.transformers`` imports
  transformers when imported, as it registers itself there), and the graph of imports between spanfill's
  modules has no cycle. Imports under ``if TYPE_CHECKING:`` never run and are left
  out of the graph.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import spanfill

PACKAGE = Path(spanfill.__file__).resolve().parent
ROOT = PACKAGE.parent
REQUIRED = {"torch", "triton", "numpy"}  # pyproject.toml's dependencies
OPTIONAL = {"transformers", "matplotlib", "tqdm"}  # the demo/test extras: lazy imports only
# An integration with a package needs that package as soon as it is imported.
INTEGRATES = {"spanfill.integrations.transformers": {"transformers"}}
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> source file."""
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


# ----------------------------------------------------------------------------- at import time

_RECORDER = r"""
import builtins, json, pkgutil, sys
import importlib

seen = {}
real_import = builtins.__import__

def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__") or ""
    if level == 0 and (importer == "spanfill" or importer.startswith("spanfill.")):
        seen.setdefault(name.split(".")[0], set()).add(importer)
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = recording_import
import spanfill
names = ["spanfill"] + [m.name for m in pkgutil.walk_packages(spanfill.__path__, "spanfill.")]
for name in names:
    if name == "spanfill.__main__":  # runs the command line when imported
        continue
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:  # an integration whose package is not installed
        if err.name not in {"transformers", "matplotlib", "tqdm"}:
            raise
print(json.dumps({"modules": names, "imports": {k: sorted(v) for k, v in seen.items()}}))
"""


def test_import_time_imports_are_dependencies_only() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", _RECORDER], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(found["modules"]) == set(_modules()), "pkgutil and the source tree disagree"
    allowed = STDLIB | REQUIRED | {"spanfill"}
    outside = {top: [m for m in who if top not in INTEGRATES.get(m, ())]
               for top, who in found["imports"].items() if top not in allowed}
    outside = {top: who for top, who in outside.items() if who}
    assert not outside, f"spanfill modules import these at import time: {outside}"


# ----------------------------------------------------------------------------- in the source

def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom,
             modules: set[str]) -> tuple[set[str], set[str]]:
    """(spanfill modules, outside top-level names) that one import statement loads."""
    internal: set[str] = set()
    external: set[str] = set()
    if isinstance(node, ast.Import):
        bases = [alias.name for alias in node.names]
        names: list[str] = []
    elif node.level == 0:
        bases, names = [node.module or ""], [alias.name for alias in node.names]
    else:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        bases = [".".join(package + ([node.module] if node.module else []))]
        names = [alias.name for alias in node.names]
    for base in bases:
        if base.split(".")[0] != "spanfill":
            external.add(base.split(".")[0])
            continue
        submodules = {f"{base}.{name}" for name in names} & modules
        internal |= submodules
        # `from . import ops` loads spanfill.ops, not (again) the package; any other
        # name comes from the base module itself, which must be initialised.
        if not names or len(submodules) < len(names):
            internal.add(base)
    return internal & modules, external


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """spanfill module -> spanfill modules it imports; outside name -> modules importing it."""
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    outside: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _imports(tree):
            internal, external = _targets(name, path.name == "__init__.py", node, set(modules))
            edges[name] |= internal - {name}
            for top in external:
                outside.setdefault(top, set()).add(name)
    return edges, outside


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_source_imports_only_dependencies() -> None:
    _, outside = _graph()
    allowed = STDLIB | REQUIRED | OPTIONAL
    bad = {top: sorted(who) for top, who in outside.items() if top not in allowed}
    assert not bad, f"spanfill imports packages that are not its dependencies: {bad}"


def test_no_import_cycles() -> None:
    edges, _ = _graph()
    assert "spanfill.ops" in edges["spanfill"]  # the graph sees `from .ops import ...`
    assert not _cycles(edges), f"import cycles among spanfill's modules: {_cycles(edges)}"


def test_cycle_finder_finds_a_cycle() -> None:
    """The checker itself: the old cli -> demo -> cli loop, and a longer one, are found."""
    assert _cycles({"cli": {"demo", "selfcheck"}, "demo": {"cli"}, "selfcheck": {"cli"}}) == [
        ["cli", "demo", "selfcheck"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_are_in_the_graph() -> None:
    edges, outside = _graph()
    assert "spanfill.selfcheck" in edges["spanfill.cli"]  # inside cmd_check
    assert "spanfill.demo" in outside["matplotlib"]  # inside draw
