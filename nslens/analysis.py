"""The paper's distribution analyses on recorded raw activations (``RecordResult.samples``).

- Normality (Tables 1, 7, 9): per neuron and concept, skewness, Pearson kurtosis (normal = 3) and the practical
  normality test: standardise, take the Kolmogorov-Smirnov statistic against N(0, 1); a neuron is practically normal
  for a concept if it is <= 0.1. All from scipy.
- Polysemanticity (Fig. 2): overlap of the top-p salient neuron sets between concepts, |S_a & S_b| / |S_a|.
- Distribution overlap (Table 5): for each concept's salient neurons and every other concept, the AUROC of
  separating the two concept-conditioned activation sets (Mann-Whitney, equal to scikit-learn's); overlap =
  1 - 2 |AUROC - 0.5|, so 1 means identical distributions and 0 perfectly separated ones. Summarised as shares per
  overlap quartile.
- Samples at the bounds (Table 2/8): the training texts whose activation is nearest a range's lower bound, mean
  and upper bound.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .concepts import concept_labels
from .errors import NsLensError
from .figures import plot_activation_patterns, plot_common_neurons, plot_overlap_heatmap
from .files import write_text
from .ranges import RangeMask
from .rank import select_top

__all__ = [
    "KS_THRESHOLD",
    "NormalityReport",
    "bound_samples",
    "normality",
    "overlap_quartiles",
    "pairwise_auroc_overlap",
    "salient_overlap",
    "write_analyses",
]

KS_THRESHOLD = 0.1


@dataclass
class NormalityReport:
    """Per concept and neuron ``[C, d]``: skewness, Pearson kurtosis, KS statistic of the standardised values."""

    skewness: np.ndarray
    kurtosis: np.ndarray
    ks: np.ndarray
    label_names: list[str]

    def practically_normal(self, threshold: float = KS_THRESHOLD) -> np.ndarray:
        return self.ks <= threshold

    def summary(self, neurons: Sequence[np.ndarray] | None = None) -> dict[str, dict[str, float]]:
        """Per concept (over all neurons, or each concept's given neurons) and for the dataset: mean skewness,
        mean kurtosis, share practically normal."""
        out = {}
        for c, name in enumerate(self.label_names):
            idx = slice(None) if neurons is None else np.asarray(neurons[c])
            out[name] = {"skewness": float(np.mean(self.skewness[c, idx])),
                         "kurtosis": float(np.mean(self.kurtosis[c, idx])),
                         "practically_normal": float(np.mean(self.practically_normal()[c, idx]))}
        out["dataset"] = {k: float(np.mean([v[k] for v in out.values()])) for k in
                          ("skewness", "kurtosis", "practically_normal")}
        return out


def _concept_samples(x: np.ndarray, labels: Any, n_concepts: int, every: bool = True) -> np.ndarray:
    """The samples' labels as concept indices, one per row of ``x``, every concept among them: a label past the
    names was an IndexError, a concept left out was dropped from the analysis without a word."""
    labels = concept_labels(labels, n_concepts)
    if x.ndim != 2 or len(labels) != len(x):
        raise NsLensError(f"samples [n, d] need one label each: got samples of shape {x.shape} and {len(labels)} "
                          "labels")
    if every and len(set(labels.tolist())) != n_concepts:
        raise NsLensError(f"the samples hold concepts {sorted(set(labels.tolist()))}, not all {n_concepts}")
    return labels


def normality(samples: np.ndarray, labels: np.ndarray, label_names: Sequence[str]) -> NormalityReport:
    """Skewness, Pearson kurtosis and standardised-KS statistic per concept and neuron (scipy)."""
    from scipy import stats

    x = np.asarray(samples, dtype=np.float64)
    labels = _concept_samples(x, labels, len(label_names))
    c, d = len(label_names), x.shape[1]
    sk, ku, ks = np.zeros((c, d)), np.zeros((c, d)), np.ones((c, d))
    for k in range(c):
        xs = x[labels == k]
        if len(xs) < 3:
            raise NsLensError(f"concept {label_names[k]!r} has {len(xs)} samples; normality needs at least 3")
        sk[k] = stats.skew(xs, axis=0)
        ku[k] = stats.kurtosis(xs, axis=0, fisher=False)
        sd = xs.std(0)
        z = (xs - xs.mean(0)) / np.where(sd > 0, sd, 1.0)
        for j in range(d):
            ks[k, j] = stats.kstest(z[:, j], "norm").statistic if sd[j] > 0 else 1.0
    return NormalityReport(sk, ku, ks, list(label_names))


def salient_overlap(scores: np.ndarray, fraction: float = 0.3) -> np.ndarray:
    """``[C, C]``: share of concept a's top-``fraction`` neurons that are also in concept b's."""
    sets = [set(select_top(s, fraction).tolist()) for s in scores]
    c = len(sets)
    out = np.zeros((c, c))
    for a in range(c):
        for b in range(c):
            out[a, b] = len(sets[a] & sets[b]) / len(sets[a])
    return out


def pairwise_auroc_overlap(samples: np.ndarray, labels: np.ndarray, masks: Sequence[RangeMask]) -> np.ndarray:
    """Overlap 1 - 2|AUROC - 0.5| for every (concept, salient neuron, other concept): shape ``[C, k, C]``, NaN on
    the diagonal. Concept c's salient neurons are its mask's neurons.

    The AUROC is the Mann-Whitney statistic (mid-ranks for ties, the same value scikit-learn's ``roc_auc_score``
    gives), computed for all of a mask's neurons at once from one ``rankdata`` per concept pair: a per-neuron
    ``roc_auc_score`` call made this the slowest step of an analysis of a real model (C^2 k calls). Twice the rank
    sum is an integer, so the overlap is one division of exact integers."""
    from scipy.stats import rankdata

    x = np.asarray(samples, dtype=np.float64)
    c = len(masks)
    misplaced = [i for i, m in enumerate(masks) if m.meta.get("concept_index", i) != i]
    if not c or misplaced or len({len(m) for m in masks}) != 1:  # a subset scored concept 2's neurons on concept 0
        raise NsLensError("the overlap takes one mask per concept, in concept order, all of one size (masks[c] is "
                          f"concept c's): got {[(m.meta.get('concept_index'), len(m)) for m in masks]} "
                          "(concept index, neurons)")
    labels = _concept_samples(x, labels, c, every=False)  # a concept without samples is named per pair below
    k = len(masks[0])
    out = np.full((c, k, c), np.nan)
    for a, mask in enumerate(masks):
        cols = np.asarray(mask.neurons.tolist(), dtype=int)
        for b in range(c):
            if a == b:
                continue
            sel = (labels == a) | (labels == b)
            pos = labels[sel] == a
            n1, n0 = int(pos.sum()), int((~pos).sum())
            if n1 == 0 or n0 == 0:
                raise NsLensError(f"the AUROC overlap of concepts {a} and {b} needs samples of both "
                                  f"(got {n1} and {n0})")
            twice_ranks = np.rint(2.0 * rankdata(x[sel][:, cols], axis=0)).astype(np.int64)
            twice_u = twice_ranks[pos].sum(axis=0) - n1 * (n1 + 1)  # 2 U, U = AUROC * n1 * n0
            out[a, :, b] = (n1 * n0 - np.abs(twice_u - n1 * n0)) / (n1 * n0)
    return out


def overlap_quartiles(overlap: np.ndarray) -> dict[str, float]:
    """Share of (neuron, concept pair) overlaps in each quartile of [0, 1]."""
    v = overlap[np.isfinite(overlap)]
    edges = [0.0, 0.25, 0.5, 0.75, 1.0 + 1e-12]
    names = ["0-25%", "25-50%", "50-75%", "75-100%"]
    return {n: float(np.mean((v >= lo) & (v < hi))) for n, lo, hi in zip(names, edges[:-1], edges[1:])}


def bound_samples(samples: np.ndarray, labels: np.ndarray, texts: Sequence[str], mask: RangeMask, neuron: int,
                  k: int = 3) -> dict[str, list[tuple[str, float]]]:
    """The ``k`` texts of the mask's concept whose activation of ``neuron`` is nearest its range's lower bound,
    mean and upper bound (each as (text, activation))."""
    pos = (mask.neurons == neuron).nonzero()
    if len(pos) == 0:
        raise NsLensError(f"neuron {neuron} is not in the mask of concept {mask.concept!r}")
    i = int(pos[0, 0])
    c = int(mask.meta.get("concept_index", 0))
    idx = np.flatnonzero(labels == c)
    acts = np.asarray(samples)[idx, neuron]
    out = {}
    for name, target in (("lower", float(mask.lo[i])), ("mean", float(mask.mu[i])), ("upper", float(mask.hi[i]))):
        order = np.argsort(np.abs(acts - target), kind="stable")[:k]
        out[name] = [(texts[idx[o]], float(acts[o])) for o in order]
    return out


def write_analyses(run_dir: str | Path, samples: np.ndarray, labels: np.ndarray, texts: Sequence[str],
                   label_names: Sequence[str], masks: Sequence[RangeMask], scores: np.ndarray, *,
                   overlap_fraction: float = 0.3, k_bounds: int = 3) -> dict[str, Any]:
    """Compute every analysis for a run and write ``analysis.json`` and ``figures/*.png`` into ``run_dir``."""
    run = Path(run_dir)
    figs = run / "figures"
    names = list(label_names)
    norm = normality(samples, labels, names)
    sal = salient_overlap(scores, overlap_fraction)
    ov = pairwise_auroc_overlap(samples, labels, masks)
    plot_overlap_heatmap(sal, names, figs / "polysemanticity.png",
                         title=f"Overlap of top {overlap_fraction:.0%} salient neurons")
    for c in range(len(names)):
        plot_activation_patterns(samples, labels, names, scores, masks, c, figs / f"patterns_{c:02d}.png")
    top_sets = [set(select_top(s, overlap_fraction).tolist()) for s in scores]
    common = sorted(set.intersection(*top_sets))
    plot_common_neurons(samples, labels, names, common, figs / "common_neurons.png")
    bounds = {}
    for c, mask in enumerate(masks):
        j = int(mask.neurons[0])
        bounds[names[c]] = {"neuron": j, **bound_samples(samples, labels, texts, mask, j, k=k_bounds)}
    result = {
        "normality": {"all_neurons": norm.summary(),
                      "salient_neurons": norm.summary([m.neurons.numpy() for m in masks]),
                      "ks_threshold": KS_THRESHOLD},
        "polysemanticity": {"fraction": overlap_fraction, "names": names, "overlap": sal.tolist(),
                            "common_neurons": common},
        "distribution_overlap": {"definition": "1 - 2|AUROC - 0.5| per salient neuron and concept pair",
                                 "quartiles": overlap_quartiles(ov),
                                 "per_concept_mean": {names[a]: float(np.nanmean(ov[a])) for a in range(len(names))}},
        "bound_samples": bounds,
        "n_samples": int(len(samples)),
    }
    write_text(run / "analysis.json", json.dumps(result, indent=2))
    return result
