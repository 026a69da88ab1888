"""The library's shape: layers that import only downwards, no cycles, Metaflow only in flow/.

Read from the source with ``ast`` (imports inside functions count too: a lazy import
that reaches up a layer is still a dependency), and checked once more by importing
the lower layers in a fresh interpreter.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import bincount

LIBRARY = Path(bincount.__file__).resolve().parent
# Lowest first. A module may import its own layer and any layer listed before it.
LAYERS = ["validation", "aws", "data", "model", "serving", "sagemaker", "flow", "audit", "monitor", "cli"]
WITHOUT_METAFLOW = ["validation", "aws", "data", "model", "serving", "sagemaker"]


def module_name(path: Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(LIBRARY.rglob("*.py")) if "__pycache__" not in p.parts}


def imported_names(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, anywhere in it, as absolute dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            # ``from bincount.serving import handler`` imports the module bincount.serving.handler
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def internal_imports() -> dict[str, set[str]]:
    """Module -> the bincount modules it imports."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {n for n in imported_names(path, package) if n in mods and n != name}
    return graph


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else None  # bincount itself: below everything


def test_every_module_is_in_a_layer():
    stray = [m for m in modules() if m != "bincount" and m.split(".")[1] not in LAYERS]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_no_module_reaches_up_a_layer():
    upward = [(m, dep) for m, deps in internal_imports().items() for dep in deps
              if layer_of(dep) is not None and layer_of(m) is not None and layer_of(dep) > layer_of(m)]
    assert not upward, f"imports that reach up a layer (module, imported): {upward}"


def test_no_import_cycles():
    graph = internal_imports()
    # Package __init__ files are imported with their modules; only module-to-module edges form cycles.
    graph = {m: {d for d in deps if not (m.startswith(d + "."))} for m, deps in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("layer", WITHOUT_METAFLOW)
def test_lower_layers_never_import_metaflow(layer):
    offenders = [m for m, p in modules().items() if layer_of(m) == LAYERS.index(layer)
                 and any(n == "metaflow" or n.startswith("metaflow.") for n in imported_names(p, m))]
    assert not offenders, f"{layer} modules that import metaflow: {offenders}"


def test_lower_layers_import_without_metaflow_in_a_fresh_interpreter():
    names = [m for m in modules() if layer_of(m) is not None and LAYERS[layer_of(m)] in WITHOUT_METAFLOW]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m == 'metaflow' or m.startswith('metaflow.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {WITHOUT_METAFLOW} loaded metaflow: {out}"
