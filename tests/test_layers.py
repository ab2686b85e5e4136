"""The library's modules form layers: no module imports one above it, so no cycle exists.

Every import is read from the source with `ast`, including imports inside
functions (importing each module alone would not find those cycles).
"""

import ast
import pathlib

import elastic_jax

PACKAGE = pathlib.Path(elastic_jax.__file__).parent

# Bottom up (docs/design.md, "Layers"); a module imports only modules of lower rank.
LAYERS = [
    {"base", "validation", "consistency", "bounds"},  # types, state protocol, keys, numerics
    {"compressors", "delays", "topologies", "clock"},  # and the system model (ej.clock)
    {"powersgd"},  # a collective compressor (sync_sgd, diloco)
    {"links"},  # the per-worker chain: its link type and basic links
    {"error_feedback", "ef21", "optimizers"},  # links built on the type
    {"chain"},
    {"algorithms._common"},
    {"algorithms.sync", "algorithms.asynchronous", "algorithms.message_passing",
     "algorithms.elastic_scheduling", "algorithms.local", "algorithms.gossip",
     "algorithms.clock_async", "algorithms.diloco"},
    {"workers"},  # the round: how a device maps its workers
    {"rounds"},
    {"parallel", "checks"},
    {"drivers"},  # make_step, run
    {"analysis", "sweeps"},  # whole runs: hypergradients, grids
    {"__init__", "algorithms.__init__"},
]
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: pathlib.Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _imports(path: pathlib.Path) -> set[str]:
    """The `elastic_jax` modules `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("elastic_jax."):
                module = name.removeprefix("elastic_jax.")
                # `from elastic_jax.x import y`: `y` is a module only if it is one.
                if module in RANK:
                    found.add(module)
    return found


def test_every_module_has_a_layer():
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    assert modules == set(RANK), modules ^ set(RANK)


def test_imports_follow_the_layers_and_form_no_cycle():
    graph = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    upward = [f"{m} imports {d}" for m, deps in graph.items() for d in deps
              if RANK[d] >= RANK[m]]
    assert not upward, upward
    # Strict ranks make the graph acyclic; check it directly too (depth-first).
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", " -> ".join(path + [module])
        state[module] = "open"
        for dep in graph[module]:
            visit(dep, path + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])
