"""Intervention operators phi: small pure-tensor functions of the selected neurons' activations.

Each factory returns an ``Operator`` (a frozen dataclass, picklable, so it ships to NDIF with the trace). It is
called as ``op(x, mu, sigma, tau)`` with ``x`` the activations of the selected neurons ``[..., k]`` and the
mask's per-neuron ``mu``/``sigma`` ``[k]``; it returns phi(x) with x's shape. Gating (apply only inside
[lo, hi]) is not the operator's business: see ``nslens.intervene``.

- ``zero``: phi(x) = 0 (the paper's concept erasure).
- ``dampen``: phi(x) = alpha * x (Suau et al. 2024; alpha = 0.125 in the paper).
- ``mean``: phi(x) = the neuron's mean over general text (paper App. G.2, Tables 13-15; ``nslens.general``),
  given for the whole site (``site_values``, ``[d_model]``) so one operator serves every concept's mask.
- ``mean_concept``: phi(x) = the mask's concept mean mu (pulls the concept to its most typical value).
- ``steer``: phi(x) = x + a * r, r a steering vector given for the whole site (difference-in-means steering,
  App. M; a = -2 in the paper). Range-gated (App. M.2: "range-based steering") it adds a * r_j only to components
  whose activation lies in the target concept's range.
- ``ablate``: phi(x) = x - (x . r_hat) r_hat, directional ablation (Arditi et al.; App. M.1) of the unit direction
  r_hat restricted to the selected neurons (all of them, for a full-width mask).
- ``adaptive``: phi(x) = a(x) * x with a(x) = beta * |x - mu| / (tau * sigma) (paper Appendix G): full suppression
  at mu, dampening by beta at the range's edges. Where tau * sigma = 0 the range is the single point mu and
  a = 0 there (no division by zero). Ungated, a(x) is capped at beta so values outside the range are never
  amplified; inside the range the cap never binds, so range-gated use is exactly the paper's formula.
- ``leace``: LEACE (least-squares concept erasure), one eraser per concept fitted on the training split
  (``nslens.leace.Leace``, a subclass of ``Operator``); ``make_operator`` cannot build it from a name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import NsLensError

__all__ = ["OPERATORS", "VECTOR_OPERATORS", "Operator", "ablate_direction", "adaptive_dampen", "dampen",
           "make_operator", "mean_replace", "steer", "zero"]

OPERATORS = ("zero", "dampen", "mean", "mean_concept", "adaptive", "leace")
#: operators fitted on the concepts' training activations (``nslens.leace``), not built by name alone
FITTED_OPERATORS = ("leace",)
#: operators built from a per-concept steering vector (``steer``, ``ablate``), not by name alone
VECTOR_OPERATORS = ("steer", "ablate")


@dataclass(frozen=True)
class Operator:
    """phi with its parameters. Build it with the factories below rather than by hand."""

    name: str
    alpha: float = 0.125
    beta: float = 0.5
    values: torch.Tensor | None = None
    """Replacement values, one per selected neuron (``mean`` with explicit values)."""
    site_values: torch.Tensor | None = None
    """Replacement values for every neuron of the site ``[d_model]`` (``mean``: the general-text mean)."""

    def __call__(self, x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, tau: float,
                 neurons: torch.Tensor | None = None) -> torch.Tensor:
        if self.name == "zero":
            return torch.zeros_like(x)
        if self.name == "dampen":
            return x * self.alpha
        if self.name in ("mean", "mean_concept"):
            if self.site_values is not None:
                if neurons is None:
                    raise NsLensError("site-wide replacement values need the selected neurons' indices")
                v = self.site_values.to(x.device)[neurons.to(x.device)]
            else:
                v = mu if self.values is None else self.values
            return v.to(device=x.device, dtype=x.dtype).expand_as(x).clone()
        if self.name in VECTOR_OPERATORS:
            if self.site_values is None or neurons is None:
                raise NsLensError(f"{self.name} needs its site-wide vector and the selected neurons' indices")
            r = self.site_values.to(device=x.device, dtype=x.dtype)[neurons.to(x.device)]
            if self.name == "steer":
                return x + self.alpha * r
            return x - (x @ r)[..., None] * r
        if self.name == "adaptive":
            denom = tau * sigma.to(device=x.device, dtype=x.dtype)
            dist = (x - mu.to(device=x.device, dtype=x.dtype)).abs()
            a = torch.where(denom > 0, self.beta * dist / denom.clamp(min=torch.finfo(x.dtype).tiny),
                            torch.zeros_like(x))
            return a.clamp(max=self.beta) * x
        raise NsLensError(f"unknown operator {self.name!r}; choose one of {', '.join(OPERATORS)}")

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.name == "dampen":
            d["alpha"] = self.alpha
        if self.name == "adaptive":
            d["beta"] = self.beta
        if self.name in ("mean", "mean_concept"):
            d["values"] = ("general-text mean" if self.site_values is not None
                           else "mu" if self.values is None else "given")
        if self.name == "steer":
            d["alpha"] = self.alpha
        return d

    @property
    def label(self) -> str:
        return {"zero": "zero", "dampen": f"dampen(a={self.alpha:g})", "mean": "mean", "mean_concept": "mean(mu)",
                "adaptive": f"adaptive(b={self.beta:g})", "steer": f"steer(a={self.alpha:g})",
                "ablate": "ablate"}[self.name]


def zero() -> Operator:
    return Operator("zero")


def dampen(alpha: float = 0.125) -> Operator:
    if not 0.0 <= alpha <= 1.0:
        raise NsLensError(f"dampening factor alpha must be in [0, 1], got {alpha}")
    return Operator("dampen", alpha=float(alpha))


def mean_replace(values: torch.Tensor | None = None, *, site_values: torch.Tensor | None = None) -> Operator:
    """Replace by ``site_values`` (one per neuron of the site: the general-text mean, ``nslens.general_mean``), by
    ``values`` (one per selected neuron), or, with neither, by the mask's concept mean mu (``mean_concept``)."""
    if values is not None and site_values is not None:
        raise NsLensError("give values (per selected neuron) or site_values (per site neuron), not both")
    if site_values is not None:
        return Operator("mean", site_values=torch.as_tensor(site_values, dtype=torch.float32).flatten())
    if values is not None:
        return Operator("mean", values=torch.as_tensor(values, dtype=torch.float32))
    return Operator("mean_concept")


