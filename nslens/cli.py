"""The ``nslens`` command line: thin wrappers over the library (parse, call, print)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import NsLensError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Range-based neuron attribution and intervention (NeuronLens) on nnsight.")
console = Console(stderr=True)
out_console = Console(width=None if sys.stdout.isatty() else 140)

ModelOpt = typer.Option("embedded", "--model", "-m", help="Hub id, local directory or 'embedded'.")
DatasetOpt = typer.Option("synthetic", "--dataset", "-d", help="synthetic, ag_news, dbpedia_14, emotion, sst2, "
                          "imdb, next:<family>[:<source>] (next-token concepts: pronouns, pronoun_pairs, punctuation, "
                          "delimiters, agreement or w1,w2/w3; source wikitext, synthetic or a .txt file), or a "
                          ".csv/.jsonl path.")
LayerOpt = typer.Option(-1, "--layer", "-l", help="Decoder layer whose output is the site (negative counts from "
                        "the end; -1 = the last block, the paper's 'penultimate layer' before the output head).")
LabelWordsOpt = typer.Option(None, "--label-words", help="Comma-separated words the model answers with, one per "
                             "concept in the dataset's order (default: the label names).")
AllowOtherModelOpt = typer.Option(False, "--allow-other-model",
                                  help="Use masks recorded on another model id (e.g. a fine-tuned copy).")
OnlyCorrectOpt = typer.Option(True, "--only-correct/--all-samples",
                              help="Keep only samples the clean model classifies correctly (the paper's protocol).")
NOpt = typer.Option(400, "--n-per-class", help="Samples per concept before the train/test split.")
BatchOpt = typer.Option(16, "--batch-size")
RemoteOpt = typer.Option(False, "--remote", help="Run traces on NDIF (needs a hub id and NDIF_API_KEY).")
QuantOpt = typer.Option(None, "--quantize", help="nf4 or int8 (bitsandbytes; local models).")
DtypeOpt = typer.Option(None, "--dtype", help="float32, bfloat16 or float16.")


@contextlib.contextmanager
def progress_display() -> Iterator:
    """A rich progress bar fed by the library's (task, done, total) callback; without a terminal, plain lines: one
    when a stage finishes, and one every 30 s while a long stage runs."""
    if not console.is_terminal:
        yield _line_progress()
        return
    tasks: dict[str, int] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        def callback(desc: str, done: int, total: int) -> None:
            if desc not in tasks:
                tasks[desc] = bar.add_task(desc, total=total)
            bar.update(tasks[desc], completed=done, total=total)

        yield callback


def _line_progress(every: float = 30.0) -> Any:
    import time

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


def _check_writable(path: Path) -> None:
    """Fail before any work when an output cannot be written (its folder is made if missing)."""
    import tempfile

    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise NsLensError(f"cannot write {path}: {e.strerror or e}") from e


def _config(model: str, dataset: str, layer: int, n_per_class: int, batch_size: int, remote: bool, **kw):
    from .pipeline import RunConfig

    if isinstance(kw.get("label_words"), str):
        kw["label_words"] = [w.strip() for w in kw["label_words"].split(",") if w.strip()]
    from .pipeline import check_layers

    cfg = RunConfig(model=model, dataset=dataset, layer=layer, n_per_class=n_per_class, batch_size=batch_size,
                    remote=remote, **kw)
    cfg.validate()
    check_layers(cfg)
    return cfg


def _print_table(tab) -> None:
    t = Table(title=f"Concept erasure (operator: {tab.operator})", show_lines=False)
    for h in ("concept", "Acc", "Conf", "CAcc", "CConf", "N ΔAcc", "N ΔConf", "N ΔCAcc", "N ΔCConf",
              "R ΔAcc", "R ΔConf", "R ΔCAcc", "R ΔCConf"):
        t.add_column(h, justify="right" if h != "concept" else "left")
    for r in tab.rows():
        t.add_row(str(r[0]), *(f"{v:.3f}" if j < 4 else f"{v:+.3f}" for j, v in enumerate(r[1:])))
    out_console.print(t)
    from .erasure import trim_note

    out_console.print("N = neuron masking (ungated), R = range masking (gated); deltas vs base; CAcc/CConf "
                      f"{'pooled over' if tab.meta.get('cacc_average') == 'pooled' else 'averaged over'} the other "
                      "concepts. " + trim_note(len(tab.concepts)))


def _refresh_report(out: Path) -> None:
    """When results are written into a run directory, its report picks them up."""
    if (out / "summary.json").exists():
        from .report import write_report

        write_report(out)


def _print_run(run: Path, operators: list[str]) -> None:
    from .erasure import ErasureTable

    for op in operators:
        _print_table(ErasureTable.from_json((run / f"erasure_{op}.json").read_text()))
        side = run / f"side_effects_{op}.md"
        if side.exists():
            out_console.print(f"Side effects (lm-eval), operator {op}:")
            out_console.print(side.read_text(), markup=False, highlight=False)


@app.command("record")
def record_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors for the statistics."),
    model: str = ModelOpt, dataset: str = DatasetOpt, layer: int = LayerOpt, n_per_class: int = NOpt,
    batch_size: int = BatchOpt, remote: bool = RemoteOpt,
    position: str = typer.Option("last", help="last or all tokens."),
    seed: int = typer.Option(0), only_correct: bool = OnlyCorrectOpt, label_words: str | None = LabelWordsOpt,
    quantize: str | None = QuantOpt, dtype: str | None = DtypeOpt,
    checkpoint: Path | None = typer.Option(None, help="Save partial statistics here; re-run to resume."),
) -> None:
    """Record per-concept activation statistics at a site (training split)."""
    from .models import load_model, resolve_site
    from .pipeline import prepare_data, record_stats

    cfg = _config(model, dataset, layer, n_per_class, batch_size, remote, record_position=position, seed=seed,
                  quantize=quantize, dtype=dtype, only_correct=only_correct, label_words=label_words)
    _check_writable(out)
    m = load_model(cfg.model, remote=cfg.remote, quantize=cfg.quantize, dtype=cfg.dtype)
    site = resolve_site(m, cfg.layer)
    with progress_display() as cb:
        data = prepare_data(m, site, cfg, cb)
        rec = record_stats(m, site, data, cfg, cb, checkpoint=checkpoint, keep_checkpoint=True)
    rec.stats.save(out)
    if checkpoint is not None and checkpoint.exists():  # only now: a failed write above keeps the progress
        checkpoint.unlink()
    console.print(f"[green]wrote[/] {out} ({int(rec.stats.count.sum())} samples, {site.d_model} neurons, "
                  f"{rec.stats.n_concepts} concepts, layer {site.layer})")


@app.command("ranges")
def ranges_cmd(
    stats: Path = typer.Argument(..., help="Statistics file from `nslens record`."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the range masks."),
    method: str = typer.Option("max", help="max or probeless (probe needs `nslens run`, which keeps samples)."),
    fraction: float = typer.Option(0.3, help="Top fraction of neurons per concept, in (0, 1]."),
    tau: float = typer.Option(2.5, help="Range half-width in standard deviations."),
) -> None:
    """Rank neurons and write one range mask per concept."""
    from .files import slug
    from .ranges import build_range_masks
    from .stats import ConceptStats

    st = ConceptStats.load(stats)
    masks = build_range_masks(st, method=method, fraction=fraction, tau=tau)
    for i, mk in enumerate(masks):
        mk.save(out / f"{i:02d}_{slug(mk.concept)}.safetensors")
    console.print(f"[green]wrote[/] {len(masks)} masks of {len(masks[0])} neurons to {out}")


@app.command("erase")
def erase_cmd(
    ranges: Path = typer.Option(..., "--ranges", "-r", help="Directory of range masks."),
    model: str = ModelOpt, dataset: str = DatasetOpt, layer: int = LayerOpt, n_per_class: int = NOpt,
    batch_size: int = BatchOpt, remote: bool = RemoteOpt,
    operator: str = typer.Option("zero", help="zero, dampen, mean (general-text mean), mean_concept, adaptive or "
                                 "leace (LEACE per concept over the masks' neurons, fitted on the training split)."),
    positions: str = typer.Option("all", help="all or last."),
    seed: int = typer.Option(0), only_correct: bool = OnlyCorrectOpt, label_words: str | None = LabelWordsOpt,
    allow_other_model: bool = AllowOtherModelOpt,
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the table as .md/.csv/.json here."),
    quantize: str | None = QuantOpt, dtype: str | None = DtypeOpt,
) -> None:
    """Evaluate neuron vs range masking of every concept on the test split."""
    from .erasure import erasure_table
    from .models import load_model, resolve_site
    from .pipeline import load_concepts, prepare_data, run_operators
    from .ranges import check_masks_fit, load_masks

    cfg = _config(model, dataset, layer, n_per_class, batch_size, remote, operators=[operator],
                  positions=positions, seed=seed, quantize=quantize, dtype=dtype, only_correct=only_correct,
                  label_words=label_words)
    if out is not None:
        _check_writable(out)
    ds = load_concepts(cfg)
    m = load_model(cfg.model, remote=cfg.remote, quantize=cfg.quantize, dtype=cfg.dtype)
    site = resolve_site(m, cfg.layer)
    masks = load_masks(ranges, expect=site.describe())
    check_masks_fit(masks, label_names=ds.label_names, model=m, dataset=cfg.dataset,
                    allow_other_model=allow_other_model, source=f"the masks in {ranges}")
    with progress_display() as cb:
        data = prepare_data(m, site, cfg, cb, ds=ds)
        op = run_operators(m, site, cfg, cb, data=data, masks=masks)[operator]
        tab = erasure_table(m, site, data.prompts(data.test), data.test.labels, data.label_ids, masks, op,
                            gold_token_ids=data.test_gold, positions=positions, batch_size=batch_size,
                            remote=remote, progress=cb)
    _print_table(tab)
    if out is not None:
        tab.write(out.with_suffix(""))


@app.command("nexttoken")
def nexttoken_cmd(
    family: str = typer.Argument(..., help="pronouns, pronoun_pairs, punctuation, delimiters, agreement, or "
                                 "concepts as w1,w2/w3 (a concept per comma, its tokens split by /)."),
    source: str = typer.Option("wikitext", "--source", "-s", help="wikitext (WikiText-103 through datasets), "
                               "synthetic (the embedded model's text) or a .txt (a text per line) / .jsonl file."),
    n_per_concept: int = typer.Option(500, "--n", help="Samples per concept (the paper: 500)."),
    min_words: int = typer.Option(5, help="Shortest context, in words."),
    max_words: int = typer.Option(64, help="Contexts are cut on the left to this many words."),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("nexttoken/samples"), "--out", "-o",
                             help="Writes <out>.jsonl (the dataset) and <out>.md (the check sheet)."),
) -> None:
    """Extract next-token concept samples (paper App. K) for the manual check: contexts that end right before a
    concept's token. Delete wrong rows from the .jsonl and use it as --dataset (or use next:FAMILY:SOURCE)."""
    from .nexttoken import extract_next_token, parse_concepts, parse_spec, source_texts, write_check_sheet

    parse_spec(f"next:{family}:{source}")
    if n_per_concept < 1:
        raise NsLensError(f"--n must be >= 1, got {n_per_concept}")
    _check_writable(out)
    concepts = parse_concepts(family)
    with progress_display() as cb:
        samples = extract_next_token(source_texts(source, seed=seed), concepts, n_per_concept=n_per_concept,
                                     seed=seed, min_words=min_words, max_words=max_words, progress=cb)
    paths = write_check_sheet(samples, out)
    counts = ", ".join(f"{c.name} {sum(s.concept == c.name for s in samples)}" for c in concepts)
    console.print(f"[green]wrote[/] {len(samples)} samples ({counts}) to {paths[0]} and the check sheet {paths[1]}")


