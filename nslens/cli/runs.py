"""The commands that make or read a run directory: run, sae, steer, sweep, demo, analyze, report. Each parses,
calls one library function and prints from the ``RunResult`` it returns; the library is imported inside the
command (torch loads with it, not with `nslens --help`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import NsLensError
from .app import done, out_console, print_markdown, print_run, progress_display
from .options import option, run_config

OverwriteOpt = typer.Option(False, help="Replace an existing run directory.")


def run_cmd(
    # the help is rich markup: "\[" keeps a bracket that would otherwise read as a style tag and vanish
    config: Path = typer.Argument(..., help="Run config (.toml or .json): RunConfig's fields, and its sections as "
                                  "tables (\\[sae], \\[steering], \\[sweeps], \\[side_effects])."),
    out: Path = typer.Option(Path("runs/latest"), "--out", "-o", help="Run directory to create."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """The whole pipeline from a config file; writes a run directory with artifacts, tables and a report."""
    from nslens.pipeline import RunConfig, run_pipeline

    cfg = RunConfig.from_file(config)
    with progress_display() as cb:
        result = run_pipeline(cfg, out, progress=cb, overwrite=overwrite)
    print_run(result, cfg.operators)
    done("run written to", f"{result.path} (report: {result.report})")


def sae_cmd(
    ctx: typer.Context,
    model: str = option("--model"), dataset: str = option("--dataset"), layer: int = option("--layer"),
    n_per_class: int = option("--n-per-class"), batch_size: int = option("--batch-size"),
    remote: bool = option("--remote"), quantize: str | None = option("--quantize"),
    dtype: str | None = option("--dtype"), seed: int = option("--seed"),
    label_words: str | None = option("--label-words"),
    readout: str = option("--readout"), k_shot: int = option("--k-shot"),
    max_words: int = option("--max-words"),
    sae_path: Path | None = option("--sae-path"), release: str | None = option("--sae-release"),
    sae_id: str | None = option("--sae-id"), operators: str = option("--operators"),
    ranges_over: str = option("--sae-ranges-over"), side_effects: bool = option("--side-effects", True),
    tasks: str = option("--tasks"), limit: float | None = option("--lm-eval-limit"),
    only_correct: bool = option("--only-correct"),
    out: Path = typer.Option(Path("runs/sae"), "--out", "-o", help="Run directory to create."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Range masking of SAE features (Gemma Scope JumpReLU) vs feature masking: paper Tables 31-32."""
    from nslens.pipeline import run_pipeline
    from nslens.report import section

    if not sae_path and not release:
        raise NsLensError("name the SAE: --sae-path params.npz, or --sae-release R --sae-id ID")
    cfg = run_config(ctx, analyses=False)
    with progress_display() as cb:
        result = run_pipeline(cfg, out, progress=cb, overwrite=overwrite)
    print_markdown(section(result.path, "sae"))
    done("run written to", result.path)


