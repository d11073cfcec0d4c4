"""The package's import direction, read from the source (every import, at module level or inside
a function): leaves < data < engine < evaluation < release < cli, no cycles, Prefect and the
flows/tasks layer only in cli, and an engine that runs without Prefect or MLflow."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "loraflow"
# A module may import loraflow modules of its own layer or lower ones. artifacts.py, the typed
# references tasks hand each other, names data's template and report, so it sits beside data.
LAYERS = {"artifacts": 1, "data": 1, "engine": 2, "evaluation": 3, "release": 4, "cli": 5}
# leaves (config, hashing, base_model, environment, summary): 0
ORCHESTRATION = ("prefect", "flows", "tasks")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def imports() -> dict[str, set[str]]:
    """module -> every top-level name it imports (loraflow ones as full module names)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                # `from loraflow.engine import distributed` imports the submodule
                found |= {f"{node.module}.{a.name}" for a in node.names
                          if f"{node.module}.{a.name}" in modules}
        graph[module] = {n for n in found if n in modules or not n.startswith("loraflow")}
    return graph


GRAPH = imports()


def test_the_layer_rule_reads_the_real_tree():
    assert {"loraflow.data.records", "loraflow.engine.loop", "loraflow.release.merge",
            "loraflow.cli"} <= set(GRAPH)
    assert "loraflow.data.records" in GRAPH["loraflow.data.prompts"]


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_a_higher_layer(module):
    higher = sorted(n for n in GRAPH[module]
                    if n.startswith("loraflow.") and layer(n) > layer(module))
    assert higher == [], f"{module} (layer {layer(module)}) imports {higher}"


def test_only_the_cli_imports_prefect_flows_or_tasks():
    offenders = {m: sorted(n for n in names if n.split(".")[0] in ORCHESTRATION)
                 for m, names in GRAPH.items() if not m.startswith("loraflow.cli")}
    assert {m: n for m, n in offenders.items() if n} == {}


def test_the_engine_imports_neither_prefect_nor_mlflow():
    offenders = {m: sorted(n for n in names if n.split(".")[0] in ("prefect", "mlflow"))
                 for m, names in GRAPH.items() if m.startswith("loraflow.engine")}
    assert {m: n for m, n in offenders.items() if n} == {}


def test_there_is_no_import_cycle():
    internal = {m: {n for n in names if n in GRAPH} for m, names in GRAPH.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(module):], module]))
        if module in done:
            return
        for name in sorted(internal[module]):
            visit(name, [*path, module])
        done.add(module)

    for module in sorted(internal):
        visit(module, [])
