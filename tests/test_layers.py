"""Layers point down: each folder of hf_slimmoe imports only from its own layer and the layers below it, no import
cycle among its modules, no private name imported across modules, and every module imports on its own."""

import ast
import json
import os
import subprocess
import sys


ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf_slimmoe")
# the folders of hf_slimmoe, lowest first; one entry may hold several folders (they may import each other): the model's
# promised methods are thin calls into the family adapters, which load and export the model
LAYERS = ("utils", ("model", "architectures"), "distillation", "hub", "pruning", "posttrain", "compression", "cli")
# the one import that points up, inside a method: `SlimMoeForCausalLM.prune_to` (the public API's promised method) is a
# thin call into the generic surgery every family uses
UPWARD = {("hf_slimmoe.model.modeling_slimmoe", "hf_slimmoe.pruning.surgery")}


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
    assert "hf_slimmoe.pruning.surgery" in _graph()["hf_slimmoe.model.modeling_slimmoe"]


def test_the_walk_sees_the_package():
    assert {"hf_slimmoe", "hf_slimmoe.utils.data", "hf_slimmoe.pruning.sensitivity", "hf_slimmoe.distillation"} <= set(
        MODULES)
    assert ("hf_slimmoe.utils.modeling", "backbone") not in _imports("hf_slimmoe.compression.evaluation")
    assert "hf_slimmoe.utils.modeling" in _graph()["hf_slimmoe.compression.evaluation"]


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


def _layer(module: str) -> int | None:
    """The index in `LAYERS` of a module's folder (None for the package's own `__init__`, which re-exports)."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    for index, layer in enumerate(LAYERS):
        if parts[1] in ((layer,) if isinstance(layer, str) else layer):
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS: add its folder")


def test_every_module_is_in_a_folder_of_a_layer():
    assert [m for m in MODULES if m.count(".") == 1 and not _is_package(m)] == []  # no loose module at the top
    for module in MODULES:
        _layer(module)


def test_each_layer_imports_only_from_itself_and_the_layers_below():
    upward = [f"{module} imports {target}" for module, targets in _graph().items() for target in targets
              if None not in (_layer(module), _layer(target)) and _layer(target) > _layer(module)
              and (module, target) not in UPWARD]
    assert upward == []


def test_the_layer_check_sees_an_upward_import():
    assert _layer("hf_slimmoe.utils.data") < _layer("hf_slimmoe.compression.recipe") < _layer("hf_slimmoe.cli.main")
    assert _layer("hf_slimmoe.model.modeling_slimmoe") == _layer("hf_slimmoe.architectures.loading")


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
