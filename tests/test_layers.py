"""The package's layers import only downward (``docs/architecture.md``), and no module imports
itself back through others: read from the source, without importing it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "distill_fused"
KERNELS = ROOT / "kernels"  # installed as distill_fused.kernels

# Layer of each part of the package, top first: a module may import its own layer and those
# below it. The names the package hands on (its __init__, the command, the synthetic batches) sit
# above the API.
LAYERS = {"distill_fused": 5, "api": 4, "dispatch": 3, "verification": 3, "backends": 2,
          "kernels": 1, "core": 0}


def _modules():
    """``{dotted name: path}`` of every module of the package, kernels included."""
    found = {}
    for base, prefix in ((PACKAGE, "distill_fused"), (KERNELS, "distill_fused.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix] + parts)] = path
    return found


def _imports(name, path, modules):
    """The package modules that module ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [f"{target}.{alias.name}" for alias in node.names] + [target]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        out.update(c for c in candidates if c in modules and c != name)
    return out


def _layer(name):
    parts = name.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 and parts[1] in LAYERS else LAYERS["distill_fused"]


def test_every_module_has_a_layer_and_the_graph_is_read():
    modules = _modules()
    assert {"distill_fused.api.losses", "distill_fused.dispatch",
            "distill_fused.backends.triton_backend", "distill_fused.kernels.combined",
            "distill_fused.core.config"} <= set(modules)
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "distill_fused.kernels.combined" in graph["distill_fused.backends.triton_backend"]
    assert "distill_fused.dispatch" in graph["distill_fused.api.losses"]


def test_layers_import_only_downward():
    modules = _modules()
    upward = [f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})"
              for name, path in modules.items() for target in _imports(name, path, modules)
              if _layer(target) > _layer(name)]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    done, stack = set(), []

    def visit(name):
        if name in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(name):]
                                                                  + [name]))
        if name in done:
            return
        stack.append(name)
        for target in sorted(graph[name]):
            visit(target)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
