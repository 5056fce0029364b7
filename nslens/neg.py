"""Neuron empirical gradients (NEG; Zhao et al.): NeurGrad and the ground-truth linearity check.

NEG is the slope of the target token's probability against a shift of one neuron's activation. The paper
estimates it with NeurGrad = (d p / d a) x sign(a): the shift is taken *in the direction of the activation's sign*
(a -> a + v sign(a)), which is why the sign of a enters. The ground truth here follows the same convention:
p(a + v sign(a)) - p(a) is regressed on v through the origin; the slope is the NEG and Pearson r measures
linearity (|r| >= 0.95 counts as linear). For small shifts the two agree to first order.

NeurGrad runs inside one nnsight trace per batch with one backward: the model's weights stay frozen (gradients are
requested on the embedding output, never on parameters), each prompt is repeated once per target token so that one
backward gives every (prompt, target) gradient, and only the last position's gradient leaves the trace.

Neuron sites: MLP intermediate neurons of a Llama-family decoder layer -- ``product`` (default: act_fn(gate) * up,
the input of down_proj, i.e. the value that weights down_proj's columns), ``up_proj`` (the authors' hook) and
``act_fn`` -- or the ``residual`` stream (the layer output, nslens' usual site).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .models import Site, model_family, read_site, resolve_site, site_module, write_site
from .record import Progress, batches, prepare_remote, tokenize
from .remote import maybe_retry

__all__ = ["NEURON_KINDS", "LinearityReport", "NeuronSite", "linearity_report", "neg_sweep", "neurgrad",
           "neurgrad_concept_scores", "resolve_neuron_site"]

logger = logging.getLogger(__name__)

NEURON_KINDS = ("product", "up_proj", "act_fn", "residual")
#: the NEG paper's grid: shifts of -2 to +2 in steps of 0.2 (0 itself changes nothing and is left out)
DEFAULT_SHIFTS = tuple(round(0.2 * i, 1) for i in range(-10, 11) if i != 0)
_EMBED = {"gpt2": "transformer.wte"}


@dataclass(frozen=True)
class NeuronSite:
    """Which neurons: ``kind`` at decoder layer ``site.layer``; ``width`` neurons."""

    site: Site
    kind: str
    width: int


def resolve_neuron_site(model: Any, layer: int = -2, kind: str = "product") -> NeuronSite:
    if kind not in NEURON_KINDS:
        raise ValueError(f"unknown neuron kind {kind!r}; choose one of {', '.join(NEURON_KINDS)}")
    site = resolve_site(model, layer)
    if kind == "residual":
        return NeuronSite(site, kind, site.d_model)
    if model_family(model) == "gpt2":
        raise ValueError("MLP neuron kinds need a gated (Llama-family) MLP; use kind='residual' for GPT-2")
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    return NeuronSite(site, kind, int(cfg.intermediate_size))


def _mlp_envoy(model: Any, ns: NeuronSite) -> Any:
    mlp = site_module(model, ns.site).mlp
    return {"product": mlp.down_proj, "up_proj": mlp.up_proj, "act_fn": mlp.act_fn}[ns.kind]


def _read_neurons(model: Any, ns: NeuronSite) -> torch.Tensor:
    if ns.kind == "residual":
        return read_site(model, ns.site)
    env = _mlp_envoy(model, ns)
    return env.input if ns.kind == "product" else env.output


def _write_neurons(model: Any, ns: NeuronSite, value: torch.Tensor) -> None:
    if ns.kind == "residual":
        write_site(model, ns.site, value)
        return
    env = _mlp_envoy(model, ns)
    if ns.kind == "product":
        env.input = value
    else:
        env.output = value


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision models, unchanged for float32/float64 (a float64 model keeps its precision)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _embedding(model: Any) -> Any:
    path = _EMBED.get(model_family(model), "model.embed_tokens")
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@contextlib.contextmanager
def _frozen(model: Any) -> Iterator[None]:
    """No parameter gradients (memory, and no .grad left on the model); flags restored afterwards."""
    params = list(model._module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _target_matrix(targets: Any, options: Any, n: int) -> torch.Tensor:
    """``[N, K]`` token ids from exactly one of: per-prompt ``targets`` ([N] or [N, K]) or shared ``options`` [K]."""
    if (targets is None) == (options is None):
        raise ValueError("give exactly one of targets (per prompt: [N] or [N, K]) and options (shared: [K])")
    if options is not None:
        o = torch.as_tensor(np.asarray(options), dtype=torch.int64)
        if o.ndim != 1:
            raise ValueError(f"options must be a 1-D list of token ids, got shape {tuple(o.shape)}")
        return o[None, :].expand(n, -1)
    t = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
    t = t[:, None] if t.ndim == 1 else t
    if t.ndim != 2 or t.shape[0] != n:
        raise ValueError(f"targets must be [N] or [N, K] with N = {n} prompts, got shape {tuple(t.shape)}")
    return t


def neurgrad(model: Any, ns: NeuronSite, prompts: Sequence[str], targets: Any = None, *, options: Any = None,
             batch_size: int = 8, log_prob: bool = False, remote: bool | str = False,
             progress: Progress | None = None) -> np.ndarray:
    """NeurGrad ``[prompts, targets, neurons]`` at the last token: d p(target) / d a x sign(a).

    ``targets``: token ids per prompt, ``[N]`` or ``[N, K]``; or ``options``: ``[K]`` ids shared by every prompt.
    ``log_prob=True`` differentiates log p instead of p.
    """
    t = _target_matrix(targets, options, len(prompts))
    k = t.shape[1]
    prepare_remote(remote)
    out = []
    parts = batches(len(prompts), batch_size)
    with _frozen(model) if not remote or remote == "local" else contextlib.nullcontext():
        for i, sl in enumerate(parts):
            enc = tokenize(model, prompts[sl])
            tiled = {key: v.repeat_interleave(k, dim=0) for key, v in enc.items()}
            tg = t[sl].reshape(-1)
            out.append(maybe_retry(remote, lambda tiled=tiled, tg=tg: _neurgrad_batch(model, ns, tiled, tg,
                                                                                      log_prob, remote),
                                   what=f"neurgrad batch {i}").reshape(-1, k, ns.width))
            if progress is not None:
                progress("neurgrad", i + 1, len(parts))
    return torch.cat(out).numpy().astype(np.float64)


def _neurgrad_batch(model: Any, ns: NeuronSite, enc: dict[str, torch.Tensor], tg: torch.Tensor, log_prob: bool,
                    remote: bool | str) -> torch.Tensor:
    with torch.enable_grad():
        with model.trace(enc, remote=remote):
            _embedding(model).output.requires_grad_(True)
            a = _read_neurons(model, ns)
            sign = torch.sign(a[:, -1, :].detach())
            logits = _at_least_f32(model.output.logits[:, -1, :])
            lp = torch.log_softmax(logits, dim=-1).gather(-1, tg.to(logits.device)[:, None])[:, 0]
            objective = lp if log_prob else lp.exp()
            with objective.sum().backward():
                g = (_at_least_f32(a.grad[:, -1, :]) * sign).cpu().save()
    return g


def neg_sweep(model: Any, ns: NeuronSite, prompt: str, target: int, neurons: Sequence[int], *,
              shifts: Sequence[float] = DEFAULT_SHIFTS, log_prob: bool = False, batch_size: int = 64,
              remote: bool | str = False) -> dict[str, np.ndarray]:
    """Ground-truth NEG of each neuron for one prompt: shift the last token's activation by v sign(a) for every v,
    measure the change of p(target), fit a zero-intercept regression. Returns slope, r, and the raw
    (shift, change) pairs."""
    shifts = [float(v) for v in shifts]
    if not shifts or all(v == 0 for v in shifts):
        raise ValueError("shifts need at least one non-zero value")
    neurons = [int(j) for j in neurons]
    if not neurons or max(neurons) >= ns.width or min(neurons) < 0:
        raise ValueError(f"neurons must lie in [0, {ns.width - 1}]")
    prepare_remote(remote)
    rows = [(j, v) for j in neurons for v in shifts]
    enc = tokenize(model, [prompt])
    base = _shifted_probs(model, ns, enc, target, [(neurons[0], 0.0)], log_prob, remote)[0]
    changes = []
    for sl in batches(len(rows), batch_size):
        p = _shifted_probs(model, ns, enc, target, rows[sl], log_prob, remote)
        changes.append(p - base)
    dp = np.concatenate(changes).reshape(len(neurons), len(shifts))
    v = np.asarray(shifts)
    slope = dp @ v / (v @ v)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.array([np.corrcoef(v, row)[0, 1] if row.std() > 0 else 0.0 for row in dp])
    return {"slope": slope, "r": np.nan_to_num(r), "shifts": v, "changes": dp, "neurons": np.asarray(neurons)}


def _shifted_probs(model: Any, ns: NeuronSite, enc: dict[str, torch.Tensor], target: int,
                   rows: Sequence[tuple[int, float]], log_prob: bool, remote: bool | str) -> np.ndarray:
    n = len(rows)
    tiled = {key: v.repeat(n, 1) for key, v in enc.items()}
    delta = torch.zeros(n, ns.width)
    for i, (j, v) in enumerate(rows):
        delta[i, j] = v

    def run() -> torch.Tensor:
        with torch.no_grad():
            with model.trace(tiled, remote=remote):
                a = _read_neurons(model, ns)
                shift = delta.to(a.device, a.dtype) * torch.sign(a[:, -1, :])
                edited = torch.cat([a[:, :-1], (a[:, -1, :] + shift)[:, None, :]], dim=1)
                _write_neurons(model, ns, edited)
                lp = torch.log_softmax(_at_least_f32(model.output.logits[:, -1, :]), dim=-1)[:, target]
                out = (lp if log_prob else lp.exp()).cpu().save()
        return out

    return maybe_retry(remote, run, what="neg sweep").numpy().astype(np.float64)


@dataclass
class LinearityReport:
    """Per sampled (prompt, neuron): ground-truth NEG slope, Pearson r, and NeurGrad (NEG Tables 1-2 shape)."""

    slope: np.ndarray
    r: np.ndarray
    neurgrad: np.ndarray

    def summary(self, threshold: float = 0.95) -> dict[str, float]:
        nz = self.slope != 0
        corr = float(np.corrcoef(self.neurgrad, self.slope)[0, 1]) if self.slope.std() > 0 else float("nan")
        return {"pairs": int(len(self.slope)), "linear_share": float(np.mean(np.abs(self.r) >= threshold)),
                "positive_share": float(np.mean(self.slope[nz] > 0)) if nz.any() else float("nan"),
                "negative_share": float(np.mean(self.slope[nz] < 0)) if nz.any() else float("nan"),
                "neurgrad_corr": corr, "neurgrad_mae": float(np.mean(np.abs(self.neurgrad - self.slope)))}

    def to_markdown(self, threshold: float = 0.95) -> str:
        s = self.summary(threshold)
        return (f"| pairs | linear (\\|r\\| >= {threshold:.2f}) | positive | negative | r(NeurGrad, NEG) | MAE |\n"
                "|---|---|---|---|---|---|\n"
                f"| {s['pairs']} | {s['linear_share']:.3f} | {s['positive_share']:.3f} | {s['negative_share']:.3f} | "
                f"{s['neurgrad_corr']:.3f} | {s['neurgrad_mae']:.2e} |\n")


def linearity_report(model: Any, ns: NeuronSite, prompts: Sequence[str], targets: Sequence[int], *,
                     n_neurons: int = 16, shifts: Sequence[float] = DEFAULT_SHIFTS, seed: int = 0,
                     log_prob: bool = False, remote: bool | str = False,
                     progress: Progress | None = None) -> LinearityReport:
    """Sample ``n_neurons`` neurons per prompt; compare the ground-truth NEG with NeurGrad."""
    rng = np.random.default_rng(seed)
    grads = neurgrad(model, ns, prompts, np.asarray(targets), log_prob=log_prob, remote=remote)[:, 0, :]
    slopes, rs, ngs = [], [], []
    for i, (p, t) in enumerate(zip(prompts, targets)):
        neurons = rng.choice(ns.width, size=min(n_neurons, ns.width), replace=False)
        sw = neg_sweep(model, ns, p, int(t), neurons, shifts=shifts, log_prob=log_prob, remote=remote)
        slopes.append(sw["slope"])
        rs.append(sw["r"])
        ngs.append(grads[i, neurons])
        if progress is not None:
            progress("neg sweep", i + 1, len(prompts))
    return LinearityReport(np.concatenate(slopes), np.concatenate(rs), np.concatenate(ngs))


def neurgrad_concept_scores(model: Any, site: Site, prompts: Sequence[str], labels: np.ndarray,
                            label_token_ids: Sequence[int], *, batch_size: int = 8, remote: bool | str = False,
                            progress: Progress | None = None) -> np.ndarray:
    """The ``neurgrad`` saliency ranking at a residual site: per concept, mean |NeurGrad| of the gold label's
    probability over the concept's samples, ``[C, d_model]``."""
    ns = NeuronSite(site, "residual", site.d_model)
    labels = np.asarray(labels, dtype=np.int64)
    gold = np.asarray(label_token_ids)[labels]
    g = np.abs(neurgrad(model, ns, prompts, gold, batch_size=batch_size, remote=remote, progress=progress)[:, 0])
    return np.stack([g[labels == c].mean(0) for c in range(len(label_token_ids))])
