"""The README and docs/ run as written: every ```python block is executed (offline, on the embedded model) unless
the line before it says ``<!-- needs: hub -->`` or ``<!-- needs: ndif -->``; in every ```bash block, each
``nslens`` command names a real command and only options that command takes (the commands themselves run in
the CLI and experiment tests); every relative link points at a file that exists."""

from __future__ import annotations

import re
import runpy
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- needs: (?P<needs>\w+) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)


def blocks(lang: str):
    for page in PAGES:
        for m in FENCE.finditer(page.read_text()):
            if m["lang"] == lang:
                line = page.read_text()[: m.start()].count("\n") + 1
                yield pytest.param(m["code"], m["needs"], id=f"{page.relative_to(ROOT)}:{line}")


@pytest.mark.parametrize(("code", "needs"), list(blocks("python")))
def test_python_blocks_run(code, needs, tmp_path, monkeypatch, embedded):
    if needs in ("hub", "ndif"):
        compile(code, "<doc>", "exec")  # it must at least be Python
        return
    monkeypatch.chdir(tmp_path)
    # from a file, as a user runs it: nnsight reads a trace's `with` body back from its source file
    script = tmp_path / "block.py"
    script.write_text(code)
    runpy.run_path(str(script), run_name="__doc__")


def _commands(code: str):
    joined = code.replace("\\\n", " ")
    for raw in joined.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("nslens "):
            yield shlex.split(line)


def _options(command) -> set[str]:
    names = set()
    for p in command.params:
        names.update(p.opts)
        names.update(getattr(p, "secondary_opts", []))
    return names


@pytest.mark.parametrize(("code", "needs"), list(blocks("bash")))
def test_bash_commands_name_real_options(code, needs):
    import typer.main

    from nslens.cli import app

    group = typer.main.get_command(app)
    for argv in _commands(code):
        name = argv[1]
        assert name in group.commands, f"nslens {name}: no such command"
        allowed = _options(group.commands[name]) | {"--help"}
        for arg in argv[2:]:
            if arg.startswith("--"):
                assert arg.split("=", 1)[0] in allowed, f"nslens {name}: no option {arg}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(page):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
