"""The whole NeuronLens pipeline from a config: data -> record -> ranges -> erasure -> run directory.

A run directory holds everything a user keeps: ``config.json``, ``stats.safetensors``, ``ranges/*.safetensors``
(+ JSON sidecars), ``erasure_<operator>.{md,csv,json}``, ``summary.json`` and ``report.md``. Each file is written
atomically as soon as it is finished, and ``summary.json`` records how far the run got, so a failed or interrupted
run keeps its finished work and never holds a half-written file.
"""

from __future__ import annotations

import json
import logging
import shutil
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .data import ConceptDataset, FewShotPrompter, check_dataset_spec, label_token_ids, load_dataset
from .erasure import CACC_AVERAGES, erasure_table, predict
from .errors import NsLensError
from .files import atomic_path, slug, write_text
from .intervene import INTERVENE_POSITIONS
from .models import Site, check_layer, load_model, local_n_layers, model_id, resolve_site
from .nexttoken import target_token_ids
from .ops import OPERATORS, make_operator
from .ranges import DEFAULT_TAU, RangeMask, build_range_masks, check_tau
from .rank import RANKING_METHODS, check_fraction
from .record import POSITIONS, Progress, RecordResult, record

#: the steering comparisons a run can add (paper App. M, Tables 28-30)
STEERING_RUNS = ("steer", "ablate", "arm", "leace")
#: steering runs whose tables are written under another name (``leace`` is also an operator: the operator's
#: tables are erasure_leace / side_effects_leace, the full-vector run's erasure_leace_full / side_effects_leace_full)
STEERING_KEYS = {"leace": "leace_full"}

__all__ = ["STEERING_RUNS", "PreparedData", "RunConfig", "analyze_run", "load_concepts", "prepare_data", "run_pipeline"]

