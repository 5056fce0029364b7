"""What a run is told: ``RunConfig``, the core settings (model, data, site, ranking, operators), and one section per
capability that a run can add (``[sae]``, ``[steering]``, ``[sweeps]``, ``[side_effects]``), each with its own
``validate``. A TOML or JSON config writes a section as a table:

    fraction = 0.5
    [steering]
    runs = ["steer", "ablate"]
    alpha = -2.0

The flat keys of earlier configs (``steer_alpha``, ``sweep_taus``, ``side_effects = true``, ...) are still read;
each one logs a one-line deprecation notice naming its new key (``RunConfig(steer_alpha=...)`` in Python warns with
a ``DeprecationWarning``). ``FLAT_KEYS`` is the mapping.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import tomllib
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .concepts import check_test_size
from .data import check_dataset_spec
from .erasure import CACC_AVERAGES
from .errors import NsLensError, check_choice, check_number
from .intervene import INTERVENE_POSITIONS
from .leace import check_leace_config
from .models import QUANTIZE_MODES, check_layer, local_n_layers
from .ops import OPERATORS, VECTOR_OPERATORS, get_operator
from .ranges import DEFAULT_TAU, check_tau
from .rank import RANKING_METHODS, check_fraction
from .readout import READOUTS
from .record import POSITIONS
from .sae import check_feature_selection

__all__ = ["FLAT_KEYS", "STEERING_RUNS", "SWEEP_PARAMS", "RunConfig", "SaeConfig", "SideEffectsConfig",
           "SteeringConfig", "SweepConfig", "check_layers", "steering_runs"]

logger = logging.getLogger(__name__)

#: the built-in steering comparisons a run can add (paper App. M, Tables 28-30); a registered vector operator
#: (``build == "vector"``) is accepted too (``steering_runs``)
STEERING_RUNS = ("steer", "ablate", "arm", "leace")


def steering_runs() -> tuple[str, ...]:
    """Every steering comparison a run accepts: the vector operators (``steer``, ``ablate`` and registered ones),
    then the other built-ins (``arm``, ``leace``)."""
    return tuple(dict.fromkeys((*VECTOR_OPERATORS, *STEERING_RUNS)))


#: what a sweep can vary (paper Fig. 4, Tables 10-11, 17)
SWEEP_PARAMS = ("fraction", "tau", "layer")


@dataclass
class SaeConfig:
    """Range masking of SAE features at the site instead of neurons (paper Appendix N); on when ``path`` or
    ``release`` names an SAE."""

    path: str | None = None
    """A Gemma Scope params.npz."""
    release: str | None = None
    """Or an SAE by sae-lens release (e.g. gemma-scope-2b-pt-res) ..."""
    id: str | None = None
    """... and id (e.g. layer_25/width_16k/average_l0_285)."""
    ranges_over: str = "firing"
    """Feature ranges over the concept's firing samples (default) or all its samples."""
    min_fire: float = 0.1
    """A feature is a candidate for a concept if it fires on at least this share of the concept's samples."""
    top: float = 0.2
    """Share of candidates (by mean activation) selected per concept."""

    @property
    def enabled(self) -> bool:
        return bool(self.path or self.release)

    def validate(self) -> None:
        if "" in (self.path, self.release, self.id):  # an unset shell variable: it ran a plain neuron run
            raise NsLensError("an empty SAE setting names no SAE ([sae] path, release, id); give one or leave it out")
        if self.path and (self.release or self.id):
            raise NsLensError("give either sae_path or sae_release + sae_id, not both ([sae] path, or release + id)")
        if bool(self.release) != bool(self.id):
            raise NsLensError("sae_release and sae_id go together ([sae] release and id)")
        if self.ranges_over not in ("firing", "all"):
            raise NsLensError(f"unknown sae_ranges_over {self.ranges_over!r}; choose firing or all")
        check_feature_selection(self.min_fire, self.top)


