"""The package's layers: imports flow downward only, there are no cycles, reference/ stays apart.

The layer order is the table below. A module may import modules of its own layer or of lower
layers, never of a higher one. The checker reads source with `ast`, so it sees every import
statement: at module level, inside functions (picoGPT-style lazy imports), under `if`/`try`.

How an import becomes an edge of the module graph (names are dotted, `minilm_edge.runtime.model`;
a package's `__init__.py` is the package's own name, `minilm_edge.runtime`):
  - relative imports are resolved against the importing module's package, as Python does;
  - `from P import n`: if `P.n` is a module of the package (`from ..kernels import policy`), the
    edge goes to that submodule; otherwise `n` is a name defined in P and the edge goes to P;
  - `import a.b.c`: the edge goes to the deepest prefix that is a module of the package;
  - the parent packages that Python also runs on the way (`minilm_edge/__init__.py` before any
    submodule) are not edges: every submodule would otherwise "import" the top-level API.
"""
from __future__ import annotations

import ast
import dataclasses
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "minilm_edge"
REFERENCE = "reference"

# The first name below `minilm_edge` -> its layer; lower layers never import higher ones.
LAYERS = {
    "errors": 0,      # typed exceptions; imports nothing of ours
    "version": 0,     # the package version, recorded by quantized folders
    "formats": 1,     # on-disk formats: safetensors, the name table, q4, AWQ GEMM, GGUF, folders
    "kernels": 2,     # Numba kernels and their policy
    "runtime": 3,     # config, checkpoint, linears, forward pass, tokenizer, generation, evaluation
    "quant": 4,       # the AWQ quantizer and exporter (built on the runtime, never used by it)
    "app": 5,         # model store, describe, bench, the CLI
    "__init__": 6,    # the package's public API (minilm_edge/__init__.py)
    "__main__": 6,    # `python -m minilm_edge`
}


@dataclasses.dataclass(frozen=True)
class Import:
    source: str       # importing module, e.g. "minilm_edge.runtime.model"
    target: str       # imported module of the package, e.g. "minilm_edge.kernels.ops_f32"
    where: str        # "minilm_edge/runtime/model.py:15"
    statement: str    # the import as written

    def __str__(self):
        return f"{self.where}: `{self.statement}` ({self.source} -> {self.target})"


# ---- reading the package -------------------------------------------------------------------------

def module_files(root: Path, package: str) -> dict[str, Path]:
    """Every module of `package` under `root`, by dotted name (a package's __init__ is the package)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imported_names(module: str, path: Path) -> list[tuple[str, int, str]]:
    """(absolute dotted name, line, statement) for every import in the file, relative ones resolved.
    `from P import n` yields "P.n" (which may be a module or a name in P; see `resolve`)."""
    text = path.read_text(encoding="utf-8")
    found = []
    for node in ast.walk(ast.parse(text, filename=str(path))):
        statement = ast.get_source_segment(text, node) if isinstance(node, (ast.Import, ast.ImportFrom)) else None
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, statement) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = _package_of(module, path).split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found += [(f"{base}.{alias.name}" if alias.name != "*" else base, node.lineno, statement)
                      for alias in node.names]
    return sorted(found, key=lambda item: item[1])


def resolve(name: str, modules) -> str | None:
    """The deepest module of the package that `name` names or lies in; None outside the package."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def module_graph(root: Path, package: str = PACKAGE) -> dict[str, list[Import]]:
    """Module -> its imports of other modules of the same package (every module is a key; one
    Import per statement and target, however many names the statement takes from it)."""
    modules = module_files(root, package)
    graph = {}
    for module, path in modules.items():
        edges = {}
        for name, line, statement in imported_names(module, path):
            target = resolve(name, modules)
            if target is not None:
                where = f"{path.relative_to(root).as_posix()}:{line}"
                edges.setdefault((target, where), Import(module, target, where, statement))
        graph[module] = list(edges.values())
    return graph


def foreign_imports(root: Path, folder: str, foreign: str) -> list[str]:
    """Imports of the top-level package `foreign` anywhere in the files of `root/folder`."""
    modules = module_files(root, folder)
    return [f"{path.relative_to(root).as_posix()}:{line}: `{statement}`"
            for module, path in modules.items()
            for name, line, statement in imported_names(module, path)
            if name.split(".")[0] == foreign]


# ---- the checks ----------------------------------------------------------------------------------

def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1] if len(parts) > 1 else "__init__")