logger = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """Everything a run needs. Field docs are the CLI/config documentation."""

    model: str = "embedded"
    """Hub id, local directory, or 'embedded' (the offline default)."""
    dataset: str = "synthetic"
    """'synthetic', a paper dataset (ag_news, dbpedia_14, emotion, sst2, imdb), next-token concepts
    next:<family>[:<source>] (families pronouns, pronoun_pairs, punctuation, delimiters, agreement, or w1,w2/w3;
    source wikitext, synthetic or a .txt file; paper App. K) or a .csv/.jsonl path (a target column makes it
    next-token)."""
    label_words: list[str] | None = None
    """Words the model answers with (default: the dataset's)."""
    layer: int = -1
    """Decoder layer whose output is the site; negative counts from the end (-1 = the last block, the layer before
    the output head: the paper's "penultimate layer")."""
    method: str = "max"
    """Saliency ranking: max, probeless, probe or neurgrad."""
    fraction: float = 0.3
    """Top fraction of neurons selected per concept, in (0, 1]."""
    tau: float = DEFAULT_TAU
    """Range half-width in standard deviations."""
    operators: list[str] = field(default_factory=lambda: ["zero"])
    """Operators to evaluate (zero, dampen, mean = the general-text mean, mean_concept = mu, adaptive, leace = LEACE
    fitted per concept on the training split over the mask's neurons, ``nslens.leace``)."""
    alpha: float = 0.125
    """Dampening factor."""
    beta: float = 0.5
    """Adaptive-dampening factor."""
    n_per_class: int = 400
    """Samples per concept drawn (balanced) before the train/test split."""
    test_size: float = 0.3
    """Fraction of samples held out for the erasure evaluation."""
    k_shot: int = 1
    """Demonstrations per class in the few-shot prompt."""
    max_words: int = 64
    """Texts are cut to this many words inside prompts."""
    only_correct: bool = True
    """Keep only samples the clean model classifies correctly (the paper's protocol for Llama, App. H)."""
    max_correct_per_class: int = 2000
    """Cap per concept when only_correct is set."""
    cacc_average: str = "class"
    """CAcc/CConf over the other concepts: class (mean of per-concept values, the paper's) or pooled samples."""
    batch_size: int = 16
    record_position: str = "last"
    """Where activations are recorded: last (the label-predicting token) or all tokens."""
    positions: str = "all"
    """Where interventions apply: all positions (the edited model) or the last one."""
    analyses: bool = True
    """Normality, polysemanticity, distribution overlap, activation patterns and samples at the bounds (keeps up to
    max_samples raw vectors)."""
    max_samples: int = 20000
    """Raw last-token vectors kept for the probe ranking and the analyses."""
    sweeps: list[str] = field(default_factory=list)
    """Sweeps to run: any of fraction, tau, layer (paper Fig. 4, Tables 10-11, 17)."""
    sweep_fractions: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0])
    sweep_taus: list[float] = field(default_factory=lambda: [0.3, 0.6, 1.2, 1.8, 2.4, 2.5, 2.7, 3.0, 3.6, 4.5])
    sweep_layers: list[int] | None = None
    """Layers for the layer sweep (default: all)."""
    sae_path: str | None = None
    """A Gemma Scope params.npz: range-mask SAE features at the site instead of neurons (paper Appendix N)."""
    sae_release: str | None = None
    """Or an SAE by sae-lens release (e.g. gemma-scope-2b-pt-res) ..."""
    sae_id: str | None = None
    """... and id (e.g. layer_25/width_16k/average_l0_285)."""
    sae_ranges_over: str = "firing"
    """SAE feature ranges over the concept's firing samples (default) or all its samples."""
    sae_min_fire: float = 0.1
    """A feature is a candidate for a concept if it fires on at least this share of the concept's samples."""
    sae_top: float = 0.2
    """Share of candidates (by mean activation) selected per concept."""
    steering: list[str] = field(default_factory=list)
    """Steering baselines (paper App. M) over the full site vector, each an erasure table (and side effects):
    steer (ungated = difference-in-means steering, range = range-gated steering), ablate (directional ablation),
    arm (zeroing, range = range masking of the full vector with tau = steer_tau), leace (LEACE of the full vector
    fitted per concept on the training split; range = range-gated LEACE; written as erasure_leace_full)."""
    steer_alpha: float = -2.0
    """Steering strength a in x + a r (the paper: -2)."""
    steer_source: str = "last"
    """Steering vectors from the last token's statistics (App. M.2) or the mean token ("mean", Table 28; one extra
    recording of every position)."""
    steer_tau: float = 1.0
    """tau of the full-vector ranges used by range-gated steering and arm (the paper: 1)."""
    side_effects: bool = False
    """Also measure lm-eval side effects (paper Table 4) of neuron vs range masking for every concept."""
    side_effect_tasks: list[str] = field(default_factory=lambda: ["mmlu", "nslens_wikipedia_ppl"])
    """lm-eval tasks; on the embedded model the defaults are replaced by the offline synthetic tasks."""
    side_effect_limit: float | None = None
    """lm-eval --limit (for the mmlu group lm-eval applies it per subtask)."""
    lm_eval_include: str | None = None
    """Extra directory of lm-eval task YAMLs (TaskManager include_path)."""
    dtype: str | None = None
    quantize: str | None = None
    remote: bool = False
    seed: int = 0

    def validate(self) -> None:
        """Everything that can be checked without the model; ``check_layers`` adds what its config tells."""
        check_dataset_spec(self.dataset)
        if self.batch_size < 1:
            raise NsLensError(f"batch_size must be >= 1, got {self.batch_size}")
        check_fraction(self.fraction)
        check_tau(self.tau)
        if self.method not in RANKING_METHODS:
            raise NsLensError(f"unknown ranking method {self.method!r}; choose one of {', '.join(RANKING_METHODS)}")
        for op in self.operators:
            if op not in OPERATORS:
                raise NsLensError(f"unknown operator {op!r}; choose one of {', '.join(OPERATORS)}")
        if not self.operators:
            raise NsLensError("no operators given; choose from " + ", ".join(OPERATORS))
        if self.cacc_average not in CACC_AVERAGES:
            raise NsLensError(f"unknown cacc_average {self.cacc_average!r}; choose one of {', '.join(CACC_AVERAGES)}")
        if self.record_position not in POSITIONS:
            raise NsLensError(f"unknown record_position {self.record_position!r}; choose one of {', '.join(POSITIONS)}")
        if self.positions not in INTERVENE_POSITIONS:
            raise NsLensError(f"unknown positions {self.positions!r}; choose one of {', '.join(INTERVENE_POSITIONS)}")
        if self.side_effect_limit is not None and not self.side_effect_limit > 0:
            raise NsLensError(f"side_effect_limit must be > 0, got {self.side_effect_limit}")
        if self.sae_path and (self.sae_release or self.sae_id):
            raise NsLensError("give either sae_path or sae_release + sae_id, not both")
        if bool(self.sae_release) != bool(self.sae_id):
            raise NsLensError("sae_release and sae_id go together")
        unknown_steering = sorted(set(self.steering) - set(STEERING_RUNS))
        if unknown_steering:
            raise NsLensError(f"unknown steering {unknown_steering}; choose from {', '.join(STEERING_RUNS)}")
        if self.steer_source not in ("last", "mean"):
            raise NsLensError(f"unknown steer_source {self.steer_source!r}; choose last or mean")
        check_tau(self.steer_tau)
        from .leace import check_leace_config

        check_leace_config(self)
        if self.steering and (self.sae_path or self.sae_release):
            raise NsLensError("steering baselines act on the site's neurons; run them without an SAE")
        if self.sae_ranges_over not in ("firing", "all"):
            raise NsLensError(f"unknown sae_ranges_over {self.sae_ranges_over!r}; choose firing or all")
        unknown = sorted(set(self.sweeps) - {"fraction", "tau", "layer"})
        if unknown:
            raise NsLensError(f"unknown sweeps {unknown}; choose from fraction, tau, layer")
        for f in self.sweep_fractions:
            check_fraction(f)
        for t in self.sweep_taus:
            check_tau(t)
        if self.quantize is not None:
            from .models import QUANTIZE_MODES

            if self.quantize not in QUANTIZE_MODES:
                raise NsLensError(f"unknown quantize mode {self.quantize!r}; choose one of {', '.join(QUANTIZE_MODES)}")
        if self.n_per_class < 4:
            raise NsLensError(f"n_per_class must be >= 4, got {self.n_per_class}")

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        """Read a ``.toml`` or ``.json`` config; unknown keys are an error listing the valid ones."""
        path = Path(path)
        if not path.exists():
            raise NsLensError(f"config file not found: {path}")
        if path.suffix not in (".toml", ".json"):
            raise NsLensError(f"config must be .toml or .json, got {path.name}")
        try:
            text = path.read_text(encoding="utf-8")
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except UnicodeDecodeError as e:
            raise NsLensError(f"config file {path} is not UTF-8 text (byte {e.start})") from e
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise NsLensError(f"config file {path}: {e}") from e
        if not isinstance(data, dict):
            raise NsLensError(f"config file {path} must hold a table of keys, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise NsLensError(f"unknown config keys {unknown}; valid keys: {', '.join(names)}")
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            if not _fits(value, hints[key]):
                raise NsLensError(f"config key {key!r} must be {_type_name(hints[key])}, got {value!r}")
        cfg = cls(**data)
        cfg.validate()
        return cfg


def _fits(value: Any, tp: Any) -> bool:
    """Whether a config value (from TOML/JSON) has the field's type: bool is not a number, ints are floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(args[0], _type_name(args[0]))
    return {type(None): "none", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def check_layers(cfg: RunConfig) -> None:
    """The layer and the sweep layers against the model's depth, read from its config where that is local (the
    embedded model, a local directory, the hub cache), so a bad layer is reported before the model loads."""
    n = local_n_layers(cfg.model)
    if n is not None:
        for layer in [cfg.layer, *(cfg.sweep_layers or [])]:
            check_layer(layer, n)


@dataclass
class PreparedData:
    """The train/test split, prompts and gold tokens a run uses.

    Classification datasets go through the few-shot ``prompter`` and every sample's gold token is its concept's
    label token (``label_ids``). Next-token datasets (``ConceptDataset.next_token``) have neither: the texts are
    the prompts and each sample has its own gold token."""

    train: ConceptDataset
    test: ConceptDataset
    prompter: FewShotPrompter | None
    label_ids: list[int] | None
    train_gold: np.ndarray
    test_gold: np.ndarray

    def prompts(self, ds: ConceptDataset) -> list[str]:
        return list(ds.texts) if self.prompter is None else self.prompter.prompts(ds.texts)


def load_concepts(cfg: RunConfig) -> ConceptDataset:
    """The run's dataset, balanced to ``n_per_class`` (label words from the config when given)."""
    if cfg.dataset == "synthetic":
        ds = load_dataset("synthetic", n_per_class=cfg.n_per_class, seed=cfg.seed + 1)
    elif cfg.dataset.startswith("next:"):
        ds = load_dataset(cfg.dataset, n_per_concept=cfg.n_per_class, seed=cfg.seed, max_words=cfg.max_words)
    else:
        ds = load_dataset(cfg.dataset)
    if cfg.label_words:
        if ds.next_token:
            raise NsLensError(f"dataset {cfg.dataset!r} holds next-token concepts: label_words do not apply")
        ds.label_words = list(cfg.label_words)
        ds.__post_init__()
    return ds.balanced(cfg.n_per_class, seed=cfg.seed)


