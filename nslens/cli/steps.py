"""The single-step commands: record, ranges, erase, side-effects, nexttoken. Each parses, calls one library
function and prints; the library is imported inside the command (torch loads with it, not with `nslens --help`)."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import done, print_markdown, print_table, progress_display
from .options import option, run_config

RangesOpt = typer.Option(..., "--ranges", "-r", help="Directory of range masks.")
MaybeRangesOpt = typer.Option(None, "--ranges", "-r", help="Directory of range masks (or give --bundle).")
BundleOpt = typer.Option(None, "--bundle", "-b", help="An intervention bundle directory (nslens bundle; instead of "
                         "--ranges).")
AllowOtherModelOpt = typer.Option(False, "--allow-other-model",
                                  help="Use masks recorded on another model id (e.g. a fine-tuned copy).")


def record_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors for the statistics."),
    model: str = option("--model"), dataset: str = option("--dataset"), layer: int = option("--layer"),
    n_per_class: int = option("--n-per-class"), batch_size: int = option("--batch-size"),
    remote: bool = option("--remote"), position: str = option("--position"), seed: int = option("--seed"),
    only_correct: bool = option("--only-correct"), label_words: str | None = option("--label-words"),
    readout: str = option("--readout"), k_shot: int = option("--k-shot"),
    max_words: int = option("--max-words"),
    quantize: str | None = option("--quantize"), dtype: str | None = option("--dtype"),
    checkpoint: Path | None = typer.Option(None, help="Save partial statistics here; re-run to resume."),
) -> None:
    """Record per-concept activation statistics at a site (training split)."""
    from nslens.workflows import record_to_file

    cfg = run_config(ctx)
    with progress_display() as cb:
        rec, site = record_to_file(cfg, out, checkpoint=checkpoint, progress=cb)
    done("wrote", f"{out} ({int(rec.stats.count.sum())} samples, {site.d_model} neurons, "
                  f"{rec.stats.n_concepts} concepts, layer {site.layer})")


def ranges_cmd(
    stats: Path = typer.Argument(..., help="Statistics file from `nslens record`."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the range masks."),
    method: str = option("--method"), fraction: float = option("--fraction"), tau: float = option("--tau"),
) -> None:
    """Rank neurons and write one range mask per concept."""
    from nslens.workflows import write_ranges

    masks = write_ranges(stats, out, method=method, fraction=fraction, tau=tau)
    done("wrote", f"{len(masks)} masks of {len(masks[0])} neurons to {out}")


def erase_cmd(
    ctx: typer.Context,
    ranges: Path | None = MaybeRangesOpt, bundle: Path | None = BundleOpt,
    model: str = option("--model"), dataset: str = option("--dataset"), layer: int = option("--layer"),
    n_per_class: int = option("--n-per-class"), batch_size: int = option("--batch-size"),
    remote: bool = option("--remote"), operators: str = option("--operators"), alpha: float = option("--alpha"),
    beta: float = option("--beta"), positions: str = option("--positions"), seed: int = option("--seed"),
    only_correct: bool = option("--only-correct"), label_words: str | None = option("--label-words"),
    readout: str = option("--readout"), k_shot: int = option("--k-shot"),
    max_words: int = option("--max-words"),
    allow_other_model: bool = AllowOtherModelOpt,
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the table as .md/.csv/.json here (several "
                                    "operators: <out>_<operator>)."),
    quantize: str | None = option("--quantize"), dtype: str | None = option("--dtype"),
) -> None:
    """Evaluate neuron vs range masking of every concept on the test split (with --bundle: the bundle's effect on
    every concept)."""
    from nslens.workflows import erase_with_bundle, erase_with_masks, one_source

    one_source(ranges, bundle)
    cfg = run_config(ctx)
    with progress_display() as cb:
        if bundle is not None:
            effect = erase_with_bundle(cfg, bundle, out=out, allow_other_model=allow_other_model, progress=cb)
            print_markdown(effect.to_markdown())
            return
        tables = erase_with_masks(cfg, ranges, out=out, allow_other_model=allow_other_model, progress=cb)
    for tab in tables.values():
        print_table(tab)


def side_effects_cmd(
    ctx: typer.Context,
    ranges: Path | None = MaybeRangesOpt, bundle: Path | None = BundleOpt,
    model: str = option("--model"), layer: int = option("--layer"), batch_size: int = option("--batch-size"),
    remote: bool = option("--remote"),
    dataset: str = option("--dataset", help="leace only: the concepts its erasers are fitted on (as for erase)."),
    n_per_class: int = option("--n-per-class", help="leace only: samples per concept before the split."),
    seed: int = option("--seed"), only_correct: bool = option("--only-correct"),
    label_words: str | None = option("--label-words"),
    readout: str = option("--readout"), k_shot: int = option("--k-shot"),
    max_words: int = option("--max-words"),
    operators: str = option("--operators"), alpha: float = option("--alpha"), beta: float = option("--beta"),
    tasks: str = option("--tasks"), limit: float | None = option("--lm-eval-limit"),
    include: Path | None = option("--include"), positions: str = option("--positions"),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the table as .md/.json here (several "
                                    "operators: <out>_<operator>)."),
    allow_other_model: bool = AllowOtherModelOpt,
    quantize: str | None = option("--quantize"), dtype: str | None = option("--dtype"),
) -> None:
    """lm-eval side effects (MMLU acc, Wikipedia token perplexity) of neuron vs range masking of every concept."""
    from nslens.workflows import one_source, side_effects_with_bundle, side_effects_with_masks

    one_source(ranges, bundle)
    cfg = run_config(ctx)
    with progress_display() as cb:
        if bundle is not None:
            res = side_effects_with_bundle(cfg, bundle, out=out, allow_other_model=allow_other_model, progress=cb)
            print_markdown(res.to_markdown())
            return
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
    concept's token. Delete wrong rows from the .jsonl and use it as --dataset (or use next:<family>[:<source>])."""
    from nslens.workflows import export_next_token

    with progress_display() as cb:
        samples, concepts, paths = export_next_token(family, source, out, n_per_concept=n_per_class, seed=seed,
                                                     min_words=min_words, max_words=max_words, progress=cb)
    counts = ", ".join(f"{c.name} {sum(s.concept == c.name for s in samples)}" for c in concepts)
    done("wrote", f"{len(samples)} samples ({counts}) to {paths[0]} and the check sheet {paths[1]}")