def cycles(graph: dict[str, list[Import]]) -> list[list[Import]]:
    """For each strongly connected component of more than one module, and each self-import: the
    imports that stay inside it (Tarjan's algorithm; the graph has a few dozen nodes)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for edge in graph[v]:
            w = edge.target
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or v not in component:
                component.add(stack.pop())
            on_stack.difference_update(component)
            components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for component in components:
        inside = [e for v in sorted(component) for e in graph[v] if e.target in component]
        if len(component) > 1 or inside:
            found.append(inside)
    return found


def upward_imports(graph: dict[str, list[Import]]) -> list[Import]:
    return [e for edges in graph.values() for e in edges
            if None not in (layer_of(e.source), layer_of(e.target)) and layer_of(e.target) > layer_of(e.source)]


def unlayered_modules(graph: dict[str, list[Import]]) -> list[str]:
    return sorted(m for m in graph if layer_of(m) is None)


def runtime_imports_of_quant(graph: dict[str, list[Import]]) -> list[Import]:
    runtime, quant = f"{PACKAGE}.runtime", f"{PACKAGE}.quant"
    return [e for edges in graph.values() for e in edges
            if (e.source == runtime or e.source.startswith(runtime + "."))
            and (e.target == quant or e.target.startswith(quant + "."))]


def report(title: str, items) -> str:
    def lines(item):
        return "\n".join(f"    {e}" for e in item) if isinstance(item, list) else f"  {item}"
    return title + "\n" + "\n".join(lines(item) for item in items)


# ---- the current tree ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def graph():
    return module_graph(REPO)


def test_graph_covers_every_layer_and_known_imports(graph):
    """Guards the checks below against passing on an empty or unresolved graph."""
    assert {layer_of(m) for m in graph} >= set(LAYERS.values())
    assert f"{PACKAGE}.kernels.ops_f32" in {e.target for e in graph[f"{PACKAGE}.runtime.model"]}
    assert f"{PACKAGE}.runtime.model" in {e.target for e in graph[PACKAGE]}


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, report("import cycles (each group lists the imports that close it):", found)


def test_imports_follow_the_layer_order(graph):
    found = upward_imports(graph)
    order = " < ".join(sorted(LAYERS, key=LAYERS.get))
    assert not found, report(f"imports against the layer order {order}:", found)


def test_every_module_is_in_a_layer(graph):
    found = unlayered_modules(graph)
    assert not found, report(f"modules in no layer (add them to LAYERS in {Path(__file__).name}):", found)


def test_runtime_never_imports_quant(graph):
    """The runtime runs quantized checkpoints; it must not need the quantizer to do so."""
    found = runtime_imports_of_quant(graph)
    assert not found, report("the runtime imports the quantizer:", found)


def test_package_and_reference_stay_apart():
    """reference/ is the tests' oracle: it must not share code with what it checks."""
    assert (REPO / REFERENCE / "llama.py").is_file()
    found = foreign_imports(REPO, PACKAGE, REFERENCE) + foreign_imports(REPO, REFERENCE, PACKAGE)
    assert not found, report("imports between minilm_edge and reference:", found)


# ---- the checker on synthetic packages -----------------------------------------------------------

CLEAN = {
    "minilm_edge/__init__.py": "from .runtime.model import load\nfrom .quant.awq import awq\n",
    "minilm_edge/__main__.py": "from .app import cli\n",
    "minilm_edge/errors.py": "import json\n",
    "minilm_edge/formats/__init__.py": "",
    "minilm_edge/formats/q4.py": "from ..errors import Error\n",
    "minilm_edge/kernels/__init__.py": "",
    "minilm_edge/kernels/policy.py": "import numba\n",
    "minilm_edge/kernels/ops.py": "from . import policy\nfrom ..formats.q4 import Q4\n",
    "minilm_edge/runtime/__init__.py": "from .model import load\n",
    "minilm_edge/runtime/model.py": "from ..kernels import policy\nfrom ..kernels.ops import rms_norm\n",
    "minilm_edge/quant/__init__.py": "",
    "minilm_edge/quant/awq.py": "import minilm_edge.runtime.model as model\n",
    "minilm_edge/app/__init__.py": "",
    "minilm_edge/app/cli.py": "def main():\n    from ..quant import awq\n    from .. import errors\n",
    "reference/__init__.py": "",
    "reference/llama.py": "import numpy as np\n",
}


def write_package(root: Path, changes: dict[str, str]) -> Path:
    for name, text in {**CLEAN, **changes}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_checker_finds_nothing_in_a_clean_package(tmp_path):
    graph = module_graph(write_package(tmp_path, {}))
    assert (cycles(graph), upward_imports(graph), unlayered_modules(graph)) == ([], [], [])
    assert foreign_imports(tmp_path, PACKAGE, REFERENCE) == foreign_imports(tmp_path, REFERENCE, PACKAGE) == []


