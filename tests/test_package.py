"""The package's shape: the module graph is acyclic (lazy imports inside functions included), nothing happens at
import time, and __all__ names what exists."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "nslens"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_module_graph_is_acyclic_including_lazy_imports():
    graph = {p.stem: _imports(p) for p in PKG.glob("*.py")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, nxt])
            if state.get(nxt) is None:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_import_has_no_side_effects_and_all_is_true():
    optional = ("lm_eval", "sae_lens", "bitsandbytes", "matplotlib", "sklearn", "datasets")
    code = ("import sys, nslens; "
            f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {optional!r}); "
            "assert not loaded, loaded[:5]")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr[-500:]
    for p in PKG.glob("*.py"):
        if p.stem.startswith("_"):
            continue
        mod = importlib.import_module(f"nslens.{p.stem}")
        for name in getattr(mod, "__all__", []):
            assert hasattr(mod, name), f"nslens.{p.stem}.__all__ names {name!r}, which does not exist"