def generate_cmd(
    ctx: typer.Context,
    prompt: list[str] = typer.Option(None, "--prompt", "-p", help="A prompt (repeatable)."),
    prompts_file: Path | None = typer.Option(None, "--prompts-file", help="A text file, one prompt per line."),
    ranges: Path | None = MaybeRangesOpt, bundle: Path | None = BundleOpt,
    concepts: str | None = typer.Option(None, "--concepts", help="Comma-separated concepts whose masks apply "
                                        "(--ranges; default: every mask in the directory)."),
    gated: bool = typer.Option(True, "--gated/--ungated", help="Range masking (inside each range only) or neuron "
                               "masking (--ranges)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens to generate per prompt."),
    sample: bool = typer.Option(False, "--sample/--greedy", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (--sample)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (--sample)."),
    top_k: int = typer.Option(0, "--top-k", help="Top-k cut (--sample; 0 = none)."),
    model: str = option("--model"), layer: int = option("--layer"), batch_size: int = option("--batch-size"),
    remote: bool = option("--remote"), operators: str = option("--operators"), alpha: float = option("--alpha"),
    beta: float = option("--beta"), positions: str = option("--positions"), seed: int = option("--seed"),
    dataset: str = option("--dataset", help="leace only: the concepts its erasers are fitted on (as for erase)."),
    n_per_class: int = option("--n-per-class", help="leace only: samples per concept before the split."),
    only_correct: bool = option("--only-correct"), label_words: str | None = option("--label-words"),
    readout: str = option("--readout"), k_shot: int = option("--k-shot"),
    max_words: int = option("--max-words"),
    allow_other_model: bool = AllowOtherModelOpt,
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the continuations as JSON here."),
    quantize: str | None = option("--quantize"), dtype: str | None = option("--dtype"),
) -> None:
    """Clean and intervened continuations side by side, the intervention applied at every generated token."""
    from nslens.generate import GenerationSettings
    from nslens.workflows import generate_with_options, read_prompts

    texts = read_prompts(prompt or [], prompts_file)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature,
                                  top_p=top_p, top_k=top_k, seed=seed)
    cfg = run_config(ctx)
    wanted = [c.strip() for c in concepts.split(",") if c.strip()] if concepts else None
    with progress_display() as cb:
        result = generate_with_options(cfg, texts, settings, ranges=ranges, bundle=bundle, concepts=wanted,
                                       gated=gated, allow_other_model=allow_other_model, out=out, progress=cb)
    for c in result:
        print_markdown(f"**prompt** {c.prompt!r}\n\n- clean: {c.clean!r}\n- intervened: {c.intervened!r}"
                       f"{'' if c.changed else ' (unchanged)'}\n")


