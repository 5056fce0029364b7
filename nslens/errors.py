"""The user-error type: what nslens raises for bad input or an environment it cannot work in (a model that is
not served, a file that is truncated, a server that does not answer), as opposed to a bug.

``NsLensError`` subclasses ``ValueError`` so that code catching ``ValueError`` keeps working. The CLI and the
experiment scripts print a user error as one line (exit 1); any other exception is an internal error: one line
saying so and where ``save_traceback`` put its traceback, so that a numpy or torch error is never passed off as
bad input.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

__all__ = ["NsLensError", "check_choice", "check_number", "internal_error_line", "is_user_error", "save_traceback"]


class NsLensError(ValueError):
    """A user error: its message is one line naming the problem and, where there are any, the valid choices."""


def check_choice(what: str, value: object, choices: Sequence[str]) -> None:
    """``value`` is one of ``choices``, or the one-line error that names them all."""
    if value not in choices:
        raise NsLensError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def check_number(what: str, value: object, lo: float = -math.inf, hi: float = math.inf, *,
                 integer: bool = False) -> float:
    """``value`` as a finite float in [lo, hi] (a whole one with ``integer``), or the one-line error: a string,
    None, NaN or inf given as an operator's strength otherwise failed deep in a comparison or ran and returned
    NaN logits, and a string count failed as a TypeError."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        x = math.nan
    wrong_kind = isinstance(value, (str, bool)) or not math.isfinite(x) or (integer and not x.is_integer())
    if wrong_kind or not lo <= x <= hi:
        # the kind is named only where the value is not of it: "must be >= 1, got 0", "an integer >= 1, got 2.5"
        kind = "an integer" if integer else "a finite number"
        said = f"{kind} " if wrong_kind else ""
        bounds = (f"in [{lo:g}, {hi:g}]" if math.isfinite(lo) and math.isfinite(hi) else f"{said}>= {lo:g}"
                  if math.isfinite(lo) else f"{said}<= {hi:g}" if math.isfinite(hi) else kind)
        raise NsLensError(f"{what} must be {bounds}, got {value!r}")
    return x


def is_user_error(e: BaseException) -> bool:
    """Errors that are the user's to fix: nslens's own, and files or directories missing, misplaced or not
    writable (the operating system's words are clear enough there)."""
    return isinstance(e, (NsLensError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                          FileExistsError)) or type(e) is OSError


def save_traceback(e: BaseException) -> tuple[str, Path | None]:
    """``(traceback text, file it was saved to)``: under ``$NSLENS_HOME/errors`` (or the temp directory), with the
    command line, so that a bug report has it although the CLI printed one line. The path is None when nothing
    could be written."""
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    home = Path(os.environ.get("NSLENS_HOME") or Path.home() / ".cache" / "nslens")
    name = f"internal-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    for where in (home / "errors", Path(tempfile.gettempdir())):
        try:
            where.mkdir(parents=True, exist_ok=True)
            (where / name).write_text(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) + "\n\n" + text)
            return text, where / name
        except OSError:
            continue
    return text, None


def internal_error_line(e: BaseException, saved: Path | None, debug: bool) -> str:
    """The one line for an internal error: what it was, where its traceback is, how to see it."""
    where = f"the traceback is in {saved}" if saved else "the traceback could not be saved"
    return (f"internal error (a bug in nslens or a library it calls, not your input): {type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}; {where}" + ("" if debug else "; rerun with --debug to print it"))
