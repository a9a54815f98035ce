"""The package's import graph: no circles, and no module imports from a layer above its own
(function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import gckd_ray

PACKAGE = Path(gckd_ray.__file__).parent

# Lowest first. A module may import its own layer and the ones below.
LAYERS = (
    ("gckd_ray.errors", "gckd_ray.config"),
    ("gckd_ray.checkpoint_format",),  # file formats: the memory bank's state files too
    ("gckd_ray.data.",),
    ("gckd_ray.model.",),
    ("gckd_ray.results", "gckd_ray.tune_space",
     "gckd_ray.config_rules", "gckd_ray.evaluate", "gckd_ray.gallery", "gckd_ray.search",
     "gckd_ray.plots"),
    ("gckd_ray.distributed.",),
    ("gckd_ray.train", "gckd_ray.tune"),
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from a import b`` counts ``a.b`` when that
    is a module, else ``a``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in targets if t in modules] or [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t not in (name, "gckd_ray")}
    return graph


def _layer(module: str) -> int:
    for level, members in enumerate(LAYERS):
        if any(module == m or (m.endswith(".") and module.startswith(m)) for m in members):
            return level
    raise AssertionError(f"{module}: not in any layer of tests/test_layout.py")


def test_no_module_imports_from_a_layer_above_its_own():
    graph = import_graph()
    upward = [f"{a} -> {b}" for a, targets in sorted(graph.items()) for b in sorted(targets)
              if _layer(b) > _layer(a)]
    assert upward == []


def test_the_import_graph_has_no_circles():
    graph, state, cycles = import_graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_evaluation_search_and_the_method_import_nothing_of_distributed():
    graph = import_graph()
    reaching = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
                if b.startswith("gckd_ray.distributed.")
                and _layer(a) < _layer("gckd_ray.distributed.worker")]
    assert reaching == []
    assert graph["gckd_ray.distributed.worker"]  # the graph does see imports
