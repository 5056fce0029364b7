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


def test_every_nslens_name_the_text_mentions_exists():
    """Every ``nslens.<name>[.<name>...]`` that the README, the docs, the docstrings, the messages and the
    experiments mention resolves: a package attribute or a submodule, then attributes of it (the error for the mean
    operator once sent users to an ``nslens.general_mean`` the package did not have). Format tags such as
    ``nslens.rangemask/1`` are not names."""
    import re
    import types

    import nslens

    root = PKG.parent
    files = [root / "README.md", *(root / "docs").glob("*.md"), *PKG.rglob("*.py"), *(root / "experiments").glob("*.py")]
    pattern = re.compile(r"(?<![\w./-])nslens((?:\.[A-Za-z_]\w*)+)(?![\w/])")
    missing = set()
    for f in files:
        for m in pattern.finditer(f.read_text()):
            obj, path = nslens, "nslens"
            for part in m.group(1)[1:].split("."):
                if not isinstance(obj, types.ModuleType):
                    break  # an attribute of a class or function (a method, a field): not checked further
                path += "." + part
                if hasattr(obj, part):
                    obj = getattr(obj, part)
                    continue
                try:
                    obj = importlib.import_module(path)
                except ImportError:
                    missing.add(f"{m.group(0)} ({f.relative_to(root)})")
                    break
    assert not missing, sorted(missing)
