"""The package's layout, read statically from its source (no import, so it is cheap): modules of a readable size,
no module reaching into another's private names, no import cycles at module top level, and imports inside
function bodies only where a heavy or optional dependency, or the CLI's start-up time, asks for it."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "nslens"
MAX_LINES = 450

#: modules still being reworked (split, or their imports moved; a folder stands for its modules); the checks of
#: private names, line counts and function-body imports skip what they find in them. Empty this as each lands:
#: the checks then hold for the whole package.
PENDING: set[str] = set()

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
#: modules whose function bodies may import nslens modules lazily: the CLI package, so that `nslens --help` loads
#: no more of nslens than it needs
LAZY_NSLENS_OK = {"cli/"}
#: one module's own lazy import of a light package, and why: RangeMask and ConceptStats travel by value with every
#: remote trace (nslens is pickled by value), and a safetensors reader type among their module's globals does not
#: survive that serialisation (remote="local" fails with "'safe_open' has no attribute '__enter__'")
LAZY_HERE = {("ranges.py", "safetensors"), ("stats.py", "safetensors")}


def _covered(path: str, entries: set[str]) -> bool:
    """``path`` is named in ``entries``, as itself or through a folder (``cli/``)."""
    return path in entries or any(e.endswith("/") and path.startswith(e) for e in entries)


def _modules() -> dict[str, ast.Module]:
    """Every module of the package by its path inside it (``ops.py``, ``cli/app.py``). lm-eval's task hooks under
    ``tasks/`` are data that nslens copies into task folders, not modules of the package."""
    return {p.relative_to(PKG).as_posix(): ast.parse(p.read_text(), filename=str(p))
            for p in sorted(PKG.rglob("*.py")) if p.relative_to(PKG).parts[0] != "tasks"}


def _dotted(path: str) -> str:
    """``cli/app.py`` -> ``nslens.cli.app``; ``cli/__init__.py`` -> ``nslens.cli``."""
    parts = ["nslens", *path.removesuffix(".py").split("/")]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(path: str) -> str:
    """The package a module's relative imports start from."""
    return _dotted(path) if path.endswith("__init__.py") else _dotted(path).rsplit(".", 1)[0]


def _resolve(node: ast.ImportFrom, path: str) -> str:
    """The absolute module an ``ImportFrom`` in ``path`` names (a package itself for ``from . import x``)."""
    if node.level == 0:
        return node.module or ""
    base = _package(path).split(".")
    base = base[:len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


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


def _targets(node: ast.Import | ast.ImportFrom, path: str, by_name: dict[str, str]) -> set[str]:
    """The nslens modules (paths) an import statement in ``path`` loads, with the packages above them (Python
    imports those first), except the importer's own packages (already being imported)."""
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        mod = _resolve(node, path)
        names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in by_name else mod for a in node.names]
    pkg = _package(path).split(".")
    own = {_dotted(path), *(".".join(pkg[:i]) for i in range(1, len(pkg) + 1))}
    out = set()
    for name in names:
        parts = name.split(".")
        if parts[0] != "nslens":
            continue
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in by_name and prefix not in own:
                out.add(by_name[prefix])
    return out


