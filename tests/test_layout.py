"""The package's layers point down: no import circle, configuration at the bottom, the CLI on top."""
import ast
from pathlib import Path

import nvae

SRC = Path(nvae.__file__).parent


def _imports() -> dict:
    """Module -> the nvae modules it imports (anywhere in the file, lazy imports included)."""
    mods = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        mods[name] = (path, ast.parse(path.read_text()))
    graph = {}
    for name, (path, tree) in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    deps.add(full if full in mods else target)
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                deps.update(n for n in names if n in mods)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def _reaches(graph, start, goal) -> bool:
    seen, todo = set(), [start]
    while todo:
        for d in graph[todo.pop()]:
            if d == goal:
                return True
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return False


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports()
    assert len(graph) > 20
    circles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if _reaches(graph, b, a)})
    assert not circles, circles


def test_configuration_depends_on_nothing_above_it_and_nothing_imports_the_cli():
    graph = _imports()
    assert graph["nvae.config"] == set()
    assert not [m for m, deps in graph.items() if "nvae.cli" in deps and m != "nvae.__main__"]
    # the network reads and writes no file: saving and loading live in formats/
    assert not _reaches(graph, "nvae.formats.checkpoint", "nvae.model.network")
    assert not _reaches(graph, "nvae.formats.official", "nvae.model.network")


#: The only imports from above the model: NVAE.save / from_checkpoint / from_official, doors into nvae.formats
#: imported when called.
MODEL_DOORS = {("nvae.model.network", "save"), ("nvae.model.network", "from_checkpoint"),
               ("nvae.model.network", "from_official")}


def _imports_above(module: str, tree: ast.AST, above) -> list:
    """(function or None, imported module) of every import in ``tree`` of a module under one of ``above``."""
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.ImportFrom):
                package = module.split(".")[:-1]
                base = package[:len(package) - child.level + 1] if child.level else []
                target = ".".join(base + ([child.module] if child.module else []))
                names = [f"{target}.{a.name}" for a in child.names] + [target]
                if any(n == w or n.startswith(w + ".") for n in names for w in above):
                    found.append((function, target))
            elif isinstance(child, ast.Import):
                found.extend((function, a.name) for a in child.names if any(a.name.startswith(w) for w in above))
            visit(child, inner)

    visit(tree, None)
    return found


def test_the_model_imports_nothing_above_it():
    """nvae.model is the paper's network: no speed-up, file format, training or analysis is imported into it
    (the speed-ups are applied from outside, by nvae.speedups.apply)."""
    above = ("nvae.speedups", "nvae.formats", "nvae.training", "nvae.analysis", "nvae.data", "nvae.cli")
    checked = 0
    for path in sorted((SRC / "model").glob("*.py")):
        module = f"nvae.model.{path.stem}"
        for function, target in _imports_above(module, ast.parse(path.read_text()), above):
            assert (module, function) in MODEL_DOORS, f"{module} ({function or 'module level'}) imports {target}"
            assert target.startswith("nvae.formats"), target
            checked += 1
        assert "is_compiling" not in path.read_text(), f"{module} knows about tracing: a speed-up's business"
    assert checked == len(MODEL_DOORS)


def test_no_module_name_is_another_ones_plural():
    names = {p.stem for p in SRC.rglob("*.py")} | {p.name for p in SRC.rglob("*") if p.is_dir()}
    plurals = sorted(n for n in names if n.endswith("s") and n[:-1] in names)
    assert not plurals, plurals
