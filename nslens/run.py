"""A run directory and what happens in it: ``Run`` owns the directory, its summary and its steps; ``RunResult`` is
what a finished run hands back.

Every step runs inside ``run.step(name)``: its time and outcome go into ``summary.json`` (``steps``), which is
rewritten atomically after every step, so the file always says how far the run got (``status``: running,
complete, failed or interrupted). A required step that fails ends the run (its status says why); an optional one
(``required=False``) is recorded under ``failed_steps`` and the run goes on: an hour of remote erasure work is never
thrown away because a figure failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .effects import SideEffectTable
from .erasure import ErasureTable
from .errors import NsLensError
from .files import is_leftover, read_json, write_text

__all__ = ["Run", "RunResult", "StepRecord", "is_run_dir"]

logger = logging.getLogger(__name__)


@dataclass
class StepRecord:
    """One step of a run: whether the run needs it, how it ended (done or failed) and how long it took."""

    name: str
    required: bool
    status: str = "running"
    seconds: float = 0.0
    error: str | None = None


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory a run wrote (``Run.start`` writes ``config.json`` then ``summary.json``)."""
    path = Path(path)
    return (path / "summary.json").is_file() or (path / "config.json").is_file()


class Run:
    """The run directory ``path`` while a run writes it.

    ``Run(path, overwrite=...)`` refuses a non-empty directory unless ``overwrite`` (temporary files a killed
    writer left behind do not count), and even then unless it is a run's own (it holds ``summary.json`` or
    ``config.json``): replacing deletes the directory, and a user's folder given as ``--out`` must survive
    the mistake; ``with run:`` creates it afresh and sets the final status on the way out;
    ``run.step(name)`` times a step; ``run.summary`` is the dict ``summary.json`` holds (``run.save()`` writes it)."""

    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        kept = [p for p in self.path.iterdir() if not is_leftover(p)] \
            if self.path.exists() else []
        if kept and not is_run_dir(self.path):
            raise NsLensError(f"{self.path} exists, is not empty and is not an nslens run directory (no "
                              "summary.json); choose a new or empty directory as --out")
        if kept and not overwrite:
            raise NsLensError(f"run directory {self.path} exists and is not empty (pass --overwrite to replace it)")
        self.summary: dict[str, Any] = {"status": "running", "failed_steps": {}}
        self.steps: dict[str, StepRecord] = {}

    def start(self, config: dict[str, Any], **summary: Any) -> None:
        """Create the directory afresh with ``config.json`` and a first ``summary.json`` (status running)."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        write_text(self.path / "config.json", json.dumps(config, indent=2))
        self.summary = {"status": "running", **summary, "failed_steps": {}}
        self.save()

    def save(self) -> None:
        self.summary["steps"] = {name: asdict(s) for name, s in self.steps.items()}
        write_text(self.path / "summary.json", json.dumps(self.summary, indent=2))

    @contextlib.contextmanager
    def step(self, name: str, *, required: bool = True) -> Iterator[StepRecord]:
        """Run the ``with`` body as step ``name``; a failing optional step is recorded and swallowed (Ctrl-C is
        never swallowed)."""
        rec = self.steps[name] = StepRecord(name, required)
        t0 = time.monotonic()
        try:
            yield rec
            rec.status = "done"
        except Exception as e:
            rec.status, rec.error = "failed", f"{type(e).__name__}: {e}"
            if required:
                raise
            self.summary["failed_steps"][name] = rec.error
            logger.warning("step %s failed (%s); the run goes on", name, rec.error)
        finally:
            rec.seconds = round(time.monotonic() - t0, 3)
            if rec.status == "running":  # interrupted
                rec.status = "interrupted"
            self.save()

    def complete(self) -> None:
        self.summary["status"] = "complete"
        self.save()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if e is None or not self.path.exists():
            return
        self.summary["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) \
            else f"failed: {type(e).__name__}: {e}"
        self.save()

    def result(self) -> RunResult:
        return RunResult(self.path, self.summary, dict(self.steps))


@dataclass
class RunResult:
    """A finished run: its directory, its summary and its steps.

    It stands in for the directory's ``Path`` as ``run_pipeline`` returned one before (``result / "report.md"``,
    ``result.iterdir()``, ``os.fspath(result)``)."""

    path: Path
    summary: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, StepRecord] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return self.summary.get("status", "")

    @property
    def failed_steps(self) -> dict[str, str]:
        """Optional steps that failed: name -> error."""
        return dict(self.summary.get("failed_steps") or {})

    @property
    def tables(self) -> list[str]:
        """The erasure tables the run wrote, by name (operators, then steering runs)."""
        return list(self.summary.get("erasure", {}))

    @property
    def config(self) -> dict[str, Any]:
        """The run's ``config.json`` (the ``RunConfig`` as a dict, sections as sub-dicts)."""
        return read_json(self.path / "config.json")

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    def erasure(self, name: str) -> Any:
        """Erasure table ``name`` (an operator or a steering run) as an ``ErasureTable``."""
        return read_json(self.path / f"erasure_{name}.json", ErasureTable.from_json)

    def side_effects(self, name: str) -> Any:
        """Side-effect table ``name`` as a ``SideEffectTable``, or None when the run measured none for it."""
        path = self.path / f"side_effects_{name}.json"
        if not path.exists():
            return None

        return read_json(path, SideEffectTable.from_json)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __truediv__(self, other: str | Path) -> Path:
        return self.path / other

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("path", "summary", "steps"):
            raise AttributeError(name)
        return getattr(self.path, name)  # the rest of the Path API (iterdir, glob, exists, name, ...)
