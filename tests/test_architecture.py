"""The package's layering, read from the sources: the module import graph has no cycle and every import points
down the layers (core <- zoo <- convert <- application), so a newcomer can read the layer math without the zoo
and the zoo without the converter. Lazy imports inside functions count: they are dependencies all the same."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the module name it installs as (pyproject's package-dir).
PACKAGES = {"ndeconv": "ndeconv", "zoo": "ndeconv.zoo", "convert": "ndeconv.convert"}
THIRD_PARTY_IN_CORE = {"timm", "huggingface_hub", "onnx", "onnxruntime", "onnxscript", "matplotlib"}

CORE, ZOO, CONVERT, APP = 0, 1, 2, 3
LAYER_NAMES = {CORE: "core", ZOO: "zoo", CONVERT: "convert", APP: "application"}


def layer(module: str) -> int | None:
    """The layer of an ndeconv module; None for the package face ``ndeconv`` itself."""
    if module == "ndeconv":
        return None
    if module.startswith("ndeconv.zoo"):
        return ZOO
    if module.startswith("ndeconv.convert"):
        return CONVERT
    core = ("ndeconv.layers", "ndeconv.errors", "ndeconv.io", "ndeconv.runtime", "ndeconv.datasets",
            "ndeconv.dataset_specs", "ndeconv.onnx_defaults", "ndeconv.file_lock",
            "ndeconv._source_tree", "ndeconv._version")
    if any(module == c or module.startswith(c + ".") for c in core):
        return CORE
    return APP


def source_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Every ndeconv module ``module`` imports (``from X import y`` counts as X.y when that is a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]
            names = [n for n in names[1:] if n in known] or [target]
        else:
            continue
        for name in names:
            for top in PACKAGES:  # `import zoo` is the old, wheel-breaking spelling
                if top != "ndeconv" and (name == top or name.startswith(top + ".")):
                    found.add("!" + name)
            if name == "ndeconv" or name.startswith("ndeconv."):
                while name not in known and "." in name:
                    name = name.rpartition(".")[0]
                found.add(name)
    found.discard(module)
    return found


def third_party_of(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            tops |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            tops.add(node.module.partition(".")[0])
    return tops


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = source_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def test_every_package_is_read(graph):
    # The walk must see the three source folders, or every check below passes vacuously.
    assert {"ndeconv.layers.fast_deconv", "ndeconv.zoo._builder", "ndeconv.convert.fold", "ndeconv.cli"} <= set(graph)


def test_no_top_level_zoo_or_convert_imports(graph):
    wrong = {m: sorted(n[1:] for n in deps if n.startswith("!")) for m, deps in graph.items()}
    wrong = {m: names for m, names in wrong.items() if names}
    assert not wrong, f"import ndeconv.zoo / ndeconv.convert, not the wheel-less top-level names: {wrong}"


def test_imports_point_down_the_layers(graph):
    upward = []
    for module, deps in graph.items():
        for dep in deps:
            if dep.startswith("!"):
                continue
            if dep == "ndeconv":
                upward.append(f"{module} imports the package face `ndeconv` (import the module it needs)")
                continue
            mine, theirs = layer(module), layer(dep)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} ({LAYER_NAMES[mine]}) imports {dep} ({LAYER_NAMES[theirs]})")
    assert not upward, "\n".join(sorted(upward))


def test_core_needs_only_torch_and_numpy(graph):
    modules = source_modules()
    heavy = {m: sorted(third_party_of(p) & THIRD_PARTY_IN_CORE) for m, p in modules.items() if layer(m) == CORE}
    heavy = {m: v for m, v in heavy.items() if v}
    assert not heavy, f"the core imports application libraries: {heavy}"
    layer_math = {m: sorted(d for d in graph[m] if not d.startswith("ndeconv.layers"))
                  for m in graph if m.startswith("ndeconv.layers")}
    assert not {m: d for m, d in layer_math.items() if d}, f"ndeconv.layers imports outside itself: {layer_math}"


def test_import_graph_has_no_cycle(graph):
    # The face `ndeconv` imports downward only; leaving it out, the graph must be a DAG.
    edges = {m: {d for d in deps if not d.startswith("!") and d != "ndeconv"} for m, deps in graph.items()
             if m != "ndeconv"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))
