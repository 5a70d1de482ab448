"""The package layers (docs/architecture.md) hold: no module imports a layer above its own, and an import inside a
function is there only because it keeps start-up fast (it loads a heavy library, directly or through the module it
imports). Both are read from the source with `ast`, function-local imports included, so a wrong-way import fails CI
wherever it is written."""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("data_schemas", "align", "eval", "stages")

# Bottom to top. align's core helpers sit under eval; its entry points (CLI, pipeline) on top of everything.
LAYERS = {
    "data_schemas": 0,
    "align.core": 1,
    "eval": 2,
    "stages": 3,
    "align.entry": 4,
}
ENTRY_POINTS = {
    "align.cli",
    "align.pipeline",
    "align.data_cli",
    "align.annotate",
    "align.sweep",
    "align.__main__",
}

# Libraries whose import costs seconds (or pulls in one that does): the reason a function may import lazily.
HEAVY = {
    "torch", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed", "vllm", "matplotlib",
    "safetensors", "pyarrow", "scipy", "tensorboard", "evaluate", "PIL", "jinja2", "numpy", "pandas", "sklearn",
    "fastapi", "uvicorn", "starlette", "optuna",
}  # fmt: skip


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int | None:
    top = module.split(".")[0]
    if top == "align":
        return LAYERS["align.entry"] if module in ENTRY_POINTS else LAYERS["align.core"]
    return LAYERS.get(top)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
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


def test_no_module_imports_a_layer_above_its_own():
    wrong = []
    for name, path in _modules().items():
        own = _layer(name)
        for imported, line, _ in _imports(path):
            theirs = _layer(imported)
            if theirs is not None and own is not None and theirs > own:
                wrong.append(
                    f"{path.relative_to(ROOT)}:{line}: {name} (layer {own}) imports {imported} ({theirs})"
                )
    assert not wrong, "imports against the layer order (docs/architecture.md):\n" + "\n".join(wrong)


def test_function_local_imports_only_where_they_keep_start_up_fast():
    needless = []
    for path in _modules().values():
        for imported, line, local in _imports(path):
            if local and not _heavy(imported) and imported.split(".")[0] not in sys.builtin_module_names:
                needless.append(f"{path.relative_to(ROOT)}:{line}: {imported} (light: import it at the top)")
    assert not needless, "function-local imports of light modules:\n" + "\n".join(needless)


def test_the_checker_sees_a_wrong_way_import(tmp_path):
    # the checker itself: a function-local import of a stage from eval is found
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from stages.sft import run\n")
    assert _imports(bad) == [("stages.sft", 2, True)]
    assert (
        _layer("stages.sft") > _layer("eval.gates") > _layer("align.manifest") > _layer("data_schemas.config")
    )
    assert _layer("align.cli") > _layer("stages.sft")