@app.command("side-effects")
def side_effects_cmd(
    ranges: Path = typer.Option(..., "--ranges", "-r", help="Directory of range masks."),
    model: str = ModelOpt, layer: int = LayerOpt, batch_size: int = typer.Option(8, "--batch-size"),
    remote: bool = RemoteOpt,
    dataset: str = typer.Option("synthetic", "--dataset", "-d", help="leace only: the concepts its erasers are "
                                "fitted on (as for erase)."),
    n_per_class: int = typer.Option(400, "--n-per-class", help="leace only: samples per concept before the split."),
    operator: str = typer.Option("zero", help="zero, dampen, mean (general-text mean), mean_concept, adaptive or "
                                 "leace (LEACE per concept over the masks' neurons, fitted on the training split)."),
    tasks: str = typer.Option("mmlu,nslens_wikipedia_ppl", help="Comma-separated lm-eval tasks (embedded model: offline "
                              "synthetic tasks replace the defaults)."),
    limit: float | None = typer.Option(None, help="lm-eval --limit (per subtask for the mmlu group)."),
    include: Path | None = typer.Option(None, help="Directory of extra lm-eval task YAMLs."),
    positions: str = typer.Option("all", help="all or last."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the table as .md/.json here."),
    allow_other_model: bool = AllowOtherModelOpt,
) -> None:
    """lm-eval side effects (MMLU acc, Wikipedia token perplexity) of neuron vs range masking of every concept."""
    from .harness import default_cache_dir, side_effect_table
    from .models import load_model, resolve_site
    from .pipeline import run_operators, side_effect_tasks
    from .ranges import check_masks_fit, load_masks

    if limit is not None and not limit > 0:
        raise NsLensError(f"limit must be > 0, got {limit}")
    cfg = _config(model, dataset, layer, n_per_class, batch_size, remote, operators=[operator], positions=positions,
                  side_effect_tasks=[t.strip() for t in tasks.split(",") if t.strip()],
                  lm_eval_include=str(include) if include else None)
    if out is not None:
        _check_writable(out)
    m = load_model(cfg.model, remote=cfg.remote)
    site = resolve_site(m, cfg.layer)
    masks = load_masks(ranges, expect=site.describe())
    check_masks_fit(masks, model=m, allow_other_model=allow_other_model, source=f"the masks in {ranges}")
    data = None
    if operator == "leace":  # its erasers are fitted on the dataset's training split
        from .pipeline import prepare_data

        with progress_display() as cb:
            data = prepare_data(m, site, cfg, cb)
    op = run_operators(m, site, cfg, data=data, masks=masks)[operator]
    task_list, inc = side_effect_tasks(cfg)
    with progress_display() as cb:
        tab = side_effect_table(m, site, masks, op, tasks=task_list, positions=positions, limit=limit,
                                include_path=inc, cache_dir=default_cache_dir(), batch_size=batch_size,
                                remote=remote, progress=cb)
    out_console.print(tab.to_markdown(), markup=False, highlight=False)
    if out is not None:
        tab.write(out.with_suffix(""))


@app.command("run")
def run_cmd(
    config: Path = typer.Argument(..., help="Run config (.toml or .json); keys are RunConfig's fields."),
    out: Path = typer.Option(Path("runs/latest"), "--out", "-o", help="Run directory to create."),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
) -> None:
    """The whole pipeline from a config file; writes a run directory with artifacts, tables and a report."""
    from .pipeline import RunConfig, run_pipeline

    cfg = RunConfig.from_file(config)
    with progress_display() as cb:
        run = run_pipeline(cfg, out, progress=cb, overwrite=overwrite)
    _print_run(run, cfg.operators)
    console.print(f"[green]run written to[/] {run} (report: {run / 'report.md'})")


@app.command("sae")
def sae_cmd(
    model: str = ModelOpt, dataset: str = DatasetOpt, layer: int = LayerOpt, n_per_class: int = NOpt,
    batch_size: int = BatchOpt, remote: bool = RemoteOpt,
    sae_path: Path | None = typer.Option(None, "--sae-path", help="Gemma Scope params.npz."),
    release: str | None = typer.Option(None, help="sae-lens release, e.g. gemma-scope-2b-pt-res."),
    sae_id: str | None = typer.Option(None, "--sae-id", help="e.g. layer_25/width_16k/average_l0_285."),
    operators: str = typer.Option("zero", help="Comma-separated operators."),
    ranges_over: str = typer.Option("firing", help="firing or all samples of the concept."),
    side_effects: bool = typer.Option(True, help="Also measure lm-eval perplexity / MMLU."),
    limit: float | None = typer.Option(None, help="lm-eval --limit."),
    only_correct: bool = OnlyCorrectOpt,
    out: Path = typer.Option(Path("runs/sae"), "--out", "-o"),
    overwrite: bool = typer.Option(False),
) -> None:
    """Range masking of SAE features (Gemma Scope JumpReLU) vs feature masking: paper Tables 31-32."""
    from .pipeline import run_pipeline

    if not sae_path and not release:
        raise NsLensError("name the SAE: --sae-path params.npz, or --release R --sae-id ID")
    cfg = _config(model, dataset, layer, n_per_class, batch_size, remote, sae_path=str(sae_path) if sae_path else None,
                  sae_release=release, sae_id=sae_id, sae_ranges_over=ranges_over, side_effects=side_effects,
                  side_effect_limit=limit, operators=[o.strip() for o in operators.split(",") if o.strip()],
                  analyses=False, only_correct=only_correct)
    with progress_display() as cb:
        run = run_pipeline(cfg, out, progress=cb, overwrite=overwrite)
    report = (run / "report.md").read_text()
    section = report[report.index("## SAE features"):].split("\n## ")[0]
    out_console.print(section, markup=False, highlight=False)
    console.print(f"[green]run written to[/] {run}")


@app.command("steer")
def steer_cmd(
    model: str = ModelOpt, dataset: str = DatasetOpt,
    layer: int | None = typer.Option(None, "--layer", "-l", help="Decoder layer (default: the middle one, as the "
                                     "paper steers at layer 14 of Llama-3.2-3B's 28)."),
    n_per_class: int = NOpt, batch_size: int = BatchOpt, remote: bool = RemoteOpt,
    kinds: str = typer.Option("steer,ablate,arm", help="Comma-separated: steer, ablate, arm, leace."),
    alpha: float = typer.Option(-2.0, help="Steering strength a in x + a r."),
    source: str = typer.Option("last", help="Steering vectors from the last token or the mean token (mean)."),
    tau: float = typer.Option(1.0, help="tau of the full-vector ranges (range-gated steering, arm)."),
    side_effects: bool = typer.Option(True, help="Also measure lm-eval MMLU / perplexity."),
    limit: float | None = typer.Option(None, help="lm-eval --limit."),
    only_correct: bool = OnlyCorrectOpt,
    out: Path = typer.Option(Path("runs/steer"), "--out", "-o"),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
) -> None:
    """Steering baselines vs range masking (paper App. M, Tables 28-30): difference-in-means steering, range-gated
    steering, directional ablation and full-vector range masking."""
    from .models import load_model, resolve_site
    from .pipeline import run_pipeline

    cfg = _config(model, dataset, -1 if layer is None else layer, n_per_class, batch_size, remote, operators=["zero"],
                  steering=[k.strip() for k in kinds.split(",") if k.strip()], steer_alpha=alpha, steer_source=source,
                  steer_tau=tau, side_effects=side_effects, side_effect_limit=limit, only_correct=only_correct,
                  analyses=False)
    m = load_model(cfg.model, remote=cfg.remote, dtype=cfg.dtype)
    if layer is None:
        cfg.layer = resolve_site(m).n_layers // 2
    with progress_display() as cb:
        run = run_pipeline(cfg, out, progress=cb, model=m, overwrite=overwrite)
    report = (run / "report.md").read_text()
    for head in ("## Steering baselines", "## Side effects"):
        if head in report:
            out_console.print(report[report.index(head):].split("\n## ")[0], markup=False, highlight=False)


@app.command("neg")
def neg_cmd(
    model: str = ModelOpt, dataset: str = DatasetOpt, layer: int = LayerOpt,
    kind: str = typer.Option("product", help="product (default), up_proj, act_fn or residual."),
    prompts: int = typer.Option(8, help="Prompts (test split) to sweep; those answered correctly are used."),
    neurons: int = typer.Option(100, help="Neurons sampled per prompt (the paper: 100)."),
    all_layers: bool = typer.Option(True, "--all-layers/--one-layer",
                                    help="Sample neurons from every feed-forward layer (the paper) or --layer only."),
    log_prob: bool = typer.Option(False, help="Differentiate log p instead of p."),
    ig_steps: int = typer.Option(20, help="Integrated-gradients steps."),
    ig_grid: str = typer.Option("linspace", help="IG alphas: linspace (the authors' linspace(0, 1, steps)) or "
                                "right (k/steps, k = 1..steps)."),
    lpi_norm: str = typer.Option("final", help="LPI normaliser: final (the released LPI code: one fixed "
                                 "rsqrt(final_var + 1e-6)) or recompute (the final norm on each vector)."),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("runs/neg"), "--out", "-o"),
) -> None:
    """NEG linearity (NEG paper Tables 1-2): ground-truth shift sweeps (+-2, step 0.2) vs NeurGrad and the CG, IG
    and LPI baselines, on prompts the model answers correctly: share of linear neurons, polarity split,
    correlation and MAE."""
    import json as _json

    from .files import write_text
    from .models import load_model, resolve_site
    from .neg import linearity_report, resolve_neuron_site, resolve_neuron_sites
    from .pipeline import prepare_data

    cfg = _config(model, dataset, layer, 50, 16, False, seed=seed, only_correct=False)
    m = load_model(cfg.model)
    sites = resolve_neuron_sites(m, kind) if all_layers else [resolve_neuron_site(m, layer, kind)]
    data = prepare_data(m, resolve_site(m, layer), cfg)
    sub = data.test.subset(list(range(min(prompts, len(data.test)))))
    gold = data.test_gold[: len(sub)]
    with progress_display() as cb:
        rep = linearity_report(m, sites, data.prompts(sub), gold, n_neurons=neurons, seed=seed, log_prob=log_prob,
                               ig_steps=ig_steps, ig_grid=ig_grid, lpi_norm=lpi_norm, progress=cb)
    out.mkdir(parents=True, exist_ok=True)
    where = "all feed-forward layers" if all_layers else f"layer {sites[0].site.layer}"
    write_text(out / "neg.md", f"NEG linearity, neurons from {where} ({kind}, {sites[0].width} per layer)\n\n"
               + rep.to_markdown())
    write_text(out / "neg.json", _json.dumps(rep.summary(), indent=2))
    _refresh_report(out)
    out_console.print(rep.to_markdown(), markup=False, highlight=False)


