"""Massive-activation ("outlier") dimensions of a site, and what they do to saliency rankings and range masks.

Why this exists: in pretrained LLMs a handful of residual-stream dimensions carry activations one to three orders
of magnitude larger than the rest, with nearly the same large value on every input (Sun et al. 2024, "Massive
activations in large language models"). The paper's ``max`` ranking (mean \\|activation\\| per concept) then picks
the same few dimensions first for *every* concept, and their concept-conditioned range [mu -/+ tau sigma] covers
the samples of every other concept too: zeroing them, with or without the range gate, is not concept-specific.
On SmolLM2-135M (``experiments/real_model.py``, ``docs/real-model.md``) this is what makes neuron and range
masking of the top 30 % destroy every concept alike. The embedded toy model has no such dimensions.

The functions here only read recorded statistics (``ConceptStats``) and raw samples, so they cost no model pass:

- ``pooled_rms``: each neuron's root mean square over all recorded samples (every concept pooled).
- ``outlier_dims``: the neurons whose pooled RMS exceeds ``ratio`` times the median neuron's; the default ratio
  (``DEFAULT_RATIO`` = 20) is far above what a Gaussian-like dimension reaches and far below the massive ones
  (SmolLM2's run at 100-1000x the median).
- ``exclude_dims``: scores with those neurons ranked last, so ``build_range_masks(..., scores=...)`` never selects
  them (unless the fraction asks for every neuron).
- ``rank_standardised``: a ranking in units of each neuron's own spread, \\|mu_c - mu\\| / sigma (pooled), which a
  constant large offset cannot win.
- ``range_coverage``: the share of each concept's samples inside a mask's range, per selected neuron: how often
  range masking edits samples of concepts it is not meant for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import NsLensError
from .ranges import RangeMask
from .stats import ConceptStats

__all__ = ["DEFAULT_RATIO", "exclude_dims", "outlier_dims", "pooled_mean_std", "pooled_rms", "range_coverage",
           "rank_standardised"]

#: a neuron is an outlier dimension when its pooled RMS is more than this many times the median neuron's
DEFAULT_RATIO = 20.0


def pooled_mean_std(stats: ConceptStats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population standard deviation [d] of every neuron over all recorded samples, all concepts pooled
    (merged from the per-concept count, mean and M2, the same numbers the raw samples give)."""
    n = stats.count.sum()
    if n <= 0:
        raise NsLensError("statistics hold no samples")
    w = stats.count[:, None]
    mean = (w * stats.mean).sum(0) / n
    m2 = (stats.m2 + w * (stats.mean - mean) ** 2).sum(0)
    return mean, np.sqrt(np.maximum(m2 / n, 0.0))


def pooled_rms(stats: ConceptStats) -> np.ndarray:
    """Root mean square [d] of every neuron over all recorded samples: sqrt(sigma^2 + mu^2), pooled."""
    mean, std = pooled_mean_std(stats)
    return np.sqrt(std**2 + mean**2)


def outlier_dims(stats: ConceptStats, ratio: float = DEFAULT_RATIO) -> np.ndarray:
    """Indices of the neurons whose pooled RMS exceeds ``ratio`` x the median neuron's, largest first."""
    if not (np.isfinite(ratio) and ratio > 1):
        raise NsLensError(f"outlier ratio must be a number > 1, got {ratio}")
    rms = pooled_rms(stats)
    med = float(np.median(rms))
    idx = np.flatnonzero(rms > ratio * med) if med > 0 else np.flatnonzero(rms > 0)
    return idx[np.argsort(-rms[idx], kind="stable")]


def exclude_dims(scores: np.ndarray, dims: Sequence[int] | np.ndarray) -> np.ndarray:
    """A copy of saliency ``scores`` [C, d] with ``dims`` set to -inf: ranked last for every concept."""
    out = np.array(scores, dtype=np.float64, copy=True)
    dims = np.asarray(dims, dtype=np.int64)
    if dims.size and (dims.min() < 0 or dims.max() >= out.shape[-1]):
        raise NsLensError(f"dimensions to exclude must lie in [0, {out.shape[-1] - 1}]")
    out[..., dims] = -np.inf
    return out


def rank_standardised(stats: ConceptStats) -> np.ndarray:
    """Saliency [C, d] = \\|mu_c - mu\\| / sigma with mu, sigma pooled over all concepts (0 where sigma = 0): how far
    a concept moves the neuron, in units of the neuron's own spread, so a dimension that is large for every input
    scores nothing for being large."""
    mean, std = pooled_mean_std(stats)
    safe = np.where(std > 0, std, 1.0)
    return np.where(std > 0, np.abs(stats.mean - mean) / safe, 0.0)


def range_coverage(mask: RangeMask, samples: np.ndarray, labels: np.ndarray, n_concepts: int) -> np.ndarray:
    """[n_concepts, k]: for each concept, the share of its samples whose activation at each of the mask's ``k``
    neurons lies inside the mask's range [lo, hi] (where a range-gated operator edits it); NaN for a concept
    without samples."""
    idx = mask.neurons.numpy()
    x = np.asarray(samples)[:, idx]
    inside = (x >= mask.lo.numpy()) & (x <= mask.hi.numpy())
    labels = np.asarray(labels)
    out = np.full((n_concepts, len(idx)), np.nan)
    for c in range(n_concepts):
        if (labels == c).any():
            out[c] = inside[labels == c].mean(0)
    return out