def steer(vector: torch.Tensor, alpha: float = -2.0) -> Operator:
    """Add ``alpha * vector`` (one value per neuron of the site): difference-in-means steering (paper: alpha = -2
    with the target concept's mean minus the other concepts' mean, ``nslens.steering.steering_vectors``)."""
    v = torch.as_tensor(vector, dtype=torch.float32).flatten()
    if not torch.isfinite(v).all():
        raise NsLensError("the steering vector has NaN/inf values")
    return Operator("steer", alpha=float(alpha), site_values=v)


def ablate_direction(vector: torch.Tensor) -> Operator:
    """Project out the unit direction of ``vector`` (one value per neuron of the site): directional ablation."""
    v = torch.as_tensor(vector, dtype=torch.float32).flatten()
    norm = float(v.norm())
    if not norm > 0 or not torch.isfinite(v).all():
        raise NsLensError("directional ablation needs a finite, non-zero direction")
    return Operator("ablate", site_values=v / norm)


def adaptive_dampen(beta: float = 0.5) -> Operator:
    if not 0.0 <= beta <= 1.0:
        raise NsLensError(f"adaptive dampening beta must be in [0, 1], got {beta}")
    return Operator("adaptive", beta=float(beta))


def make_operator(name: str, *, alpha: float = 0.125, beta: float = 0.5,
                  general_mean: torch.Tensor | None = None) -> Operator:
    """Operator by name (CLI and configs). ``mean`` needs the site's general-text mean (``nslens.general_mean``)."""
    if name == "zero":
        return zero()
    if name == "dampen":
        return dampen(alpha)
    if name == "mean":
        if general_mean is None:
            raise NsLensError("the mean operator replaces with the general-text mean: pass general_mean= "
                             "(nslens.general_mean(model, site)), or use mean_concept for the concept mean")
        return mean_replace(site_values=general_mean)
    if name == "mean_concept":
        return mean_replace()
    if name == "adaptive":
        return adaptive_dampen(beta)
    if name in FITTED_OPERATORS:
        raise NsLensError(f"{name} is fitted per concept on the training split, not built by name: use "
                          "nslens.leace.leace_operators (or run_operators(..., data=, masks=))")
    raise NsLensError(f"unknown operator {name!r}; choose one of {', '.join(OPERATORS)}")
