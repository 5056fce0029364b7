"""The single steps and the prepared runs that ``nslens``'s commands are, one function each: record statistics to a
file, write range masks, erase or measure side effects with saved masks, and the steering, sweep and demo runs.
Each takes a validated ``RunConfig`` (or what it needs) and returns what the command prints."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, check_bundle_dir, load_bundle, save_bundle
from .config import SWEEP_PARAMS, RunConfig, steering_runs
from .embedded import build_embedded_model, embedded_model_dir
from .erasure import ErasureTable, erasure_table, predict
from .errors import NsLensError
from .files import output_stem, write_text
from .generate import Continuation, GenerationSettings, generate
from .harness import default_cache_dir, side_effect_tables, side_effects
from .intervene import Intervention
from .mdtable import cell
from .models import Site, load_model, resolve_site
from .nexttoken import extract_next_token, parse_concepts, parse_spec, source_texts, write_check_sheet
from .pipeline import (
    check_side_effect_tasks,
    checked,
    needs_fit,
    run_operators,
    run_pipeline,
    side_effect_tasks,
)
from .prepare import load_concepts, prepare_data, record_stats
from .ranges import RangeMask, build_range_masks, check_masks_fit, load_masks, save_masks
from .rank import STATS_RANKINGS, get_ranking
from .record import Progress, RecordResult
from .report import write_report
from .run import RunResult
from .stats import ConceptStats

__all__ = ["BundleEffect", "bundle_from_masks", "check_writable", "demo_run", "erase_with_bundle", "erase_with_masks",
           "export_next_token", "one_source", "read_prompts", "side_effects_with_bundle",
           "generate_with_options", "interventions_from_options", "read_sources", "record_to_file", "refresh_report",
           "side_effects_with_masks", "steering_run", "sweep_run", "write_ranges"]


def check_writable(path: str | Path, *, file: bool = False, stem: bool = False) -> None:
    """Fail before any work when an output cannot be written: a folder on its way is a file, the nearest folder
    that exists takes no new file, or the path is a directory where the output is one file (``file``) or
    ``<stem>.md``, ``.json``, ... files (``stem``: ``-o nt/`` wrote ``nt.md`` beside the folder). Nothing is made
    here, so a command that fails later leaves no empty folders behind; the writers make the missing ones."""
    if stem and (Path(path).is_dir() or str(path).endswith(("/", os.sep))):  # Path() drops a trailing separator
        raise NsLensError(f"cannot write {path}: it is a directory; give a name for the files in it, such as "
                          f"{Path(path) / 'table'} (for table.md, table.json, ...)")
    path = Path(path)
    if file and path.is_dir():
        raise NsLensError(f"cannot write {path}: it is a directory; give a file name")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NsLensError(f"cannot write {path}: {existing} is not a directory")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise NsLensError(f"cannot write {path}: {e.strerror or e}") from e


def refresh_report(out: str | Path) -> None:
    """When results are written into a run directory, its report picks them up."""
    if (Path(out) / "summary.json").exists():
        write_report(out)


def _model(cfg: RunConfig) -> Any:
    """The config's model: local, quantized or remote, in the dtype asked for."""
    return load_model(cfg.model, remote=cfg.remote, quantize=cfg.quantize, dtype=cfg.dtype)


def _model_site(cfg: RunConfig) -> tuple[Any, Site]:
    model = _model(cfg)
    return model, resolve_site(model, cfg.layer)


def record_to_file(cfg: RunConfig, out: str | Path, *, checkpoint: str | Path | None = None,
                   progress: Progress | None = None) -> tuple[RecordResult, Site]:
    """Per-concept statistics of the training split at the site, saved to ``out``. With ``checkpoint`` the
    recording resumes from (and saves) partial statistics there; it is removed only once ``out`` is written."""
    check_writable(out, file=True)
    model, site = _model_site(cfg)
    data = prepare_data(model, site, cfg, progress)
    rec = record_stats(model, site, data, cfg, progress, checkpoint=checkpoint, keep_checkpoint=True)
    rec.stats.save(out)
    if checkpoint is not None and Path(checkpoint).exists():  # only now: a failed write above keeps the progress
        Path(checkpoint).unlink()
    return rec, site


