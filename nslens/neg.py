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

The paper's Table 2 compares NeurGrad with three estimators, all here: the plain computational gradient
(``neurgrad(..., signed=False)``, CG), integrated gradients (``integrated_gradients``, IG, one trace and one
backward per batch over ``steps`` scaled copies on the authors' ``linspace(0, 1, steps)`` grid) and the
log-probability increase (``lpi``, LPI, with the released LPI code's fixed final normaliser). ``linearity_report``
follows the paper's sampling: prompts the model answers correctly, and ``n_neurons`` random neurons per prompt drawn
from all feed-forward layers (``resolve_neuron_sites``; one layer stays possible).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import NsLensError
from .models import Site, model_family, read_site, resolve_site, site_module, write_site
from .record import Progress, batches, tokenize
from .remote import maybe_retry, trace_args

__all__ = ["DEFAULT_SHIFTS", "IG_GRIDS", "LPI_NORMS", "NEURON_KINDS", "LinearityReport", "NeuronSite", "ig_alphas",
           "integrated_gradients", "linearity_report", "lpi", "neg_sweep", "neurgrad", "neurgrad_concept_scores",
           "resolve_neuron_site", "resolve_neuron_sites"]

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


def resolve_neuron_site(model: Any, layer: int = -1, kind: str = "product") -> NeuronSite:
    if kind not in NEURON_KINDS:
        raise NsLensError(f"unknown neuron kind {kind!r}; choose one of {', '.join(NEURON_KINDS)}")
    site = resolve_site(model, layer)
    if kind == "residual":
        return NeuronSite(site, kind, site.d_model)
    if model_family(model) == "gpt2":
        raise NsLensError("MLP neuron kinds need a gated (Llama-family) MLP; use kind='residual' for GPT-2")
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    return NeuronSite(site, kind, int(cfg.intermediate_size))


def resolve_neuron_sites(model: Any, kind: str = "product", layers: Sequence[int] | None = None) -> list[NeuronSite]:
    """The neuron sites of every decoder layer (the paper samples neurons from all feed-forward layers), or of
    ``layers``."""
    n = resolve_site(model, -1).n_layers
    return [resolve_neuron_site(model, layer, kind) for layer in (range(n) if layers is None else layers)]


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
        raise NsLensError("give exactly one of targets (per prompt: [N] or [N, K]) and options (shared: [K])")
    if options is not None:
        o = torch.as_tensor(np.asarray(options), dtype=torch.int64)
        if o.ndim != 1:
            raise NsLensError(f"options must be a 1-D list of token ids, got shape {tuple(o.shape)}")
        return o[None, :].expand(n, -1)
    t = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
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
    g, a = _last_token_grads(model, ns, prompts, _target_matrix(targets, options, len(prompts)), None,
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
    g, a = _last_token_grads(model, ns, prompts, _target_matrix(targets, options, len(prompts)), alphas,
                             batch_size=batch_size, log_prob=log_prob, remote=remote, progress=progress,
                             desc="integrated gradients")
    return (g.mean(2) * a[:, None, :]).numpy().astype(np.float64)


def _last_token_grads(model: Any, ns: NeuronSite, prompts: Sequence[str], t: torch.Tensor,
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
            _embedding(model).output.requires_grad_(True)
            a = _read_neurons(model, ns)
            x = a
            if alphas is not None:  # x = alpha a at the last token; the gradient is read at x (alpha = 0 included)
                x = a[:, -1, :] * alphas.to(a.device, a.dtype)[:, None]
                _write_neurons(model, ns, torch.cat([a[:, :-1], x[:, None, :]], dim=1))
            logits = _at_least_f32(model.output.logits[:, -1, :])
            lp = torch.log_softmax(logits, dim=-1).gather(-1, tg.to(logits.device)[:, None])[:, 0]
            objective = lp if log_prob else lp.exp()
            with objective.sum().backward():
                g = x.grad if alphas is not None else x.grad[:, -1, :]
                g = _at_least_f32(g).cpu().save()
            act = _at_least_f32(a[:, -1, :].detach()).cpu().save()
    return g, act


LPI_NORMS = ("final", "recompute")
#: the released LPI code's epsilon (``rsqrt(final_var + 1e-6)``), whatever the model's own rms_norm_eps
LPI_EPS = 1e-6


def _norm_gain(norm: Any) -> torch.Tensor:
    """The final RMSNorm's elementwise gain: its weight (Llama, Mistral, Qwen), 1 + weight for Gemma's norm."""
    w = _at_least_f32(norm.weight.detach())
    return 1.0 + w if "Gemma" in type(norm).__name__ else w


def lpi(model: Any, ns: NeuronSite, prompt: str, target: int, neurons: Sequence[int], *,
        norm: str = "final") -> np.ndarray:
    """Log-probability increase (the paper's LPI baseline; Yu and Ananiadou 2024) of each neuron in ``neurons``:
    log p(target | h + a_j W_j) - log p(target | h), where h is the residual stream entering the MLP at the last
    token (after the layer's attention), a_j W_j the neuron's contribution (its activation times its down_proj
    column), and p the logit lens of the vector: the final norm and the LM head.

    ``norm="final"`` (default) is the normaliser of the released LPI code (zepingyu0512/neuron-attribution,
    ``get_bsvalues``, which the NEG paper follows): every vector v is scaled by one fixed factor,
    ``rsqrt(final_var + 1e-6)`` with final_var the mean square of the last decoder layer's output at the last token
    (the final norm's input in the real forward), times the final norm's gain, then unembedded. ``norm="recompute"``
    applies the final norm to each vector, so h and h + a_j W_j each get their own normaliser (the logit lens as
    usually written); at shallow layers, whose residual is far smaller than the final one, it scales them up.

    ``product`` neurons only; the unembedding runs locally, so a remote model is refused."""
    if ns.kind != "product":
        raise NsLensError("LPI needs product neurons (the down_proj input): their contribution is a_j W_down[:, j]")
    if norm not in LPI_NORMS:
        raise NsLensError(f"unknown LPI norm {norm!r}; choose one of {', '.join(LPI_NORMS)}")
    if next(model._module.parameters()).device.type == "meta":
        raise NsLensError("LPI unembeds locally: it needs local weights (not a remote model)")
    neurons = torch.as_tensor(np.asarray(neurons, dtype=np.int64))
    layer = site_module(model, ns.site)
    pre_mlp = layer.post_attention_layernorm if hasattr(layer, "post_attention_layernorm") else layer.pre_feedforward_layernorm
    enc = tokenize(model, [prompt])
    hf = model._module
    with torch.no_grad():
        with model.trace(enc):
            h = pre_mlp.input[0, -1].save()
            a = _mlp_envoy(model, ns).input[0, -1].save()
            final = model.model.norm.input[0, -1].save()
        w = hf.model.layers[ns.site.layer].mlp.down_proj.weight  # [d, width]
        contrib = _at_least_f32(a[neurons])[:, None] * _at_least_f32(w[:, neurons].T)  # [n, d]
        h = _at_least_f32(h)
        x = torch.cat([h[None], h[None] + contrib])
        if norm == "final":
            final = _at_least_f32(final)
            scale = torch.rsqrt(final.pow(2).mean(-1, keepdim=True) + LPI_EPS)
            normed = x * scale * _norm_gain(hf.model.norm)
        else:
            normed = hf.model.norm(x.to(w.dtype))
        head = hf.lm_head
        lp = torch.log_softmax(_at_least_f32(head(normed.to(head.weight.dtype))), dim=-1)[:, target]
    return (lp[1:] - lp[0]).double().cpu().numpy()


def neg_sweep(model: Any, ns: NeuronSite, prompt: str, target: int, neurons: Sequence[int], *,
              shifts: Sequence[float] = DEFAULT_SHIFTS, log_prob: bool = False, batch_size: int = 64,
              remote: bool | str = False) -> dict[str, np.ndarray]:
    """Ground-truth NEG of each neuron for one prompt: shift the last token's activation by v sign(a) for every v,
    measure the change of p(target), fit a zero-intercept regression. Returns slope, r, and the raw
    (shift, change) pairs."""
    shifts = [float(v) for v in shifts]
    if not shifts or all(v == 0 for v in shifts):
        raise NsLensError("shifts need at least one non-zero value")
    neurons = [int(j) for j in neurons]
    if not neurons or max(neurons) >= ns.width or min(neurons) < 0:
        raise NsLensError(f"neurons must lie in [0, {ns.width - 1}]")
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
            with model.trace(tiled, **trace_args(model, remote)):
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
    """Per sampled (prompt, neuron): ground-truth NEG slope and Pearson r, NeurGrad, and the Table 2 baselines
    (CG, IG, LPI; None where not computed). ``layers`` holds each pair's layer."""

    slope: np.ndarray
    r: np.ndarray
    neurgrad: np.ndarray
    cg: np.ndarray | None = None
    ig: np.ndarray | None = None
    lpi: np.ndarray | None = None
    layers: np.ndarray | None = None
    prompts_used: int = 0
    prompts_offered: int = 0

    def _corr(self, x: np.ndarray | None) -> float:
        if x is None or self.slope.std() == 0 or x.std() == 0:
            return float("nan")
        return float(np.corrcoef(x, self.slope)[0, 1])

    def _mae(self, x: np.ndarray | None) -> float:
        return float("nan") if x is None else float(np.mean(np.abs(x - self.slope)))

    def summary(self, threshold: float = 0.95) -> dict[str, float]:
        nz = self.slope != 0
        out = {"pairs": int(len(self.slope)), "prompts_used": self.prompts_used,
               "prompts_offered": self.prompts_offered,
               "linear_share": float(np.mean(np.abs(self.r) >= threshold)),
               "positive_share": float(np.mean(self.slope[nz] > 0)) if nz.any() else float("nan"),
               "negative_share": float(np.mean(self.slope[nz] < 0)) if nz.any() else float("nan"),
               "neurgrad_corr": self._corr(self.neurgrad), "neurgrad_mae": self._mae(self.neurgrad)}
        for name in ("cg", "ig", "lpi"):
            out[f"{name}_corr"] = self._corr(getattr(self, name))
            if name != "lpi":  # LPI is a log-probability difference, not a slope: the paper reports no MAE for it
                out[f"{name}_mae"] = self._mae(getattr(self, name))
        return out

    def to_markdown(self, threshold: float = 0.95) -> str:
        s = self.summary(threshold)
        f = lambda v: "n/a" if np.isnan(v) else f"{v:.3f}"  # noqa: E731
        e = lambda v: "n/a" if np.isnan(v) else f"{v:.2e}"  # noqa: E731
        return (f"NEG Table 1 ({s['pairs']} (prompt, neuron) pairs over {s['prompts_used']} prompts the model "
                f"answers correctly, of {s['prompts_offered']}):\n\n"
                f"| pairs | linear (\\|r\\| >= {threshold:.2f}) | positive | negative |\n|---|---|---|---|\n"
                f"| {s['pairs']} | {s['linear_share']:.3f} | {s['positive_share']:.3f} | {s['negative_share']:.3f} |\n\n"
                "NEG Table 2 (correlation r and MAE against the ground-truth NEG):\n\n"
                "| r CG | r IG | r LPI | r NeurGrad | MAE CG | MAE IG | MAE NeurGrad |\n|---|---|---|---|---|---|---|\n"
                f"| {f(s['cg_corr'])} | {f(s['ig_corr'])} | {f(s['lpi_corr'])} | {f(s['neurgrad_corr'])} | "
                f"{e(s['cg_mae'])} | {e(s['ig_mae'])} | {e(s['neurgrad_mae'])} |\n")


def _answered_correctly(model: Any, ns: NeuronSite, prompts: Sequence[str], targets: Sequence[int],
                        remote: bool | str) -> np.ndarray:
    from .erasure import predict

    return predict(model, ns.site, prompts, np.asarray(targets), batch_size=8, remote=remote).correct


def linearity_report(model: Any, ns: NeuronSite | Sequence[NeuronSite], prompts: Sequence[str],
                     targets: Sequence[int], *, n_neurons: int = 100, shifts: Sequence[float] = DEFAULT_SHIFTS,
                     seed: int = 0, log_prob: bool = False, only_correct: bool = True, baselines: bool = True,
                     ig_steps: int = 20, ig_grid: str = "linspace", lpi_norm: str = "final",
                     remote: bool | str = False, progress: Progress | None = None) -> LinearityReport:
    """The NEG paper's Tables 1-2: for each prompt the model answers correctly (``only_correct``), ``n_neurons``
    neurons drawn at random from all the given neuron sites (pass ``resolve_neuron_sites(model)`` for all
    feed-forward layers, as the paper does; one ``NeuronSite`` for one layer); the ground-truth NEG of each, and
    NeurGrad, CG, IG and LPI for the same pairs (``baselines``; LPI needs local product neurons). ``ig_grid`` and
    ``lpi_norm`` choose the IG alphas and the LPI normaliser (defaults: the authors' released code; see
    ``integrated_gradients`` and ``lpi``)."""
    sites = [ns] if isinstance(ns, NeuronSite) else list(ns)
    if not sites:
        raise NsLensError("no neuron sites given")
    if baselines:  # a bad IG grid or LPI normaliser fails before any forward pass
        ig_alphas(ig_steps, ig_grid)
        if lpi_norm not in LPI_NORMS:
            raise NsLensError(f"unknown LPI norm {lpi_norm!r}; choose one of {', '.join(LPI_NORMS)}")
    targets = [int(t) for t in targets]
    offered = len(prompts)
    if only_correct:
        ok = _answered_correctly(model, sites[0], prompts, targets, remote)
        prompts, targets = [p for p, k in zip(prompts, ok) if k], [t for t, k in zip(targets, ok) if k]
        if not prompts:
            raise NsLensError(f"the model answers none of the {offered} prompts correctly; pass only_correct=False "
                             "to measure NEG on them anyway")
    rng = np.random.default_rng(seed)
    widths = np.array([s.width for s in sites])
    bounds = np.concatenate([[0], np.cumsum(widths)])
    picks = [np.sort(rng.choice(bounds[-1], size=min(n_neurons, int(bounds[-1])), replace=False))
             for _ in prompts]
    used = sorted({int(np.searchsorted(bounds, j, side="right") - 1) for pick in picks for j in pick})
    do_lpi = baselines and sites[0].kind == "product" and not remote
    est: dict[str, dict[int, np.ndarray]] = {"neurgrad": {}, "cg": {}, "ig": {}}
    tg = np.asarray(targets)
    for li in used:
        # one backward gives both: NeurGrad = CG x sign(a)
        g, a = _last_token_grads(model, sites[li], prompts, torch.as_tensor(tg, dtype=torch.int64)[:, None], None,
                                 batch_size=8, log_prob=log_prob, remote=remote, progress=None, desc="neurgrad")
        cg = g[:, 0, 0]
        est["neurgrad"][li] = (cg * torch.sign(a)).numpy().astype(np.float64)
        if baselines:
            est["cg"][li] = cg.numpy().astype(np.float64)
            est["ig"][li] = integrated_gradients(model, sites[li], prompts, tg, steps=ig_steps, grid=ig_grid,
                                                 log_prob=log_prob, remote=remote)[:, 0]
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("slope", "r", "neurgrad", "cg", "ig", "lpi", "layers")}
    for i, (p, t) in enumerate(zip(prompts, targets)):
        for li in sorted({int(np.searchsorted(bounds, j, side="right") - 1) for j in picks[i]}):
            local = picks[i][(picks[i] >= bounds[li]) & (picks[i] < bounds[li + 1])] - bounds[li]
            sw = neg_sweep(model, sites[li], p, t, local, shifts=shifts, log_prob=log_prob, remote=remote)
            cols["slope"].append(sw["slope"])
            cols["r"].append(sw["r"])
            cols["layers"].append(np.full(len(local), sites[li].site.layer))
            for k in ("neurgrad", "cg", "ig"):
                if est[k]:
                    cols[k].append(est[k][li][i, local])
            if do_lpi:
                cols["lpi"].append(lpi(model, sites[li], p, t, local, norm=lpi_norm))
        if progress is not None:
            progress("neg sweep", i + 1, len(prompts))
    cat = lambda k: np.concatenate(cols[k]) if cols[k] else None  # noqa: E731
    return LinearityReport(cat("slope"), cat("r"), cat("neurgrad"), cat("cg"), cat("ig"), cat("lpi"),
                           cat("layers"), prompts_used=len(prompts), prompts_offered=offered)


def neurgrad_concept_scores(model: Any, site: Site, prompts: Sequence[str], labels: np.ndarray,
                            label_token_ids: Sequence[int] | None, *, gold_token_ids: Any = None,
                            n_concepts: int | None = None, batch_size: int = 8, remote: bool | str = False,
                            progress: Progress | None = None) -> np.ndarray:
    """The ``neurgrad`` saliency ranking at a residual site: per concept, mean |NeurGrad| of the gold token's
    probability over the concept's samples, ``[C, d_model]``. The gold token is the concept's label token or the
    sample's own (``gold_token_ids``, next-token concepts; then ``n_concepts`` says how many there are)."""
    from .erasure import sample_gold

    ns = NeuronSite(site, "residual", site.d_model)
    labels = np.asarray(labels, dtype=np.int64)
    n = n_concepts if n_concepts is not None else len(label_token_ids or [])
    gold = sample_gold(labels, label_token_ids, gold_token_ids, n_concepts=n)
    g = np.abs(neurgrad(model, ns, prompts, gold, batch_size=batch_size, remote=remote, progress=progress)[:, 0])
    return np.stack([g[labels == c].mean(0) for c in range(n)])