def _single_token_targets(tokenizer: Any, ds: ConceptDataset) -> ConceptDataset:
    """Next-token samples whose target is one token right after the context's tokens (``target_token_ids``)."""
    _, ok = target_token_ids(tokenizer, ds.texts, ds.targets or [])
    if not ok.all():
        logger.warning("dataset %s: %d of %d samples dropped (the target is not one token after the context's "
                       "tokens with this tokenizer)", ds.name, int((~ok).sum()), len(ok))
    kept = ds.subset(np.flatnonzero(ok))
    kept.source["dropped_multi_token"] = int((~ok).sum())
    return kept


def prepare_data(model: Any, site: Site, cfg: RunConfig, progress: Progress | None = None,
                 ds: ConceptDataset | None = None) -> PreparedData:
    """Balanced sampling, seeded stratified split, few-shot prompter, label tokens (checked for collisions) and,
    with ``only_correct``, the filter to samples the clean model gets right. ``ds``: the dataset, when the caller
    already loaded it (``load_concepts(cfg)``). Next-token datasets keep the samples whose target is one token
    and need no prompter."""
    ds = ds if ds is not None else load_concepts(cfg)
    tok = model.tokenizer
    if ds.next_token:
        ds = _single_token_targets(tok, ds)
    label_ids = None if ds.next_token else label_token_ids(tok, ds.label_words or ds.label_names)
    ds.check_concepts(min_samples=4)
    train, test = ds.split(cfg.test_size, seed=cfg.seed)
    prompter = None if ds.next_token else FewShotPrompter.from_dataset(train, k=cfg.k_shot, seed=cfg.seed,
                                                                        max_words=cfg.max_words)

    def gold(part: ConceptDataset) -> np.ndarray:
        return target_token_ids(tok, part.texts, part.targets or [])[0] if part.next_token \
            else np.asarray(label_ids)[part.labels]

    data = PreparedData(train, test, prompter, label_ids, gold(train), gold(test))
    if not cfg.only_correct:
        return data
    kept: list[Any] = []
    for part, g, split, least in ((train, data.train_gold, "train", 2), (test, data.test_gold, "test", 1)):
        p = predict(model, site, data.prompts(part), g, batch_size=cfg.batch_size, remote=cfg.remote,
                    progress=progress, desc="filter correct")
        idx = np.flatnonzero(p.correct)
        _check_correct(part, p.correct, split, least, cfg)  # the train split fails before the test pass runs
        cap = cfg.max_correct_per_class if part is train else max(1, int(cfg.max_correct_per_class * cfg.test_size))
        keep = np.sort(np.concatenate([idx[part.labels[idx] == c][:cap] for c in range(part.n_concepts)]))
        kept += [part.subset(keep), g[keep]]
    train, train_gold, test, test_gold = kept
    train.check_concepts(min_samples=2)  # max_correct_per_class may cap below that
    return PreparedData(train, test, prompter, label_ids, train_gold, test_gold)


