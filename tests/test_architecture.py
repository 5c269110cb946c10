"""The house plan, enforced: no import cycle in the package, no oversized module without a stated
reason, a pure-PyTorch core, and methods as peers that register themselves.

The import graph is read from the source (every ``import`` / ``from ... import`` anywhere in a
file, module level or inside functions: a lazy import still ties two modules together), so the
test needs nothing installed and cannot be fooled by import order.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "floral_flwr"
MAX_LINES = 400
SIZE_REASON = "# size:"  # a module over MAX_LINES says why in a comment starting like this


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file; a package's ``__init__`` stands for the package."""
    mods = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def import_graph(mods: dict[str, Path], prefix: str = "floral_flwr") -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in the file)."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # `from pkg import submodule` depends on the submodule, not on the package
                subs = [f"{base}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in mods] or [base]
            else:
                continue
            for t in targets:
                r = resolve(t)
                if r and r != m and r.startswith(prefix):
                    graph[m].add(r)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_cycles(tmp_path: Path) -> None:
    """The detector itself: a lazy (function-level) import closing a loop is a cycle."""
    pkg = tmp_path / "floral_flwr"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from floral_flwr.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import x\n")
    (pkg / "c.py").write_text("import floral_flwr.a\n")
    (pkg / "d.py").write_text("from floral_flwr import a\n")  # not in the loop
    found = cycles(import_graph(module_files(pkg)))
    assert found == [["floral_flwr.a", "floral_flwr.c", "floral_flwr.sub.b"]]


def test_no_import_cycles() -> None:
    found = cycles(import_graph(module_files()))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_oversized_module_without_a_reason() -> None:
    too_big = []
    for name, f in sorted(module_files().items()):
        lines = f.read_text().splitlines()
        if len(lines) > MAX_LINES and not any(ln.startswith(SIZE_REASON) for ln in lines[:5]):
            too_big.append(f"{f.relative_to(ROOT)} ({len(lines)} lines)")
    assert not too_big, f"modules over {MAX_LINES} lines without a '{SIZE_REASON} ...' line at the top: {too_big}"


def test_the_core_imports_no_flower() -> None:
    """``floral_flwr.floral`` is plain PyTorch: no flwr import in its source, and importing it
    loads no flwr module (checked in a fresh interpreter)."""
    core = PACKAGE / "floral"
    for f in core.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "flwr" or n.startswith("flwr.") for n in names), f"{f}: imports {names}"
    code = ("import sys, floral_flwr.floral as c; "
            "bad = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')); "
            "print(bad); sys.exit(1 if bad else 0)")
    # the package face (floral_flwr/__init__) must not pull flwr in either
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"importing the core loaded flwr modules: {res.stdout} {res.stderr[-500:]}"


def test_local_loops_import_no_method() -> None:
    graph = import_graph(module_files())
    assert not {m for m in graph["floral_flwr.methods.training"] if m.startswith("floral_flwr.methods")}


def test_client_package_is_only_flower_glue() -> None:
    """No local training loop or method lives in ``client/``: it holds message handlers, the
    ClientApp factory, the per-process setup, the private-state store, the secure-aggregation
    glue around Flower's mod and fault injection."""
    names = {f.stem for f in (PACKAGE / "client").glob("*.py")}
    assert names == {"__init__", "app", "handlers", "setup", "state_store", "secure", "faults"}, names


SHARED = {"__init__", "base", "training", "multimodel"}


def test_every_method_module_registers_itself_with_a_documented_spec() -> None:
    import importlib

    from floral_flwr.config import METHODS
    from floral_flwr.methods import METHOD_SPECS

    by_module: dict[str, list[str]] = {}
    for name, spec in METHOD_SPECS.items():
        assert spec.build is not None and spec.description and spec.federated and spec.private, name
        module = spec.build.__module__
        by_module.setdefault(module, []).append(name)
    method_files = {f.stem for f in (PACKAGE / "methods").glob("*.py")} - SHARED
    assert {m.rpartition(".")[2] for m in by_module} == method_files  # every file registers; one home each
    for module in by_module:
        doc = importlib.import_module(module).__doc__ or ""
        assert "ederated" in doc and ("rivate" in doc or "local" in doc), f"{module}: docstring says what is shared"
    # the run-config validator knows exactly the registered methods
    assert set(METHODS) == set(METHOD_SPECS)


def test_registering_a_method_twice_is_refused() -> None:
    from floral_flwr.methods import METHOD_SPECS, MethodSpec, register

    spec = METHOD_SPECS["fedavg"]
    with pytest.raises(ValueError, match="registered twice"):
        register(MethodSpec("fedavg", "x", uses_adaptors=False, build=spec.build))
    with pytest.raises(ValueError, match="no build function"):
        register(MethodSpec("not-a-method", "x", uses_adaptors=False))
    assert "not-a-method" not in METHOD_SPECS
