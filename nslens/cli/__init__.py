"""The ``nslens`` command line: thin commands over the library (parse, call one function, print), one vocabulary of
options (``options.FLAGS``: each flag sets one configuration field, the same on every command), and the error
policy of ``main``.

The commands live in ``steps`` (record, ranges, erase, side-effects, nexttoken), ``runs`` (run, sae, steer, sweep,
demo, analyze, report) and ``neurons`` (neg, probe); ``COMMANDS`` registers them on ``app`` in the order of the
data flow, which ``nslens --help`` shows.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from rich.markup import escape

from ..errors import internal_error_line, is_user_error, save_traceback
from . import neurons, runs, steps
from .app import app, console, out_console, progress_display

__all__ = ["COMMANDS", "app", "console", "main", "out_console", "progress_display", "quiet_libraries"]

COMMANDS = {
    "record": steps.record_cmd, "ranges": steps.ranges_cmd, "erase": steps.erase_cmd,
    "nexttoken": steps.nexttoken_cmd, "side-effects": steps.side_effects_cmd, "run": runs.run_cmd,
    "sae": runs.sae_cmd, "steer": runs.steer_cmd, "neg": neurons.neg_cmd, "probe": neurons.probe_cmd,
    "analyze": runs.analyze_cmd, "sweep": runs.sweep_cmd, "report": runs.report_cmd, "demo": runs.demo_cmd,
    "explore": runs.explore_cmd, "generate": steps.generate_cmd, "bundle": steps.bundle_cmd,
    "export-steering": steps.export_steering_cmd,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)


def _error(message: str) -> None:
    """One line on stderr, unwrapped (also without a terminal), coloured only on a terminal."""
    text = " ".join(str(message).split())
    if sys.stderr.isatty():
        console.print(f"[red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
    else:
        sys.stderr.write(f"error: {text}\n")


def _is(e: BaseException, name: str) -> bool:
    """Click's exception classes by name: typer >= 0.2x bundles its own click (``typer._click``), older typer
    uses ``click``; both are recognised."""
    return any(c.__name__ == name for c in type(e).__mro__)


def _interrupted(argv: list[str]) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args if not a.startswith("-")), "nslens")
    hint = ""
    ck = next((a.split("=", 1)[1] for a in args if a.startswith("--checkpoint=")), None)
    if "--checkpoint" in args[:-1]:
        ck = args[args.index("--checkpoint") + 1]
    if ck is not None:
        hint = ("; the checkpoint keeps the saved batches: run the same command again to resume ("
                + " ".join(["nslens", *args]) + ")") if Path(ck).exists() else "; no batch was checkpointed yet"
    elif command in ("run", "demo", "sae"):
        hint = "; finished artifacts stay in the run directory (summary.json says how far it got)"
    _error(f"interrupted: nslens {command}{hint}")


def _internal_error(e: BaseException, debug: bool) -> None:
    """A bug, not a user error: one line saying so and where the full traceback was saved (``--debug`` or
    ``NSLENS_DEBUG=1`` prints it as well)."""
    text, saved = save_traceback(e)
    if debug:
        sys.stderr.write(text)
    _error(internal_error_line(e, saved, debug))


def main(argv: list[str] | None = None) -> None:
    """Entry point. Usage errors: the usage line and one ``error:`` line, exit 2. Other user errors
    (``NsLensError``, a missing or unwritable file): one line, exit 1. Ctrl-C: one line saying what was interrupted
    (and how to resume), exit 130. Any other exception is an internal error: one line saying so and where its
    traceback was saved, exit 1; ``--debug`` (anywhere on the line) or ``NSLENS_DEBUG=1`` also prints it."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("NSLENS_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    argv = args
    try:
        code = app(args=args, standalone_mode=False, prog_name="nslens")
    except KeyboardInterrupt:
        _interrupted(argv)
        sys.exit(130)
    except Exception as e:  # click's (or typer's bundled click's) exceptions
        if _is(e, "Abort"):  # click turns Ctrl-C into Abort when it is not in standalone mode
            _interrupted(argv)
            sys.exit(130)
        if _is(e, "UsageError"):
            ctx = getattr(e, "ctx", None)
            if ctx is not None:
                sys.stderr.write(ctx.get_usage().strip() + "\n")
            if _is(e, "NoArgsIsHelpError"):
                names = sorted(getattr(ctx.command, "commands", {})) if ctx is not None else []
                _error("missing command; choose one of " + ", ".join(names))
            else:
                _error(e.format_message())
            sys.exit(2)
        if _is(e, "ClickException"):
            _error(e.format_message())
            sys.exit(getattr(e, "exit_code", 1))
        if is_user_error(e):
            _error(str(e))
            sys.exit(1)
        _internal_error(e, debug)
        sys.exit(1)
    # typer >= 0.2x turns Ctrl-C into Exit(130), which a non-standalone call returns instead of raising
    if isinstance(code, int) and not isinstance(code, bool) and code:
        if code == 130:
            _interrupted(argv)
        sys.exit(code)


def quiet_libraries() -> None:
    """No third-party progress bars or chatter around nslens's own output (transformers' weight-loading bar). Set
    through the variables transformers reads when it is imported, so that ``--help`` does not import it."""
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # bitsandbytes warns at import on a CPU machine that an optional kernel package is missing: a command that only
    # imports it (sae-lens does) printed that line above its own one-line error
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
