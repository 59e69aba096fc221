#!/usr/bin/env python3
"""The import graph of the ``capfilt`` package, its cycles and its forbidden arrows.

Usage: python tests/tools/import_graph.py [PACKAGE_DIR]   (default: ./capfilt)

Every ``import`` / ``from ... import`` statement counts, including those inside functions (a lazy
import still ties two modules together). ``from capfilt.x import y`` is an edge to
``capfilt.x.y`` when ``y`` is a submodule, else to ``capfilt.x``. The implicit import of a parent
package (``capfilt.io`` before ``capfilt.io.writer``) is not an edge. Prints the cycles (strongly
connected components of more than one module, or a module importing itself) and the forbidden
edges; exits 1 if there is any.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

#: (importer prefix, imported prefix or module, why): arrows the layering forbids.
FORBIDDEN = (
    ("capfilt.io", "capfilt.stages", "io/ is below stages/"),
    ("capfilt.modeling", "capfilt.config", "model wrappers take plain arguments, not recipe sections"),
    ("capfilt.stages", "capfilt.runner", "stages never import the Ray runner"),
    ("capfilt.train", "capfilt.api", "the trainer depends on the library, not on the run API"),
    ("capfilt.export", "capfilt.stages", "exports read outputs through io/, not the pipeline's stages"),
    ("capfilt.export", "capfilt.runner", "exports never start the Ray runner"),
)
#: Names of ``capfilt.config`` that ``capfilt.modeling`` may import (the model preset, not recipes).
MODELING_MAY_USE = {"ModelSpec", "ModelPreset", "ConfigError", "load_preset", "bundled_dir"}


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of ``path`` inside the package folder ``root``."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(mod: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def build_graph(root: Path) -> tuple[dict[str, set[str]], dict[tuple[str, str], set[str]]]:
    """Edges ``module -> imported modules`` within the package, and the names each edge imports.

    Returns:
        ``(graph, names)``: ``names[(a, b)]`` are the names ``a`` imports from ``b`` (empty for
        ``import b``).
    """
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    names: dict[tuple[str, str], set[str]] = {}
    pkg = root.name

    def add(a: str, b: str, name: str | None) -> None:
        while b and b not in files:  # capfilt.x.Name -> capfilt.x
            b = b.rsplit(".", 1)[0] if "." in b else ""
        if b and b != a:
            graph[a].add(b)
            names.setdefault((a, b), set()).update([name] if name else [])
        elif b == a:
            graph[a].add(a)

    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == pkg:
                        add(mod, alias.name, None)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, node, path.name == "__init__.py")
                if target.split(".")[0] != pkg:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in files:
                        add(mod, sub, None)
                    else:
                        add(mod, target, alias.name)
    return graph, names


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with a cycle (Tarjan), each sorted, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out, key=lambda c: (-len(c), c))


def _within(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def forbidden_edges(graph: dict[str, set[str]], names: dict[tuple[str, str], set[str]]) -> list[str]:
    """Edges of :data:`FORBIDDEN` present in ``graph``, one readable line each."""
    out = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            for src, dst, why in FORBIDDEN:
                if not (_within(a, src) and _within(b, dst)):
                    continue
                extra = names.get((a, b), set())
                if dst == "capfilt.config" and extra and extra <= MODELING_MAY_USE:
                    continue
                shown = f" ({', '.join(sorted(extra))})" if extra else ""
                out.append(f"{a} -> {b}{shown}: {why}")
    return out


def main(argv: list[str]) -> int:
    """Print the graph's size, its cycles and forbidden edges; 1 if there is any."""
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[2] / "capfilt")
    graph, names = build_graph(root)
    found = cycles(graph)
    bad = forbidden_edges(graph, names)
    print(f"{len(graph)} modules, {sum(len(v) for v in graph.values())} import edges "
          f"(module level and inside functions)")
    for c in found:
        print("cycle: " + " <-> ".join(c))
    for line in bad:
        print("forbidden: " + line)
    print(f"{len(found)} cycle(s), {len(bad)} forbidden edge(s)")
    return 1 if found or bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