def test_checker_resolves_relative_and_submodule_imports(tmp_path):
    graph = module_graph(write_package(tmp_path, {}))
    targets = {m: sorted(e.target for e in edges) for m, edges in graph.items()}
    # `from ..kernels import policy` -> the submodule; `from ..kernels.ops import rms_norm` -> ops
    assert targets["minilm_edge.runtime.model"] == ["minilm_edge.kernels.ops", "minilm_edge.kernels.policy"]
    assert targets["minilm_edge.kernels.ops"] == ["minilm_edge.formats.q4", "minilm_edge.kernels.policy"]
    assert targets["minilm_edge.runtime"] == ["minilm_edge.runtime.model"]           # from an __init__
    assert targets["minilm_edge.quant.awq"] == ["minilm_edge.runtime.model"]         # absolute import
    assert targets["minilm_edge.app.cli"] == ["minilm_edge.errors", "minilm_edge.quant.awq"]  # in a function
    assert targets["minilm_edge.formats.q4"] == ["minilm_edge.errors"]               # a name in a module
    assert graph["minilm_edge.kernels.ops"][1].where == "minilm_edge/kernels/ops.py:2"
    graph = module_graph(write_package(tmp_path, {"minilm_edge/formats/q4.py": "from ..errors import A, B, C\n"}))
    assert [e.target for e in graph["minilm_edge.formats.q4"]] == ["minilm_edge.errors"]     # one edge, not 3


def test_checker_finds_a_cycle_closed_inside_a_function(tmp_path):
    graph = module_graph(write_package(tmp_path, {
        "minilm_edge/runtime/tokenizer.py": "def encode():\n    from .model import load\n",
        "minilm_edge/runtime/model.py": "from .tokenizer import encode\n",
    }))
    [cycle] = cycles(graph)
    assert sorted(str(e) for e in cycle) == [
        "minilm_edge/runtime/model.py:1: `from .tokenizer import encode` "
        "(minilm_edge.runtime.model -> minilm_edge.runtime.tokenizer)",
        "minilm_edge/runtime/tokenizer.py:2: `from .model import load` "
        "(minilm_edge.runtime.tokenizer -> minilm_edge.runtime.model)",
    ]


def test_checker_finds_a_self_import(tmp_path):
    graph = module_graph(write_package(tmp_path, {"minilm_edge/formats/q4.py": "from . import q4\n"}))
    assert [[e.where for e in cycle] for cycle in cycles(graph)] == [["minilm_edge/formats/q4.py:1"]]


def test_checker_finds_upward_imports_at_any_depth(tmp_path):
    graph = module_graph(write_package(tmp_path, {
        "minilm_edge/kernels/extra.py": "from ..runtime import model\n",
        "minilm_edge/formats/q4.py": "import typing\nif typing.TYPE_CHECKING:\n    def f():\n"
                                     "        from minilm_edge.app.cli import main\n",
        "minilm_edge/errors.py": "from . import formats\n",
    }))
    assert sorted(e.where for e in upward_imports(graph)) == [
        "minilm_edge/errors.py:1", "minilm_edge/formats/q4.py:4", "minilm_edge/kernels/extra.py:1"]


def test_checker_finds_the_runtime_importing_quant(tmp_path):
    graph = module_graph(write_package(tmp_path, {
        "minilm_edge/runtime/model.py": "try:\n    from ..quant.awq import awq\nexcept ImportError:\n    pass\n",
    }))
    assert [e.where for e in runtime_imports_of_quant(graph)] == ["minilm_edge/runtime/model.py:2"]
    assert [e.where for e in upward_imports(graph)] == ["minilm_edge/runtime/model.py:2"]


def test_checker_finds_a_module_outside_the_layers(tmp_path):
    graph = module_graph(write_package(tmp_path, {"minilm_edge/utils.py": "", "minilm_edge/misc/__init__.py": ""}))
    assert unlayered_modules(graph) == ["minilm_edge.misc", "minilm_edge.utils"]


def test_checker_finds_imports_between_package_and_reference(tmp_path):
    write_package(tmp_path, {
        "minilm_edge/kernels/ops.py": "def oracle():\n    import reference.llama\n",
        "reference/llama.py": "from minilm_edge.formats import q4\n",
    })
    assert foreign_imports(tmp_path, PACKAGE, REFERENCE) == ["minilm_edge/kernels/ops.py:2: `import reference.llama`"]
    assert foreign_imports(tmp_path, REFERENCE, PACKAGE) == [
        "reference/llama.py:1: `from minilm_edge.formats import q4`"]
