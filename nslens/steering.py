"""Steering baselines of the NeuronLens paper (Appendix M): difference-in-means steering, directional ablation and
range-gated steering, built from statistics a recording already holds.

- r_c = mu_c - mu_other, the target concept's mean minus the mean of all other concepts' samples (count-weighted),
  per neuron of the site. From last-token statistics it is the last-token variant (App. M.2); from statistics
  recorded at every position (``record(..., position="all")``) it is the mean-token representation, the usual
  steering default (Table 28).
- ``steer(r_c, alpha)`` adds alpha * r_c everywhere (ungated); range-gated it adds alpha * r_c,j only where the
  activation lies in concept c's range [mu - tau sigma, mu + tau sigma] (App. M.2).
- ``ablate_direction(r_c)`` projects r_c's unit direction out of the residual stream (Arditi et al., App. M.1).
- The paper's range-masking comparison uses tau = 1 over the full vector (100 % of neurons): ``full_masks``.
Every one of them is an ordinary ``Intervention`` over a full-width mask, so the erasure table, the side-effect
sweep, remote execution and ``applied`` work unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import NsLensError
from .ops import VECTOR_OPERATORS, Operator, get_operator
from .ranges import RangeMask, build_range_masks
from .stats import ConceptStats

__all__ = ["STEERING_KINDS", "full_masks", "steering_operators", "steering_vectors"]

#: the operators built from a concept's steering vector: ``steer``, ``ablate`` and any registered one (read at each use)
STEERING_KINDS = VECTOR_OPERATORS


def steering_vectors(stats: ConceptStats) -> torch.Tensor:
    """``[C, d]``: each concept's mean minus the count-weighted mean of all other concepts' samples."""
    n = np.asarray(stats.count, dtype=np.float64)
    if (n <= 0).any():
        raise NsLensError("every concept needs samples for a steering vector")
    mu = np.asarray(stats.mean, dtype=np.float64)
    total = (n[:, None] * mu).sum(0)
    other = (total[None, :] - n[:, None] * mu) / (n.sum() - n)[:, None]
    return torch.from_numpy(mu - other).float()


def full_masks(stats: ConceptStats, tau: float = 1.0) -> list[RangeMask]:
    """One mask per concept over every neuron of the site with ranges mu -/+ tau sigma (the paper: tau = 1)."""
    return build_range_masks(stats, method="max", fraction=1.0, tau=tau)


def steering_operators(stats: ConceptStats, kind: str = "steer", alpha: float = -2.0) -> list[Operator]:
    """One operator per concept from its steering vector r_c: ``steer`` (alpha * r_c), ``ablate`` (r_c's direction)
    or a registered vector operator (its class's ``from_vector``)."""
    if kind not in STEERING_KINDS:
        raise NsLensError(f"unknown steering kind {kind!r}; choose one of {', '.join(STEERING_KINDS)}")
    cls = get_operator(kind)
    return [cls.from_vector(v, alpha=alpha) for v in steering_vectors(stats)]