def _check_correct(part: ConceptDataset, correct: np.ndarray, split: str, least: int, cfg: RunConfig) -> None:
    """The only-correct filter must leave ``least`` samples of every concept; if not, one line with every
    concept's count before and after the filter, its clean accuracy, and what to try."""
    before = part.class_counts()
    after = np.bincount(part.labels[correct], minlength=part.n_concepts)
    if (after >= least).all():
        return
    counts = ", ".join(f"{n} {int(b)} -> {int(a)} (clean acc {a / max(b, 1):.2f})"
                       for n, b, a in zip(part.label_names, before, after))
    hints = ["a larger --limit / n_per_class", "--all-samples (only_correct = false)"]
    if not part.next_token:
        hints.append("other --label-words or more shots (k_shot)")
    raise NsLensError(f"dataset {cfg.dataset!r}, {split} split: the only-correct filter leaves fewer than {least} "
                     f"samples of a concept (before -> after: {counts}); try " + ", ".join(hints))


def record_stats(model: Any, site: Site, data: PreparedData, cfg: RunConfig,
                 progress: Progress | None = None, checkpoint: str | Path | None = None,
                 keep_checkpoint: bool = False) -> RecordResult:
    keep = (cfg.method == "probe" or cfg.analyses) and cfg.record_position == "last" and checkpoint is None
    return record(model, site, data.prompts(data.train), data.train.labels, data.train.label_names,
                  batch_size=cfg.batch_size, position=cfg.record_position, keep_samples=keep,
                  max_samples=cfg.max_samples, remote=cfg.remote, progress=progress, checkpoint=checkpoint,
                  keep_checkpoint=keep_checkpoint,
                  meta={"dataset": cfg.dataset, **data.train.source, "seed": cfg.seed})


