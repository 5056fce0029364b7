"""What every experiment script shares with the CLI: one-line errors (exit 1), Ctrl-C (exit 130), progress lines,
validated arguments, and run directories named so that no path argument can point them at an input file."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path


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
    from nslens.errors import internal_error_line, is_user_error, save_traceback

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
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
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
