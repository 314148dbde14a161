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
    # the network does no file I/O of its own: it hands saving and loading down to checkpoint and official
    assert "nvae.training.run_dir" not in graph["nvae.model.network"] and "nvae.training.loop" not in graph["nvae.model.network"]
    assert not _reaches(graph, "nvae.formats.checkpoint", "nvae.model.network") and not _reaches(graph, "nvae.formats.official", "nvae.model.network")
