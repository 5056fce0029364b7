"""The NEG paper's commands: neg (linearity of neuron empirical gradients) and probe (skill-neuron probes). Each
parses, calls one library function and prints; the library is imported inside the command (torch loads with it,
not with `nslens --help`)."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import print_markdown, progress_display
from .options import neg_config, option, run_config


def neg_cmd(
    ctx: typer.Context,
    model: str = option("--model"), dataset: str = option("--dataset"), layer: int = option("--layer"),
    label_words: str | None = option("--label-words"), remote: bool = option("--remote"),
    quantize: str | None = option("--quantize"), dtype: str | None = option("--dtype"),
    kind: str = option("--kind"), prompts: int = option("--prompts"), neurons: int = option("--neurons"),
    all_layers: bool = option("--all-layers"), log_prob: bool = option("--log-prob"),
    ig_steps: int = option("--ig-steps"), ig_grid: str = option("--ig-grid"), lpi_norm: str = option("--lpi-norm"),
    seed: int = option("--seed"),
    out: Path = typer.Option(Path("runs/neg"), "--out", "-o", help="Directory for neg.md and neg.json (a run "
                             "directory's report picks them up)."),
) -> None:
    """NEG linearity (NEG paper Tables 1-2): ground-truth shift sweeps (+-2, step 0.2) vs NeurGrad and the CG, IG
    and LPI baselines, on prompts the model answers correctly: share of linear neurons, polarity split,
    correlation and MAE. Remotely, LPI (which unembeds locally) is left out."""
    from nslens.negstudy import neg_linearity

    cfg, neg = run_config(ctx), neg_config(ctx)
    with progress_display() as cb:
        rep = neg_linearity(cfg, neg, out, progress=cb)
    print_markdown(rep.to_markdown())


def probe_cmd(
    ctx: typer.Context,
    model: str = option("--model"), dataset: str = option("--dataset"), layer: int = option("--layer"),
    n_per_class: int = option("--n-per-class"), label_words: str | None = option("--label-words"),
    kind: str = option("--kind"), batch_size: int = option("--batch-size"), remote: bool = option("--remote"),
    quantize: str | None = option("--quantize"), dtype: str | None = option("--dtype"),
    mceval: str | None = option("--mceval"), mceval_path: Path | None = option("--mceval-path"),
    zero_shot: bool = option("--zero-shot"), queries: int | None = option("--queries"),
    seed: int = option("--seed"),
    out: Path = typer.Option(Path("runs/probe"), "--out", "-o", help="Directory for probes.md and probes.json (a "
                             "run directory's report picks them up)."),
) -> None:
    """Skill-neuron probes (Polar, Magn, Tree) on NeurGrad features, with the LM-Prob and Act baselines; the
    options are the dataset's labels, or an MCEval8K task's answer tokens."""
    from nslens.negstudy import skill_probes

    cfg, neg = run_config(ctx), neg_config(ctx)
    with progress_display() as cb:
        res = skill_probes(cfg, neg, out, progress=cb)
    print_markdown(res.to_markdown())