@app.command("probe")
def probe_cmd(
    model: str = ModelOpt, dataset: str = DatasetOpt, layer: int = LayerOpt, n_per_class: int = NOpt,
    kind: str = typer.Option("product", help="product (default), up_proj, act_fn or residual."),
    batch_size: int = typer.Option(8, "--batch-size"),
    mceval: str | None = typer.Option(None, "--mceval", help="An MCEval8K task (e.g. agnews, paws, ner) instead "
                                      "of --dataset: its prompts, answers and option letters."),
    mceval_path: Path | None = typer.Option(None, "--mceval-path", help="A local copy of the task: its folder "
                                            "({train,valid,test}.json) or one split's json file."),
    zero_shot: bool = typer.Option(False, "--zero-shot", help="MCEval8K prompts without the demonstrations (the "
                                   "authors' default: one per answer label, from the train split)."),
    limit: int | None = typer.Option(None, help="At most this many MCEval8K queries (the first after the authors' "
                                     "seeded shuffle)."),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("runs/probe"), "--out", "-o"),
) -> None:
    """Skill-neuron probes (Polar, Magn, Tree) on NeurGrad features, with the LM-Prob and Act baselines; the
    options are the dataset's labels, or an MCEval8K task's answer tokens."""
    import json as _json

    from .files import write_text
    from .models import load_model, resolve_site
    from .neg import neurgrad, resolve_neuron_site
    from .pipeline import load_concepts
    from .probes import evaluate_probes, probe_features

    cfg = _config(model, dataset, layer, n_per_class, batch_size, False, seed=seed)
    m = load_model(cfg.model)
    ns = resolve_neuron_site(m, layer, kind)
    resolve_site(m, layer)
    if mceval is not None:
        from .mceval import answer_token_ids, load_mceval

        data = load_mceval(mceval, path=mceval_path, limit=limit, zero_shot=zero_shot)
        prompts, answers, queries = data.prompts, data.answers, data.prompts
        ids = answer_token_ids(m.tokenizer, data.labels)
    else:
        from .data import FewShotPrompter, label_token_ids

        ds = load_concepts(cfg)
        if ds.next_token:
            raise NsLensError(f"probe reads skills from label options; {dataset!r} holds next-token concepts (use a "
                             "classification dataset or --mceval)")
        ids = label_token_ids(m.tokenizer, ds.label_words or ds.label_names)
        prompter = FewShotPrompter(list(ds.label_words or ds.label_names), max_words=cfg.max_words)
        prompts, answers, queries = prompter.prompts(ds.texts), ds.labels, ds.texts
    with progress_display() as cb:
        neg = neurgrad(m, ns, prompts, options=ids, batch_size=batch_size, progress=cb)
    probs, acts = probe_features(m, ns, prompts, ids, batch_size=batch_size)
    res = evaluate_probes(neg, answers, queries, seed=seed, option_probs=probs, activations=acts)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "probes.md", res.to_markdown())
    write_text(out / "probes.json", _json.dumps(res.__dict__, indent=2))
    _refresh_report(out)
    out_console.print(res.to_markdown(), markup=False, highlight=False)


