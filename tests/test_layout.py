"""The layout's rules (DESIGN.md), checked on the source: no module imports one that imports it back (imports
inside functions and under TYPE_CHECKING count: a lazy import still ties two modules), the local-training loop does
not import cohort training, only the driver, the actors and the Ray glue import Ray, no method or task is branched
on by name outside its own package, and nothing cites a document that is not in the repository."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import networkx as nx

from ravan_ray.methods import REGISTRY as METHODS
from ravan_ray.tasks import REGISTRY as TASKS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ravan_ray", "actors")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for file in (ROOT / package).rglob("*.py"):
            found[".".join(file.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = file
    return found


def imported(name: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules ``name`` imports anywhere in its file: ``from a.b import c`` is a.b.c where that is a
    module, else a.b."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def import_graph() -> nx.DiGraph:
    known = modules()
    graph = nx.DiGraph()
    for name, file in known.items():
        graph.add_node(name)
        graph.add_edges_from((name, target) for target in imported(name, file, known))
    return graph


def test_no_module_imports_one_that_imports_it_back():
    cycles = [sorted(group) for group in nx.strongly_connected_components(import_graph()) if len(group) > 1]
    assert cycles == []


def test_the_local_training_loop_does_not_import_cohort_training():
    graph = import_graph()
    assert graph.has_edge("ravan_ray.cohort", "ravan_ray.training")  # cohort training is built on the host
    assert not nx.has_path(graph, "ravan_ray.training", "ravan_ray.cohort")


def test_only_the_driver_the_actors_and_the_ray_glue_import_ray():
    """The adapter maths, the methods, tasks and privacy mechanisms, ModelHost and cohort training are plain torch:
    testable without a cluster and runnable in any process."""
    uses_ray = set()
    for name, file in modules().items():
        for node in ast.walk(ast.parse(file.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                uses_ray.add(name)
    assert uses_ray == {"actors.client", "actors.server", "ravan_ray.cluster", "ravan_ray.federation",
                        "ravan_ray.sweep", "ravan_ray.sweep_search", "ravan_ray.sweep_trackers"}


def test_no_method_or_task_is_branched_on_by_name_outside_its_own_package():
    own = {**{name: "ravan_ray.methods" for name in METHODS}, **{name: "ravan_ray.tasks" for name in TASKS}}
    branches = []
    for module, file in modules().items():
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                constants = [c for o in operands for c in ([o] if isinstance(o, ast.Constant) else
                                                           getattr(o, "elts", []))]
                if any(isinstance(c, ast.Constant) and c.value in own and not module.startswith(own[c.value])
                       for c in constants):
                    branches.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert branches == []


def test_nothing_cites_a_document_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    texts = [ROOT / f for f in tracked if f.endswith((".py", ".md", ".yaml", ".yml", ".toml", ".sh"))]
    citing = [str(f.relative_to(ROOT)) for f in texts
              if f.exists() and "PAPER" + ".md" in f.read_text(errors="ignore")]
    assert texts and citing == []
