"""The single-step commands: record, ranges, erase, side-effects, nexttoken. Each parses, calls one library
function and prints; the library is imported inside the command (torch loads with it, not with `nslens --help`)."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import console, print_markdown, print_table, progress_display
from .options import option, run_config

RangesOpt = typer.Option(..., "--ranges", "-r", help="Directory of range masks.")
AllowOtherModelOpt = typer.Option(False, "--allow-other-model",
                                  help="Use masks recorded on another model id (e.g. a fine-tuned copy).")


def record_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors for the statistics."),
    model: str = option("--model"), dataset: str = option("--dataset"), layer: int = option("--layer"),
    n_per_class: int = option("--n-per-class"), batch_size: int = option("--batch-size"),
    remote: bool = option("--remote"), position: str = option("--position"), seed: int = option("--seed"),
    only_correct: bool = option("--only-correct"), label_words: str | None = option("--label-words"),
    quantize: str | None = option("--quantize"), dtype: str | None = option("--dtype"),
    checkpoint: Path | None = typer.Option(None, help="Save partial statistics here; re-run to resume."),
) -> None:
    """Record per-concept activation statistics at a site (training split)."""
    from nslens.workflows import record_to_file

    cfg = run_config(ctx)
    with progress_display() as cb:
        rec, site = record_to_file(cfg, out, checkpoint=checkpoint, progress=cb)
    console.print(f"[green]wrote[/] {out} ({int(rec.stats.count.sum())} samples, {site.d_model} neurons, "
                  f"{rec.stats.n_concepts} concepts, layer {site.layer})")


def ranges_cmd(
    stats: Path = typer.Argument(..., help="Statistics file from `nslens record`."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the range masks."),
    method: str = option("--method"), fraction: float = option("--fraction"), tau: float = option("--tau"),
) -> None:
    """Rank neurons and write one range mask per concept."""
    from nslens.workflows import write_ranges

    masks = write_ranges(stats, out, method=method, fraction=fraction, tau=tau)
    console.print(f"[green]wrote[/] {len(masks)} masks of {len(masks[0])} neurons to {out}")


def erase_cmd(
    ctx: typer.Context,
    ranges: Path = RangesOpt,
    model: str = option("--model"), dataset: str = option("--dataset"), layer: int = option("--layer"),
    n_per_class: int = option("--n-per-class"), batch_size: int = option("--batch-size"),
    remote: bool = option("--remote"), operators: str = option("--operators"), alpha: float = option("--alpha"),
    beta: float = option("--beta"), positions: str = option("--positions"), seed: int = option("--seed"),
    only_correct: bool = option("--only-correct"), label_words: str | None = option("--label-words"),
    allow_other_model: bool = AllowOtherModelOpt,
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the table as .md/.csv/.json here (several "
                                    "operators: <out>_<operator>)."),
    quantize: str | None = option("--quantize"), dtype: str | None = option("--dtype"),
) -> None:
    """Evaluate neuron vs range masking of every concept on the test split."""
    from nslens.workflows import erase_with_masks

    cfg = run_config(ctx)
    with progress_display() as cb:
        tables = erase_with_masks(cfg, ranges, out=out, allow_other_model=allow_other_model, progress=cb)
    for tab in tables.values():
        print_table(tab)


def side_effects_cmd(
    ctx: typer.Context,
    ranges: Path = RangesOpt,
    model: str = option("--model"), layer: int = option("--layer"), batch_size: int = option("--batch-size"),
    remote: bool = option("--remote"),
    dataset: str = option("--dataset", help="leace only: the concepts its erasers are fitted on (as for erase)."),
    n_per_class: int = option("--n-per-class", help="leace only: samples per concept before the split."),
    seed: int = option("--seed"), only_correct: bool = option("--only-correct"),
    label_words: str | None = option("--label-words"),
    operators: str = option("--operators"), alpha: float = option("--alpha"), beta: float = option("--beta"),
    tasks: str = option("--tasks"), limit: float | None = option("--lm-eval-limit"),
    include: Path | None = option("--include"), positions: str = option("--positions"),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the table as .md/.json here (several "
                                    "operators: <out>_<operator>)."),
    allow_other_model: bool = AllowOtherModelOpt,
    quantize: str | None = option("--quantize"), dtype: str | None = option("--dtype"),
) -> None:
    """lm-eval side effects (MMLU acc, Wikipedia token perplexity) of neuron vs range masking of every concept."""
    from nslens.workflows import side_effects_with_masks

    cfg = run_config(ctx)
    with progress_display() as cb:
        tables = side_effects_with_masks(cfg, ranges, out=out, allow_other_model=allow_other_model, progress=cb)
    for tab in tables.values():
        print_markdown(tab.to_markdown())


def nexttoken_cmd(
    family: str = typer.Argument(..., help="pronouns, pronoun_pairs, punctuation, delimiters, agreement, or "
                                 "concepts as w1,w2/w3 (a concept per comma, its tokens split by /)."),
    source: str = typer.Option("wikitext", "--source", "-s", help="wikitext (WikiText-103 through datasets), "
                               "synthetic (the embedded model's text) or a .txt (a text per line) / .jsonl file."),
    n_per_class: int = option("--n-per-class", 500, help="Samples per concept (the paper: 500)."),
    min_words: int = typer.Option(5, "--min-words", help="Shortest context, in words."),
    max_words: int = option("--max-words", help="Contexts are cut on the left to this many words."),
    seed: int = option("--seed"),
    out: Path = typer.Option(Path("nexttoken/samples"), "--out", "-o",
                             help="Writes <out>.jsonl (the dataset) and <out>.md (the check sheet)."),
) -> None:
    """Extract next-token concept samples (paper App. K) for the manual check: contexts that end right before a
    concept's token. Delete wrong rows from the .jsonl and use it as --dataset (or use next:FAMILY:SOURCE)."""
    from nslens.workflows import export_next_token

    with progress_display() as cb:
        samples, concepts, paths = export_next_token(family, source, out, n_per_concept=n_per_class, seed=seed,
                                                     min_words=min_words, max_words=max_words, progress=cb)
    counts = ", ".join(f"{c.name} {sum(s.concept == c.name for s in samples)}" for c in concepts)
    console.print(f"[green]wrote[/] {len(samples)} samples ({counts}) to {paths[0]} and the check sheet {paths[1]}")