@app.command("analyze")
def analyze_cmd(run: Path = typer.Argument(..., help="Run directory (from `nslens run`).")) -> None:
    """Normality, polysemanticity, distribution overlap, activation patterns and samples at the bounds of a run."""
    from .pipeline import analyze_run

    report = analyze_run(run)
    console.print(f"[green]analyses written to[/] {run} (report: {report})")


@app.command("sweep")
def sweep_cmd(
    config: Path = typer.Argument(..., help="Run config (.toml or .json)."),
    param: str = typer.Option(..., "--param", help="fraction, tau or layer."),
    values: str = typer.Option("", help="Comma-separated values (default: the config's sweep values)."),
    out: Path = typer.Option(Path("runs/sweep"), "--out", "-o"),
    overwrite: bool = typer.Option(False),
) -> None:
    """Erasure along masking fraction, tau or layer (one recording per layer), with a curve figure."""
    from .pipeline import RunConfig, run_pipeline

    cfg = RunConfig.from_file(config)
    if param not in ("fraction", "tau", "layer"):
        raise NsLensError(f"unknown sweep {param!r}; choose from fraction, tau, layer")
    cfg.sweeps, cfg.analyses = [param], False
    if values:
        vals = [float(v) for v in values.split(",") if v.strip()]
        if param == "fraction":
            cfg.sweep_fractions = vals
        elif param == "tau":
            cfg.sweep_taus = vals
        else:
            cfg.sweep_layers = [int(v) for v in vals]
    cfg.validate()
    with progress_display() as cb:
        run = run_pipeline(cfg, out, progress=cb, overwrite=overwrite)
    out_console.print((run / f"sweep_{param}.md").read_text(), markup=False, highlight=False)
    console.print(f"[green]sweep written to[/] {run} (figure: {run / 'figures' / f'sweep_{param}.png'})")


