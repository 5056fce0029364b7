"""Saliency rankings of neurons per concept (paper Appendix C).

- ``max``: mean |h| over the concept's samples (high negative activations count too; Voita et al. 2023).
- ``probeless`` (Antverg & Belinkov 2022): the paper writes r = sum over concept pairs |q(c) - q(c')| for the
  whole dataset; a ranking *per concept* needs the terms involving c, so we use
  r_c = sum_{c' != c} |q(c) - q(c')| with q the concept mean.
- ``neurgrad`` (NEG paper): mean |NeurGrad| of the gold label's probability over the concept's samples; it needs
  the model, so it is computed by ``nslens.neg.neurgrad_concept_scores`` and passed in as ``scores``.
- ``probe``: a linear classifier with elastic-net regularisation (scikit-learn, standardised inputs) on the raw
  vectors; neuron j's score for concept c is |W[c, j]| (for two concepts, the single weight row serves both).

Every method returns scores ``[C, d]``; higher is more salient.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import NsLensError
from .stats import ConceptStats

__all__ = ["RANKING_METHODS", "rank", "rank_max", "rank_probe", "rank_probeless", "select_top"]

RANKING_METHODS = ("max", "probeless", "probe", "neurgrad")


def rank_max(stats: ConceptStats) -> np.ndarray:
    return stats.abs_mean()


def rank_probeless(stats: ConceptStats) -> np.ndarray:
    q = stats.mean
    return np.abs(q[:, None, :] - q[None, :, :]).sum(1)


def _elastic_net() -> dict[str, str]:
    """scikit-learn >= 1.8 makes a fractional l1_ratio mean elastic net and deprecates ``penalty`` (removed in
    1.10); older versions need ``penalty="elasticnet"``. Same objective either way."""
    import sklearn

    major, minor = (int(x) for x in sklearn.__version__.split(".")[:2])
    return {} if (major, minor) >= (1, 8) else {"penalty": "elasticnet"}


def rank_probe(samples: np.ndarray, labels: np.ndarray, n_concepts: int, *, l1_ratio: float = 0.5, C: float = 1.0,
               seed: int = 0, max_iter: int = 300) -> np.ndarray:
    """|weights| of an elastic-net logistic-regression probe trained on standardised activations."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if samples is None:
        raise NsLensError("the probe ranking needs raw samples: record with keep_samples=True")
    x = StandardScaler().fit_transform(np.asarray(samples, dtype=np.float64))
    clf = LogisticRegression(**_elastic_net(), solver="saga", l1_ratio=l1_ratio, C=C, max_iter=max_iter,
                             random_state=seed)
    clf.fit(x, labels)
    w = np.abs(clf.coef_)
    if w.shape[0] == 1:  # binary: one weight row separates both concepts
        w = np.repeat(w, n_concepts, axis=0)
    return w


def rank(method: str, stats: ConceptStats, samples: np.ndarray | None = None,
         labels: np.ndarray | None = None, **kwargs: Any) -> np.ndarray:
    """Scores ``[C, d]`` by ``method`` (one of ``RANKING_METHODS``)."""
    if method == "max":
        return rank_max(stats)
    if method == "probeless":
        return rank_probeless(stats)
    if method == "probe":
        if samples is None or labels is None:
            raise NsLensError("the probe ranking needs raw samples: record with keep_samples=True")
        return rank_probe(samples, labels, stats.n_concepts, **kwargs)
    if method == "neurgrad":
        raise NsLensError("the neurgrad ranking needs the model: compute it with "
                         "nslens.neg.neurgrad_concept_scores and pass scores= (the pipeline does this)")
    raise NsLensError(f"unknown ranking method {method!r}; choose one of {', '.join(RANKING_METHODS)}")


def select_top(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the top ``fraction`` of neurons by score, most salient first (ties: lower index first).

    The count is the authors' ``int(fraction * d)`` (floor), at least one: 19 of 64 neurons for 30 %.
    """
    check_fraction(fraction)
    scores = np.asarray(scores)
    k = max(1, int(fraction * scores.shape[-1]))
    order = np.argsort(-scores, kind="stable")
    return order[:k]


def check_fraction(fraction: float) -> None:
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise NsLensError(f"fraction must be in (0, 1], got {fraction!r}")
