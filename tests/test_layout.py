"""The package's structure: imports run one way (no cycles, each folder imports only
from the folders below it), and the public API stays where users reach it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import fastskip as fs

ROOT = Path(__file__).resolve().parents[1]

# Folders from the bottom up: a module may import from its own folder and from the
# folders listed before its own. "" is the top level: errors, inputs, results,
# ablation, prompt_files, files (the user-facing pieces every folder may use).
LAYERS = ["", "plans", "kernels", "model", "reference", "run", "output", "search", "cli"]
ENTRY_POINTS = {"fastskip", "fastskip.__main__"}  # the package's face: imports everything


def module_files() -> dict[str, Path]:
    """Every module of the distribution by its import name (``kernels/`` ships as
    ``fastskip.kernels``)."""
    out = {}
    for base, prefix in ((ROOT / "fastskip", "fastskip"), (ROOT / "kernels", "fastskip.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The fastskip modules ``name`` imports anywhere in its file (module level, inside
    functions and under TYPE_CHECKING alike)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` mod
            targets = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in modules
                       else base_name for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first = last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(module: str) -> int:
    parts = module.split(".")
    folder = parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""
    return LAYERS.index(folder)


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_run_down_the_layers():
    wrong = []
    for module, targets in import_graph().items():
        if module in ENTRY_POINTS:
            continue
        for target in targets:
            if target not in ENTRY_POINTS and layer_of(target) > layer_of(module):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports that run up the layers:\n" + "\n".join(sorted(wrong))


def test_plans_know_nothing_of_torch():
    for name, path in module_files().items():
        if name.startswith("fastskip.plans"):
            assert not re.search(r"^\s*(import|from)\s+torch", path.read_text(), re.M), name


PUBLIC = [
    "Ablation", "CheckError", "EdgeGraph", "EdgePlan", "EdgePlanSet", "FastskipError",
    "InputError", "MemoryBudgetError",
    "OverflowWarning", "Plan", "PlanError", "PlanMask", "PlanSet", "Results", "Runner",
    "UnsupportedModelError", "check", "grid", "io", "load_model", "plan_hooks", "plot",
    "reference_logits", "search", "sweep", "tables", "tasks", "test_prompt",
]


def test_public_api_is_pinned():
    assert sorted(fs.__all__) == sorted(PUBLIC)
    for name in fs.__all__:
        assert getattr(fs, name) is not None, name


def readme_names() -> set[str]:
    """Every dotted ``fs.`` name the README's text and examples use."""
    text = (ROOT / "README.md").read_text()
    return set(re.findall(r"\bfs\.([A-Za-z_][\w.]*[A-Za-z_0-9])", text))


@pytest.mark.parametrize("dotted", sorted(readme_names()))
def test_names_the_readme_uses_exist(dotted):
    obj = fs
    for part in dotted.split("."):
        assert hasattr(obj, part), f"fs.{dotted}: no {part!r} in {obj!r}"
        obj = getattr(obj, part)


def test_old_module_names_still_reach_their_functions():
    assert fs.io.load_results is fs.tables.load_results and fs.io.read_prompts
    assert fs.sweep.sweep and fs.tasks.make_task and fs.search.prune_nodes
    assert fs.grid.block_subsets and fs.plot.leave_one_out
