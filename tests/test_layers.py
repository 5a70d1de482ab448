"""The package layers (docs/architecture.md) are the folders, bottom to top:

    data_schemas/  core/  lib/  eval/  stages/  align/

Every module of the product lives in exactly one of these folders (`align/__init__.py`, which holds only the
version, and `align/__main__.py`, the `python -m align` entry, are the top floor's), and the test reads each
module's layer from the folder it sits in. It fails on:
- an import of a higher layer (function-local imports included: a wrong-way import fails wherever it is written);
- an import cycle between modules, in any layer;
- a stage module importing another stage module (stages share code through lib/, never through each other);
- a function-local import that does not keep start-up fast (it must load a heavy library, directly or through the
  module it imports).
All of it is read from the source with `ast`; nothing is imported.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent

# The floors, bottom to top: the only hand-written list, and it names folders.
FLOORS = ("data_schemas", "core", "lib", "eval", "stages", "align")

# Libraries whose import costs seconds (or pulls in one that does): the reason a function may import lazily.
HEAVY = {
    "torch", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed", "vllm", "matplotlib",
    "safetensors", "pyarrow", "scipy", "tensorboard", "evaluate", "PIL", "jinja2", "numpy", "pandas", "sklearn",
    "fastapi", "uvicorn", "starlette", "optuna", "statsmodels", "rouge_score", "nltk",
    "wandb", "mlflow",  # optional trackers: imported only where a config asks for them
}  # fmt: skip


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p.relative_to(ROOT)): p for top in FLOORS for p in (ROOT / top).rglob("*.py")}


def _floor_of_path(rel: str) -> int | None:
    """The floor of a file (a path relative to the root): the deepest floor folder that holds it."""
    top = rel.split("/")[0]
    return FLOORS.index(top) if top in FLOORS and "/" in rel else None


def _resolve(module: str) -> str | None:
    """The product module an import names (`from pkg.mod import name` where name is not a module: pkg.mod), or
    None for anything else: the standard library, third parties."""
    modules = _modules()
    while module and module not in modules:
        module = module.rpartition(".")[0]
    return module or None


def _layer(module: str) -> int | None:
    """The floor of a module of the product (None for anything else)."""
    found = _resolve(module)
    return None if found is None else _floor_of_path(_modules()[found].relative_to(ROOT).as_posix())


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of a file; `from pkg import mod` names the
    module pkg.mod when pkg/mod.py exists."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = _modules()
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                subs = [
                    f"{child.module}.{a.name}" for a in child.names if f"{child.module}.{a.name}" in modules
                ]
                found.extend((s, child.lineno, in_function) for s in subs)
                if len(subs) < len(child.names):
                    found.append((child.module, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


@cache
def _heavy(module: str) -> bool:
    """Whether importing `module` loads a heavy library at import time (through its top-level imports)."""
    top = module.split(".")[0]
    if top in HEAVY:
        return True
    modules = _modules()
    if module not in modules:
        return False  # the standard library and light third-party packages
    return any(_heavy(m) for m, _, local in _imports(modules[module]) if not local)


def test_every_package_is_a_floor():
    """A new package of the product takes its place in FLOORS (and in the wheel) before anything can import it."""
    packages = {d.name for d in ROOT.iterdir() if (d / "__init__.py").exists()} - {"tests"}
    assert packages == set(FLOORS), f"packages that are not floors: {packages ^ set(FLOORS)}"
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {p.rstrip("*") for p in wheel["include"]} == set(FLOORS)


def test_no_module_imports_a_layer_above_its_own():
    wrong = []
    for name, path in _modules().items():
        own = _layer(name)
        for imported, line, _ in _imports(path):
            theirs = _layer(imported)
            if theirs is not None and own is not None and theirs > own:
                wrong.append(
                    f"{path.relative_to(ROOT)}:{line}: {name} ({FLOORS[own]}) imports {imported} ({FLOORS[theirs]})"
                )
    assert not wrong, "imports against the layer order (docs/architecture.md):\n" + "\n".join(wrong)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in _modules().items():
        deps = {_resolve(m) for m, _, _ in _imports(path)}
        graph[name] = {d for d in deps if d is not None and d != name and not name.startswith(d + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "modules that import each other (directly or around a circle):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def test_no_stage_imports_another_stage():
    stage_modules = {
        n
        for n, p in _modules().items()
        if p.parent == ROOT / "stages" and p.stem not in ("__init__", "registry")
    }
    wrong = [
        f"{_modules()[n].relative_to(ROOT)}:{line}: imports {m}"
        for n in sorted(stage_modules)
        for m, line, _ in _imports(_modules()[n])
        if _resolve(m) in stage_modules - {n}
    ]
    assert not wrong, "stages share code through lib/, not through each other:\n" + "\n".join(wrong)


def test_function_local_imports_only_where_they_keep_start_up_fast():
    needless = []
    for path in _modules().values():
        for imported, line, local in _imports(path):
            if local and not _heavy(imported) and imported.split(".")[0] not in sys.builtin_module_names:
                needless.append(f"{path.relative_to(ROOT)}:{line}: {imported} (light: import it at the top)")
    assert not needless, "function-local imports of light modules:\n" + "\n".join(needless)


def test_the_checker_sees_a_wrong_way_import_and_a_cycle(tmp_path):
    # the checker itself: a function-local import of a stage from eval is found, floors come from the folders
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from stages.sft import run\n")
    assert _imports(bad) == [("stages.sft", 2, True)]
    assert (
        _layer("align.cli")
        > _layer("stages.sft")
        > _layer("eval.gates")
        > _layer("lib.rollout")
        > _layer("core.manifest")
        > _layer("data_schemas.config")
    )
    assert _layer("core.manifest.atomic_write_json") == _layer("core.manifest")  # a name, not a module
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
