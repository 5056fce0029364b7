"""What every experiment script shares with the CLI: one-line errors (exit 1), Ctrl-C (exit 130), progress lines,
validated arguments, and run directories named so that no path argument can point them at an input file."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's usage error: a short usage line and one ``error:`` line, exit 2 (argparse printed
    the whole usage, several lines, and ``<script>: error:``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"Usage: {self.prog} [OPTIONS] (--help lists them)\nerror: {message}\n")
        sys.exit(2)


def parser(doc: str | None) -> Parser:
    """The scripts' argument parser (their docstring as its description)."""
    return Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def check_out(out: Path) -> Path:
    """``--out`` (a directory) can be written, checked before any work: a file there failed only at the end, with
    every result lost."""
    from nslens.errors import NsLensError
    from nslens.workflows import check_writable

    if out.exists() and not out.is_dir():
        raise NsLensError(f"--out {out} is a file; give a directory for the results")
    check_writable(out / "results")
    return out


def check_datasets(specs: list[str], out: Path) -> None:
    """Every dataset is known and has a run directory of its own, checked before the first run: a typo in the
    third dataset cost the first two runs, and ``a/data.csv b/data.csv`` wrote both into ``out/data``."""
    from nslens.errors import NsLensError

    seen: dict[Path, str] = {}
    for spec in specs:
        check_dataset(spec)
        where = run_dir(out, spec)
        if where in seen:
            raise NsLensError(f"datasets {seen[where]!r} and {spec!r} would share the run directory {where}; "
                              "rename one of the files")
        seen[where] = spec


def check_dataset(spec: str) -> None:
    """A dataset spec is known (or its file exists), checked before the model loads."""
    from nslens.data import check_dataset_spec

    check_dataset_spec(spec)


def seed_list(text: str) -> list[int]:
    """argparse type: comma-separated seeds, each an integer >= 0 (``--seeds a`` was an internal error after the
    model had loaded)."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected seeds >= 0, got {text!r}")
    return seeds


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--limit 0`` is an error, not "no limit")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_sample_args(ap: argparse.ArgumentParser) -> None:
    """--limit (samples per class) and --all-samples (switch off the only-correct filter)."""
    ap.add_argument("--limit", type=positive_int, default=None, help="samples per class (smoke mode)")
    ap.add_argument("--all-samples", action="store_true",
                    help="keep samples the clean model misclassifies (the paper keeps only correct ones)")


def default_dataset(model: str, dataset: str | None, paper_default: str) -> str:
    """The embedded model's data is offline and synthetic; any other model defaults to the paper's dataset."""
    if dataset is not None:
        return dataset
    return "synthetic" if model == "embedded" else paper_default


def run_dir(out: Path, dataset: str) -> Path:
    """``out / <name>`` for a dataset name or path: a path contributes its file stem, never itself."""
    name = Path(dataset).stem if dataset.endswith((".csv", ".jsonl", ".json")) else dataset
    return out / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "dataset")


def progress() -> object:
    """The CLI's progress display (a bar on a terminal, a line per stage otherwise)."""
    from nslens.cli import progress_display

    return progress_display()


def run(main: Callable[[list[str] | None], object]) -> None:
    """Call ``main`` like the CLI: bad input is one ``error:`` line and exit 1, Ctrl-C one line and exit 130, any
    other exception one line saying it is internal and where its traceback was saved (``--debug`` prints it)."""
    import logging

    from nslens.cli import quiet_libraries
    from nslens.errors import internal_error_line, is_user_error, save_traceback

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()  # no weight-loading bar before a one-line error, as in the CLI
    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv.remove("--debug")
    try:
        main(None)
    except KeyboardInterrupt:
        sys.stderr.write(f"error: interrupted: {Path(sys.argv[0]).name}\n")
        sys.exit(130)
    except Exception as e:
        if is_user_error(e):
            sys.stderr.write("error: " + " ".join(str(e).split()) + "\n")
        else:
            text, saved = save_traceback(e)
            if debug:
                sys.stderr.write(text)
            sys.stderr.write("error: " + internal_error_line(e, saved, debug) + "\n")
        sys.exit(1)


def run_parser(doc: str | None, config: object, out: str, *, lm_eval: bool = False,
               dataset_help: str | None = None) -> argparse.ArgumentParser:
    """The arguments the run-based scripts share: model, dataset, samples, remote, batch size, output (and the
    lm-eval limit where side effects are measured)."""
    ap = parser(doc)
    ap.add_argument("--model", default=config.model)
    ap.add_argument("--dataset", default=None,
                    help=dataset_help or f"default: {config.dataset} (synthetic for the embedded model)")
    add_sample_args(ap)
    if lm_eval:
        ap.add_argument("--lm-eval-limit", type=float, default=None, help="lm-eval --limit (per MMLU subtask)")
    ap.add_argument("--remote", action="store_true")
    ap.add_argument("--batch-size", type=positive_int, default=16)
    ap.add_argument("--out", type=Path, default=Path(out))
    return ap
