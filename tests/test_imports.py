"""The package's modules import in one direction only.

Two checks, because they catch different things. The static one reads every `import`
statement in the source, function-level ones included, so an import cycle cannot hide behind
a lazy import inside a function. The dynamic one imports each module *first* (before any
other llmscratch module, the package `__init__` not run) in a fresh interpreter, which is
what a user's `from llmscratch.x import y` does and where a top-level cycle would fail.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import llmscratch

PKG_DIR = Path(llmscratch.__file__).parent
PKG = "llmscratch"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG_DIR.rglob("*.py"))}
# `python -m llmscratch` runs the CLI when imported; it imports only `cli`
IMPORTABLE = sorted(set(MODULES) - {"llmscratch.__main__"})


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute module name of a (possibly relative) `from ... import`."""
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(name: str, path: Path) -> set[str]:
    """The llmscratch modules `name` imports anywhere in its source (not its parent packages,
    which Python imports implicitly and which are not a design choice)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.level, node.module)
            # `from . import bench` imports the submodule llmscratch.bench
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for t in targets:
            while t and t not in MODULES:  # llmscratch.tokenizer.bpe.X -> the module that holds X
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):
                found.add(t)
    return found


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of module names (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_accepts_a_dag():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_imports_resolve_to_modules():
    assert _resolve("llmscratch.checkpoints.run", False, 2, "hf.decoders") == "llmscratch.hf.decoders"
    assert _resolve("llmscratch.checkpoints.run", False, 1, "hub") == "llmscratch.checkpoints.hub"
    assert _resolve("llmscratch.finetune.loop", False, 2, "train") == "llmscratch.train"
    assert _resolve("llmscratch.tokenizer", True, 1, "bpe") == "llmscratch.tokenizer.bpe"


def test_no_import_cycle_even_through_function_level_imports():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    assert "llmscratch.models.gpt" in graph["llmscratch.checkpoints.run"]  # the scan sees imports at all
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


_IMPORT_EACH_FIRST = r"""
import importlib, sys, types
pkg_dir, names = sys.argv[1], sys.argv[2:]
failed = []
for name in names:
    for loaded in [m for m in sys.modules if m == "llmscratch" or m.startswith("llmscratch.")]:
        del sys.modules[loaded]
    if name != "llmscratch":
        # the package without running its __init__, so `name` is the first of ours imported
        stub = types.ModuleType("llmscratch")
        stub.__path__ = [pkg_dir]
        sys.modules["llmscratch"] = stub
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_first_in_a_fresh_interpreter():
    # One interpreter for all (third-party packages like torch stay loaded between modules:
    # they are not ours and importing torch 40 times would take minutes); before each module,
    # every llmscratch module is dropped from sys.modules so each one starts from nothing.
    names = IMPORTABLE
    assert len(names) > 20
    r = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST, str(PKG_DIR), *names],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"modules that fail when imported first:\n{r.stdout}{r.stderr[-2000:]}"


# The layers, lowest first: a module may import from its own layer and the layers before it,
# never from a later one. ARCHITECTURE.md draws the same list.
LAYERS = [
    ("foundation", ["llmscratch.errors", "llmscratch.utils"]),
    ("text", ["llmscratch.tokenizer"]),
    ("data", ["llmscratch.data"]),
    ("models", ["llmscratch.models"]),
    ("kernels", ["llmscratch.kernels"]),
    ("hf", ["llmscratch.hf"]),
    ("checkpoints", ["llmscratch.checkpoints"]),
    ("decoding", ["llmscratch.decoding"]),
    ("train", ["llmscratch.train"]),
    ("finetune", ["llmscratch.finetune"]),
    ("evaluation", ["llmscratch.evaluation"]),
    ("serve", ["llmscratch.serve"]),
    ("cli", ["llmscratch.cli", "llmscratch.__main__"]),
]


def _layer_of(module: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def _upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, targets in sorted(graph.items()):
        here = _layer_of(name)
        if here is None:  # the package itself: the public API, above every layer
            continue
        for t in sorted(targets):
            there = _layer_of(t)
            if there is not None and there > here:
                bad.append(f"{name} ({LAYERS[here][0]}) imports {t} ({LAYERS[there][0]})")
    return bad


def test_upward_import_check_catches_a_lower_layer_importing_a_higher_one():
    graph = {"llmscratch.models.gpt": {"llmscratch.train.loop"}, "llmscratch.train.loop": {"llmscratch.models.gpt"}}
    assert _upward_imports(graph) == ["llmscratch.models.gpt (models) imports llmscratch.train.loop (train)"]


def test_every_module_belongs_to_a_layer():
    loose = [m for m in MODULES if m != "llmscratch" and _layer_of(m) is None]
    assert loose == [], f"modules outside every layer (add them to a layer folder): {loose}"


def test_no_layer_imports_a_higher_one():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    bad = _upward_imports(graph)
    assert bad == [], "upward imports:\n" + "\n".join(bad)


def _private_imports() -> list[str]:
    """`from <another module> import _name` anywhere in the package."""
    bad = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith(PKG)):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        bad.append(f"{name}: from {'.' * node.level}{node.module or ''} import {alias.name}")
    return bad


def test_no_module_imports_another_modules_private_names():
    bad = _private_imports()
    assert bad == [], "private names imported across modules (make them public in their layer):\n" + "\n".join(bad)


MAX_LINES = 500


def test_no_module_over_500_lines():
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines (split them by what they own): {long}"


def test_openmp_threads_spin_briefly_unless_the_user_says_otherwise():
    """Importing llmscratch before torch (as the CLI does) sets libgomp's spin count, which
    benchmarks/omp_wait.py measured 2-8x faster on a busy machine and the same on a quiet
    one; an OMP_WAIT_POLICY or GOMP_SPINCOUNT of the user's is left alone."""
    import os
    import subprocess
    import sys

    probe = "import llmscratch, os; print(os.environ.get('GOMP_SPINCOUNT'))"
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}

    def spincount(**env) -> str:
        return subprocess.run([sys.executable, "-c", probe], env={**clean, **env}, capture_output=True,
                              text=True, check=True).stdout.strip()

    assert spincount() == "30000"
    assert spincount(GOMP_SPINCOUNT="5") == "5"
    assert spincount(OMP_WAIT_POLICY="ACTIVE") == "None"
