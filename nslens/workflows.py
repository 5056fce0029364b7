"""The single steps and the prepared runs that ``nslens``'s commands are, one function each: record statistics to a
file, write range masks, erase or measure side effects with saved masks, and the steering, sweep and demo runs.
Each takes a validated ``RunConfig`` (or what it needs) and returns what the command prints."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import SWEEP_PARAMS, RunConfig, check_layers
from .embedded import build_embedded_model, embedded_model_dir
from .erasure import ErasureTable, erasure_table
from .errors import NsLensError
from .files import slug
from .models import Site, load_model, resolve_site
from .nexttoken import extract_next_token, parse_concepts, parse_spec, source_texts, write_check_sheet
from .pipeline import run_operators, run_pipeline, side_effect_tasks
from .prepare import load_concepts, prepare_data, record_stats
from .ranges import RangeMask, build_range_masks, check_masks_fit, load_masks
from .record import Progress, RecordResult
from .report import write_report
from .run import RunResult
from .stats import ConceptStats

__all__ = ["check_writable", "demo_run", "erase_with_masks", "export_next_token", "record_to_file", "refresh_report",
           "side_effects_with_masks", "steering_run", "sweep_run", "write_ranges"]


def check_writable(path: str | Path) -> None:
    """Fail before any work when an output cannot be written (its folder is made if missing)."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise NsLensError(f"cannot write {path}: {e.strerror or e}") from e


def refresh_report(out: str | Path) -> None:
    """When results are written into a run directory, its report picks them up."""
    if (Path(out) / "summary.json").exists():
        write_report(out)


def checked(cfg: RunConfig) -> RunConfig:
    """``cfg`` validated, with its layers checked against the model's depth where that is known locally."""
    cfg.validate()
    check_layers(cfg)
    return cfg


def _model_site(cfg: RunConfig) -> tuple[Any, Site]:
    model = load_model(cfg.model, remote=cfg.remote, quantize=cfg.quantize, dtype=cfg.dtype)
    return model, resolve_site(model, cfg.layer)


def record_to_file(cfg: RunConfig, out: str | Path, *, checkpoint: str | Path | None = None,
                   progress: Progress | None = None) -> tuple[RecordResult, Site]:
    """Per-concept statistics of the training split at the site, saved to ``out``. With ``checkpoint`` the
    recording resumes from (and saves) partial statistics there; it is removed only once ``out`` is written."""
    check_writable(out)
    model, site = _model_site(cfg)
    data = prepare_data(model, site, cfg, progress)
    rec = record_stats(model, site, data, cfg, progress, checkpoint=checkpoint, keep_checkpoint=True)
    rec.stats.save(out)
    if checkpoint is not None and Path(checkpoint).exists():  # only now: a failed write above keeps the progress
        Path(checkpoint).unlink()
    return rec, site


def write_ranges(stats: str | Path, out: str | Path, *, method: str, fraction: float, tau: float
                 ) -> list[RangeMask]:
    """Rank the neurons of a statistics file and write one range mask per concept into ``out``."""
    masks = build_range_masks(ConceptStats.load(stats), method=method, fraction=fraction, tau=tau)
    for i, mk in enumerate(masks):
        mk.save(Path(out) / f"{i:02d}_{slug(mk.concept)}.safetensors")
    return masks


def export_next_token(family: str, source: str, out: str | Path, *, n_per_concept: int = 500, seed: int = 0,
                      min_words: int = 5, max_words: int = 64, progress: Progress | None = None
                      ) -> tuple[list[Any], tuple[Any, ...], list[Path]]:
    """Next-token concept samples of ``family`` from ``source`` (paper App. K) written for the manual check as
    ``<out>.jsonl`` (the dataset) and ``<out>.md`` (the check sheet); returns the samples, concepts and paths."""
    parse_spec(f"next:{family}:{source}")
    if n_per_concept < 1:
        raise NsLensError(f"--n-per-class must be >= 1, got {n_per_concept}")
    check_writable(out)
    concepts = parse_concepts(family)
    samples = extract_next_token(source_texts(source, seed=seed), concepts, n_per_concept=n_per_concept, seed=seed,
                                 min_words=min_words, max_words=max_words, progress=progress)
    return samples, concepts, write_check_sheet(samples, out)


def _written(out: str | Path | None, names: Sequence[str]) -> dict[str, Path | None]:
    """Where each table goes: ``out`` itself for one, ``<out>_<name>`` for several."""
    if out is None:
        return {n: None for n in names}
    base = Path(out).with_suffix("")
    return {n: base if len(names) == 1 else base.with_name(f"{base.name}_{n}") for n in names}


def erase_with_masks(cfg: RunConfig, ranges: str | Path, *, out: str | Path | None = None,
                     allow_other_model: bool = False, progress: Progress | None = None) -> dict[str, ErasureTable]:
    """Neuron vs range masking with saved masks on the config's test split, one table per operator (written to
    ``out`` as .md/.csv/.json when given). Masks made for another site, model or concepts are refused."""
    if out is not None:
        check_writable(out)
    ds = load_concepts(cfg)  # a bad dataset fails before the model loads
    model, site = _model_site(cfg)
    masks = load_masks(ranges, expect=site.describe())
    check_masks_fit(masks, label_names=ds.label_names, model=model, dataset=cfg.dataset,
                    allow_other_model=allow_other_model, source=f"the masks in {ranges}")
    data = prepare_data(model, site, cfg, progress, ds=ds)
    ops = run_operators(model, site, cfg, progress, data=data, masks=masks)
    tables = {}
    for (name, op), path in zip(ops.items(), _written(out, list(ops)).values()):
        tables[name] = erasure_table(model, site, data.prompts(data.test), data.test.labels, data.label_ids, masks,
                                     op, gold_token_ids=data.test_gold, positions=cfg.positions,
                                     batch_size=cfg.batch_size, remote=cfg.remote, progress=progress,
                                     cacc_average=cfg.cacc_average)
        if path is not None:
            tables[name].write(path)
    return tables


def side_effects_with_masks(cfg: RunConfig, ranges: str | Path, *, out: str | Path | None = None,
                            allow_other_model: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """lm-eval side effects of neuron vs range masking of every concept's saved mask, one ``SideEffectTable`` per
    operator (written to ``out`` as .md/.json when given). ``leace`` is fitted on the config's training split."""
    # lm-eval is an optional extra (nslens[eval]): imported only where side effects are measured
    from .harness import default_cache_dir, side_effect_tables

    if out is not None:
        check_writable(out)
    model, site = _model_site(cfg)
    masks = load_masks(ranges, expect=site.describe())
    check_masks_fit(masks, model=model, allow_other_model=allow_other_model, source=f"the masks in {ranges}")
    data = prepare_data(model, site, cfg, progress) if "leace" in cfg.operators else None  # the erasers' fit
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
    checked(cfg)
    model = load_model(cfg.model, remote=cfg.remote, quantize=cfg.quantize, dtype=cfg.dtype)
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