def write_ranges(stats: str | Path, out: str | Path, *, method: str, fraction: float, tau: float
                 ) -> list[RangeMask]:
    """Rank the neurons of a statistics file and write one range mask per concept into ``out``. A ranking that
    needs the model or the raw samples is refused in the command's terms (which rankings a file can give)."""
    ranking = get_ranking(method)
    if method not in STATS_RANKINGS:
        raise NsLensError(f"the {method} ranking needs {'the model' if ranking.needs_model else 'raw samples'}, "
                          f"which a statistics file does not hold; choose {', '.join(STATS_RANKINGS)} here, or run "
                          f"it with nslens run (method = \"{method}\")")
    masks = build_range_masks(ConceptStats.load(stats), method=method, fraction=fraction, tau=tau)
    save_masks(masks, out)
    return masks


def export_next_token(family: str, source: str, out: str | Path, *, n_per_concept: int = 500, seed: int = 0,
                      min_words: int = 5, max_words: int = 64, progress: Progress | None = None
                      ) -> tuple[list[Any], tuple[Any, ...], list[Path]]:
    """Next-token concept samples of ``family`` from ``source`` (paper App. K) written for the manual check as
    ``<out>.jsonl`` (the dataset) and ``<out>.md`` (the check sheet); returns the samples, concepts and paths."""
    parse_spec(f"next:{family}:{source}")
    if n_per_concept < 1:
        raise NsLensError(f"--n-per-class must be >= 1, got {n_per_concept}")
    check_writable(out, stem=True)
    concepts = parse_concepts(family)
    samples = extract_next_token(source_texts(source, seed=seed), concepts, n_per_concept=n_per_concept, seed=seed,
                                 min_words=min_words, max_words=max_words, progress=progress)
    found = {s.concept for s in samples}
    missing = [c.name for c in concepts if c.name not in found]
    if missing:  # the dataset was written anyway and failed only when a run read it
        raise NsLensError(f"no sample of next-token concept {', '.join(map(repr, missing))} in {source}; check "
                          "the words or choose another source (nothing written)")
    return samples, concepts, write_check_sheet(samples, out)


def _written(out: str | Path | None, names: Sequence[str]) -> dict[str, Path | None]:
    """Where each table goes: ``out`` itself for one, ``<out>_<name>`` for several."""
    if out is None:
        return {n: None for n in names}
    base = output_stem(out)
    return {n: base if len(names) == 1 else base.with_name(f"{base.name}_{n}") for n in names}


def erase_with_masks(cfg: RunConfig, ranges: str | Path, *, out: str | Path | None = None,
                     allow_other_model: bool = False, progress: Progress | None = None) -> dict[str, ErasureTable]:
    """Neuron vs range masking with saved masks on the config's test split, one table per operator (written to
    ``out`` as .md/.csv/.json when given). Masks made for another site, model or concepts are refused."""
    if out is not None:
        check_writable(out, stem=True)
    ds = load_concepts(cfg)  # a bad dataset or mask directory fails before the model loads
    masks = load_masks(ranges)
    model, site = _model_site(cfg)
    check_masks_fit(masks, label_names=ds.label_names, model=model, dataset=cfg.dataset, site=site.describe(),
                    allow_other_model=allow_other_model, source=f"the masks in {ranges}")
    data = prepare_data(model, site, cfg, progress, ds=ds)
    ops = run_operators(model, site, cfg, progress, data=data, masks=masks)
    tables = {}
    for (name, op), path in zip(ops.items(), _written(out, list(ops)).values()):
        tables[name] = erasure_table(model, site, data.prompts(data.test), data.test.labels, data.label_ids, masks,
                                     op, gold_token_ids=data.test_gold, positions=cfg.positions,
                                     batch_size=cfg.batch_size, remote=cfg.remote, progress=progress,
                                     cacc_average=cfg.cacc_average, readout=data.readout)
        if path is not None:
            tables[name].write(path)
    return tables


