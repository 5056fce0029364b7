"""The whole NeuronLens pipeline from a config: data -> record -> ranges -> erasure (-> steering, side effects,
analyses, sweeps) -> report, into one run directory.

A run directory holds everything a user keeps: ``config.json``, ``stats.safetensors``, ``ranges/*.safetensors``
(+ JSON sidecars), ``erasure_<operator>.{md,csv,json}``, ``summary.json`` and ``report.md``. ``nslens.run.Run`` owns
it: each file is written atomically as soon as it is finished, and ``summary.json`` records every step, so a failed
or interrupted run keeps its finished work and never holds a half-written file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from .analysis import write_analyses
from .config import STEERING_RUNS, RunConfig, check_layers
from .data import ConceptDataset
from .erasure import erasure_table
from .errors import NsLensError
from .explorer import write_explorer
from .figures import plot_sweep
from .files import atomic_path, read_json, write_text
from .general import general_mean
from .harness import default_cache_dir, side_effect_tables
from .leace import run_leace
from .lmtasks import (
    DEFAULT_TASKS,
    LOCAL_TASKS,
    WIKIPEDIA_PPL_TASK,
    check_tasks,
    include_paths,
    local_tasks_dir,
    task_manager,
)
from .models import Site, load_model, model_id, resolve_site
from .ops import FITTED_OPERATORS, OPERATOR_FITTERS, make_operator, zero
from .prepare import PreparedData, load_concepts, prepare_data, record_stats
from .ranges import RangeMask, build_range_masks, load_masks, save_masks
from .rank import get_ranking, rank
from .record import Progress, RecordResult, record
from .report import write_report
from .run import Run, RunResult, is_run_dir
from .sae import (
    build_feature_masks,
    feature_table31,
    load_sae,
    load_sae_npz,
    record_features,
    save_sae_meta,
    select_features,
)
from .stats import ConceptStats
from .steering import full_masks, steering_operators
from .sweeps import fraction_sweep, layer_sweep, tau_sweep

#: steering runs whose tables are written under another name (``leace`` is also an operator: the operator's
#: tables are erasure_leace / side_effects_leace, the full-vector run's erasure_leace_full / side_effects_leace_full)
STEERING_KEYS = {"leace": "leace_full"}
#: steps whose failure is recorded in the run (summary.json, report) instead of ending it
OPTIONAL_STEPS = ("side_effects", "analyses", "sweeps", "report", "explorer")

__all__ = ["OPTIONAL_STEPS", "STEERING_RUNS", "PreparedData", "RunConfig", "RunResult", "analyze_run",
           "check_layers", "load_concepts", "needs_fit", "prepare_data", "record_stats", "run_operators",
           "run_pipeline"]

logger = logging.getLogger(__name__)


def run_pipeline(cfg: RunConfig, out_dir: str | Path, *, progress: Progress | None = None,
                 model: Any = None, overwrite: bool = False) -> RunResult:
    """Run everything into the run directory ``out_dir``; returns the ``RunResult`` (which also stands in for the
    directory's path).

    Every artifact is written into the run as soon as it is finished (atomically), and ``summary.json`` says how
    far the run got (``status``: running, complete, failed or interrupted) and how each step went (``steps``). A
    failing optional step (side effects, analyses, sweeps, report, the explorer page) is recorded under
    ``failed_steps`` and in the report, and the run goes on.
    """
    checked(cfg)
    run = Run(out_dir, overwrite=overwrite)  # refuses a non-empty directory before the model loads
    sae = load_run_sae(cfg)  # a missing SAE fails before the model loads, a mismatched one before any model pass
    if model is None:
        model = load_model(cfg.model, dtype=cfg.dtype, quantize=cfg.quantize, remote=cfg.remote)
    site = resolve_site(model, cfg.layer)
    if sae is not None:
        sae.check(site)
    with run:
        run.start(asdict(cfg), model_id=model_id(model), site=site.describe(), dataset=cfg.dataset)
        with run.step("data"):
            data = prepare_data(model, site, cfg, progress)
            run.summary.update(n_train=len(data.train), n_test=len(data.test), next_token=data.test.next_token,
                               readout=data.readout.describe() if data.readout else {"readout": "argmax"})
            _write_texts(run.path / "train.jsonl", data.train)
        with run.step("masks"):
            if sae is not None:
                rec, scores, masks = None, None, _sae_masks(model, site, sae, data, cfg, run.path, progress)
                run.summary["basis"] = "sae"
            else:
                rec, scores, masks = _neuron_masks(model, site, data, cfg, run.path, progress)
            save_masks(masks, run.path / "ranges")
            run.summary.update(neurons_per_concept=len(masks[0]), erasure={})
        with run.step("erasure"):
            ops = run_operators(model, site, cfg, progress, data=data, masks=masks, rec=rec)
            for name, op in ops.items():
                _erasure(run, name, model, site, data, masks, op, cfg, progress, sae=sae)
        steer_runs: dict[str, Any] = {}
        if cfg.steering.runs and rec is not None:
            with run.step("steering"):
                steer_runs = _steering(run, model, site, rec, data, cfg, progress)
        if cfg.side_effects.enabled:
            with run.step("side_effects", required=False):
                run.summary["side_effects"] = _side_effects(model, site, masks, ops, cfg, run.path, progress, sae,
                                                            steer_runs)
        if cfg.analyses and rec is not None and rec.samples is not None:
            with run.step("analyses", required=False):
                texts = [data.train.texts[i] for i in rec.sample_index]
                write_analyses(run.path, rec.samples, rec.sample_labels, texts, rec.stats.label_names, masks,
                               scores, overlap_fraction=cfg.fraction)
                run.summary["analyses"] = True
        if cfg.sweeps.params and rec is not None:
            with run.step("sweeps", required=False):
                run.summary["sweeps"] = _sweeps(model, site, rec, data, cfg, run.path, progress,
                                                next(iter(ops.values())), scores)
        run.complete()
        with run.step("report", required=False):
            write_report(run.path)
        with run.step("explorer", required=False):
            write_explorer(run.path)
    return run.result()


def _neuron_masks(model: Any, site: Site, data: PreparedData, cfg: RunConfig, out: Path,
                  progress: Progress | None) -> tuple[RecordResult, np.ndarray, list[RangeMask]]:
    """Record the training split, rank the neurons and build one range mask per concept (statistics, raw samples
    and scores are written as they are finished)."""
    rec = record_stats(model, site, data, cfg, progress)
    rec.stats.save(out / "stats.safetensors")
    if rec.samples is not None:
        rec.save_samples(out / "samples.safetensors")
    scores = _scores(model, site, rec, data, cfg, progress)
    with atomic_path(out / "scores.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, scores)
    masks = build_range_masks(rec.stats, method=cfg.method, fraction=cfg.fraction, tau=cfg.tau,
                              samples=rec.samples, sample_labels=rec.sample_labels, scores=scores)
    return rec, scores, masks


def _erasure(run: Run, name: str, model: Any, site: Site, data: PreparedData, masks: list[RangeMask], op: Any,
             cfg: RunConfig, progress: Progress | None, *, sae: Any = None, meta: dict[str, Any] | None = None
             ) -> None:
    """One erasure table on the test split, written as ``erasure_<name>`` and into the summary."""
    tab = erasure_table(model, site, data.prompts(data.test), data.test.labels, data.label_ids, masks, op,
                        gold_token_ids=data.test_gold, positions=cfg.positions, batch_size=cfg.batch_size,
                        remote=cfg.remote, progress=progress, sae=sae, cacc_average=cfg.cacc_average,
                        readout=data.readout)
    tab.meta.update(meta or {})
    tab.write(run.path / f"erasure_{name}")
    run.summary["erasure"][name] = tab.summary()
    run.save()


def checked(cfg: RunConfig) -> RunConfig:
    """``cfg`` validated, its layers checked against the model's depth where that is known locally, and the
    side-effect tasks it will evaluate found: all before the model loads. A misspelled task was found only at the
    side-effect step, hours in, which the run then skipped and still called complete."""
    cfg.validate()
    check_layers(cfg)
    if cfg.side_effects.enabled:
        check_side_effect_tasks(cfg)
    return cfg


def check_side_effect_tasks(cfg: RunConfig) -> None:
    """The config's side-effect tasks exist (lm-eval's index, the include directories, nslens's offline tasks);
    the token-perplexity task is cut with the model's tokenizer, so it is written only once the model is loaded."""
    tasks, include = side_effect_tasks(cfg)
    check_tasks(task_manager(include, tasks), [t for t in tasks if t != WIKIPEDIA_PPL_TASK])


def side_effect_tasks(cfg: RunConfig) -> tuple[list[str], tuple[str, ...]]:
    """The lm-eval tasks and include directories a run uses. On the embedded model each default task (MMLU,
    Wikipedia token perplexity) is replaced by its offline synthetic stand-in, and the offline tasks
    (``nslens_synth_*``, ``nslens.lmtasks.local_tasks_dir``) can be named without an include path. The config's
    own include is kept (and checked) beside them: it was dropped when the defaults were replaced."""
    se = cfg.side_effects
    own = include_paths(se.include)
    if cfg.model == "embedded" and set(se.tasks) & set(DEFAULT_TASKS):
        stand_in = dict(zip(DEFAULT_TASKS, LOCAL_TASKS))
        return [stand_in.get(t, t) for t in se.tasks], (str(local_tasks_dir()), *own)
    if cfg.model == "embedded" and not own and any(t.startswith("nslens_synth_") for t in se.tasks):
        return list(se.tasks), (str(local_tasks_dir()),)
    return list(se.tasks), own


def load_run_sae(cfg: RunConfig) -> Any:
    """The SAE a run config names (npz path or sae-lens release + id), or None."""
    if cfg.sae.path:
        return load_sae_npz(cfg.sae.path)
    if cfg.sae.release:
        return load_sae(cfg.sae.release, cfg.sae.id or "")
    return None


def _sae_masks(model: Any, site: Site, sae: Any, data: PreparedData, cfg: RunConfig, out: Path,
               progress: Progress | None) -> list[RangeMask]:
    fst = record_features(model, site, sae, data.prompts(data.train), data.train.labels, data.train.label_names,
                          batch_size=cfg.batch_size, remote=cfg.remote, progress=progress)
    selection = select_features(fst, min_fire=cfg.sae.min_fire, top=cfg.sae.top)
    masks = build_feature_masks(fst, selection, tau=cfg.tau, ranges_over=cfg.sae.ranges_over)
    save_sae_meta(out / "sae.json", sae, feature_table31(fst, selection, cfg.sae.min_fire))
    sae.save_npz(out / "sae_params.npz")
    return masks


def needs_fit(cfg: RunConfig) -> bool:
    """Whether one of the run's operators is fitted on the training split (so the data must be prepared)."""
    return any(name in FITTED_OPERATORS for name in cfg.operators)


def run_operators(model: Any, site: Site, cfg: RunConfig, progress: Progress | None = None, *,
                  data: PreparedData | None = None, masks: list[RangeMask] | None = None,
                  rec: RecordResult | None = None) -> dict[str, Any]:
    """The run's operators by name; ``mean`` gets the site's general-text mean (recorded once, cached); a fitted
    operator (``build == "fitted"``: ``leace``, or one registered) is a list of per-concept instances from its fit
    (``OPERATOR_FITTERS``) on ``data``'s training split over ``masks`` (LEACE from ``rec``'s raw samples when they
    cover it, else streamed from the model)."""
    gm = None
    if "mean" in cfg.operators:
        gm = general_mean(model, site, batch_size=cfg.batch_size, remote=cfg.remote, progress=progress)
    ops: dict[str, Any] = {}
    for name in cfg.operators:
        if name in FITTED_OPERATORS:
            ops[name] = OPERATOR_FITTERS.get(name)(model, site, cfg, data, masks, rec, progress)
        else:
            ops[name] = make_operator(name, alpha=cfg.alpha, beta=cfg.beta, general_mean=gm)
    return ops


def _steering(run: Run, model: Any, site: Site, rec: RecordResult, data: PreparedData, cfg: RunConfig,
              progress: Progress | None) -> dict[str, Any]:
    """The steering comparisons over full-vector masks (tau = steering tau), each written as an erasure table as it
    completes; returns {name: (masks, per-concept operators)} for the side-effect sweep."""
    st = cfg.steering
    stats = rec.stats
    if st.source == "mean":  # the mean-token representation: every position of the training prompts
        stats = record(model, site, data.prompts(data.train), data.train.labels, data.train.label_names,
                       batch_size=cfg.batch_size, position="all", remote=cfg.remote, progress=progress).stats
    masks = full_masks(rec.stats, tau=st.tau)
    runs: dict[str, Any] = {}
    for name in st.runs:
        if name == "leace":
            per = run_leace(model, site, cfg, data, masks, rec, progress)
        else:
            per = [zero()] * len(masks) if name == "arm" else steering_operators(stats, name, st.alpha)
        key = STEERING_KEYS.get(name, name)  # never the file of an operator of the same name
        _erasure(run, key, model, site, data, masks, per, cfg, progress,
                 meta={"steering": name, "steer_source": st.source, "steer_tau": st.tau})
        runs[key] = (masks, per)
    return runs


def _side_effects(model: Any, site: Site, masks: list[RangeMask], ops: dict[str, Any], cfg: RunConfig, out: Path,
                  progress: Progress | None, sae: Any = None, steer_runs: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """One sweep for the run's operators on its masks, one for the steering comparisons on the full-vector masks
    (the clean results are computed once and cached)."""
    tasks, include = side_effect_tasks(cfg)
    common = {"tasks": tasks, "positions": cfg.positions, "limit": cfg.side_effects.limit, "include_path": include,
              "cache_dir": default_cache_dir(), "batch_size": cfg.batch_size, "remote": cfg.remote,
              "progress": progress}
    groups = [(masks, dict(ops), sae)]
    if steer_runs:
        groups.append((next(iter(steer_runs.values()))[0], {k: per for k, (_, per) in steer_runs.items()}, None))
    result = {}
    for group_masks, named, group_sae in groups:
        tabs = list(side_effect_tables(model, site, group_masks, list(named.values()), sae=group_sae,
                                       **common).values())
        for name, tab in zip(named, tabs):
            tab.write(out / f"side_effects_{name}")
            result[name] = {"clean": tab.clean, **tab.summary()}
    return result


def _scores(model: Any, site: Site, rec: RecordResult, data: PreparedData, cfg: RunConfig,
            progress: Progress | None) -> Any:
    """Saliency scores [C, d] of the run's ranking: from the statistics or raw samples, or from the model for a
    ranking that needs it (``Ranking.needs_model``, e.g. neurgrad over the training prompts)."""
    ranking = get_ranking(cfg.method)
    if ranking.needs_model:
        return ranking.scores_from_model(model, site, data.prompts(data.train), data.train.labels, data.label_ids,
                                         gold_token_ids=data.train_gold, n_concepts=data.train.n_concepts,
                                         batch_size=cfg.batch_size, remote=cfg.remote, progress=progress)
    return ranking.scores(rec.stats, rec.samples, rec.sample_labels)


def _write_texts(path: Path, ds: ConceptDataset) -> None:
    targets = ds.targets if ds.targets is not None else [None] * len(ds)
    write_text(path, "".join(json.dumps({"text": t, "label": y, **({"target": g} if g is not None else {})}) + "\n"
                             for t, y, g in zip(ds.texts, ds.labels.tolist(), targets)))


def _sweeps(model: Any, site: Site, rec: RecordResult, data: PreparedData, cfg: RunConfig, out: Path,
            progress: Progress | None, op: Any, scores: Any) -> list[str]:
    """The fraction and tau sweeps rebuild the masks from the run's own scores; the layer sweep ranks each layer
    with the run's ranking (from the model, where the ranking needs it)."""
    test = (data.prompts(data.test), data.test.labels, data.label_ids, op)
    method = cfg.method
    common = {"batch_size": cfg.batch_size, "remote": cfg.remote, "positions": cfg.positions,
              "gold_token_ids": data.test_gold, "readout": data.readout}
    done = []
    for param in cfg.sweeps.params:
        if param == "fraction":
            sw = fraction_sweep(model, site, rec.stats, *test, fractions=cfg.sweeps.fractions, method=method,
                                tau=cfg.tau, progress=progress, scores=scores, **common)
        elif param == "tau":
            sw = tau_sweep(model, site, rec.stats, *test, taus=cfg.sweeps.taus, method=method,
                           fraction=cfg.fraction, progress=progress, scores=scores, **common)
        else:
            sw = layer_sweep(model, data.prompts(data.train), data.train.labels, data.train.label_names, *test,
                             layers=cfg.sweeps.layers, method=method, fraction=cfg.fraction, tau=cfg.tau,
                             batch_size=cfg.batch_size, remote=cfg.remote, progress=progress,
                             gold_token_ids=data.test_gold, train_gold_token_ids=data.train_gold,
                             readout=data.readout)
        write_text(out / f"sweep_{param}.json", sw.to_json())
        write_text(out / f"sweep_{param}.md", sw.to_markdown())
        plot_sweep(sw, out / "figures" / f"sweep_{param}.png")
        done.append(param)
    return done


def analyze_run(run_dir: str | Path) -> Path:
    """(Re)compute the analyses of an existing run from its saved raw samples, masks and training texts, then
    rewrite its report and explorer page."""
    run = Path(run_dir)
    if not is_run_dir(run):
        raise NsLensError(f"{run} is not an nslens run directory (no summary.json)")
    if not (run / "samples.safetensors").exists():
        raise NsLensError(f"{run} has no raw samples (samples.safetensors); re-run with analyses = true")
    cfg = read_json(run / "config.json")
    try:
        raw = load_file(str(run / "samples.safetensors"))
    except Exception as e:  # safetensors raises its own error types for a truncated file
        raise NsLensError(f"cannot read {run / 'samples.safetensors'}: {e}") from e
    if not {"samples", "labels"} <= set(raw):
        raise NsLensError(f"{run / 'samples.safetensors'} is not a run's raw samples (no samples and labels)")
    stats = ConceptStats.load(run / "stats.safetensors")
    masks = load_masks(run / "ranges")
    with (run / "train.jsonl").open() as f:
        texts = [json.loads(line)["text"] for line in f]
    labels = raw["labels"].astype(np.int64)
    index = raw["index"] if "index" in raw else np.arange(len(labels))  # runs before round 2: the first samples
    scores = (np.load(run / "scores.npy") if (run / "scores.npy").exists()
              else rank(cfg["method"], stats, raw["samples"], labels))
    write_analyses(run, raw["samples"], labels, [texts[i] for i in index], stats.label_names, masks, scores,
                   overlap_fraction=cfg["fraction"])
    summary = read_json(run / "summary.json")
    summary["analyses"] = True
    summary.get("failed_steps", {}).pop("analyses", None)
    write_text(run / "summary.json", json.dumps(summary, indent=2))
    report = write_report(run)
    write_explorer(run)  # the page shows the new overlap matrix and bounds too
    return report


def load_run_masks(run_dir: str | Path, site: Site | None = None) -> list[RangeMask]:
    """A run's range masks (checked against ``site`` when given)."""
    return load_masks(Path(run_dir) / "ranges", expect=site.describe() if site else None)