#: steps whose failure is recorded in the run (summary.json, report) instead of ending it
OPTIONAL_STEPS = ("side_effects", "analyses", "sweeps", "report")


def run_pipeline(cfg: RunConfig, out_dir: str | Path, *, progress: Progress | None = None,
                 model: Any = None, overwrite: bool = False) -> Path:
    """Run everything into the run directory ``out_dir``; returns its path.

    Every artifact is written into the run as soon as it is finished (atomically), and ``summary.json`` says how
    far the run got (``status``: running, complete, failed or interrupted). A failing optional step (side
    effects, analyses, sweeps, report) is recorded under ``failed_steps`` and in the report, and the run goes on:
    an hour of remote erasure work is never thrown away because a figure failed.
    """
    cfg.validate()
    check_layers(cfg)
    out = Path(out_dir)
    # temporary files of a writer that was killed (SIGKILL) are not a run: they never block the next one
    kept = [p for p in out.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp"))] \
        if out.exists() else []
    if kept and not overwrite:
        raise NsLensError(f"run directory {out} exists and is not empty (pass --overwrite to replace it)")
    if model is None:
        model = load_model(cfg.model, dtype=cfg.dtype, quantize=cfg.quantize, remote=cfg.remote)
    site = resolve_site(model, cfg.layer)
    sae = load_run_sae(cfg)  # fail fast on a missing or mismatched SAE, before any model pass
    if sae is not None:
        sae.check(site)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_text(out / "config.json", json.dumps(asdict(cfg), indent=2))
    summary: dict[str, Any] = {"status": "running", "model_id": model_id(model), "site": site.describe(),
                               "dataset": cfg.dataset, "failed_steps": {}}

    def save_summary() -> None:
        write_text(out / "summary.json", json.dumps(summary, indent=2))

    def optional(step: str, fn: Any) -> Any:
        try:
            return fn()
        except Exception as e:  # recorded, not fatal: the finished artifacts stay valid
            summary["failed_steps"][step] = f"{type(e).__name__}: {e}"
            logger.warning("step %s failed (%s: %s); the run goes on", step, type(e).__name__, e)
            return None
        finally:
            save_summary()

    save_summary()
    try:
        data = prepare_data(model, site, cfg, progress)
        summary.update(n_train=len(data.train), n_test=len(data.test), next_token=data.test.next_token)
        _write_texts(out / "train.jsonl", data.train)
        rec, scores = None, None
        if sae is not None:
            masks = _sae_masks(model, site, sae, data, cfg, out, progress)
            sae.save_npz(out / "sae_params.npz")
            summary["basis"] = "sae"
        else:
            rec = record_stats(model, site, data, cfg, progress)
            rec.stats.save(out / "stats.safetensors")
            if rec.samples is not None:
                rec.save_samples(out / "samples.safetensors")
            scores = _scores(model, site, rec, data, cfg, progress)
            with atomic_path(out / "scores.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, scores)
            masks = build_range_masks(rec.stats, method=cfg.method, fraction=cfg.fraction, tau=cfg.tau,
                                      samples=rec.samples, sample_labels=rec.sample_labels, scores=scores)
        for i, m in enumerate(masks):
            m.save(out / "ranges" / f"{i:02d}_{slug(m.concept)}.safetensors")
        summary["neurons_per_concept"] = len(masks[0])
        summary["erasure"] = {}
        save_summary()
        ops = run_operators(model, site, cfg, progress, data=data, masks=masks, rec=rec)
        for op_name, op in ops.items():
            tab = erasure_table(model, site, data.prompts(data.test), data.test.labels, data.label_ids, masks, op,
                                gold_token_ids=data.test_gold, positions=cfg.positions, batch_size=cfg.batch_size, remote=cfg.remote,
                                progress=progress, sae=sae, cacc_average=cfg.cacc_average)
            tab.write(out / f"erasure_{op_name}")
            summary["erasure"][op_name] = tab.summary()
            save_summary()
        steer_runs = {}
        if cfg.steering and rec is not None:
            steer_runs = _steering(model, site, rec, data, cfg, out, progress, summary, save_summary)
        if cfg.side_effects:
            summary["side_effects"] = optional(
                "side_effects", lambda: _side_effects(model, site, masks, ops, cfg, out, progress, sae, steer_runs))
        if cfg.analyses and rec is not None and rec.samples is not None:
            def analyses() -> bool:
                from .analysis import write_analyses

                texts = [data.train.texts[i] for i in rec.sample_index]
                write_analyses(out, rec.samples, rec.sample_labels, texts, rec.stats.label_names, masks, scores,
                               overlap_fraction=cfg.fraction)
                return True

            summary["analyses"] = optional("analyses", analyses)
        if cfg.sweeps and rec is not None:
            summary["sweeps"] = optional("sweeps", lambda: _sweeps(model, site, rec, data, cfg, out, progress,
                                                                   next(iter(ops.values()))))
        summary["status"] = "complete"
        save_summary()
        from .report import write_report

        optional("report", lambda: write_report(out))
    except KeyboardInterrupt:
        summary["status"] = "interrupted"
        save_summary()
        raise
    except BaseException as e:
        summary["status"] = f"failed: {type(e).__name__}: {e}"
        save_summary()
        raise
    return out


def side_effect_tasks(cfg: RunConfig) -> tuple[list[str], str | None]:
    """The lm-eval tasks and include path a run uses. On the embedded model each default task (MMLU, Wikipedia
    token perplexity) is replaced by its offline synthetic stand-in."""
    from .harness import DEFAULT_TASKS, LOCAL_TASKS, local_tasks_dir

    if cfg.model == "embedded" and set(cfg.side_effect_tasks) & set(DEFAULT_TASKS):
        stand_in = dict(zip(DEFAULT_TASKS, LOCAL_TASKS))
        return [stand_in.get(t, t) for t in cfg.side_effect_tasks], str(local_tasks_dir())
    return list(cfg.side_effect_tasks), cfg.lm_eval_include


def load_run_sae(cfg: RunConfig) -> Any:
    """The SAE a run config names (npz path or sae-lens release + id), or None."""
    from .sae import load_sae, load_sae_npz

    if cfg.sae_path:
        return load_sae_npz(cfg.sae_path)
    if cfg.sae_release:
        return load_sae(cfg.sae_release, cfg.sae_id or "")
    return None


def _sae_masks(model: Any, site: Site, sae: Any, data: PreparedData, cfg: RunConfig, out: Path,
               progress: Progress | None) -> list[RangeMask]:
    from .sae import build_feature_masks, feature_table31, record_features, save_sae_meta, select_features

    fst = record_features(model, site, sae, data.prompts(data.train), data.train.labels, data.train.label_names,
                          batch_size=cfg.batch_size, remote=cfg.remote, progress=progress)
    selection = select_features(fst, min_fire=cfg.sae_min_fire, top=cfg.sae_top)
    masks = build_feature_masks(fst, selection, tau=cfg.tau, ranges_over=cfg.sae_ranges_over)
    save_sae_meta(out / "sae.json", sae, feature_table31(fst, selection, cfg.sae_min_fire))
    return masks


def run_operators(model: Any, site: Site, cfg: RunConfig, progress: Progress | None = None, *,
                  data: PreparedData | None = None, masks: list[RangeMask] | None = None,
                  rec: RecordResult | None = None) -> dict[str, Any]:
    """The run's operators by name; ``mean`` gets the site's general-text mean (recorded once, cached); ``leace``
    is a list of per-concept erasers fitted on ``data``'s training split over ``masks`` (from ``rec``'s raw samples
    when they cover it, else streamed from the model)."""
    gm = None
    if "mean" in cfg.operators:
        from .general import general_mean

        gm = general_mean(model, site, batch_size=cfg.batch_size, remote=cfg.remote, progress=progress)
    ops: dict[str, Any] = {}
    for name in cfg.operators:
        if name == "leace":
            from .leace import run_leace

            ops[name] = run_leace(model, site, cfg, data, masks, rec, progress)
        else:
            ops[name] = make_operator(name, alpha=cfg.alpha, beta=cfg.beta, general_mean=gm)
    return ops


def _steering(model: Any, site: Site, rec: RecordResult, data: PreparedData, cfg: RunConfig, out: Path,
              progress: Progress | None, summary: dict[str, Any], save_summary: Any) -> dict[str, Any]:
    """The steering comparisons over full-vector masks (tau = steer_tau), each written as an erasure table as it
    completes; returns {name: (masks, per-concept operators)} for the side-effect sweep."""
    from .ops import zero
    from .steering import full_masks, steering_operators

    stats = rec.stats
    if cfg.steer_source == "mean":  # the mean-token representation: every position of the training prompts
        stats = record(model, site, data.prompts(data.train), data.train.labels, data.train.label_names,
                       batch_size=cfg.batch_size, position="all", remote=cfg.remote, progress=progress).stats
    masks = full_masks(rec.stats, tau=cfg.steer_tau)
    runs: dict[str, Any] = {}
    for name in cfg.steering:
        if name == "leace":
            from .leace import run_leace

            per = run_leace(model, site, cfg, data, masks, rec, progress)
        else:
            per = [zero()] * len(masks) if name == "arm" else steering_operators(stats, name, cfg.steer_alpha)
        tab = erasure_table(model, site, data.prompts(data.test), data.test.labels, data.label_ids, masks, per,
                            gold_token_ids=data.test_gold, positions=cfg.positions, batch_size=cfg.batch_size, remote=cfg.remote,
                            progress=progress, cacc_average=cfg.cacc_average)
        tab.meta.update(steering=name, steer_source=cfg.steer_source, steer_tau=cfg.steer_tau)
        key = STEERING_KEYS.get(name, name)  # never the file of an operator of the same name
        tab.write(out / f"erasure_{key}")
        summary["erasure"][key] = tab.summary()
        save_summary()
        runs[key] = (masks, per)
    return runs


def _side_effects(model: Any, site: Site, masks: list[RangeMask], ops: dict[str, Any], cfg: RunConfig, out: Path,
                  progress: Progress | None, sae: Any = None, steer_runs: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """One sweep for the run's operators on its masks, one for the steering comparisons on the full-vector masks
    (the clean results are computed once and cached)."""
    from .harness import default_cache_dir, side_effect_tables

    tasks, include = side_effect_tasks(cfg)
    common = {"tasks": tasks, "positions": cfg.positions, "limit": cfg.side_effect_limit, "include_path": include,
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
    """Saliency scores [C, d] of the run's ranking method."""
    from .rank import rank

    if cfg.method == "neurgrad":
        from .neg import neurgrad_concept_scores

        return neurgrad_concept_scores(model, site, data.prompts(data.train), data.train.labels, data.label_ids,
                                       gold_token_ids=data.train_gold, n_concepts=data.train.n_concepts,
                                       batch_size=cfg.batch_size, remote=cfg.remote, progress=progress)
    return rank(cfg.method, rec.stats, rec.samples, rec.sample_labels)


def _write_texts(path: Path, ds: ConceptDataset) -> None:
    targets = ds.targets if ds.targets is not None else [None] * len(ds)
    write_text(path, "".join(json.dumps({"text": t, "label": y, **({"target": g} if g is not None else {})}) + "\n"
                             for t, y, g in zip(ds.texts, ds.labels.tolist(), targets)))


def _sweeps(model: Any, site: Site, rec: RecordResult, data: PreparedData, cfg: RunConfig, out: Path,
            progress: Progress | None, op: Any) -> list[str]:
    from .figures import plot_sweep
    from .sweeps import fraction_sweep, layer_sweep, tau_sweep

    test = (data.prompts(data.test), data.test.labels, data.label_ids, op)
    method = cfg.method if cfg.method in ("max", "probeless") else "max"  # sweeps rebuild masks from statistics
    common = {"batch_size": cfg.batch_size, "remote": cfg.remote, "positions": cfg.positions,
              "gold_token_ids": data.test_gold}
    done = []
    for param in cfg.sweeps:
        if param == "fraction":
            sw = fraction_sweep(model, site, rec.stats, *test, fractions=cfg.sweep_fractions, method=method,
                                tau=cfg.tau, progress=progress, **common)
        elif param == "tau":
            sw = tau_sweep(model, site, rec.stats, *test, taus=cfg.sweep_taus, method=method,
                           fraction=cfg.fraction, progress=progress, **common)
        else:
            sw = layer_sweep(model, data.prompts(data.train), data.train.labels, data.train.label_names, *test,
                             layers=cfg.sweep_layers, method=method, fraction=cfg.fraction, tau=cfg.tau,
                             batch_size=cfg.batch_size, remote=cfg.remote, progress=progress,
                             gold_token_ids=data.test_gold)
        write_text(out / f"sweep_{param}.json", sw.to_json())
        write_text(out / f"sweep_{param}.md", sw.to_markdown())
        plot_sweep(sw, out / "figures" / f"sweep_{param}.png")
        done.append(param)
    return done


def analyze_run(run_dir: str | Path) -> Path:
    """(Re)compute the analyses of an existing run from its saved raw samples, masks and training texts, then
    rewrite its report."""
    from safetensors.numpy import load_file

    from .analysis import write_analyses
    from .ranges import load_masks
    from .rank import rank
    from .report import write_report
    from .stats import ConceptStats

    run = Path(run_dir)
    if not (run / "samples.safetensors").exists():
        raise NsLensError(f"{run} has no raw samples (samples.safetensors); re-run with analyses = true")
    cfg = json.loads((run / "config.json").read_text())
    raw = load_file(str(run / "samples.safetensors"))
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
    summary = json.loads((run / "summary.json").read_text())
    summary["analyses"] = True
    summary.get("failed_steps", {}).pop("analyses", None)
    write_text(run / "summary.json", json.dumps(summary, indent=2))
    return write_report(run)


def load_run_masks(run_dir: str | Path, site: Site | None = None) -> list[RangeMask]:
    from .ranges import load_masks

    return load_masks(Path(run_dir) / "ranges", expect=site.describe() if site else None)
