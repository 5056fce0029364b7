"""Applying a range mask + operator at a site, as tensor code inside an nnsight trace.

Range-gated (NeuronLens, Eq. 2): h_j <- phi(h_j) only where lo_j <= h_j <= hi_j, for the selected neurons j.
Ungated (classic neuron masking): h_j <- phi(h_j) everywhere for the selected neurons. Every other value is
passed through untouched (``index_copy`` of the selected columns into an out-of-place copy).

The model itself is never modified: an intervention lives in the trace that applies it, so the next trace sees
the clean model (``applied`` offers the same guarantee for code that needs a persistent edit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import NsLensError
from .models import Site, read_site, write_site
from .ops import Operator
from .ranges import RangeMask
from .sae import NPZ_KEYS

__all__ = ["INTERVENE_POSITIONS", "Intervention", "applied", "apply_in_trace", "check_site", "edit_hidden",
           "intervention_fingerprint"]

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
        if not isinstance(self.mask, RangeMask) or not isinstance(self.operator, Operator):
            raise NsLensError(f"an Intervention takes a RangeMask and an operator (nslens.zero(), nslens.dampen(a), "
                              f"...), got {type(self.mask).__name__} and {type(self.operator).__name__}")
        is_sae_mask = self.mask.meta.get("basis") == "sae"
        if is_sae_mask and self.sae is None:
            raise NsLensError("this mask selects SAE features: pass the SAE (Intervention(..., sae=sae))")
        if self.sae is not None and not is_sae_mask:
            raise NsLensError("an SAE intervention needs a mask of SAE features (nslens.sae.build_feature_masks)")
        if self.positions not in INTERVENE_POSITIONS:
            raise NsLensError(f"unknown positions {self.positions!r}; choose one of {', '.join(INTERVENE_POSITIONS)}")
        check = getattr(self.operator, "check", None)
        if callable(check):  # the operator's own checks: a site-wide vector's width, a fitted eraser's mask
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


def check_site(site: Site | None, interventions: Any) -> None:
    """Refuse, before any trace runs, an intervention whose mask was made for another site (its layer, width or
    depth, as ``RangeMask.validate``) or selects a neuron the site lacks: applied at the wrong layer a mask ran
    and gave a table that looked right, and a neuron past the width failed inside the trace. ``interventions``:
    one, a sequence of them (or of sequences, or None for the clean model) or a mapping of them."""
    if site is None or interventions is None:
        return
    if isinstance(interventions, Intervention):
        interventions.mask.validate(site.describe(), source=f"the mask of concept {interventions.mask.concept!r}")
        return
    if not isinstance(interventions, (Mapping, list, tuple)):  # a string would recurse into its letters forever
        raise NsLensError(f"interventions are Intervention objects (one, a list or a mapping of them), got "
                          f"{type(interventions).__name__}")
    for iv in interventions.values() if isinstance(interventions, Mapping) else interventions:
        check_site(site, iv)


def edit_hidden(h: torch.Tensor, iv: Intervention, ends: torch.Tensor | None = None) -> torch.Tensor:
    """The edited copy of hidden states ``h`` ``[batch, seq, d]`` (pure tensor code; local or remote).

    ``ends`` ``[batch]``: each row's last real position, for right-padded batches (lm-eval's), where an edit of the
    last position must reach the row's own last token; None: the last column (nnsight pads on the left).
    With an SAE the same gated edit applies to the selected *features*: f = encode(h), f' = edit(f), and
    decode(f') + (h - decode(f)) is returned, so unchanged features leave h unchanged up to float rounding."""
    m = iv.mask
    idx = m.neurons.to(h.device)
    if iv.sae is not None:
        f = iv.sae.encode(h)
        err = h.float() - iv.sae.decode(f)
        y = _edit_selected(f.index_select(-1, idx), iv, ends)
        return (iv.sae.decode(f.index_copy(-1, idx, y)) + err).to(h.dtype)
    x = h.index_select(-1, idx)
    return h.index_copy(-1, idx, _edit_selected(x, iv, ends).to(h.dtype))


def _edit_selected(x: torch.Tensor, iv: Intervention, ends: torch.Tensor | None = None) -> torch.Tensor:
    """phi (gated or not, all or last positions) of the selected columns ``x`` ``[batch, seq, k]``; ``ends``: as
    in ``edit_hidden``."""
    m = iv.mask
    x32 = x.float()
    mu, sigma = m.mu.to(x.device), m.sigma.to(x.device)
    y = iv.operator(x32, mu, sigma, iv.tau, neurons=m.neurons)
    if iv.gated:
        inside = (x32 >= m.lo.to(x.device)) & (x32 <= m.hi.to(x.device))
        y = torch.where(inside, y, x32)
    y = y.to(x.dtype)
    if iv.positions == "last" and ends is None:
        y = torch.cat([x[:, :-1], y[:, -1:]], dim=1)
    elif iv.positions == "last":
        at = torch.arange(x.shape[1], device=x.device)[None, :] == ends.to(x.device)[:, None]
        y = torch.where(at[..., None], y, x)
    return y


def apply_in_trace(model: Any, site: Site, interventions: Intervention | Sequence[Intervention] | None,
                   ends: torch.Tensor | None = None) -> None:
    """Call inside ``model.trace``: edit the site with one intervention, or a sequence applied in order
    (``ends``: each row's last real position in a right-padded batch, see ``edit_hidden``)."""
    if interventions is None:
        return
    ivs = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    if not ivs:
        return
    h = read_site(model, site)
    for iv in ivs:
        h = edit_hidden(h, iv, ends)
    write_site(model, site, h)


@contextlib.contextmanager
def applied(model: Any, site: Site, interventions: Intervention | Sequence[Intervention]) -> Iterator[Any]:
    """Persistently edit ``model`` for the block (every trace inside sees the intervention); the edit is removed
    in ``finally``, so afterwards the model is exactly the clean model again."""
    check_site(site, interventions)
    with model.edit(inplace=True):
        apply_in_trace(model, site, interventions)
    try:
        yield model
    finally:
        model.clear_edits()


def _hash_into(h: Any, value: Any) -> None:
    """Feed ``value`` into the hash ``h``, unambiguously: tensors and arrays by dtype, shape and bytes, dataclasses
    by class name and every field, containers element by element, scalars by type and repr."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
        h.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        h.update(f"array {a.dtype} {a.shape};".encode())
        h.update(a.tobytes())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(f"{type(value).__module__}.{type(value).__qualname__}(".encode())
        for f in dataclasses.fields(value):
            h.update(f"{f.name}=".encode())
            _hash_into(h, getattr(value, f.name))
        h.update(b")")
    elif isinstance(value, dict):
        h.update(f"dict {len(value)}{{".encode())
        for k in sorted(value, key=str):
            _hash_into(h, str(k))
            _hash_into(h, value[k])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__} {len(value)}[".encode())
        for v in value:
            _hash_into(h, v)
        h.update(b"]")
    else:
        h.update(f"{type(value).__name__} {value!r};".encode())


def intervention_fingerprint(interventions: Intervention | Sequence[Intervention] | None) -> str:
    """A hash of everything that decides what an intervention (or a sequence applied in order) does to the model:
    for each one, gated or not, its positions, tau, the mask's neurons, bounds, mu and sigma, its basis, the
    operator's class and every parameter (the tensors byte for byte: a steering vector, a LEACE eraser, a mean) and
    the SAE's weights. A run's name and a mask file's metadata (creation time, dataset) do not enter it, so two
    interventions that edit the same way share cached results and two that differ in any number never do."""
    h = hashlib.sha256(b"nslens.intervention/1;")
    ivs = [] if interventions is None else [interventions] if isinstance(interventions, Intervention) \
        else list(interventions)
    for iv in ivs:
        m = iv.mask
        _hash_into(h, [iv.gated, iv.positions, iv.tau, m.meta.get("basis", "neurons"),
                       m.neurons, m.lo, m.hi, m.mu, m.sigma, iv.operator])
        if iv.sae is not None:
            _hash_into(h, [getattr(iv.sae, k) for k in NPZ_KEYS])
    return h.hexdigest()[:24]
