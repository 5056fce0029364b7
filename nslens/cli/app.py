"""The typer app, its two consoles (results on stdout, progress and messages on stderr) and what every command
prints with: the progress display and the erasure table."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Range-based neuron attribution and intervention (NeuronLens) on nnsight.")
# rich reads "[word]" as a style tag and ":name:" as an emoji: no emoji anywhere, and text that is not nslens's own
# markup (paths, concept names, messages) goes through rich.markup.escape
console = Console(stderr=True, emoji=False)
out_console = Console(width=None if sys.stdout.isatty() else 140, emoji=False)


def done(label: str, text: object) -> None:
    """A green ``label`` and what was written, on stderr; the text is printed as it is (a path may hold
    brackets)."""
    console.print(f"[green]{label}[/] {escape(str(text))}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def progress_display() -> Iterator:
    """A rich progress bar fed by the library's (task, done, total) callback; without a terminal, plain lines: one
    when a stage finishes, and one every 30 s while a long stage runs."""
    if not console.is_terminal:
        yield _line_progress()
        return
    tasks: dict[str, int] = {}
    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        def callback(desc: str, done: int, total: int) -> None:
            if desc not in tasks:
                tasks[desc] = bar.add_task(desc, total=total)
            bar.update(tasks[desc], completed=done, total=total)

        yield callback


def _line_progress(every: float = 30.0) -> Any:
    started: dict[str, float] = {}
    last: dict[str, float] = {}
    seen: dict[str, int] = {}

    def callback(desc: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < seen.get(desc, 0):  # the same stage again (e.g. the filter on train, then on test)
            started[desc] = last[desc] = now
        seen[desc] = done
        t0 = started.setdefault(desc, now)
        if done >= total or now - last.get(desc, t0) >= every:
            last[desc] = now
            sys.stderr.write(f"{desc}: {done}/{total} ({now - t0:.1f} s)\n")
            sys.stderr.flush()

    return callback


def print_markdown(text: str) -> None:
    """Markdown from the library, printed as it is (no rich markup or highlighting)."""
    out_console.print(text, markup=False, highlight=False)


def print_table(tab: Any) -> None:
    """An ``ErasureTable`` as a terminal table with its footer."""
    from nslens.erasure import trim_note  # torch loads with the library, not with `nslens --help`

    t = Table(title=f"Concept erasure (operator: {tab.operator})", show_lines=False)
    for h in ("concept", "Acc", "Conf", "CAcc", "CConf", "N ΔAcc", "N ΔConf", "N ΔCAcc", "N ΔCConf",
              "R ΔAcc", "R ΔConf", "R ΔCAcc", "R ΔCConf"):
        t.add_column(h, justify="right" if h != "concept" else "left")
    for r in tab.rows():
        t.add_row(escape(str(r[0])), *(f"{v:.3f}" if j < 4 else f"{v:+.3f}" for j, v in enumerate(r[1:])))
    out_console.print(t)
    out_console.print("N = neuron masking (ungated), R = range masking (gated); deltas vs base; CAcc/CConf "
                      f"{'pooled over' if tab.meta.get('cacc_average') == 'pooled' else 'averaged over'} the other "
                      "concepts. " + trim_note(len(tab.concepts)))


def print_run(result: Any, names: list[str] | None = None) -> None:
    """A run's erasure tables (``names``, default: the operators') and each one's side effects, from its result."""
    for name in names if names is not None else result.tables:
        print_table(result.erasure(name))
        side = result.side_effects(name)
        if side is not None:
            out_console.print(f"Side effects (lm-eval), operator {name}:", markup=False)
            print_markdown(side.to_markdown())
