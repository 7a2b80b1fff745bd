"""The import graph of the project: no cycles, and every import goes down the layer order of
docs/layout.md.

Every project ``.py`` file is parsed with ``ast`` (imports inside functions included, nothing is
imported); an import of a project module is an edge ``importer -> imported``. ``from pkg import
name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg`` (its ``__init__``).
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("common", "quant", "model", "snn", "metrics", "bench", "tests")
SKIP_DIRS = {".venv", ".git", "__pycache__", "logs", "data", "stats", "config", "docs"}

# The layers, lowest first: a module may import modules of its own layer or of a lower one.
# A name stands for the module and everything under it; the longest matching name decides.
LAYERS = [
    ["common.errors", "common.atomic", "common.lock", "common.progress", "common.runtime",
     "common.compiled"],
    ["common.configs"],
    ["quant"],
    ["model", "model.unet"],
    ["model.build", "model.ema", "model.image_sets", "model.data", "model.images", "model.checkpoint", "diffusion"],
    ["schedulers", "model.train"],
    ["snn.steps"],
    ["snn.fused"],
    ["snn.neuron"],
    ["snn.norm"],
    ["snn.latency"],
    ["snn.convert"],
    ["snn.stats", "snn.calibrate", "snn.capture", "snn.agreement"],
    ["snn.finetune"],
    ["snn.io", "snn"],
    ["snn.conversion", "snn.finetune_run"],
    ["metrics"],
    ["common.flags"],
    ["ANN_train", "SNN_conversion", "SNN_ft", "evaluate", "compute_fid_stats"],
    ["bench"],
]
# Imports forbidden although the layers would allow them (importer, imported).
FORBIDDEN = [("diffusion", "model"), ("schedulers", "model")]


def project_files(root=ROOT):
    """{module name: path} of every project .py file under ``root``."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        rel = os.path.relpath(folder, root)
        parts = [] if rel == "." else rel.split(os.sep)
        if parts and parts[0] not in PACKAGES:
            dirs[:] = []
            continue
        for name in files:
            if name.endswith(".py"):
                mod = parts + ([] if name == "__init__.py" else [name[:-3]])
                found[".".join(mod)] = os.path.join(folder, name)
    return found


def _resolve(name, modules, search):
    """The project module ``name`` means (tried under each prefix of ``search``), or None."""
    for prefix in search:
        full = f"{prefix}.{name}" if prefix else name
        while full:
            if full in modules:
                return full
            full = full.rpartition(".")[0]
    return None


def imports_of(module, path, modules):
    """The project modules that ``module`` (file ``path``) imports anywhere in its code."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    # tests/ modules import each other by their bare names (pytest puts their folder on the import path)
    search = [""] + ([package, "tests"] if module.startswith("tests") else [])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            hit = _resolve(target, modules, search)
            if hit is not None and hit != module:
                found.add(hit)
    return found


def import_graph(root=ROOT):
    """{module: set of project modules it imports}."""
    modules = project_files(root)
    return {mod: imports_of(mod, path, modules) for mod, path in modules.items()}


def find_cycle(graph):
    """One import cycle as a list [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def layer(module):
    """The index in ``LAYERS`` of ``module`` (longest matching name), or None (tests/)."""
    best, rank = -1, None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), index
    return rank


def _matches(module, name):
    return module == name or module.startswith(name + ".")


def violations(graph):
    """["importer -> imported (why)"] for every import against the layer order."""
    bad = []
    for importer, targets in sorted(graph.items()):
        if importer.startswith("tests"):
            continue
        for imported in sorted(targets):
            if layer(importer) is None or layer(imported) is None:
                bad.append(f"{importer} -> {imported} (a module of no layer: add it to LAYERS)")
            elif layer(imported) > layer(importer):
                bad.append(f"{importer} -> {imported} (imports upwards)")
            elif any(_matches(importer, a) and _matches(imported, b) for a, b in FORBIDDEN):
                bad.append(f"{importer} -> {imported} (forbidden)")
    return bad


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_follow_the_layers():
    bad = violations(import_graph())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_every_module_has_a_layer():
    missing = [m for m in import_graph() if not m.startswith("tests") and layer(m) is None]
    assert not missing, f"modules of no layer: {missing}"


def test_the_graph_sees_what_it_must(tmp_path):
    """The walk finds imports inside functions, ``from pkg import module``, relative imports,
    names a cycle and an upward import (a made-up project of three modules)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "__init__.py").write_text("")
    (tmp_path / "model" / "unet.py").write_text("def f():\n    from . import build\n")
    (tmp_path / "model" / "build.py").write_text("import torch\nfrom model import unet\n")
    (tmp_path / "diffusion.py").write_text("def g():\n    import model.build as b\n")
    graph = import_graph(str(tmp_path))
    assert graph == {"model": set(), "model.unet": {"model.build"}, "model.build": {"model.unet"},
                     "diffusion": {"model.build"}}
    assert find_cycle(graph) in (["model.build", "model.unet", "model.build"],
                                 ["model.unet", "model.build", "model.unet"])
    assert violations(graph) == ["diffusion -> model.build (forbidden)",
                                 "model.unet -> model.build (imports upwards)"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", ["diffusion", "schedulers"])
def test_diffusion_and_samplers_use_nothing_above_the_configs(module):
    """diffusion.py and schedulers.py build on common/ only (schedulers also on diffusion)."""
    allowed = {"diffusion"} if module == "schedulers" else set()
    above = [m for m in import_graph()[module] if layer(m) > 1 and m not in allowed]
    assert not above, above