def side_effects_with_masks(cfg: RunConfig, ranges: str | Path, *, out: str | Path | None = None,
                            allow_other_model: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """lm-eval side effects of neuron vs range masking of every concept's saved mask, one ``SideEffectTable`` per
    operator (written to ``out`` as .md/.json when given). ``leace`` is fitted on the config's training split."""
    if out is not None:
        check_writable(out, stem=True)
    check_side_effect_tasks(cfg)  # a task, task directory or mask directory that is not one fails before the load
    masks = load_masks(ranges)
    model, site = _model_site(cfg)
    check_masks_fit(masks, model=model, site=site.describe(), allow_other_model=allow_other_model,
                    source=f"the masks in {ranges}")
    data = prepare_data(model, site, cfg, progress) if needs_fit(cfg) else None  # the fitted operators' data
    ops = run_operators(model, site, cfg, data=data, masks=masks)
    tasks, include = side_effect_tasks(cfg)
    tabs = side_effect_tables(model, site, masks, list(ops.values()), tasks=tasks, positions=cfg.positions,
                              limit=cfg.side_effects.limit, include_path=include, cache_dir=default_cache_dir(),
                              batch_size=cfg.batch_size, remote=cfg.remote, progress=progress)
    tables = dict(zip(ops, tabs.values()))
    for name, path in _written(out, list(tables)).items():
        if path is not None:
            tables[name].write(path)
    return tables


def steering_run(cfg: RunConfig, out: str | Path, *, middle_layer: bool = False, progress: Progress | None = None,
                 overwrite: bool = False) -> RunResult:
    """A run of the config's steering baselines; ``middle_layer`` puts the site at the model's middle block (the
    paper steers at layer 14 of Llama-3.2-3B's 28), read from the model that the run then uses."""
    if not cfg.steering.runs:  # `--steering ""` ran a run without any baseline
        raise NsLensError("no steering baselines given; choose from " + ", ".join(steering_runs()))
    checked(cfg)
    model = _model(cfg)
    if middle_layer:
        cfg = cfg.replace(layer=resolve_site(model).n_layers // 2)
    return run_pipeline(cfg, out, progress=progress, model=model, overwrite=overwrite)


def sweep_run(cfg: RunConfig, param: str, values: Sequence[float], out: str | Path, *,
              progress: Progress | None = None, overwrite: bool = False) -> RunResult:
    """A run of the config with one sweep (fraction, tau or layer) over ``values`` (empty: the config's), without
    the analyses."""
    if param not in SWEEP_PARAMS:
        raise NsLensError(f"unknown sweep {param!r}; choose from {', '.join(SWEEP_PARAMS)}")
    sweeps: dict[str, Any] = {"params": [param]}
    if values:
        whole = param == "layer"
        bad = [v for v in values if not math.isfinite(v) or (whole and v != int(v))]
        if bad:
            raise NsLensError(f"the {param} sweep's values must be {'whole layer numbers' if whole else 'finite'}, "
                              f"got {bad[0]!r}")
        key = {"fraction": "fractions", "tau": "taus", "layer": "layers"}[param]
        sweeps[key] = [int(v) for v in values] if param == "layer" else [float(v) for v in values]
    cfg = cfg.replace(sweeps=sweeps, analyses=False)
    return run_pipeline(cfg, out, progress=progress, overwrite=overwrite)


def demo_run(out: str | Path, *, fraction: float = 0.5, operators: Sequence[str] = ("zero", "adaptive"),
             side_effects: bool = True, progress: Progress | None = None) -> RunResult:
    """The whole pipeline on the embedded model and synthetic concepts, into ``out`` (replaced); the embedded model
    is trained first when it is not cached."""
    if not (embedded_model_dir() / "config.json").exists():
        build_embedded_model(progress=None if progress is None
                             else lambda done, total: progress("train embedded model", done, total))
    cfg = RunConfig(fraction=fraction, operators=list(operators), n_per_class=200, batch_size=32,
                    side_effects={"enabled": side_effects})
    cfg.validate()
    return run_pipeline(cfg, out, progress=progress, overwrite=True)


def one_source(ranges: str | Path | None, bundle: str | Path | None) -> None:
    """A command reads its interventions from range masks or from a bundle: exactly one of them."""
    if (ranges is None) == (bundle is None):
        raise NsLensError("give the range masks (--ranges) or a bundle (--bundle), one of them")


def read_sources(ranges: str | Path | None, bundle: str | Path | None, concepts: Sequence[str] | None = None
                 ) -> tuple[list[RangeMask] | None, Bundle | None]:
    """The one source of interventions a command names, read in full before the model loads (so that a typo in
    ``--ranges``, in ``concepts`` or a damaged bundle costs no model load): the masks of ``ranges`` or the
    bundle."""
    one_source(ranges, bundle)
    if bundle is not None:
        return None, load_bundle(bundle)
    masks = load_masks(ranges)
    _select(masks, concepts, str(ranges))  # the concepts asked for are among them
    return masks, None


def read_prompts(prompts: Sequence[str], path: str | Path | None) -> list[str]:
    """The prompts given one by one, then those of ``path`` (one per non-empty line; ``\\n`` stands for a
    newline inside a prompt)."""
    out = list(prompts)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise NsLensError(f"prompts file not found: {p}")
        try:
            text = p.read_text()
        except UnicodeDecodeError as e:
            raise NsLensError(f"{p} is not UTF-8 text") from e
        out += [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    return out


def _select(masks: Sequence[RangeMask], concepts: Sequence[str] | None, source: str) -> list[RangeMask]:
    """The masks of ``concepts`` (all when none are named), in the directory's order."""
    if not concepts:
        return list(masks)
    names = [m.concept for m in masks]
    unknown = [c for c in concepts if c not in names]
    if unknown:
        raise NsLensError(f"no mask for concept {', '.join(map(repr, unknown))} in {source}; "
                          f"choose from {', '.join(names)}")
    return [m for m in masks if m.concept in concepts]


def interventions_from_options(cfg: RunConfig, model: Any, site: Site, *, ranges: str | Path | None = None,
                               bundle: str | Path | Bundle | None = None, concepts: Sequence[str] | None = None,
                               gated: bool = True, allow_other_model: bool = False, progress: Progress | None = None,
                               masks: Sequence[RangeMask] | None = None) -> tuple[list[Intervention], Site]:
    """The interventions a command applies, with their site: a bundle's (checked against ``model``, at the
    bundle's layer), or the range masks in ``ranges`` of ``concepts`` with the config's one operator, gated (range
    masking) or not (neuron masking). ``masks`` are those of ``ranges`` already read (``read_sources``, before the
    model loaded). ``leace`` is fitted on the config's training split."""
    one_source(ranges, bundle)
    if bundle is not None:
        b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        b.check_fits(model, allow_other_model=allow_other_model)
        return b.interventions, b.site(model)
    if len(cfg.operators) != 1:
        raise NsLensError(f"one operator at a time here, got {', '.join(cfg.operators)}")
    masks = list(masks) if masks is not None else load_masks(ranges)
    check_masks_fit(masks, model=model, site=site.describe(), allow_other_model=allow_other_model,
                    source=f"the masks in {ranges}")
    data = prepare_data(model, site, cfg, progress) if needs_fit(cfg) else None  # the fitted operators' data
    op = next(iter(run_operators(model, site, cfg, progress, data=data, masks=masks).values()))
    chosen = _select(masks, concepts, str(ranges))
    ops = {m.concept: o for m, o in zip(masks, op)} if isinstance(op, list) else {}  # LEACE: one per concept
    return [Intervention(m, ops.get(m.concept, op), gated=gated, positions=cfg.positions) for m in chosen], site


def generate_with_options(cfg: RunConfig, prompts: Sequence[str], settings: GenerationSettings, *,
                          ranges: str | Path | None = None, bundle: str | Path | None = None,
                          concepts: Sequence[str] | None = None, gated: bool = True, allow_other_model: bool = False,
                          out: str | Path | None = None, progress: Progress | None = None) -> list[Continuation]:
    """Clean and intervened continuations of ``prompts`` (``nslens.generate``), written to ``out`` as JSON."""
    if not prompts:
        raise NsLensError("no prompts: give --prompt (repeatable) or --prompts-file")
    if out is not None:
        check_writable(out, file=True)
    masks, read = read_sources(ranges, bundle, concepts)  # before the model loads
    model, site = _model_site(cfg)
    ivs, site = interventions_from_options(cfg, model, site, ranges=ranges, bundle=read, concepts=concepts,
                                           gated=gated, allow_other_model=allow_other_model, progress=progress,
                                           masks=masks)
    result = generate(model, site, prompts, interventions=ivs, settings=settings, batch_size=cfg.batch_size,
                      remote=cfg.remote)
    if out is not None:
        write_text(out, json.dumps({"settings": asdict(settings), "site": site.describe(),
                                    "interventions": [iv.describe() for iv in ivs],
                                    "continuations": [c.to_dict() for c in result]}, indent=2) + "\n")
    return result


def bundle_from_masks(cfg: RunConfig, ranges: str | Path, out: str | Path, *, concepts: Sequence[str] | None = None,
                      gated: bool = True, allow_other_model: bool = False,
                      progress: Progress | None = None) -> tuple[Path, list[Intervention]]:
    """A bundle (``nslens.bundle``) of the masks in ``ranges`` with the config's operator, for the config's
    model."""
    check_bundle_dir(out)  # before the model loads, with the masks and the concepts asked for
    masks, _ = read_sources(ranges, None, concepts)
    model, site = _model_site(cfg)
    ivs, site = interventions_from_options(cfg, model, site, ranges=ranges, concepts=concepts, gated=gated,
                                           allow_other_model=allow_other_model, progress=progress, masks=masks)
    return save_bundle(out, model, site, ivs, concepts=[iv.mask.concept for iv in ivs], dataset=cfg.dataset), ivs


@dataclass
class BundleEffect:
    """Per concept of the test split: accuracy and gold-label confidence of the clean model and under a bundle's
    interventions (all applied together, as the bundle edits)."""

    concepts: list[str]
    n: list[int]
    acc_clean: list[float]
    acc_edited: list[float]
    conf_clean: list[float]
    conf_edited: list[float]
    edited: list[str]
    """The concepts whose masks the bundle holds."""

    def to_markdown(self) -> str:
        rows = ["| concept | n | Acc clean | Acc edited | ΔAcc | Conf clean | Conf edited | in the bundle |",
                "|---|---|---|---|---|---|---|---|"]
        for i, c in enumerate(self.concepts):
            rows.append(f"| {cell(c)} | {self.n[i]} | {self.acc_clean[i]:.3f} | {self.acc_edited[i]:.3f} | "
                        f"{self.acc_edited[i] - self.acc_clean[i]:+.3f} | {self.conf_clean[i]:.3f} | "
                        f"{self.conf_edited[i]:.3f} | {'yes' if c in self.edited else ''} |")
        return "\n".join(rows) + "\n"

    def write(self, path: str | Path) -> None:
        base = output_stem(path)
        write_text(f"{base}.md", self.to_markdown())
        write_text(f"{base}.json", json.dumps(asdict(self), indent=2) + "\n")


def erase_with_bundle(cfg: RunConfig, bundle: str | Path, *, out: str | Path | None = None,
                      allow_other_model: bool = False, progress: Progress | None = None) -> BundleEffect:
    """A bundle's effect on every concept of the config's test split (``BundleEffect``), written to ``out`` as
    .md/.json when given. The bundle is refused for another model; its concepts must be the dataset's."""
    if out is not None:
        check_writable(out, stem=True)
    ds = load_concepts(cfg)
    b = load_bundle(bundle)  # a bad bundle, or one for other concepts, fails before the model loads
    missing = [c for c in b.concepts if c not in ds.label_names]
    if missing:
        raise NsLensError(f"bundle {bundle} edits concepts {', '.join(missing)} that dataset {cfg.dataset} lacks "
                          f"(it has {', '.join(ds.label_names)})")
    model = _model(cfg)
    b.check_fits(model, allow_other_model=allow_other_model)
    site = b.site(model)
    data = prepare_data(model, site, cfg, progress, ds=ds)
    prompts, labels = data.prompts(data.test), np.asarray(data.test.labels)
    runs = [predict(model, site, prompts, data.test_gold, interventions=ivs, batch_size=cfg.batch_size,
                    remote=cfg.remote, progress=progress, desc=desc, readout=data.readout)
            for ivs, desc in ((None, "clean"), (b.interventions, "bundle"))]
    per = [[(float(r.correct[labels == c].mean()), float(r.conf[labels == c].mean())) for r in runs]
           for c in range(len(ds.label_names))]
    effect = BundleEffect(list(ds.label_names), [int((labels == c).sum()) for c in range(len(ds.label_names))],
                          [p[0][0] for p in per], [p[1][0] for p in per], [p[0][1] for p in per],
                          [p[1][1] for p in per], b.concepts)
    if out is not None:
        effect.write(out)
    return effect


def side_effects_with_bundle(cfg: RunConfig, bundle: str | Path, *, out: str | Path | None = None,
                             allow_other_model: bool = False, progress: Progress | None = None) -> Any:
    """lm-eval side effects of a bundle's interventions against the clean model (``SideEffects``), written to
    ``out`` as .md/.json when given."""

    if out is not None:
        check_writable(out, stem=True)
    check_side_effect_tasks(cfg)
    b = load_bundle(bundle)  # a bad bundle, task or task directory fails before the model loads
    model = _model(cfg)
    b.check_fits(model, allow_other_model=allow_other_model)
    tasks, include = side_effect_tasks(cfg)
    res = side_effects(model, b.site(model), {"bundle": b.interventions}, tasks=tasks, limit=cfg.side_effects.limit,
                       include_path=include, cache_dir=default_cache_dir(), batch_size=cfg.batch_size,
                       remote=cfg.remote, progress=progress)
    if out is not None:
        base = output_stem(out)
        write_text(f"{base}.md", res.to_markdown())
        write_text(f"{base}.json", json.dumps(dict(res), indent=2) + "\n")
    return res
