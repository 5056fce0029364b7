"""Saliency rankings of neurons per concept (paper Appendix C).

- ``max``: mean |h| over the concept's samples (high negative activations count too; Voita et al. 2023).
- ``probeless`` (Antverg & Belinkov 2022): the paper writes r = sum over concept pairs |q(c) - q(c')| for the
  whole dataset; a ranking *per concept* needs the terms involving c, so we use
  r_c = sum_{c' != c} |q(c) - q(c')| with q the concept mean.
- ``neurgrad`` (NEG paper): mean |NeurGrad| of the gold label's probability over the concept's samples; it needs
  the model: ``get_ranking("neurgrad").scores_from_model(model, site, ...)`` (``nslens.neurgrad``), passed to
  ``build_range_masks`` as ``scores``.
- ``probe``: a linear classifier with elastic-net regularisation (scikit-learn, standardised inputs) on the raw
  vectors; neuron j's score for concept c is |W[c, j]| (for two concepts, the single weight row serves both).

Every method returns scores ``[C, d]``; higher is more salient. Each is a ``Ranking`` class in
``RANKING_REGISTRY`` (flags ``needs_model``, ``needs_samples``); ``register_ranking`` adds one of one's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .concepts import concept_labels
from .errors import NsLensError
from .registry import Names, Registry
from .stats import ConceptStats

__all__ = ["RANKING_METHODS", "RANKING_REGISTRY", "STATS_RANKINGS", "MaxRanking", "ProbeRanking", "ProbelessRanking", "Ranking",
           "check_fraction", "get_ranking", "rank", "rank_max", "rank_probe", "rank_probeless", "register_ranking",
           "select_top"]

def rank_max(stats: ConceptStats) -> np.ndarray:
    """The ``max`` ranking: each concept's mean |activation| per neuron, ``[C, d]``."""
    return stats.abs_mean()


def rank_probeless(stats: ConceptStats) -> np.ndarray:
    """The ``probeless`` ranking (Antverg & Belinkov 2022): per concept, the summed |difference| of its mean
    activation from every other concept's, ``[C, d]``."""
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


# --------------------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Ranking:
    """A saliency ranking: scores ``[C, d]`` per concept and neuron, higher is more salient.

    A subclass is a frozen dataclass (its fields are its parameters) that sets ``name`` and implements ``scores``
    from a recording's statistics (and raw samples where ``needs_samples``), or, where ``needs_model``,
    ``scores_from_model`` from the model and the training prompts. ``rank`` and ``build_range_masks`` call
    ``scores``; a run calls ``scores_from_model`` for a ranking that needs the model."""

    name: ClassVar[str] = ""
    needs_model: ClassVar[bool] = False
    """Scores come from the model (gradients), not from the statistics alone: ``scores_from_model``."""
    needs_samples: ClassVar[bool] = False
    """Scores need the recording's raw samples (``record(..., keep_samples=True)``), not only its statistics."""

    def scores(self, stats: ConceptStats, samples: np.ndarray | None = None,
               labels: np.ndarray | None = None) -> np.ndarray:
        """Saliency ``[C, d]`` from a recording's statistics (and its raw ``samples`` ``[n, d]`` with their concept
        ``labels`` where ``needs_samples``)."""
        if self.needs_model:
            raise NsLensError(f"the {self.name} ranking needs the model: compute it with "
                              f"get_ranking({self.name!r}).scores_from_model(model, site, ...) and pass scores= "
                              "(the pipeline does this)")
        raise NotImplementedError(f"{type(self).__name__} does not implement scores")

    def scores_from_model(self, model: Any, site: Any, prompts: Sequence[str], labels: np.ndarray,
                          label_token_ids: Sequence[int] | None, *, gold_token_ids: Any = None,
                          n_concepts: int | None = None, batch_size: int = 8, remote: bool | str = False,
                          progress: Any = None) -> np.ndarray:
        """Scores from the model over the training ``prompts`` (their concept ``labels``, the concepts' label
        tokens or each sample's gold token), for a ranking that ``needs_model``."""
        raise NsLensError(f"the {self.name} ranking is computed from a recording's statistics: use "
                          f"get_ranking({self.name!r}).scores(stats, samples, labels)")