@dataclass
class SteeringConfig:
    """Steering baselines (paper App. M) over the full site vector, each an erasure table (and side effects)."""

    runs: list[str] = field(default_factory=list)
    """Which: steer (ungated = difference-in-means steering, range = range-gated steering), ablate (directional
    ablation), arm (zeroing, range = range masking of the full vector with tau = steering tau), leace (LEACE of the
    full vector fitted per concept on the training split; range = range-gated LEACE; written as
    erasure_leace_full)."""
    alpha: float = -2.0
    """Steering strength a in x + a r (the paper: -2)."""
    source: str = "last"
    """Steering vectors from the last token's statistics (App. M.2) or the mean token ("mean", Table 28; one extra
    recording of every position)."""
    tau: float = 1.0
    """tau of the full-vector ranges used by range-gated steering and arm (the paper: 1)."""

    def validate(self) -> None:
        unknown = sorted(set(self.runs) - set(steering_runs()))
        if unknown:
            raise NsLensError(f"unknown steering {unknown}; choose from {', '.join(steering_runs())}")
        if self.source not in ("last", "mean"):
            raise NsLensError(f"unknown steer_source {self.source!r}; choose last or mean")
        check_number("steering alpha", self.alpha)
        check_tau(self.tau)


@dataclass
class SweepConfig:
    """Erasure along one parameter at a time (paper Fig. 4, Tables 10-11, 17), each with a curve figure."""

    params: list[str] = field(default_factory=list)
    """Sweeps to run: any of fraction, tau, layer."""
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0])
    """Masking fractions of the fraction sweep."""
    taus: list[float] = field(default_factory=lambda: [0.3, 0.6, 1.2, 1.8, 2.4, 2.5, 2.7, 3.0, 3.6, 4.5])
    """Range half-widths of the tau sweep."""
    layers: list[int] | None = None
    """Layers of the layer sweep (default: all)."""

    def validate(self) -> None:
        unknown = sorted(set(self.params) - set(SWEEP_PARAMS))
        if unknown:
            raise NsLensError(f"unknown sweeps {unknown}; choose from {', '.join(SWEEP_PARAMS)}")
        empty = [p for p in self.params if getattr(self, f"{p}s") is not None and not len(getattr(self, f"{p}s"))]
        if empty:  # found only at the sweep step, which then skipped the other sweeps too
            raise NsLensError(f"the {empty[0]} sweep has no values (sweeps.{empty[0]}s, --values)")
        for f in self.fractions:
            check_fraction(f)
        for t in self.taus:
            check_tau(t)


@dataclass
class SideEffectsConfig:
    """lm-eval side effects (paper Table 4) of neuron vs range masking for every concept."""

    enabled: bool = False
    """Measure them."""
    tasks: list[str] = field(default_factory=lambda: ["mmlu", "nslens_wikipedia_ppl"])
    """lm-eval tasks; on the embedded model the defaults are replaced by the offline synthetic tasks."""
    limit: float | None = None
    """lm-eval --limit (for the mmlu group lm-eval applies it per subtask)."""
    include: str | None = None
    """Extra directory of lm-eval task YAMLs (TaskManager include_path)."""

    def validate(self) -> None:
        if self.limit is not None and not self.limit > 0:
            raise NsLensError(f"lm-eval limit must be > 0, got {self.limit} (side_effects.limit, --lm-eval-limit)")
        if not self.tasks or not all(isinstance(t, str) and t.strip() for t in self.tasks):
            raise NsLensError(f"side_effects.tasks must name lm-eval tasks, got {self.tasks!r} (--tasks)")


#: the config's sections: the key a config file writes them under, and their class
SECTIONS: dict[str, type] = {"sae": SaeConfig, "steering": SteeringConfig, "sweeps": SweepConfig,
                             "side_effects": SideEffectsConfig}
#: earlier flat keys -> (section, field). ``steering``, ``sweeps`` and ``side_effects`` are flat only when they are
#: not a table (a list of runs, a list of sweeps, true/false).
FLAT_KEYS: dict[str, tuple[str, str]] = {
    "sae_path": ("sae", "path"), "sae_release": ("sae", "release"), "sae_id": ("sae", "id"),
    "sae_ranges_over": ("sae", "ranges_over"), "sae_min_fire": ("sae", "min_fire"), "sae_top": ("sae", "top"),
    "steering": ("steering", "runs"), "steer_alpha": ("steering", "alpha"), "steer_source": ("steering", "source"),
    "steer_tau": ("steering", "tau"),
    "sweeps": ("sweeps", "params"), "sweep_fractions": ("sweeps", "fractions"), "sweep_taus": ("sweeps", "taus"),
    "sweep_layers": ("sweeps", "layers"),
    "side_effects": ("side_effects", "enabled"), "side_effect_tasks": ("side_effects", "tasks"),
    "side_effect_limit": ("side_effects", "limit"), "lm_eval_include": ("side_effects", "include"),
}


