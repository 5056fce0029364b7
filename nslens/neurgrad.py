"""NeurGrad (the NEG paper's estimator of neuron empirical gradients) and its gradient baselines, and the
``neurgrad`` saliency ranking.

NeurGrad = (d p / d a) x sign(a): the slope of the target token's probability against a shift of one neuron's
activation in the direction of its sign (``nslens.neg`` measures the ground truth). It runs inside one nnsight trace
per batch with one backward: the model's weights stay frozen (gradients are requested on the embedding output, never
on parameters), each prompt is repeated once per target token so that one backward gives every (prompt, target)
gradient, and only the last position's gradient leaves the trace.

Baselines of the paper's Table 2 computed the same way: the plain computational gradient (``neurgrad(...,
signed=False)``, CG) and integrated gradients (``integrated_gradients``, IG, one trace and one backward per batch over
``steps`` scaled copies on the authors' ``linspace(0, 1, steps)`` grid).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .batching import Progress, batches, tokenize
from .erasure import sample_gold
from .errors import NsLensError, check_number
from .models import Site, check_token_ids, family_of
from .neurons import NeuronSite, at_least_f32, read_neurons, write_neurons
from .rank import Ranking
from .remote import maybe_retry, trace_args

__all__ = ["IG_GRIDS", "NeurGradRanking", "ig_alphas", "integrated_gradients", "last_token_grads", "neurgrad",
           "neurgrad_concept_scores"]


def _embedding(model: Any, site: Site) -> Any:
    fam = family_of(site)
    return fam.part(model, fam.embedding)


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


def _target_matrix(model: Any, targets: Any, options: Any, n: int) -> torch.Tensor:
    """``[N, K]`` token ids from exactly one of: per-prompt ``targets`` ([N] or [N, K]) or shared ``options`` [K]."""
    if (targets is None) == (options is None):
        raise NsLensError("give exactly one of targets (per prompt: [N] or [N, K]) and options (shared: [K])")
    if n == 0:
        raise NsLensError("no prompts given")
    if options is not None:
        o = check_token_ids(model, options, "option token id")
        if o.ndim != 1 or not o.numel():
            raise NsLensError(f"options must be a 1-D list of token ids, got shape {tuple(o.shape)}")
        return o[None, :].expand(n, -1)
    t = check_token_ids(model, targets, "target token id")
    t = t[:, None] if t.ndim == 1 else t
    if t.ndim != 2 or t.shape[0] != n:
        raise NsLensError(f"targets must be [N] or [N, K] with N = {n} prompts, got shape {tuple(t.shape)}")
    return t


def neurgrad(model: Any, ns: NeuronSite, prompts: Sequence[str], targets: Any = None, *, options: Any = None,
             batch_size: int = 8, log_prob: bool = False, remote: bool | str = False,
             progress: Progress | None = None, signed: bool = True) -> np.ndarray:
    """NeurGrad ``[prompts, targets, neurons]`` at the last token: d p(target) / d a x sign(a).

    ``targets``: token ids per prompt, ``[N]`` or ``[N, K]``; or ``options``: ``[K]`` ids shared by every prompt.
    ``log_prob=True`` differentiates log p instead of p. ``signed=False`` gives the plain computational gradient
    d p / d a (the paper's CG baseline).
    """
    g, a = last_token_grads(model, ns, prompts, _target_matrix(model, targets, options, len(prompts)), None,
                             batch_size=batch_size, log_prob=log_prob, remote=remote, progress=progress,
                             desc="neurgrad")
    g = g[:, :, 0]
    return (g * torch.sign(a)[:, None, :] if signed else g).numpy().astype(np.float64)


IG_GRIDS = ("linspace", "right")


def ig_alphas(steps: int, grid: str = "linspace") -> torch.Tensor:
    """The scaling factors of integrated gradients: ``linspace`` (default) is the grid of the NEG authors'
    ``scaled_input`` (xzhao-tkl/NEG, the knowledge-neurons code it comes from): ``torch.linspace(0, 1, steps)``,
    both ends included; ``right`` is the right Riemann sum k / steps, k = 1 .. steps."""
    if grid not in IG_GRIDS:
        raise NsLensError(f"unknown IG grid {grid!r}; choose one of {', '.join(IG_GRIDS)}")
    steps = int(check_number("IG steps", steps, integer=True))  # "x" or 2.5 was a TypeError in the comparison
    if grid == "linspace":
        if steps < 2:
            raise NsLensError(f"steps must be >= 2 on the linspace grid (it holds both 0 and 1), got {steps}")
        return torch.linspace(0, 1, steps, dtype=torch.float64)
    if steps < 1:
        raise NsLensError(f"steps must be >= 1, got {steps}")
    return torch.arange(1, steps + 1, dtype=torch.float64) / steps


def integrated_gradients(model: Any, ns: NeuronSite, prompts: Sequence[str], targets: Any = None, *,
                         options: Any = None, steps: int = 20, grid: str = "linspace", batch_size: int = 4,
                         log_prob: bool = False, remote: bool | str = False,
                         progress: Progress | None = None) -> np.ndarray:
    """Integrated gradients of p(target) for every neuron at the last token, ``[prompts, targets, neurons]``
    (the paper's IG baseline; Dai et al.'s knowledge-neuron attribution): a_j / m x sum over the m = ``steps``
    alphas of d p / d x_j at x = alpha a, the layer's last-token activations scaled together. The alphas
    (``ig_alphas``) are the authors' ``linspace(0, 1, m)`` by default, or the right Riemann sum (``grid="right"``).
    One trace and one backward per batch: each prompt is tiled steps x targets times, each copy scaled by its alpha.
    """
    alphas = ig_alphas(steps, grid)
    g, a = last_token_grads(model, ns, prompts, _target_matrix(model, targets, options, len(prompts)), alphas,
                             batch_size=batch_size, log_prob=log_prob, remote=remote, progress=progress,
                             desc="integrated gradients")
    return (g.mean(2) * a[:, None, :]).numpy().astype(np.float64)


def last_token_grads(model: Any, ns: NeuronSite, prompts: Sequence[str], t: torch.Tensor,
                      alphas: torch.Tensor | None, *, batch_size: int, log_prob: bool, remote: bool | str,
                      progress: Progress | None, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """d p(target) / d x at the last token, ``[N, K, S, neurons]``, with x = alpha a for each of the S ``alphas``
    (x = a, S = 1, when None), and the last-token activations a ``[N, neurons]``. One trace and one backward per
    batch: each prompt is tiled once per (target, alpha); the model's weights stay frozen."""
    k, s = t.shape[1], 1 if alphas is None else len(alphas)
    grads, acts = [], []
    parts = batches(len(prompts), batch_size)
    with _frozen(model) if not remote or remote == "local" else contextlib.nullcontext():
        for i, sl in enumerate(parts):
            n = len(t[sl])
            enc = tokenize(model, prompts[sl])
            tiled = {key: v.repeat_interleave(k * s, dim=0) for key, v in enc.items()}  # rows: prompt, target, alpha
            tg = t[sl].repeat_interleave(s, dim=1).reshape(-1)
            al = None if alphas is None else alphas.repeat(n * k)
            g, a = maybe_retry(remote, lambda tiled=tiled, tg=tg, al=al: _grad_batch(model, ns, tiled, tg, al,
                                                                                   log_prob, remote),
                               what=f"{desc} batch {i}")
            grads.append(g.reshape(n, k, s, ns.width))
            acts.append(a.reshape(n, k * s, ns.width)[:, 0])
            if progress is not None:
                progress(desc, i + 1, len(parts))
    return torch.cat(grads), torch.cat(acts)


def _grad_batch(model: Any, ns: NeuronSite, enc: dict[str, torch.Tensor], tg: torch.Tensor,
                alphas: torch.Tensor | None, log_prob: bool, remote: bool | str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        with model.trace(enc, **trace_args(model, remote)):
            _embedding(model, ns.site).output.requires_grad_(True)
            a = read_neurons(model, ns)
            x = a
            if alphas is not None:  # x = alpha a at the last token; the gradient is read at x (alpha = 0 included)
                x = a[:, -1, :] * alphas.to(a.device, a.dtype)[:, None]
                write_neurons(model, ns, torch.cat([a[:, :-1], x[:, None, :]], dim=1))
            logits = at_least_f32(model.output.logits[:, -1, :])
            lp = torch.log_softmax(logits, dim=-1).gather(-1, tg.to(logits.device)[:, None])[:, 0]
            objective = lp if log_prob else lp.exp()
            with objective.sum().backward():
                g = x.grad if alphas is not None else x.grad[:, -1, :]
                g = at_least_f32(g).cpu().save()
            act = at_least_f32(a[:, -1, :].detach()).cpu().save()
    return g, act


def neurgrad_concept_scores(model: Any, site: Site, prompts: Sequence[str], labels: np.ndarray,
                            label_token_ids: Sequence[int] | None, *, gold_token_ids: Any = None,
                            n_concepts: int | None = None, batch_size: int = 8, remote: bool | str = False,
                            progress: Progress | None = None) -> np.ndarray:
    """The ``neurgrad`` saliency ranking at a residual site: per concept, mean |NeurGrad| of the gold token's
    probability over the concept's samples, ``[C, d_model]``. The gold token is the concept's label token or the
    sample's own (``gold_token_ids``, next-token concepts; then ``n_concepts`` says how many there are)."""
    ns = NeuronSite(site, "residual", site.d_model)
    labels = np.asarray(labels, dtype=np.int64)
    n = n_concepts if n_concepts is not None else len(label_token_ids or [])
    gold = sample_gold(labels, label_token_ids, gold_token_ids, n_concepts=n)
    g = np.abs(neurgrad(model, ns, prompts, gold, batch_size=batch_size, remote=remote, progress=progress)[:, 0])
    return np.stack([g[labels == c].mean(0) for c in range(n)])


@dataclass(frozen=True)
class NeurGradRanking(Ranking):
    """``neurgrad`` (NEG paper): mean |NeurGrad| of the gold token's probability over the concept's samples, at the
    residual site; it needs the model (``scores_from_model``)."""

    name: ClassVar[str] = "neurgrad"
    needs_model: ClassVar[bool] = True

    def scores_from_model(self, model: Any, site: Any, prompts: Sequence[str], labels: np.ndarray,
                          label_token_ids: Sequence[int] | None, *, gold_token_ids: Any = None,
                          n_concepts: int | None = None, batch_size: int = 8, remote: bool | str = False,
                          progress: Any = None) -> np.ndarray:
        return neurgrad_concept_scores(model, site, prompts, labels, label_token_ids, gold_token_ids=gold_token_ids,
                                       n_concepts=n_concepts, batch_size=batch_size, remote=remote,
                                       progress=progress)