@app.command("report")
def report_cmd(run: Path = typer.Argument(..., help="Run directory.")) -> None:
    """(Re)write a run's report.md from what the run directory holds."""
    from .report import write_report

    console.print(f"[green]wrote[/] {write_report(run)}")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run directory (replaced if it exists)."),
    fraction: float = typer.Option(0.5, help="Top fraction of neurons per concept."),
    operators: str = typer.Option("zero,adaptive", help="Comma-separated operators to compare."),
    side_effects: bool = typer.Option(True, help="Also measure lm-eval side effects (offline synthetic tasks)."),
) -> None:
    """The whole pipeline on the embedded model and synthetic concepts (offline; about 20 s, plus up to three
    minutes to train the model the first time)."""
    from .embedded import build_embedded_model, embedded_model_dir
    from .pipeline import RunConfig, run_pipeline

    if not (embedded_model_dir() / "config.json").exists():
        with progress_display() as cb:
            build_embedded_model(progress=lambda d, t: cb("train embedded model", d, t))
    cfg = RunConfig(fraction=fraction, operators=[o.strip() for o in operators.split(",") if o.strip()],
                    n_per_class=200, batch_size=32, side_effects=side_effects)
    cfg.validate()
    with progress_display() as cb:
        run = run_pipeline(cfg, out, progress=cb, overwrite=True)
    summary = json.loads((run / "summary.json").read_text())
    out_console.print(f"embedded model, layer {summary['site']['layer']} of {summary['site']['n_layers']}, "
                      f"top {fraction:.0%} ({summary['neurons_per_concept']} of {summary['site']['d_model']} "
                      f"neurons) per concept, tau {cfg.tau}, {summary['n_test']} test samples")
    _print_run(run, list(summary["erasure"]))
    console.print(f"[green]run written to[/] {run}")


def _error(message: str) -> None:
    """One line on stderr, unwrapped (also without a terminal), coloured only on a terminal."""
    text = " ".join(str(message).split())
    if sys.stderr.isatty():
        console.print(f"[red]error:[/] {text}", highlight=False, soft_wrap=True)
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
    from .errors import internal_error_line, save_traceback

    text, saved = save_traceback(e)
    if debug:
        sys.stderr.write(text)
    _error(internal_error_line(e, saved, debug))


def main(argv: list[str] | None = None) -> None:
    """Entry point. Usage errors: the usage line and one ``error:`` line, exit 2. Other user errors
    (``NsLensError``, a missing or unwritable file): one line, exit 1. Ctrl-C: one line saying what was interrupted
    (and how to resume), exit 130. Any other exception is an internal error: one line saying so and where its
    traceback was saved, exit 1; ``--debug`` (anywhere on the line) or ``NSLENS_DEBUG=1`` also prints it."""
    import os

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
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
        from .errors import is_user_error

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


def _quiet_libraries() -> None:
    """No third-party progress bars or chatter around nslens's own output (transformers' weight-loading bar). Set
    through the variables transformers reads when it is imported, so that ``--help`` does not import it."""
    import os

    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


if __name__ == "__main__":
    main()