def _is_flat(key: str, value: Any) -> bool:
    return key in FLAT_KEYS and not isinstance(value, dict | SaeConfig | SteeringConfig | SweepConfig |
                                               SideEffectsConfig)


def upgrade_flat_keys(data: dict[str, Any], notify: Callable[[str, str, str], None]) -> dict[str, Any]:
    """``data`` with every earlier flat key moved into its section (a section given as a table or object is
    updated, one given as nothing is made); ``notify(key, section, field)`` is called once per flat key."""
    out = {k: v for k, v in data.items() if not _is_flat(k, v)}
    for key, value in data.items():
        if not _is_flat(key, value):
            continue
        section, name = FLAT_KEYS[key]
        notify(key, section, name)
        current = out.get(section)
        if isinstance(current, dict):
            out[section] = {**current, name: value}
        elif current is None:
            out[section] = {name: value}
        else:
            out[section] = dataclasses.replace(current, **{name: value})
    return out


def _log_flat_key(key: str, section: str, name: str) -> None:
    logger.warning("config key %r is deprecated: write it as %s under [%s]", key, name, section)


def _warn_flat_argument(key: str, section: str, name: str) -> None:
    warnings.warn(f"RunConfig({key}=...) is deprecated: pass {section}={SECTIONS[section].__name__}({name}=...)",
                  DeprecationWarning, stacklevel=4)


