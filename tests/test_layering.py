"""vistune's import structure, read from the source with `ast`.

Every import counts: at module level, inside functions, and under ``TYPE_CHECKING``
(a type-only import is still a dependency a reader must follow, and the cycle it closes
is one a refactoring can turn into a real one).

- No import cycle between modules. The one exemption: what ``vistune/__init__.py``
  itself imports (it re-exports the public API lazily), so modules may take
  ``__version__`` from ``vistune`` without closing a loop through the facade.
- No upward import between packages. A module's layer is its package's:

      text, files, hardware  <  data, runtime  <  model, instruct  <  train, infer, interop
      <  serve, eval  <  demo  <  cli

  A module imports its own package and packages of lower layers only. Two packages of
  one layer are independent: neither imports the other (none does today, and one that
  must has found a missing lower layer). From the ``vistune`` facade a module takes
  dunder constants only (``__version__``); anything else comes from its own module.
- No private name crosses a module: no ``from .mod import _x``, and no ``obj._x`` (or
  ``getattr(obj, "_x")``) in a module that does not itself define ``_x`` when another
  vistune module does (its function, class, module or class constant, or attribute).
  Names are matched, not types: private attributes of other libraries are not checked.

`ALLOWED` lists violations left for later, each with why; an entry that no longer
occurs fails the test, so the list only shrinks.
"""
from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "vistune"  # this checkout's source, whichever vistune is installed

# package (first part under vistune) -> layer; a module imports only its own package and lower layers
LAYERS = {
    "text": 0, "files": 0, "hardware": 0,
    "data": 1, "runtime": 1,
    "model": 2, "instruct": 2,
    "train": 3, "infer": 3, "interop": 3,
    "serve": 4, "eval": 4,
    "demo": 5,
    "cli": 6,
}

# Violations still to fix, as the test reports them, each with a comment saying why it stays.
ALLOWED: frozenset[str] = frozenset()


@dataclass
class Module:
    name: str  # dotted: vistune.train.loop
    is_package: bool
    tree: ast.Module
    where: str  # the file, under the package directory: train/loop.py
    imports: list[tuple[str, str | None, int]] = field(default_factory=list)  # (module, name or None, line)


def read_modules(src: Path) -> dict[str, Module]:
    """Every module under the package directory ``src``, with the vistune-internal imports it makes."""
    top = src.name
    mods: dict[str, Module] = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        mods[".".join(parts)] = Module(".".join(parts), is_package, ast.parse(path.read_text(), str(path)),
                                       path.relative_to(src).as_posix())
    for m in mods.values():
        package = m.name if m.is_package else m.name.rpartition(".")[0]
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Import):
                m.imports += [(a.name, None, node.lineno) for a in node.names
                              if a.name == top or a.name.startswith(top + ".")]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target != top and not target.startswith(top + "."):
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    m.imports.append((sub, None, node.lineno) if sub in mods else (target, a.name, node.lineno))
    return mods


def _short(mods: dict[str, Module], name: str) -> str:
    return mods[name].where if name in mods else name


def import_cycles(mods: dict[str, Module]) -> list[str]:
    """One line per cycle (a strongly connected set of modules): the modules and the imports that close it."""
    top = min(mods, key=len)
    graph: dict[str, dict[str, int]] = {n: {} for n in mods}
    for m in mods.values():
        if m.name == top:
            continue  # the facade's lazy re-exports (see the module docstring)
        for target, _, line in m.imports:
            if target in mods and target != m.name:
                graph[m.name].setdefault(target, line)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in found:
        edges = ", ".join(f"{_short(mods, a)}:{graph[a][b]} imports {_short(mods, b)}"
                          for a in comp for b in sorted(graph[a]) if b in comp)
        out.append(f"cycle {' <-> '.join(_short(mods, n) for n in comp)} ({edges})")
    return sorted(out)


