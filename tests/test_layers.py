"""Layers point down: no import cycle among hf_slimmoe's modules, no private name imported across modules, library
modules never import the command-line layer (`cli`, `demo`, `pipeline`), and every module imports on its own."""

import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf_slimmoe")
TOP_LAYER = ("hf_slimmoe.cli", "hf_slimmoe.demo", "hf_slimmoe.pipeline")  # and their submodules


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__)."""
    modules = {}
    for directory, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                parts = ["hf_slimmoe", *os.path.relpath(path, ROOT)[:-3].split(os.sep)]
                modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES[module].endswith("__init__.py")


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported hf_slimmoe module, imported name or None, line) for every import of `module`, lazy ones included."""
    tree = ast.parse(open(MODULES[module], encoding="utf-8").read(), MODULES[module])
    package = module if _is_package(module) else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base not in MODULES:
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule, None, node.lineno) if submodule in MODULES else (base, alias.name,
                                                                                           node.lineno))
    return found


def _defining_module(package: str, name: str) -> str:
    """The submodule whose `__all__` holds `name`, for a lazy package (transformers' `define_import_structure`, what
    its `_LazyModule` loads on first use), else the package itself."""
    from transformers.utils.import_utils import define_import_structure

    for structure in define_import_structure(MODULES[package]).values():
        for submodule, names in structure.items():
            if name in names:
                return f"{package}.{submodule}"
    return package


def _graph() -> dict[str, set[str]]:
    """module -> the modules it imports; a name imported from a package counts as an import of the submodule that
    defines it, so a cycle through a package's re-export is a cycle."""
    graph = {}
    for module in MODULES:
        targets = {_defining_module(target, name) if name is not None and _is_package(target) else target
                   for target, name, _ in _imports(module)}
        graph[module] = targets - {module}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_a_name_from_a_lazy_package_is_an_import_of_its_submodule():
    assert _defining_module("hf_slimmoe.pruning", "prune_to") == "hf_slimmoe.pruning.surgery"
    assert "hf_slimmoe.pruning.surgery" in _graph()["hf_slimmoe.modeling_slimmoe"]


def test_the_walk_sees_the_package():
    assert {"hf_slimmoe", "hf_slimmoe.data", "hf_slimmoe.pruning.sensitivity", "hf_slimmoe.distillation"} <= set(
        MODULES)
    assert ("hf_slimmoe.modeling_utils", "backbone") not in _imports("hf_slimmoe.evaluation")
    assert "hf_slimmoe.modeling_utils" in _graph()["hf_slimmoe.evaluation"]


def test_find_cycle_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_modules():
    """Package `__init__` files only declare their submodules' names (lazily), so edges into a package itself (a
    parent package imported implicitly) are left out; names imported from a package count as imports of the
    submodule defining them, and every import counts, lazy ones (inside functions) too."""
    graph = {module: {t for t in targets if not _is_package(t)} for module, targets in _graph().items()}
    assert _find_cycle(graph) is None


def test_no_private_name_crosses_a_module():
    crossing = [f"{module}:{line} imports {name} from {target}" for module in MODULES
                for target, name, line in _imports(module)
                if name is not None and name.startswith("_") and not name.startswith("__") and target != module]
    assert crossing == []


def test_library_modules_never_import_the_command_line_layer():
    def top(module):
        return any(module == name or module.startswith(name + ".") for name in TOP_LAYER)

    upward = [f"{module} imports {target}" for module, targets in _graph().items() if not top(module)
              for target in targets if top(target)]
    assert upward == []


def test_every_module_imports_first_in_a_fresh_interpreter():
    """One fresh interpreter; before each module, every hf_slimmoe module is dropped from `sys.modules`, so each is
    imported as if it were the first (third-party packages stay loaded, which keeps this fast)."""
    script = (
        "import importlib, json, sys, traceback\n"
        "failures = {}\n"
        f"for name in {sorted(MODULES)!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'hf_slimmoe' or m.startswith('hf_slimmoe.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failures[name] = traceback.format_exc(limit=3)\n"
        "print(json.dumps(failures))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {}


@pytest.mark.parametrize("module", ["hf_slimmoe.data", "hf_slimmoe.modeling_utils", "hf_slimmoe.tokenization"])
def test_the_lower_modules_import_nothing_above_them(module):
    allowed = {"hf_slimmoe.recipe", "hf_slimmoe.configuration_slimmoe", "hf_slimmoe.kd_settings"}
    assert _graph()[module] <= allowed