@dataclass(frozen=True)
class MaxRanking(Ranking):
    """``max``: mean |h| over the concept's samples (high negative activations count too; Voita et al. 2023)."""

    name: ClassVar[str] = "max"

    def scores(self, stats: ConceptStats, samples: np.ndarray | None = None,
               labels: np.ndarray | None = None) -> np.ndarray:
        return rank_max(stats)


@dataclass(frozen=True)
class ProbelessRanking(Ranking):
    """``probeless`` (Antverg & Belinkov 2022), per concept: r_c = sum_{c' != c} |q(c) - q(c')|, q the mean."""

    name: ClassVar[str] = "probeless"

    def scores(self, stats: ConceptStats, samples: np.ndarray | None = None,
               labels: np.ndarray | None = None) -> np.ndarray:
        return rank_probeless(stats)


@dataclass(frozen=True)
class ProbeRanking(Ranking):
    """``probe``: |W[c, j]| of an elastic-net logistic-regression probe on the standardised raw samples."""

    name: ClassVar[str] = "probe"
    needs_samples: ClassVar[bool] = True
    l1_ratio: float = 0.5
    C: float = 1.0
    seed: int = 0
    max_iter: int = 300

    def scores(self, stats: ConceptStats, samples: np.ndarray | None = None,
               labels: np.ndarray | None = None) -> np.ndarray:
        if samples is None or labels is None:
            raise NsLensError("the probe ranking needs raw samples: record with keep_samples=True")
        samples, d = np.asarray(samples), stats.mean.shape[1]
        if samples.ndim != 2 or samples.shape[1] != d or len(samples) != len(labels):  # found by sklearn, or not
            raise NsLensError(f"the probe ranking needs samples [n, {d}] (the statistics' width) and one label "
                              f"each, got samples of shape {samples.shape} and {len(labels)} labels")
        labels = concept_labels(labels, stats.n_concepts)
        return rank_probe(samples, labels, stats.n_concepts, l1_ratio=self.l1_ratio, C=self.C, seed=self.seed,
                          max_iter=self.max_iter)


RANKING_REGISTRY: Registry[type[Ranking]] = Registry("ranking method")


def register_ranking(cls: type[Ranking], *, replace: bool = False) -> type[Ranking]:
    """Make ``cls`` (a ``Ranking`` subclass with a ``name``) usable by name: ``rank``, ``build_range_masks``, a run
    config's ``method``, the CLI's ``--method``. Usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Ranking)) or not cls.name:
        raise NsLensError(f"register_ranking needs a Ranking subclass with a name, got {cls!r}")
    RANKING_REGISTRY.register(cls.name, cls, replace=replace)
    return cls


def get_ranking(name: str, **params: Any) -> Ranking:
    """The ranking registered as ``name``, built with ``params`` (e.g. the probe's ``l1_ratio``)."""
    return RANKING_REGISTRY.get(name)(**params)


for _cls in (MaxRanking, ProbelessRanking, ProbeRanking):
    register_ranking(_cls)
RANKING_REGISTRY.register("neurgrad", "nslens.neurgrad:NeurGradRanking")  # needs the model code, above this module

#: the registered ranking names, read at each use
RANKING_METHODS: Names = RANKING_REGISTRY.view()
#: those that need neither the model nor raw samples: what a statistics file alone can rank by
STATS_RANKINGS: Names = RANKING_REGISTRY.view(lambda cls: not (cls.needs_model or cls.needs_samples))


def rank(method: str, stats: ConceptStats, samples: np.ndarray | None = None,
         labels: np.ndarray | None = None, **kwargs: Any) -> np.ndarray:
    """Scores ``[C, d]`` by ``method`` (one of ``RANKING_METHODS``; ``kwargs`` are the ranking's parameters)."""
    return get_ranking(method, **kwargs).scores(stats, samples, labels)


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
    """A masking fraction is a number in (0, 1]; anything else is a one-line error."""
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise NsLensError(f"fraction must be in (0, 1], got {fraction!r}")
