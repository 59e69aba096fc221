"""The package's layering: no import cycles, no forbidden arrows (``tests/tools/import_graph.py``)."""

from __future__ import annotations

from pathlib import Path

from tests.tools.import_graph import build_graph, cycles, forbidden_edges

PACKAGE = Path(__file__).resolve().parents[1] / "capfilt"


def test_no_import_cycles():
    graph, _ = build_graph(PACKAGE)
    assert len(graph) > 50  # the whole package was read
    assert cycles(graph) == []


def test_no_forbidden_imports():
    graph, names = build_graph(PACKAGE)
    assert forbidden_edges(graph, names) == []


def test_the_checker_sees_cycles_and_lazy_imports(tmp_path):
    pkg = tmp_path / "capfilt"
    (pkg / "io").mkdir(parents=True)
    (pkg / "stages").mkdir()
    for f in ("__init__.py", "io/__init__.py", "stages/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "a.py").write_text("def f():\n    from capfilt import b\n")
    (pkg / "b.py").write_text("from capfilt.a import f\n")
    (pkg / "io" / "w.py").write_text("def g():\n    from capfilt.stages.s import X\n")
    (pkg / "stages" / "s.py").write_text("X = 1\n")
    graph, names = build_graph(pkg)
    assert cycles(graph) == [["capfilt.a", "capfilt.b"]]
    assert forbidden_edges(graph, names) == ["capfilt.io.w -> capfilt.stages.s (X): io/ is below stages/"]
