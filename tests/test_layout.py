"""The package layout: model code never imports the inference fast paths, and no module-level import cycles."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
MODEL_CODE = ("moelm.nn.layers", "moelm.nn.moe", "moelm.models.modeling", "moelm.nn.rope", "moelm.models.ernie4_5",
              "moelm.models.ernie4_5_moe", "moelm.models.phimoe")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(top_level_only: bool) -> dict[str, set[str]]:
    """moelm module -> the moelm modules it imports (relative imports resolved; `from . import x` is module x)."""
    graph = {}
    for path in (SRC / "moelm").rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        deps = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names
                        if (SRC / f"{target}.{a.name}".replace(".", "/")).with_suffix(".py").is_file()]
                deps.update(subs if subs and len(subs) == len(node.names) else [target, *subs])
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("moelm"))
        graph[name] = deps - {name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for dep in graph.get(stack.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                stack.append(dep)
    return seen


def test_model_code_does_not_import_inference():
    """The model code names nothing of moelm.inference (the fast paths are applied to an unchanged model by
    moelm.inference.optimize), and importing it imports none of it. Its API hands over at call time: from_pretrained
    to moelm.loading, generate to moelm.generation (which uses the StaticCache)."""
    direct, top = import_graph(top_level_only=False), import_graph(top_level_only=True)
    for name in MODEL_CODE:
        bad = sorted(d for d in direct[name] if d.startswith("moelm.inference"))
        bad += sorted(d for d in reachable(top, name) if d.startswith(("moelm.inference", "moelm.loading")))
        assert not bad, f"{name} imports {bad}"


def test_no_import_cycles():
    graph = import_graph(top_level_only=False)  # imports inside functions too
    cycles = sorted({" <-> ".join(sorted((a, b))) for a in graph for b in graph[a] if a in reachable(graph, b)})
    assert not cycles, cycles
