"""Which neurons NEG and the skill-neuron probes read and shift: MLP intermediate neurons of a gated decoder layer,
or the residual stream, as tensor code inside nnsight traces.

Kinds: ``product`` (default: act_fn(gate) * up, the input of down_proj, i.e. the value that weights down_proj's
columns), ``up_proj`` (the NEG authors' hook) and ``act_fn`` -- or the ``residual`` stream (the layer output,
nslens' usual site). The MLP's parts are named by the model's family (``nslens.models.ModelFamily``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import NsLensError
from .models import Site, family_of, read_site, resolve_site, site_module, write_site

__all__ = ["NEURON_KINDS", "NeuronSite", "at_least_f32", "check_neuron_kind", "neuron_module", "read_neurons",
           "resolve_neuron_site", "resolve_neuron_sites", "write_neurons"]

NEURON_KINDS = ("product", "up_proj", "act_fn", "residual")


@dataclass(frozen=True)
class NeuronSite:
    """Which neurons: ``kind`` at decoder layer ``site.layer``; ``width`` neurons."""

    site: Site
    kind: str
    width: int


def check_neuron_kind(kind: str) -> None:
    """``kind`` is one of ``NEURON_KINDS``; else a one-line error naming them."""
    if kind not in NEURON_KINDS:
        raise NsLensError(f"unknown neuron kind {kind!r}; choose one of {', '.join(NEURON_KINDS)}")


def resolve_neuron_site(model: Any, layer: int = -1, kind: str = "product") -> NeuronSite:
    """Layer ``layer``'s neurons of ``kind`` (``NEURON_KINDS``: the feed-forward product, up_proj or act_fn
    outputs, or the residual stream) and their width."""
    check_neuron_kind(kind)
    site = resolve_site(model, layer)
    if kind == "residual":
        return NeuronSite(site, kind, site.d_model)
    if not family_of(site).gated_mlp:
        raise NsLensError(f"MLP neuron kinds need a gated (Llama-family) MLP; use kind='residual' for "
                          f"{'GPT-2' if site.family == 'gpt2' else site.family}")
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    return NeuronSite(site, kind, int(cfg.intermediate_size))


def resolve_neuron_sites(model: Any, kind: str = "product", layers: Sequence[int] | None = None) -> list[NeuronSite]:
    """The neuron sites of every decoder layer (the paper samples neurons from all feed-forward layers), or of
    ``layers``."""
    n = resolve_site(model, -1).n_layers
    return [resolve_neuron_site(model, layer, kind) for layer in (range(n) if layers is None else layers)]


def neuron_module(model: Any, ns: NeuronSite) -> Any:
    """The Envoy whose input (``product``) or output (``up_proj``, ``act_fn``) holds an MLP kind's neurons."""
    fam = family_of(ns.site)
    mlp = fam.part(site_module(model, ns.site), fam.mlp)
    return fam.part(mlp, {"product": fam.mlp_down, "up_proj": fam.mlp_up, "act_fn": fam.mlp_act}[ns.kind])


def read_neurons(model: Any, ns: NeuronSite) -> torch.Tensor:
    """Inside a trace: the neurons' values ``[batch, seq, width]``."""
    if ns.kind == "residual":
        return read_site(model, ns.site)
    env = neuron_module(model, ns)
    return env.input if ns.kind == "product" else env.output


def write_neurons(model: Any, ns: NeuronSite, value: torch.Tensor) -> None:
    """Inside a trace: replace the neurons' values."""
    if ns.kind == "residual":
        write_site(model, ns.site, value)
        return
    env = neuron_module(model, ns)
    if ns.kind == "product":
        env.input = value
    else:
        env.output = value


def at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision models, unchanged for float32/float64 (a float64 model keeps its precision)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
