"""Neuron empirical gradients (NEG; Zhao et al.): NeurGrad and the ground-truth linearity check.

NEG is the slope of the target token's probability against a shift of one neuron's activation. The paper
estimates it with NeurGrad = (d p / d a) x sign(a): the shift is taken *in the direction of the activation's sign*
(a -> a + v sign(a)), which is why the sign of a enters. The ground truth here follows the same convention:
p(a + v sign(a)) - p(a) is regressed on v through the origin; the slope is the NEG and Pearson r measures
linearity (|r| >= 0.95 counts as linear). For small shifts the two agree to first order.

Neuron sites (``nslens.neurons``): MLP intermediate neurons of a gated decoder layer -- ``product`` (default:
act_fn(gate) * up, the input of down_proj), ``up_proj`` (the authors' hook) and ``act_fn`` -- or the ``residual``
stream. NeurGrad, CG and IG are computed in ``nslens.neurgrad`` (and importable from here); this module measures
the ground truth and the LPI baseline and compares them.

The paper's Table 2 compares NeurGrad with three estimators, all here: the plain computational gradient
(``neurgrad(..., signed=False)``, CG), integrated gradients (``integrated_gradients``, IG, one trace and one
backward per batch over ``steps`` scaled copies on the authors' ``linspace(0, 1, steps)`` grid) and the
log-probability increase (``lpi``, LPI, with the released LPI code's fixed final normaliser). ``linearity_report``
follows the paper's sampling: prompts the model answers correctly, and ``n_neurons`` random neurons per prompt drawn
from all feed-forward layers (``resolve_neuron_sites``; one layer stays possible).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .batching import Progress, batches, tokenize
from .erasure import predict
from .errors import NsLensError, check_number
from .models import check_token_ids, family_of, site_module
from .neurgrad import (
    IG_GRIDS,
    ig_alphas,
    integrated_gradients,
    last_token_grads,
    neurgrad,
    neurgrad_concept_scores,
)
from .neurons import (
    NEURON_KINDS,
    NeuronSite,
    at_least_f32,
    check_neuron_kind,
    neuron_module,
    read_neurons,
    resolve_neuron_site,
    resolve_neuron_sites,
    write_neurons,
)
from .remote import maybe_retry, trace_args

# NeurGrad and the neuron sites live in nslens.neurgrad and nslens.neurons; they stay importable from here
__all__ = ["DEFAULT_SHIFTS", "IG_GRIDS", "LPI_NORMS", "NEURON_KINDS", "LinearityReport", "NeuronSite",
           "check_lpi_norm", "check_neuron_kind", "ig_alphas", "integrated_gradients", "linearity_report", "lpi",
           "neg_sweep", "neurgrad", "neurgrad_concept_scores", "resolve_neuron_site", "resolve_neuron_sites"]


#: the NEG paper's grid: shifts of -2 to +2 in steps of 0.2 (0 itself changes nothing and is left out)
DEFAULT_SHIFTS = tuple(round(0.2 * i, 1) for i in range(-10, 11) if i != 0)


LPI_NORMS = ("final", "recompute")


def check_lpi_norm(norm: str) -> None:
    """``norm`` is one of ``LPI_NORMS``; else a one-line error naming them."""
    if norm not in LPI_NORMS:
        raise NsLensError(f"unknown LPI norm {norm!r}; choose one of {', '.join(LPI_NORMS)}")


#: the released LPI code's epsilon (``rsqrt(final_var + 1e-6)``), whatever the model's own rms_norm_eps
LPI_EPS = 1e-6


def _norm_gain(norm: Any, offset: float) -> torch.Tensor:
    """The final RMSNorm's elementwise gain: its weight (Llama, Mistral, Qwen), 1 + weight for Gemma's norm (the
    family's ``norm_offset``)."""
    w = at_least_f32(norm.weight.detach())
    return offset + w if offset else w


def _neuron_ids(ns: NeuronSite, neurons: Sequence[int]) -> torch.Tensor:
    """``neurons`` as indices of the site's neurons: -1 was the last neuron (LPI) and one past the width an index
    error."""
    arr = np.asarray(neurons)
    if not arr.size or arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= ns.width:
        raise NsLensError(f"neurons must be whole numbers in [0, {ns.width - 1}], got {arr.reshape(-1)[:5].tolist()}")
    return torch.as_tensor(arr.astype(np.int64).reshape(-1))


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
    check_lpi_norm(norm)
    if next(model._module.parameters()).device.type == "meta":
        raise NsLensError("LPI unembeds locally: it needs local weights (not a remote model)")
    target = int(check_token_ids(model, [target], "target token id")[0])
    neurons = _neuron_ids(ns, neurons)
    fam = family_of(ns.site)
    pre_mlp = fam.part(site_module(model, ns.site), fam.pre_mlp_norm)
    enc = tokenize(model, [prompt])
    hf = model._module
    with torch.no_grad():
        with model.trace(enc):
            h = pre_mlp.input[0, -1].save()
            a = neuron_module(model, ns).input[0, -1].save()
            final = fam.part(model, fam.final_norm).input[0, -1].save()
        w = fam.part(hf, f"{fam.mlp_path(ns.site.layer)}.{fam.mlp_down}").weight  # [d, width]
        contrib = at_least_f32(a[neurons])[:, None] * at_least_f32(w[:, neurons].T)  # [n, d]
        h = at_least_f32(h)
        x = torch.cat([h[None], h[None] + contrib])
        final_norm = fam.part(hf, fam.final_norm)
        if norm == "final":
            final = at_least_f32(final)
            scale = torch.rsqrt(final.pow(2).mean(-1, keepdim=True) + LPI_EPS)
            normed = x * scale * _norm_gain(final_norm, fam.norm_offset)
        else:
            normed = final_norm(x.to(w.dtype))
        head = fam.part(hf, fam.head)
        lp = torch.log_softmax(at_least_f32(head(normed.to(head.weight.dtype))), dim=-1)[:, target]
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
    target = int(check_token_ids(model, [target], "target token id")[0])
    neurons = _neuron_ids(ns, neurons).tolist()
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
                a = read_neurons(model, ns)
                shift = delta.to(a.device, a.dtype) * torch.sign(a[:, -1, :])
                edited = torch.cat([a[:, :-1], (a[:, -1, :] + shift)[:, None, :]], dim=1)
                write_neurons(model, ns, edited)
                lp = torch.log_softmax(at_least_f32(model.output.logits[:, -1, :]), dim=-1)[:, target]
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
        check_lpi_norm(lpi_norm)
    check_number("n_neurons", n_neurons, 1, integer=True)
    targets = check_token_ids(model, targets, "target token id").tolist()
    if not prompts or len(targets) != len(prompts):  # a mismatch failed as a reshape error inside
        raise NsLensError(f"one target per prompt: got {len(prompts)} prompts and {len(targets)} targets")
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
        g, a = last_token_grads(model, sites[li], prompts, torch.as_tensor(tg, dtype=torch.int64)[:, None], None,
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