def _accepts_flat_keys(cls: type) -> type:
    """Let the generated ``__init__`` take the earlier flat keyword arguments (``steer_alpha=...``), with a
    ``DeprecationWarning`` each, and sections as their object or as a dict of their fields."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs = upgrade_flat_keys(kwargs, _warn_flat_argument)
        for name, section in SECTIONS.items():
            if isinstance(kwargs.get(name), dict):
                kwargs[name] = section(**kwargs[name])
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_accepts_flat_keys
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
    readout: str = "argmax"
    """How logits become a prediction: argmax (greedy token, the paper's), labels (best label token) or calibrated
    (best label token after the prompt's content-free prior; ``nslens.readout``)."""
    max_correct_per_class: int = 2000
    """Cap per concept when only_correct is set (at least 2: the training split needs two of each concept)."""
    cacc_average: str = "class"
    """CAcc/CConf over the other concepts: class (mean of per-concept values, the paper's) or pooled samples."""
    batch_size: int = 16
    """Prompts per model pass (padding, and so float rounding, depends on it)."""
    record_position: str = "last"
    """Where activations are recorded: last (the label-predicting token) or all tokens."""
    positions: str = "all"
    """Where interventions apply: all positions (the edited model) or the last one."""
    analyses: bool = True
    """Normality, polysemanticity, distribution overlap, activation patterns and samples at the bounds (keeps up to
    max_samples raw vectors)."""
    max_samples: int = 20000
    """Raw last-token vectors kept for the probe ranking and the analyses."""
    dtype: str | None = None
    """Weights' dtype: float32, bfloat16 or float16 (default: the checkpoint's)."""
    quantize: str | None = None
    """nf4 or int8 (bitsandbytes; local models)."""
    remote: bool = False
    """Run traces on NDIF (needs a hub id and NDIF_API_KEY)."""
    seed: int = 0
    """Seed of the sampling, the split and the demonstrations."""
    sae: SaeConfig = field(default_factory=SaeConfig)
    """[sae]: SAE features instead of neurons."""
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    """[steering]: the steering baselines."""
    sweeps: SweepConfig = field(default_factory=SweepConfig)
    """[sweeps]: fraction, tau and layer sweeps."""
    side_effects: SideEffectsConfig = field(default_factory=SideEffectsConfig)
    """[side_effects]: lm-eval side effects."""

    def validate(self) -> None:
        """Everything that can be checked without the model; ``check_layers`` adds what its config tells."""
        check_dataset_spec(self.dataset)
        for name, least in (("batch_size", 1), ("n_per_class", 4), ("k_shot", 0), ("max_words", 1), ("seed", 0),
                            ("max_correct_per_class", 2), ("max_samples", int(self.method == "probe"))):
            check_number(name, getattr(self, name), least, integer=True)
        check_fraction(self.fraction)
        check_tau(self.tau)
        check_choice("ranking method", self.method, RANKING_METHODS)
        for op in self.operators:
            check_choice("operator", op, OPERATORS)
            get_operator(op).check_options(alpha=self.alpha, beta=self.beta)  # before the model loads
        if not self.operators:
            raise NsLensError("no operators given; choose from " + ", ".join(OPERATORS))
        check_choice("cacc_average", self.cacc_average, CACC_AVERAGES)
        check_choice("readout", self.readout, READOUTS)
        if self.readout != "argmax" and self.dataset.startswith("next:"):
            raise NsLensError(f"readout {self.readout!r} compares label words; next-token datasets ({self.dataset}) "
                              "need readout argmax")
        if self.label_words is not None and not self.label_words:  # `--label-words ,,,` fell back to the defaults
            raise NsLensError("label_words lists no words; give one per concept (--label-words a,b,c) or leave it out")
        check_choice("record_position", self.record_position, POSITIONS)
        check_choice("positions", self.positions, INTERVENE_POSITIONS)
        if self.quantize is not None:
            check_choice("quantize mode", self.quantize, QUANTIZE_MODES)
        check_test_size(self.test_size)
        for section in SECTIONS:
            getattr(self, section).validate()
        # leace reads the flat names of its settings
        check_leace_config(types.SimpleNamespace(operators=self.operators, steering=self.steering.runs,
                                                 sae_path=self.sae.path, sae_release=self.sae.release))
        if self.steering.runs and self.sae.enabled:
            raise NsLensError("steering baselines act on the site's neurons; run them without an SAE")
        if self.sae.enabled and "mean" in self.operators:  # found after the SAE features were recorded
            raise NsLensError("the mean operator replaces the site's neurons by their general-text mean, not SAE "
                              "features; use mean_concept with an SAE")

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes``: core fields by name, a section by its object or by a dict of the fields to change
        in it (``cfg.replace(side_effects={"limit": 8})``)."""
        for name in SECTIONS:
            if isinstance(changes.get(name), dict):
                changes[name] = dataclasses.replace(getattr(self, name), **changes[name])
        return dataclasses.replace(self, **changes)

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
        """A validated config from a config file's table (sections as sub-tables; flat keys with a notice)."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(k for k in data if k not in names and k not in FLAT_KEYS)
        if unknown:
            raise NsLensError(f"unknown config keys {unknown}; valid keys: {', '.join(names)}")
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            if _is_flat(key, value):
                section, name = FLAT_KEYS[key]
                _check_type(key, value, typing.get_type_hints(SECTIONS[section])[name])
            elif key in SECTIONS:
                _check_section(key, value)
            else:
                _check_type(key, value, hints[key])
        cfg = cls(**upgrade_flat_keys(data, _log_flat_key))
        cfg.validate()
        return cfg


def _check_section(key: str, value: Any) -> None:
    section = SECTIONS[key]
    if not isinstance(value, dict):
        raise NsLensError(f"config key {key!r} must be a table ([{key}]), got {value!r}")
    names = [f.name for f in fields(section)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise NsLensError(f"unknown keys {unknown} in [{key}]; valid keys: {', '.join(names)}")
    hints = typing.get_type_hints(section)
    for name, v in value.items():
        _check_type(f"{key}.{name}", v, hints[name])


def _check_type(key: str, value: Any, tp: Any) -> None:
    if not _fits(value, tp):
        raise NsLensError(f"config key {key!r} must be {_type_name(tp)}, got {value!r}")


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
        for layer in [cfg.layer, *(cfg.sweeps.layers or [])]:
            check_layer(layer, n)