def _graph(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    by_name = {_dotted(p): p for p in trees}
    return {p: set().union(*(_targets(n, p, by_name) for n in _top_level_imports(t))) for p, t in trees.items()}


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    found = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif state.get(nxt) is None:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def _attribute_chain(node: ast.expr) -> str | None:
    """``a.b.c`` as a string, or None when the chain does not start at a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def _private_uses(path: str, tree: ast.Module, by_name: dict[str, str]) -> list[str]:
    """Where ``path`` imports or reads a private name of another nslens module: ``from .x import _y``,
    ``x._y`` after ``from . import x``, ``nslens.x._y`` after ``import nslens.x``."""
    found = []
    bound = {}  # local name -> the nslens module it refers to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _resolve(node, path).split(".")[0] == "nslens":
            mod = _resolve(node, path)
            for a in node.names:
                if _is_private(a.name):
                    found.append(f"{path}:{node.lineno} imports {mod}.{a.name}")
                if f"{mod}.{a.name}" in by_name:
                    bound[a.asname or a.name] = f"{mod}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "nslens":
                    bound[a.asname] = a.name if a.asname else None
                    if not a.asname:
                        bound["nslens"] = "nslens"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            chain = _attribute_chain(node.value)
            head, _, rest = (chain or "").partition(".")
            if bound.get(head) and ".".join(filter(None, (bound[head], rest))) in by_name:
                found.append(f"{path}:{node.lineno} reads {chain}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_name():
    modules = _modules()
    by_name = {_dotted(p): p for p in modules}
    found = [f for path, tree in modules.items() for f in _private_uses(path, tree, by_name)]
    left = [f for f in found if not _covered(f.split(":")[0], PENDING)]
    assert not left, "\n".join(left)


def test_no_module_is_over_the_line_limit():
    long = {p.relative_to(PKG).as_posix(): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    left = {k: v for k, v in long.items() if not _covered(k, PENDING)}
    assert not left, left


def test_no_import_cycle_at_module_top_level():
    cycles = _cycles(_graph(_modules()))
    assert not cycles, "\n".join(cycles)


def test_the_checks_see_what_they_look_for():
    """The graph and the walks above on a made-up package, so that an empty result means something: a -> b -> a
    is a cycle, a lazy or TYPE_CHECKING import is no edge, a subpackage's ``..`` reaches the top, and importing
    a submodule loads its package."""
    trees = {"a.py": ast.parse("from .b import f\n"), "b.py": ast.parse("def g():\n    pass\nfrom . import a\n"),
             "c.py": ast.parse("def f():\n    from .a import g\nif TYPE_CHECKING:\n    from .b import h\n"),
             "sub/__init__.py": ast.parse(""), "sub/d.py": ast.parse("from ..a import f\nfrom . import e\n"),
             "sub/e.py": ast.parse("import nslens.c\n"), "f.py": ast.parse("from .sub.e import x\n")}
    graph = _graph(trees)
    assert graph == {"a.py": {"b.py"}, "b.py": {"a.py"}, "c.py": set(), "sub/__init__.py": set(),
                     "sub/d.py": {"a.py", "sub/e.py"}, "sub/e.py": {"c.py"}, "f.py": {"sub/__init__.py", "sub/e.py"}}
    assert _cycles(graph) == ["a.py -> b.py -> a.py"]
    by_name = {_dotted(p): p for p in trees}
    code = ("import nslens.a\nimport nslens.sub.e as e\nfrom . import a as aa\nfrom .b import _g, f\n"
            "x = nslens.a._f, e._h, aa._k, f._not_a_module, nslens.a.__doc__\n")
    assert _private_uses("sub/d.py", ast.parse(code), by_name) == [
        "sub/d.py:4 imports nslens.sub.b._g", "sub/d.py:5 reads nslens.a._f", "sub/d.py:5 reads e._h"]
    assert _private_uses("c.py", ast.parse("from . import a as aa\ny = aa._k\n"), by_name) == ["c.py:2 reads aa._k"]


def _function_body_imports(path: str, tree: ast.Module) -> list[str]:
    """The imports inside function bodies of ``path`` that neither ``LAZY_OK`` nor ``LAZY_NSLENS_OK`` allows, and
    lazy imports of what the module imports at its top anyway."""
    found = []
    top = _top_level_imports(tree)
    at_top = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    at_top |= {_resolve(n, path).split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and n.level == 0}
    top_ids = {id(n) for n in top}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top_ids:
            continue
        roots = ({a.name.split(".")[0] for a in node.names} if isinstance(node, ast.Import)
                 else {_resolve(node, path).split(".")[0]})
        for root in sorted(roots):
            if root == "nslens":
                if not _covered(path, LAZY_NSLENS_OK):
                    what = _resolve(node, path) if isinstance(node, ast.ImportFrom) else "nslens"
                    found.append(f"{path}:{node.lineno} imports {what} inside a function")
            elif root not in LAZY_OK and (path, root) not in LAZY_HERE:
                found.append(f"{path}:{node.lineno} imports {root} inside a function (not heavy or optional)")
            elif root in at_top:
                found.append(f"{path}:{node.lineno} imports {root} inside a function, already imported at the top")
    return found


def test_imports_in_function_bodies_are_for_heavy_or_optional_modules_only():
    found = [f for path, tree in _modules().items() for f in _function_body_imports(path, tree)]
    left = [f for f in found if not _covered(f.split(":")[0], PENDING)]
    assert not left, "\n".join(left)


def test_the_function_body_check_sees_what_it_looks_for():
    code = ast.parse("import scipy\ndef f():\n    import torch\n    import json\n    from .a import x\n"
                     "    from scipy import stats\n")
    assert _function_body_imports("b.py", code) == [
        "b.py:4 imports json inside a function (not heavy or optional)", "b.py:5 imports nslens.a inside a function",
        "b.py:6 imports scipy inside a function, already imported at the top"]
    assert _function_body_imports("cli/b.py", code) == [
        "cli/b.py:4 imports json inside a function (not heavy or optional)",
        "cli/b.py:6 imports scipy inside a function, already imported at the top"]
