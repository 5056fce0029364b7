"""Sweeps (paper Fig. 4, Tables 10-11, 17): masking fraction, tau and layer against erasure.

Fraction and tau sweeps reuse one recording and one ranking: only the masks change, and every table goes through the
fast erasure path. The layer sweep records, and ranks, once per layer. Any registered ranking works
(``nslens.rank.get_ranking``); one that needs the model or raw samples is passed to the fraction and tau sweeps as
its ``scores``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .erasure import erasure_table
from .errors import NsLensError, check_number
from .models import resolve_site
from .ops import Operator
from .ranges import build_range_masks
from .rank import get_ranking
from .record import Progress, record
from .stats import ConceptStats

__all__ = ["DEFAULT_FRACTIONS", "DEFAULT_TAUS", "Sweep", "fraction_sweep", "layer_sweep", "tau_sweep"]

DEFAULT_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
DEFAULT_TAUS = (0.3, 0.6, 1.2, 1.8, 2.4, 2.5, 2.7, 3.0, 3.6, 4.5)


@dataclass
class Sweep:
    """One erasure summary (10 % trimmed means: base, neuron deltas, range deltas) per value of ``param``."""

    param: str
    values: list[float]
    summaries: list[dict[str, dict[str, float]]]
    meta: dict[str, Any] = field(default_factory=dict)

    def curve(self, part: str, metric: str) -> np.ndarray:
        """Absolute metric after intervention (base + delta) for ``part`` in (neuron, range)."""
        return np.array([s["base"][metric] + s[part][metric] for s in self.summaries])

    def to_markdown(self) -> str:
        lines = [f"| {self.param} | neuron Acc | neuron CAcc | range Acc | range CAcc |", "|---|---|---|---|---|"]
        for v, s in zip(self.values, self.summaries):
            vals = [s["base"][m] + s[p][m] for p in ("neuron", "range") for m in ("acc", "cacc")]
            lines.append(f"| {v:g} | " + " | ".join(f"{x:.3f}" for x in vals) + " |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Sweep:
        return cls(**json.loads(text))


def _check(values: Sequence[float], name: str) -> list[float]:
    if isinstance(values, (str, int, float)):  # one number was a TypeError, a string its letters
        raise NsLensError(f"the {name} sweep takes a list of values, got {values!r}")
    vals = [check_number(f"{name} sweep value", v) for v in values]
    if not vals:
        raise NsLensError(f"{name} sweep needs at least one value")
    return vals


def _mask_sweep(param: str, values: Sequence[float], model: Any, site: Any, stats: ConceptStats,
                prompts: Sequence[str], labels: np.ndarray, label_ids: Sequence[int] | None, operator: Operator,
                mask_args: dict[str, Any], progress: Progress | None, meta: dict[str, Any],
                **kwargs: Any) -> Sweep:
    """One recording, masks rebuilt with ``param`` set to each value, one (fast) erasure table per value."""
    vals, out = _check(values, param), []
    for i, v in enumerate(vals):
        masks = build_range_masks(stats, **{**mask_args, param: v})
        out.append(erasure_table(model, site, prompts, labels, label_ids, masks, operator, **kwargs).summary())
        if progress is not None:
            progress(f"sweep {param}", i + 1, len(vals))
    return Sweep(param, vals, out, {**meta, "operator": operator.label})


def _ranked(method: str, scores: np.ndarray | None, stats: ConceptStats) -> np.ndarray | None:
    """The scores the sweep's masks are built from: ``scores`` when given (the run's own ranking, which depends on
    neither fraction nor tau), else ``method`` from the statistics (a ranking that needs the model or raw samples
    needs ``scores``)."""
    if scores is not None:
        return scores
    ranking = get_ranking(method)
    if ranking.needs_model or ranking.needs_samples:
        raise NsLensError(f"the {method} ranking needs {'the model' if ranking.needs_model else 'raw samples'}: "
                          "pass its scores= (computed once, reused for every value of the sweep)")
    return ranking.scores(stats)


def fraction_sweep(model: Any, site: Any, stats: ConceptStats, prompts: Sequence[str], labels: np.ndarray,
                   label_ids: Sequence[int] | None, operator: Operator, *, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                   method: str = "max", tau: float = 2.5, progress: Progress | None = None,
                   scores: np.ndarray | None = None, **kwargs: Any) -> Sweep:
    """Neuron vs range masking as the masked share of neurons grows (one recording, masks rebuilt from one
    ranking: ``method``'s, or the given ``scores`` of it)."""
    return _mask_sweep("fraction", fractions, model, site, stats, prompts, labels, label_ids, operator,
                       {"method": method, "tau": tau, "scores": _ranked(method, scores, stats)}, progress,
                       {"method": method, "tau": tau}, **kwargs)


def tau_sweep(model: Any, site: Any, stats: ConceptStats, prompts: Sequence[str], labels: np.ndarray,
              label_ids: Sequence[int] | None, operator: Operator, *, taus: Sequence[float] = DEFAULT_TAUS,
              method: str = "max", fraction: float = 0.3, progress: Progress | None = None,
              scores: np.ndarray | None = None, **kwargs: Any) -> Sweep:
    """Neuron vs range masking as the range widens (neuron masking does not depend on tau: a constant reference);
    ``scores`` as in ``fraction_sweep``."""
    return _mask_sweep("tau", taus, model, site, stats, prompts, labels, label_ids, operator,
                       {"method": method, "fraction": fraction, "scores": _ranked(method, scores, stats)}, progress,
                       {"method": method, "fraction": fraction}, **kwargs)


def layer_sweep(model: Any, train_prompts: Sequence[str], train_labels: np.ndarray, label_names: Sequence[str],
                test_prompts: Sequence[str], test_labels: np.ndarray, label_ids: Sequence[int] | None,
                operator: Operator, *, layers: Sequence[int] | None = None, method: str = "max", fraction: float = 0.3,
                tau: float = 2.5, batch_size: int = 16, remote: bool | str = False, progress: Progress | None = None,
                gold_token_ids: Any = None, train_gold_token_ids: Any = None, readout: Any = None) -> Sweep:
    """Neuron vs range masking at every layer (default: all); one recording per layer, ranked at that layer by
    ``method``: from its statistics, its raw samples (``needs_samples``) or the model (``needs_model``, over the
    training prompts with their concepts' label tokens or ``train_gold_token_ids``). ``readout``: the run's
    prediction rule (``nslens.readout``), the same at every layer (its prior is the clean model's)."""
    ranking = get_ranking(method)
    n_layers = resolve_site(model, 0).n_layers
    if layers is None:
        sites = [resolve_site(model, layer) for layer in range(n_layers)]
    else:  # each layer once, under its own number: 1.7 ran layer 1, -1 and n - 1 ran one layer twice
        sites = [resolve_site(model, int(check_number("sweep layer", v, integer=True))) for v in layers]
        if not sites or len({s.layer for s in sites}) != len(sites):
            raise NsLensError(f"the layer sweep needs distinct layers, got {list(layers)}")
    values = [s.layer for s in sites]
    out = []
    for i, site in enumerate(sites):
        rec = record(model, site, train_prompts, train_labels, label_names, batch_size=batch_size, remote=remote,
                     **({"keep_samples": True} if ranking.needs_samples else {}))
        if ranking.needs_model:
            scores = ranking.scores_from_model(model, site, train_prompts, np.asarray(train_labels), label_ids,
                                               gold_token_ids=train_gold_token_ids, n_concepts=len(label_names),
                                               batch_size=batch_size, remote=remote)
        else:
            scores = ranking.scores(rec.stats, rec.samples, rec.sample_labels)
        masks = build_range_masks(rec.stats, method=method, fraction=fraction, tau=tau, scores=scores)
        out.append(erasure_table(model, site, test_prompts, test_labels, label_ids, masks, operator,
                                 gold_token_ids=gold_token_ids, batch_size=batch_size, remote=remote,
                                 readout=readout).summary())
        if progress is not None:
            progress("sweep layer", i + 1, len(values))
    return Sweep("layer", [float(v) for v in values], out,
                 {"method": method, "fraction": fraction, "tau": tau, "operator": operator.label})
