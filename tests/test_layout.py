"""The package's layout, read statically from its source (no import, so it is cheap): modules of a readable size,
no module reaching into another's private names, no import cycles at module top level, and imports inside
function bodies only where a heavy or optional dependency, or the CLI's start-up time, asks for it."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "nslens"
MAX_LINES = 450

#: modules still being reworked (split, or their imports moved); every check skips what it finds in them.
#: Empty this as each lands: the checks then hold for the whole package.
PENDING = {
    "analysis.py", "bundle.py", "cli.py", "data.py", "erasure.py", "gguf.py", "intervene.py", "leace.py", "models.py",
    "neg.py", "nexttoken.py", "pipeline.py", "probes.py", "ranges.py", "report.py", "run.py", "stats.py",
    "workflows.py",
}

#: what a function body may import lazily (top-level package name), and why it is not at the module's top
LAZY_OK = {
    # heavy: importing them costs from a tenth of a second to seconds, which light modules (the ones `import
    # nslens`, `nslens --help` and the training child's parent load) must not pay for a name they may not use
    "torch": "heavy",
    "nnsight": "heavy (and its remote stack: websocket, httpx)",
    "httpx": "nnsight's remote stack, only for remote runs",
    "websocket": "nnsight's remote stack, only for remote runs",
    "transformers": "heavy",
    "sklearn": "heavy",
    "scipy": "heavy",
    "matplotlib": "heavy, and its backend is chosen at first use",
    "datasets": "heavy (pyarrow, pandas)",
    "concept_erasure": "heavy (the LEACE baseline only)",
    "tqdm": "lm-eval's progress bars, silenced only while lm-eval runs (a dependency of lm-eval, not of nslens)",
    # optional extras: not installed unless asked for (pip install 'nslens[eval]', [sae], [quant], [gguf])
    "lm_eval": "optional extra [eval]",
    "sae_lens": "optional extra [sae]",
    "bitsandbytes": "optional extra [quant]",
    "gguf": "optional extra [gguf]",
    # platform: POSIX only, so a top-level import would make the module fail to import elsewhere
    "fcntl": "POSIX only",
}
#: modules whose function bodies may import nslens modules lazily: the CLI, so that `nslens --help` loads none
LAZY_NSLENS_OK = {"cli.py"}


def _modules() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text(), filename=str(p)) for p in sorted(PKG.glob("*.py"))}


def _resolve(node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (``nslens`` itself for ``from . import x``)."""
    if node.level == 0:
        return node.module or ""
    return "nslens" + (f".{node.module}" if node.module else "")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: the module body and its ``try``/``if`` blocks, except
    ``if TYPE_CHECKING:``."""
    out: list[ast.Import | ast.ImportFrom] = []

    def walk(body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                out.append(stmt)
            elif isinstance(stmt, ast.If):
                if not (isinstance(stmt.test, ast.Name) and stmt.test.id == "TYPE_CHECKING"):
                    walk(stmt.body)
                walk(stmt.orelse)
            elif isinstance(stmt, ast.Try):
                for part in (stmt.body, *(h.body for h in stmt.handlers), stmt.orelse, stmt.finalbody):
                    walk(part)

    walk(tree.body)
    return out


def _nslens_targets(node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The nslens modules (file names) an import statement loads."""
    out = set()
    if isinstance(node, ast.Import):
        for a in node.names:
            parts = a.name.split(".")
            if parts[0] == "nslens":
                out.add(f"{parts[1]}.py" if len(parts) > 1 else "__init__.py")
        return out
    mod = _resolve(node)
    if mod.split(".")[0] != "nslens":
        return out
    parts = mod.split(".")
    if len(parts) > 1:
        out.add(f"{parts[1]}.py")
    else:  # from . import x: x is a submodule, or a name of the package
        out.update(f"{a.name}.py" if f"{a.name}.py" in modules else "__init__.py" for a in node.names)
    return out


def test_no_module_imports_another_modules_private_name():
    modules = _modules()
    found = []
    for name, tree in modules.items():
        module_names = set()  # local names bound to nslens modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _resolve(node).split(".")[0] == "nslens":
                for a in node.names:
                    if _is_private(a.name):
                        found.append(f"{name}:{node.lineno} imports {_resolve(node)}.{a.name}")
                    if _resolve(node) == "nslens" and f"{a.name}.py" in modules:
                        module_names.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("nslens.") and a.asname:
                        module_names.add(a.asname)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            v = node.value
            if isinstance(v, ast.Name) and v.id in module_names:  # from . import x; x._y
                found.append(f"{name}:{node.lineno} reads {v.id}.{node.attr}")
            elif (isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name) and v.value.id == "nslens"
                  and f"{v.attr}.py" in modules):  # import nslens.x; nslens.x._y
                found.append(f"{name}:{node.lineno} reads nslens.{v.attr}.{node.attr}")
    left = [f for f in found if f.split(":")[0] not in PENDING]
    assert not left, "\n".join(left)


def test_no_module_is_over_the_line_limit():
    long = {p.name: n for p in PKG.glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    left = {k: v for k, v in long.items() if k not in PENDING}
    assert not left, left


def test_no_import_cycle_at_module_top_level():
    modules = _modules()
    graph = {name: set().union(*(_nslens_targets(n, set(modules)) for n in _top_level_imports(tree))) - {name}
             for name, tree in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif state.get(nxt) is None:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_cycle_check_sees_a_cycle():
    """The graph walk above on a made-up package: a -> b -> a is reported (so an empty result means something)."""
    trees = {"a.py": ast.parse("from .b import f\n"), "b.py": ast.parse("def g():\n    pass\nfrom . import a\n")}
    graph = {n: set().union(*(_nslens_targets(i, set(trees)) for i in _top_level_imports(t))) for n, t in trees.items()}
    assert graph == {"a.py": {"b.py"}, "b.py": {"a.py"}}
    lazy = ast.parse("def f():\n    from .b import g\nif TYPE_CHECKING:\n    from .c import h\n")
    assert _top_level_imports(lazy) == []


def test_imports_in_function_bodies_are_for_heavy_or_optional_modules_only():
    modules = _modules()
    found = []
    for name, tree in modules.items():
        top = _top_level_imports(tree)
        at_top = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
        at_top |= {_resolve(n).split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and n.level == 0}
        top_ids = {id(n) for n in top}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top_ids:
                continue
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                if name not in LAZY_NSLENS_OK:
                    found.append(f"{name}:{node.lineno} imports {_resolve(node)} inside a function")
                continue
            roots = ({a.name.split(".")[0] for a in node.names} if isinstance(node, ast.Import)
                     else {_resolve(node).split(".")[0]})
            for root in roots:
                if root == "nslens" and name in LAZY_NSLENS_OK:
                    continue
                if root not in LAZY_OK:
                    found.append(f"{name}:{node.lineno} imports {root} inside a function (not heavy or optional)")
                elif root in at_top:
                    found.append(f"{name}:{node.lineno} imports {root} inside a function, already imported at the top")
    left = [f for f in found if f.split(":")[0] not in PENDING]
    assert not left, "\n".join(left)