def bundle_cmd(
    ctx: typer.Context,
    ranges: Path = RangesOpt,
    out: Path = typer.Option(..., "--out", "-o", help="The bundle directory to write."),
    concepts: str | None = typer.Option(None, "--concepts", help="Comma-separated concepts whose masks go in "
                                        "(default: every mask in the directory)."),
    gated: bool = typer.Option(True, "--gated/--ungated", help="Range masking (inside each range only) or neuron "
                               "masking."),
    model: str = option("--model"), layer: int = option("--layer"), batch_size: int = option("--batch-size"),
    remote: bool = option("--remote"), operators: str = option("--operators"), alpha: float = option("--alpha"),
    beta: float = option("--beta"), positions: str = option("--positions"), seed: int = option("--seed"),
    dataset: str = option("--dataset", help="leace only: the concepts its erasers are fitted on (as for erase)."),
    n_per_class: int = option("--n-per-class", help="leace only: samples per concept before the split."),
    only_correct: bool = option("--only-correct"), label_words: str | None = option("--label-words"),
    readout: str = option("--readout"), k_shot: int = option("--k-shot"),
    max_words: int = option("--max-words"),
    allow_other_model: bool = AllowOtherModelOpt,
    quantize: str | None = option("--quantize"), dtype: str | None = option("--dtype"),
) -> None:
    """Write an intervention bundle (masks + operator + model fingerprints) that erase, side-effects, generate and
    the Python API load directly."""
    from nslens.workflows import bundle_from_masks

    cfg = run_config(ctx)
    wanted = [c.strip() for c in concepts.split(",") if c.strip()] if concepts else None
    with progress_display() as cb:
        path, ivs = bundle_from_masks(cfg, ranges, out, concepts=wanted, gated=gated,
                                      allow_other_model=allow_other_model, progress=cb)
    done("wrote", f"{path} ({len(ivs)} interventions: "
                  f"{', '.join(iv.mask.concept for iv in ivs)}; {ivs[0].kind} masking, {ivs[0].operator.label})")


def export_steering_cmd(
    bundle: Path = typer.Argument(..., help="A bundle of ungated steering interventions."),
    out: Path = typer.Option(..., "--out", "-o", help="lm-eval's steering file (.pt)."),
) -> None:
    """Export a steering bundle to lm-eval's `steered` model file (lm_eval --model steered ... steer_path=FILE)."""
    from nslens.bundle import export_lm_eval_steering

    done("wrote", export_lm_eval_steering(bundle, out))
