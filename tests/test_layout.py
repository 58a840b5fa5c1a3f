"""The package layering (scripts/architecture.py's LAYERS): each package imports only packages below it, model code
never imports the fast paths or the applications, no import cycles, and docs/architecture.md is the current drawing."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "architecture.py"
spec = importlib.util.spec_from_file_location("architecture", SCRIPT)
architecture = importlib.util.module_from_spec(spec)
spec.loader.exec_module(architecture)
import_graph, package_of = architecture.import_graph, architecture.package_of

MODEL_PACKAGES = ("nn", "models")
# in models/ but not run by a model: they build (Auto classes, `moelm new`) or describe (`moelm info`) one
MODEL_TOOLS = ("moelm.models.auto", "moelm.models.scaffold", "moelm.models.info")
APPLIED = ("inference", "parallel", "serve", "train", "bench")  # applied to an unchanged model, never imported by it


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for dep in graph.get(stack.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                stack.append(dep)
    return seen


def test_each_package_imports_only_packages_below_it():
    assert architecture.violations(import_graph()) == []


def test_model_code_does_not_import_inference():
    """The model code names nothing of moelm.inference (the fast paths are applied to an unchanged model by
    moelm.inference.optimize) or of the applications, and importing it imports none of them nor moelm.loading. Its API
    hands over at call time: from_pretrained to moelm.loading, generate to moelm.generation (which uses the
    StaticCache)."""
    direct, top = import_graph(), import_graph(top_level_only=True)
    model_code = [m for m in direct if package_of(m) in MODEL_PACKAGES and m not in MODEL_TOOLS]
    assert "moelm.models.ernie4_5_moe" in model_code and "moelm.nn.moe" in model_code
    for name in model_code:
        bad = sorted(d for d in direct[name] if package_of(d) in APPLIED)
        bad += sorted(d for d in reachable(top, name) if package_of(d) in (*APPLIED, "loading"))
        assert not bad, f"{name} imports {bad}"


def test_no_import_cycles():
    graph = import_graph()  # imports inside functions too
    cycles = sorted({" <-> ".join(sorted((a, b))) for a in graph for b in graph[a] if a in reachable(graph, b)})
    assert not cycles, cycles


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """A layering test that cannot fail is no test: an upward import added to a copy of the tree is reported."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(architecture.SRC / "moelm", src / "moelm", ignore=shutil.ignore_patterns("__pycache__", "csrc"))
    with open(src / "moelm" / "nn" / "rope.py", "a") as f:
        f.write("\n\ndef _upward():\n    from ..models import auto  # noqa: F401\n")
    before = set(architecture.violations(architecture.import_graph()))
    monkeypatch.setattr(architecture, "SRC", src)
    after = set(architecture.violations(architecture.import_graph()))
    assert after - before == {"moelm.nn.rope imports moelm.models.auto (models is not below nn)"}


def test_architecture_doc_is_current():
    assert architecture.DOC.read_text() == architecture.render(), \
        "docs/architecture.md is stale: run python scripts/architecture.py --write"
