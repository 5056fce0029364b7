"""Applying a range mask + operator at a site, as tensor code inside an nnsight trace.

Range-gated (NeuronLens, Eq. 2): h_j <- phi(h_j) only where lo_j <= h_j <= hi_j, for the selected neurons j.
Ungated (classic neuron masking): h_j <- phi(h_j) everywhere for the selected neurons. Every other value is
passed through untouched (``index_copy`` of the selected columns into an out-of-place copy).

The model itself is never modified: an intervention lives in the trace that applies it, so the next trace sees
the clean model (``applied`` offers the same guarantee for code that needs a persistent edit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import NsLensError
from .models import Site, read_site, write_site
from .ops import Operator
from .ranges import RangeMask

__all__ = ["INTERVENE_POSITIONS", "Intervention", "applied", "apply_in_trace", "edit_hidden"]

INTERVENE_POSITIONS = ("all", "last")


@dataclass
class Intervention:
    """A mask, an operator, gated or not, at all positions (the edited model) or the last one only."""

    mask: RangeMask
    operator: Operator
    gated: bool = True
    positions: str = "all"
    sae: Any = None
    """A ``JumpReLUSAE``: the mask then selects SAE features, edited in the SAE's basis with the error term kept."""

    def __post_init__(self) -> None:
        is_sae_mask = self.mask.meta.get("basis") == "sae"
        if is_sae_mask and self.sae is None:
            raise NsLensError("this mask selects SAE features: pass the SAE (Intervention(..., sae=sae))")
        if self.sae is not None and not is_sae_mask:
            raise NsLensError("an SAE intervention needs a mask of SAE features (nslens.sae.build_feature_masks)")
        if self.positions not in INTERVENE_POSITIONS:
            raise NsLensError(f"unknown positions {self.positions!r}; choose one of {', '.join(INTERVENE_POSITIONS)}")
        if self.operator.values is not None and self.operator.values.numel() != len(self.mask):
            raise NsLensError(f"mean replacement has {self.operator.values.numel()} values for "
                             f"{len(self.mask)} selected neurons")
        site_values = self.operator.site_values
        if site_values is not None:
            if self.sae is not None:
                raise NsLensError(f"{self.operator.name} works on the site's neurons, not SAE features "
                                 "(for mean replacement of features use mean_concept)")
            d = self.mask.meta.get("d_model")
            if (d is not None and site_values.numel() != d) or int(self.mask.neurons.max()) >= site_values.numel():
                raise NsLensError(f"{self.operator.name} has {site_values.numel()} site values for a mask over "
                                 f"{d if d is not None else 'more'} neurons")
        check = getattr(self.operator, "check", None)
        if callable(check):  # an operator fitted for one mask (LEACE) refuses any other
            check(self.mask, self.sae)

    @property
    def tau(self) -> float:
        return float(self.mask.meta.get("tau", 2.5))

    @property
    def kind(self) -> str:
        return "range" if self.gated else ("feature" if self.sae is not None else "neuron")

    def describe(self) -> dict[str, Any]:
        return {"concept": self.mask.concept, "kind": self.kind, "operator": self.operator.describe(),
                "positions": self.positions, "neurons": len(self.mask), "basis": "sae" if self.sae else "neurons"}


def edit_hidden(h: torch.Tensor, iv: Intervention) -> torch.Tensor:
    """The edited copy of hidden states ``h`` ``[batch, seq, d]`` (pure tensor code; local or remote).

    With an SAE the same gated edit applies to the selected *features*: f = encode(h), f' = edit(f), and
    decode(f') + (h - decode(f)) is returned, so unchanged features leave h unchanged up to float rounding."""
    m = iv.mask
    idx = m.neurons.to(h.device)
    if iv.sae is not None:
        f = iv.sae.encode(h)
        err = h.float() - iv.sae.decode(f)
        y = _edit_selected(f.index_select(-1, idx), iv)
        return (iv.sae.decode(f.index_copy(-1, idx, y)) + err).to(h.dtype)
    x = h.index_select(-1, idx)
    return h.index_copy(-1, idx, _edit_selected(x, iv).to(h.dtype))


def _edit_selected(x: torch.Tensor, iv: Intervention) -> torch.Tensor:
    """phi (gated or not, all or last positions) of the selected columns ``x`` ``[batch, seq, k]``."""
    m = iv.mask
    x32 = x.float()
    mu, sigma = m.mu.to(x.device), m.sigma.to(x.device)
    y = iv.operator(x32, mu, sigma, iv.tau, neurons=m.neurons)
    if iv.gated:
        inside = (x32 >= m.lo.to(x.device)) & (x32 <= m.hi.to(x.device))
        y = torch.where(inside, y, x32)
    y = y.to(x.dtype)
    if iv.positions == "last":
        y = torch.cat([x[:, :-1], y[:, -1:]], dim=1)
    return y


def apply_in_trace(model: Any, site: Site, interventions: Intervention | Sequence[Intervention] | None) -> None:
    """Call inside ``model.trace``: edit the site with one intervention, or a sequence applied in order."""
    if interventions is None:
        return
    ivs = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    if not ivs:
        return
    h = read_site(model, site)
    for iv in ivs:
        h = edit_hidden(h, iv)
    write_site(model, site, h)


@contextlib.contextmanager
def applied(model: Any, site: Site, interventions: Intervention | Sequence[Intervention]) -> Iterator[Any]:
    """Persistently edit ``model`` for the block (every trace inside sees the intervention); the edit is removed
    in ``finally``, so afterwards the model is exactly the clean model again."""
    with model.edit(inplace=True):
        apply_in_trace(model, site, interventions)
    try:
        yield model
    finally:
        model.clear_edits()