def upward_imports(mods: dict[str, Module], layers: dict[str, int]) -> list[str]:
    """One line per import that goes up, or sideways to another package of the same layer."""
    top = min(mods, key=len)
    out = []
    for m in mods.values():
        if m.name == top:
            continue
        own = m.name.split(".")[1]
        if own not in layers:
            out.append(f"package {own!r} has no layer (add it to LAYERS)")
            continue
        for target, name, line in m.imports:
            if target == top:
                if not (name and name.startswith("__") and name.endswith("__")):
                    out.append(f"{m.where}:{line} imports {name or top} from the {top} facade, not from its module")
                continue
            other = target.split(".")[1]
            if other == own or other not in layers:
                continue
            if layers[other] >= layers[own]:
                how = "upward" if layers[other] > layers[own] else "sideways"
                out.append(f"{m.where}:{line} imports {_short(mods, target)} ({how}: {own} -> {other})")
    return sorted(set(out))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _owned_private_names(tree: ast.Module) -> set[str]:
    """Private names a module defines: functions, classes, module and class constants, attributes it sets."""
    owned = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            owned.add(node.name)
            if isinstance(node, ast.ClassDef):
                owned |= {t.id for s in node.body if isinstance(s, (ast.Assign, ast.AnnAssign))
                          for t in (s.targets if isinstance(s, ast.Assign) else [s.target]) if isinstance(t, ast.Name)}
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            owned.add(node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" \
                and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
            owned.add(str(node.args[1].value))
    for s in tree.body:
        targets = s.targets if isinstance(s, ast.Assign) else [s.target] if isinstance(s, ast.AnnAssign) else []
        owned |= {t.id for t in targets if isinstance(t, ast.Name)}
    return {n for n in owned if _private(n)}


def private_access(mods: dict[str, Module]) -> list[str]:
    """One line per private name that one module imports from, or reads on an object of, another."""
    owned = {n: _owned_private_names(m.tree) for n, m in mods.items()}
    owners: dict[str, set[str]] = {}
    for n, names in owned.items():
        for x in names:
            owners.setdefault(x, set()).add(n)
    out = []
    for m in mods.values():
        for target, name, line in m.imports:
            if name is not None and _private(name):
                out.append(f"{m.where}:{line} imports {name} from {_short(mods, target)}")
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) > 1 and \
                    isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                name = node.args[1].value
            else:
                continue
            if _private(name) and name not in owned[m.name] and name in owners:
                where = ", ".join(_short(mods, o) for o in sorted(owners[name]))
                out.append(f"{m.where}:{node.lineno} uses {name}, private to {where}")
    return sorted(set(out))


def _check(found: list[str], what: str) -> None:
    new = [f for f in found if f not in ALLOWED]
    assert not new, f"{what}:\n  " + "\n  ".join(new)


def _vistune() -> dict[str, Module]:
    mods = read_modules(SRC)
    assert "vistune" in mods and "vistune.train.loop" in mods, f"no vistune source at {SRC}"
    return mods


def test_no_import_cycles():
    _check(import_cycles(_vistune()), "import cycles")


def test_no_upward_imports():
    _check(upward_imports(_vistune(), LAYERS), "imports against the layers")


def test_no_private_names_across_modules():
    _check(private_access(_vistune()), "private names used across modules")


def test_allow_list_holds_only_violations_that_still_occur():
    mods = _vistune()
    found = set(import_cycles(mods)) | set(upward_imports(mods, LAYERS)) | set(private_access(mods))
    stale = sorted(ALLOWED - found)
    assert not stale, "allow-list entries that no longer occur (remove them):\n  " + "\n  ".join(stale)


# -- the checks themselves, on a made-up package ----------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return root / "pkg"


def test_checks_find_cycles_upward_imports_and_private_names(tmp_path):
    src = _write(tmp_path, {
        "__init__.py": "from .low.a import thing\n__version__ = '1'\n",
        "low/__init__.py": "",
        "low/a.py": """\
            from typing import TYPE_CHECKING
            from .. import __version__
            if TYPE_CHECKING:
                from .b import B
            def thing():
                from ..high import c
                return c._hidden
            _CONST = 1
            """,
        "low/b.py": "from .a import _CONST, thing\nclass B:\n    def f(self):\n        self._mine = 1\n",
        "high/__init__.py": "",
        "high/c.py": "from ..low import b\nfrom .. import thing\ndef _hidden(): pass\ndef g(o):\n"
                     "    return o._mine, o._unknown, getattr(o, '_mine'), b.B\n",
        "side/__init__.py": "",
        "side/d.py": "from ..high.c import g\n",
    })
    mods = read_modules(src)
    assert import_cycles(mods) == [
        "cycle high/c.py <-> low/a.py <-> low/b.py (high/c.py:1 imports low/b.py, low/a.py:6 imports high/c.py, "
        "low/a.py:4 imports low/b.py, low/b.py:1 imports low/a.py)"]
    assert upward_imports(mods, {"low": 0, "high": 1, "side": 1}) == [
        "high/c.py:2 imports thing from the pkg facade, not from its module",
        "low/a.py:6 imports high/c.py (upward: low -> high)",
        "side/d.py:1 imports high/c.py (sideways: side -> high)",
    ]
    assert upward_imports(mods, {"low": 0, "high": 1}) == [
        "high/c.py:2 imports thing from the pkg facade, not from its module",
        "low/a.py:6 imports high/c.py (upward: low -> high)",
        "package 'side' has no layer (add it to LAYERS)",
    ]
    assert private_access(mods) == [
        "high/c.py:5 uses _mine, private to low/b.py",
        "low/a.py:7 uses _hidden, private to high/c.py",
        "low/b.py:1 imports _CONST from low/a.py",
    ]
