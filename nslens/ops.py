"""Intervention operators phi: small pure-tensor functions of the selected neurons' activations.

Each factory returns an ``Operator`` (a frozen dataclass, picklable, so it ships to NDIF with the trace). It is
called as ``op(x, mu, sigma, tau)`` with ``x`` the activations of the selected neurons ``[..., k]`` and the
mask's per-neuron ``mu``/``sigma`` ``[k]``; it returns phi(x) with x's shape. Gating (apply only inside
[lo, hi]) is not the operator's business: see ``nslens.intervene``.

- ``zero``: phi(x) = 0 (the paper's concept erasure).
- ``dampen``: phi(x) = alpha * x (Suau et al. 2024; alpha = 0.125 in the paper).
- ``mean``: phi(x) = v, a given per-neuron vector; by default the concept mean mu (paper Tables 13-15).
- ``adaptive``: phi(x) = a(x) * x with a(x) = beta * |x - mu| / (tau * sigma) (paper Appendix G): full suppression
  at mu, dampening by beta at the range's edges. Where tau * sigma = 0 the range is the single point mu and
  a = 0 there (no division by zero). Ungated, a(x) is capped at beta so values outside the range are never
  amplified; inside the range the cap never binds, so range-gated use is exactly the paper's formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["OPERATORS", "Operator", "adaptive_dampen", "dampen", "make_operator", "mean_replace", "zero"]

OPERATORS = ("zero", "dampen", "mean", "adaptive")


@dataclass(frozen=True)
class Operator:
    """phi with its parameters. Build it with the factories below rather than by hand."""

    name: str
    alpha: float = 0.125
    beta: float = 0.5
    values: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, tau: float) -> torch.Tensor:
        if self.name == "zero":
            return torch.zeros_like(x)
        if self.name == "dampen":
            return x * self.alpha
        if self.name == "mean":
            v = mu if self.values is None else self.values.to(device=x.device, dtype=x.dtype)
            return v.to(device=x.device, dtype=x.dtype).expand_as(x).clone()
        if self.name == "adaptive":
            denom = tau * sigma.to(device=x.device, dtype=x.dtype)
            dist = (x - mu.to(device=x.device, dtype=x.dtype)).abs()
            a = torch.where(denom > 0, self.beta * dist / denom.clamp(min=torch.finfo(x.dtype).tiny),
                            torch.zeros_like(x))
            return a.clamp(max=self.beta) * x
        raise ValueError(f"unknown operator {self.name!r}; choose one of {', '.join(OPERATORS)}")

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.name == "dampen":
            d["alpha"] = self.alpha
        if self.name == "adaptive":
            d["beta"] = self.beta
        if self.name == "mean":
            d["values"] = "mu" if self.values is None else "given"
        return d

    @property
    def label(self) -> str:
        return {"zero": "zero", "dampen": f"dampen(a={self.alpha:g})", "mean": "mean",
                "adaptive": f"adaptive(b={self.beta:g})"}[self.name]


def zero() -> Operator:
    return Operator("zero")


def dampen(alpha: float = 0.125) -> Operator:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"dampening factor alpha must be in [0, 1], got {alpha}")
    return Operator("dampen", alpha=float(alpha))


def mean_replace(values: torch.Tensor | None = None) -> Operator:
    """Replace by ``values`` (one per selected neuron), or by the mask's concept mean mu when None."""
    return Operator("mean", values=None if values is None else torch.as_tensor(values, dtype=torch.float32))


def adaptive_dampen(beta: float = 0.5) -> Operator:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"adaptive dampening beta must be in [0, 1], got {beta}")
    return Operator("adaptive", beta=float(beta))


def make_operator(name: str, *, alpha: float = 0.125, beta: float = 0.5) -> Operator:
    """Operator by name (CLI and configs)."""
    if name == "zero":
        return zero()
    if name == "dampen":
        return dampen(alpha)
    if name == "mean":
        return mean_replace()
    if name == "adaptive":
        return adaptive_dampen(beta)
    raise ValueError(f"unknown operator {name!r}; choose one of {', '.join(OPERATORS)}")