def steer_cmd(
    ctx: typer.Context,
    model: str = option("--model"), dataset: str = option("--dataset"),
    layer: int | None = option("--layer", None, help="Decoder layer (default: the middle one, as the paper steers "
                               "at layer 14 of Llama-3.2-3B's 28)."),
    n_per_class: int = option("--n-per-class"), batch_size: int = option("--batch-size"),
    remote: bool = option("--remote"), quantize: str | None = option("--quantize"),
    dtype: str | None = option("--dtype"), seed: int = option("--seed"),
    label_words: str | None = option("--label-words"),
    readout: str = option("--readout"), k_shot: int = option("--k-shot"),
    max_words: int = option("--max-words"),
    steering: str = option("--steering", "steer,ablate,arm"), steer_alpha: float = option("--steer-alpha"),
    steer_source: str = option("--steer-source"), steer_tau: float = option("--steer-tau"),
    side_effects: bool = option("--side-effects", True), tasks: str = option("--tasks"),
    limit: float | None = option("--lm-eval-limit"), only_correct: bool = option("--only-correct"),
    out: Path = typer.Option(Path("runs/steer"), "--out", "-o", help="Run directory to create."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Steering baselines vs range masking (paper App. M, Tables 28-30): difference-in-means steering, range-gated
    steering, directional ablation and full-vector range masking."""
    from nslens.report import section
    from nslens.workflows import steering_run

    cfg = run_config(ctx, layer=-1 if layer is None else layer, operators=["zero"], analyses=False)
    with progress_display() as cb:
        result = steering_run(cfg, out, middle_layer=layer is None, progress=cb, overwrite=overwrite)
    for part in ("steering", "side_effects"):
        print_markdown(section(result.path, part))


def sweep_cmd(
    config: Path = typer.Argument(..., help="Run config (.toml or .json)."),
    param: str = option("--param", ...),
    values: str | None = typer.Option(None, "--values", help="Comma-separated values (default: the config's sweep "
                                      "values)."),
    out: Path = typer.Option(Path("runs/sweep"), "--out", "-o", help="Run directory to create."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Erasure along masking fraction, tau or layer (one recording per layer), with a curve figure."""
    from nslens.pipeline import RunConfig
    from nslens.workflows import sweep_run

    vals: list[float] = []  # none given: the config's sweep values
    if values is not None:
        try:
            vals = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            vals = []
        if not vals:  # an empty --values fell back to the config's values
            raise NsLensError(f"--values must be comma-separated numbers, got {values!r}")
    cfg = RunConfig.from_file(config)
    with progress_display() as cb:
        result = sweep_run(cfg, param, vals, out, progress=cb, overwrite=overwrite)
    print_markdown((result.path / f"sweep_{param}.md").read_text())
    done("sweep written to", f"{result.path} (figure: {result.path / 'figures' / f'sweep_{param}.png'})")


def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run directory (replaced if it exists)."),
    fraction: float = option("--fraction", 0.5),
    operators: str = option("--operators", "zero,adaptive"),
    side_effects: bool = option("--side-effects", True, help="Also measure lm-eval side effects (offline synthetic "
                                "tasks)."),
) -> None:
    """The whole pipeline on the embedded model and synthetic concepts (offline; about 20 s, plus up to three
    minutes to train the model the first time)."""
    from nslens.workflows import demo_run

    with progress_display() as cb:
        result = demo_run(out, fraction=fraction, operators=[o.strip() for o in operators.split(",") if o.strip()],
                          side_effects=side_effects, progress=cb)
    s = result.summary
    out_console.print(f"embedded model, layer {s['site']['layer']} of {s['site']['n_layers']}, top {fraction:.0%} "
                      f"({s['neurons_per_concept']} of {s['site']['d_model']} neurons) per concept, tau "
                      f"{result.config['tau']}, {s['n_test']} test samples")
    print_run(result)
    done("run written to", result.path)


def analyze_cmd(run: Path = typer.Argument(..., help="Run directory (from `nslens run`).")) -> None:
    """Normality, polysemanticity, distribution overlap, activation patterns and samples at the bounds of a run."""
    from nslens.pipeline import analyze_run

    report = analyze_run(run)
    done("analyses written to", f"{run} (report: {report})")


def report_cmd(run: Path = typer.Argument(..., help="Run directory.")) -> None:
    """(Re)write a run's report.md from what the run directory holds."""
    from nslens.report import write_report

    done("wrote", write_report(run))


def explore_cmd(run: Path = typer.Argument(..., help="Run directory (from `nslens run`)."),
                out: Path | None = typer.Option(None, "--out", "-o", help="Where to write the page (default: "
                                                "<run>/explorer.html).")) -> None:
    """(Re)write a run's explorer.html: one self-contained page to browse its tables, neurons and ranges."""
    from nslens.explorer import write_explorer
    from nslens.workflows import check_writable

    if out is not None:
        check_writable(out, file=True)
    done("wrote", write_explorer(run, out))  # it checks the page path before any work
