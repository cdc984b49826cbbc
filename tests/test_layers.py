"""The package imports one way: every module of qvec_jax sits on a layer and imports only
from lower layers or its own, with no cycle. Parsed with ``ast``, nothing is imported.

The rule: a module on layer L may import a module on a layer <= L. Imports within one
layer are allowed (``pretrained`` reads our own checkpoints, ``cli`` drives ``demo``),
but the module graph as a whole must have no cycle. Every import counts, also those
inside functions (a lazy import is still a dependency). Subpackages (``data/``,
``cli/``, ...) take their top-level name's layer; the package root ``qvec_jax`` is the
public facade, on the top layer with the CLI. A module missing from ``LAYERS`` fails the
test: a new module must be given its layer here (and in docs/architecture.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "qvec_jax"

LAYERS: dict[str, int] = {
    # 1 core: the method's primitives and tiny utilities
    "paths": 1, "quant": 1, "trees": 1, "config": 1, "files": 1,
    # 2 trees of arrays: packing, QV merges (merge/: methods, spec, topk), the model
    "packing": 2, "merge": 2, "models": 2,
    # 3 storage and data: foreign weights, our checkpoints, packed exports, QV banks, tasks,
    # devices
    "pretrained": 3, "checkpoints": 3, "export": 3, "bank": 3, "data": 3, "sharding": 3,
    # 4 computation on models: evaluation, training (train/: loop, step, workdir), GPTQ,
    # lambda selection, the data-free quantizer a user deploys (recipe)
    "evaluate": 4, "train": 4, "gptq": 4, "select": 4, "recipe": 4,
    # 5 the transfer grid (grid/: run, store, inputs, cells, extras, gptq) and the study
    # (study/: run, stats)
    "grid": 5, "study": 5,
    # 6 the report of a grid
    "report": 6,
    # 7 entry points: the CLI, the demo, and the package root (the public facade)
    "cli": 7, "demo": 7, "": 7,
}  # fmt: skip


def _modules() -> dict[str, Path]:
    """``{"qvec_jax.data.registry": path}`` for every ``.py`` under the package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = ("qvec_jax", *path.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _component(module: str) -> str:
    """``"qvec_jax.data.registry"`` -> ``"data"``; the root ``"qvec_jax"`` -> ``""``."""
    return module.split(".")[1] if "." in module else ""


def _resolve(name: str) -> str | None:
    """The most specific module of the package that ``name`` denotes (or None if outside)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def imports_of(module: str, source: str | None = None) -> set[str]:
    """Every package module that ``module`` (or ``source`` as if it were it) imports,
    anywhere in its code."""
    if source is None:
        source = MODULES[module].read_text()
    tree = ast.parse(source, filename=str(MODULES[module]))
    here = module if _is_package(module) else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import mod`` depends on mod; ``from mod import name`` on mod
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]  # fmt: skip
        else:
            continue
        found |= {m for m in map(_resolve, names) if m and m != module}
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    unknown = sorted(m for m in MODULES if _component(m) not in LAYERS)
    assert not unknown, (
        f"modules without a layer: {unknown}; add them to LAYERS in tests/test_layers.py "
        "and to docs/architecture.md"
    )


def test_layer_table_names_only_existing_modules():
    present = {_component(m) for m in MODULES}
    assert set(LAYERS) <= present, f"LAYERS names missing modules: {set(LAYERS) - present}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_higher_layer(module):
    layer = LAYERS.get(_component(module))
    if layer is None:
        pytest.skip("no layer (test_every_module_has_a_layer fails)")
    upward = sorted(
        f"{m} (layer {LAYERS[_component(m)]})"
        for m in GRAPH[module]
        if LAYERS.get(_component(m), 0) > layer
    )
    assert not upward, f"{module} (layer {layer}) imports upward: {', '.join(upward)}"


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    # A package's __init__ may import its own submodules; a submodule importing its
    # package back (or any longer loop) is a cycle.
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_relative_from_and_lazy_imports():
    """The parser itself, on a made-up source for the module ``quant``."""
    src = (
        "import numpy as np\n"
        "from .grid.run import run_grid\n"
        "from . import trees\n"
        "import qvec_jax.data.registry\n"
        "def f():\n"
        "    from qvec_jax import report, files\n"
        "    from qvec_jax.models.vit import ViT\n"
    )
    assert imports_of("qvec_jax.quant", src) == {
        "qvec_jax.grid.run",
        "qvec_jax.trees",
        "qvec_jax.data.registry",
        "qvec_jax.report",
        "qvec_jax.files",
        "qvec_jax.models.vit",
    }
    src = "from .layouts import POS\nfrom qvec_jax import VIT_RULE\n"  # a name of the root
    assert imports_of("qvec_jax.pretrained", src) == {"qvec_jax.pretrained.layouts", "qvec_jax"}
    assert _resolve("qvec_jax.data.registry.get_task") == "qvec_jax.data.registry"
    assert _resolve("numpy") is None
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_functions_stay_small(module):
    """A module over 400 lines is a package asking to exist; a function over 60 lines
    hides its steps. Split them, as ``grid/``, ``train/`` and ``merge/`` were."""
    source = MODULES[module].read_text()
    n = source.count("\n")
    assert n <= MAX_MODULE_LINES, f"{module}: {n} lines > {MAX_MODULE_LINES}; split it"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{module}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def test_subsystems_are_packages():
    """The grid, training and merging each live in one package (no prefixed modules)."""
    for package, parts in {
        "grid": {"run", "store", "inputs", "cells", "extras", "gptq", "gptq_bank"},
        "train": {"loop", "step", "workdir", "feed", "options", "records"},
        "merge": {"methods", "spec", "topk"},
        "study": {"run", "stats"},
    }.items():
        assert {m.rpartition(".")[2] for m in MODULES if m.startswith(f"qvec_jax.{package}.")} == (
            parts
        )
    flat = [m for m in MODULES if m.count(".") == 1 and m.split(".")[1].startswith(
        ("grid_", "train_", "merge_", "transfer", "topk"))]  # fmt: skip
    assert not flat, f"prefixed modules outside their package: {flat}"
