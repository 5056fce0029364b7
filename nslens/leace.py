"""LEACE (LEAst-squares Concept Erasure, Belrose et al. 2023) as an erasure baseline beside neuron and range masking.

What is fitted: for every concept c one eraser, **concept against the rest** (z = 1[label == c], one column), not one
eraser for all classes at once. The erasure table and the side-effect table hold one intervention per target
concept and measure Acc on that concept against CAcc on the others, exactly how a concept's neuron or range mask is
evaluated; an all-classes eraser (z one-hot over C classes) would remove every concept together, so its CAcc would
say nothing about collateral damage. The rank-1 cross-covariance of a binary concept makes each eraser remove the
one direction (in the whitened space) that linearly predicts "c or not c", with the least change in mean squared
norm; with the package's defaults (affine, covariance shrinkage, the trace constraint) the edit is
x - ((x - mean) @ proj_right.T) @ proj_left.T.

Where it is fitted: on the site activations of the training split at the recording's positions (the last token by
default, where the masks' statistics come from), over the neurons the concept's mask selects (sorted ascending).
With a full-width mask (``nslens.steering.full_masks``, ``steering = ["leace"]``, ``nslens steer --kinds leace``)
that is textbook LEACE of the whole site vector; with a run's top-fraction masks it is LEACE restricted to the same
neurons that neuron/range masking touch. The statistics are streamed through the package's own
``LeaceFitter.update``, batch by batch: one fitter with z one-hot over all concepts shares X^T X across concepts, and
each concept's eraser is computed from its column of the cross-covariance and the block of its mask's neurons, which
equals fitting that concept alone (tested against ``LeaceFitter.fit``).

How it is applied: ``Leace`` is an ordinary ``Operator``, so it goes wherever an operator goes (``Intervention``,
``apply_in_trace``, ``applied``, the fast replay, the erasure and side-effect tables, local and remote). Its call is
plain torch on the eraser's tensors (nothing from the package runs inside a trace, so nothing but torch is needed
where the trace runs). Ungated (the table's "neuron" columns) it is LEACE; range-gated (the "range" columns) each
component takes its erased value only where the activation lies in the mask's range, as range-gated steering does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .batching import batches, tokenize
from .errors import NsLensError
from .models import read_site
from .ops import Operator
from .ranges import RangeMask
from .remote import maybe_retry, trace_args

__all__ = ["FIT_POSITIONS", "Leace", "check_leace_config", "fit_leace", "leace_fitter", "leace_operators", "leace_samples",
           "run_leace"]

#: where activations for the fit are read (the recording's positions)
FIT_POSITIONS = ("last", "all")
#: rows per ``LeaceFitter.update`` when fitting from samples in memory
FIT_ROWS = 4096


def _require_package() -> Any:
    try:
        import concept_erasure
    except ImportError as e:
        raise NsLensError("LEACE needs the concept-erasure package: pip install concept-erasure") from e
    return concept_erasure


@dataclass(frozen=True)
class Leace(Operator):
    """A fitted LEACE eraser for one concept, over the neurons ``fitted_on`` (ascending).

    ``proj_left`` ``[k, r]``, ``proj_right`` ``[r, k]`` and ``bias`` ``[k]`` are the package's ``LeaceEraser``
    tensors (float32), so ``LeaceEraser(proj_left, proj_right, bias)`` is the same map. Build it with
    ``fit_leace`` / ``leace_operators``."""

    name: ClassVar[str] = "leace"
    build: ClassVar[str] = "fitted"
    proj_left: torch.Tensor | None = None
    proj_right: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    fitted_on: torch.Tensor | None = None
    """The site neurons (ascending) the eraser was fitted on: the mask it is used with must select exactly these."""
    concept: str | None = None
    """The concept erased (checked against the mask's concept, so one concept's eraser never runs for another)."""

    def __call__(self, x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, tau: float,
                 neurons: torch.Tensor | None = None) -> torch.Tensor:
        """The erased selected columns ``x`` ``[..., k]`` (in the mask's order): plain torch, runs in a trace."""
        if neurons is None or self.proj_left is None or self.proj_right is None:
            raise NsLensError("LEACE needs its fitted eraser and the selected neurons' indices")
        order = torch.argsort(neurons.to(x.device))  # the mask's order -> ascending, as the eraser was fitted
        xs = x.index_select(-1, order)
        left = self.proj_left.to(device=x.device, dtype=x.dtype)
        right = self.proj_right.to(device=x.device, dtype=x.dtype)
        delta = xs - self.bias.to(device=x.device, dtype=x.dtype) if self.bias is not None else xs
        ys = xs - (delta @ right.mT) @ left.mT  # the package's LeaceEraser.__call__, operation for operation
        return ys.index_select(-1, torch.argsort(order))

    def check(self, mask: RangeMask, sae: Any = None) -> None:
        """Refuse a mask this eraser was not fitted for (other neurons, another concept, SAE features)."""
        if sae is not None or mask.meta.get("basis") == "sae":
            raise NsLensError("LEACE is fitted on the site's neurons, not SAE features; run it without an SAE")
        fitted = self.fitted_on if self.fitted_on is not None else torch.empty(0, dtype=torch.int64)
        if not torch.equal(torch.sort(mask.neurons.to(torch.int64)).values, fitted.to(torch.int64)):
            raise NsLensError(f"the LEACE eraser of {self.concept!r} was fitted on {len(fitted)} other neurons "
                              f"than the mask of {mask.concept!r} selects ({len(mask)}); fit it on this mask "
                              "(nslens.leace.leace_operators)")
        if self.concept is not None and mask.concept != self.concept:
            raise NsLensError(f"the LEACE eraser of {self.concept!r} is used with the mask of {mask.concept!r}; "
                              "give the operators in the masks' order")

    def describe(self) -> dict[str, Any]:
        rank = int(self.proj_left.shape[1]) if self.proj_left is not None else 0
        return {"name": "leace", "fit": "concept vs rest", "concept": self.concept,
                "neurons": int(self.fitted_on.numel()) if self.fitted_on is not None else 0, "rank": rank}

    @property
    def label(self) -> str:
        return "leace"


def leace_fitter(n_concepts: int, d: int) -> Any:
    """The shared streaming fitter: the package's ``LeaceFitter`` over all ``d`` neurons with z one-hot over the
    concepts (float64, so X^T X accumulated over many batches keeps its precision)."""
    _require_package()
    from concept_erasure import LeaceFitter

    return LeaceFitter(d, n_concepts, dtype=torch.float64)


def _update(fitter: Any, x: torch.Tensor, labels: torch.Tensor, n_concepts: int) -> None:
    z = torch.nn.functional.one_hot(labels.to(torch.int64), n_concepts).to(torch.float64)
    fitter.update(x.to(torch.float64), z)


def _concept_eraser(shared: Any, c: int, neurons: torch.Tensor) -> Any:
    """Concept c's eraser over ``neurons`` (ascending) from the shared statistics: the Welford sums of a subset of
    coordinates and of one z column are the sub-blocks of the shared ones, so this is the eraser ``LeaceFitter``
    fits on ``x[:, neurons]`` and ``z = 1[label == c]`` alone."""
    from concept_erasure import LeaceFitter

    k = int(neurons.numel())
    one = LeaceFitter(k, 1, dtype=shared.mean_x.dtype)
    one.n = shared.n.clone()
    one.mean_x = shared.mean_x[neurons].clone()
    one.mean_z = shared.mean_z[c:c + 1].clone()
    one.sigma_xz_ = shared.sigma_xz_[neurons][:, c:c + 1].clone()
    one.sigma_xx_ = shared.sigma_xx_[neurons][:, neurons].clone()
    return one.eraser


def _operators(shared: Any, masks: Sequence[RangeMask]) -> list[Leace]:
    counts = shared.mean_z * shared.n
    ops = []
    for c, mask in enumerate(masks):
        if not (0 < float(counts[c]) < float(shared.n)):
            raise NsLensError(f"LEACE for {mask.concept!r} needs training samples of the concept and of the others "
                              f"({int(round(float(counts[c])))} of {int(shared.n)} are the concept)")
        neurons = torch.sort(mask.neurons.to(torch.int64)).values
        er = _concept_eraser(shared, c, neurons)
        ops.append(Leace(proj_left=er.proj_left.float().contiguous(), proj_right=er.proj_right.float().contiguous(),
                         bias=None if er.bias is None else er.bias.float().contiguous(), fitted_on=neurons,
                         concept=mask.concept))
    return ops


def leace_samples(samples: np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray,
                  masks: Sequence[RangeMask]) -> list[Leace]:
    """One eraser per mask (mask i = concept i) from raw site vectors ``[n, d]`` and their concept labels, fed to
    ``LeaceFitter.update`` in batches of ``FIT_ROWS`` rows."""
    _require_package()
    x = torch.as_tensor(np.asarray(samples) if not isinstance(samples, torch.Tensor) else samples)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if x.ndim != 2 or len(x) != len(y):
        raise NsLensError(f"LEACE needs samples [n, d] with one label each, got {tuple(x.shape)} and {len(y)} labels")
    _check_masks(masks, int(x.shape[1]))
    shared = leace_fitter(len(masks), int(x.shape[1]))
    for i in range(0, len(x), FIT_ROWS):
        _update(shared, x[i:i + FIT_ROWS], y[i:i + FIT_ROWS], len(masks))
    return _operators(shared, masks)


def _check_masks(masks: Sequence[RangeMask], d: int) -> None:
    if not masks:
        raise NsLensError("LEACE needs one mask per concept, got none")
    for m in masks:
        if m.meta.get("basis") == "sae":
            raise NsLensError("LEACE is fitted on the site's neurons, not SAE features; run it without an SAE")
        if int(m.neurons.max()) >= d:
            raise NsLensError(f"the mask of {m.concept!r} selects neuron {int(m.neurons.max())} of a {d}-wide site")


def fit_leace(model: Any, site: Any, prompts: Sequence[str], labels: Sequence[int] | np.ndarray,
              masks: Sequence[RangeMask], *, position: str = "last", batch_size: int = 16,
              remote: bool | str = False, progress: Any = None) -> list[Leace]:
    """One eraser per mask (mask i = concept i), fitted on the site's activations over ``prompts``, streamed.

    Each batch runs through an nnsight trace that stops after the site and hands out the activations at
    ``position`` (``last``: each prompt's last token, the recording protocol; ``all``: every real token, labelled
    with its prompt's concept); they update the shared ``LeaceFitter`` outside the trace, so no sample cap applies
    and memory is O(d^2)."""
    _require_package()
    if position not in FIT_POSITIONS:
        raise NsLensError(f"unknown position {position!r}; choose one of {', '.join(FIT_POSITIONS)}")
    y = np.asarray(labels, dtype=np.int64)
    if len(prompts) != len(y):
        raise NsLensError(f"{len(prompts)} prompts but {len(y)} labels")
    if len(prompts) == 0:
        raise NsLensError("nothing to fit LEACE on: no training prompts")
    _check_masks(masks, site.d_model)
    shared = leace_fitter(len(masks), site.d_model)
    parts = batches(len(prompts), batch_size)
    for i, sl in enumerate(parts):
        enc = tokenize(model, prompts[sl])
        x = maybe_retry(remote, lambda enc=enc: _site_activations(model, site, enc, position, remote),
                        what=f"leace batch {i}")
        lab = torch.as_tensor(y[sl])
        if position == "all":
            keep = enc["attention_mask"].bool()
            x, lab = x[keep], lab[:, None].expand(keep.shape)[keep]
        if not torch.isfinite(x).all():
            raise NsLensError(f"non-finite activations (NaN/inf) at {site.path} in LEACE batch {i}")
        _update(shared, x, lab, len(masks))
        if progress is not None:
            progress("fit leace", i + 1, len(parts))
    return _operators(shared, masks)


def _site_activations(model: Any, site: Any, enc: dict[str, torch.Tensor], position: str,
                      remote: bool | str) -> torch.Tensor:
    """The site's value at the last position ``[B, d]`` or at every position ``[B, S, d]`` (float32)."""
    with torch.no_grad():
        with model.trace(enc, **trace_args(model, remote)) as tracer:
            h = read_site(model, site)
            x = (h[:, -1, :] if position == "last" else h).float().cpu().save()
            tracer.stop()
    return x


def leace_operators(model: Any, site: Any, prompts: Sequence[str], labels: Sequence[int] | np.ndarray,
                    masks: Sequence[RangeMask], *, samples: np.ndarray | None = None,
                    sample_labels: np.ndarray | None = None, position: str = "last", batch_size: int = 16,
                    remote: bool | str = False, progress: Any = None) -> list[Leace]:
    """The erasers a run uses: from a recording's raw samples when they cover every training prompt (no extra
    model pass), else streamed from the model (``fit_leace``)."""
    if samples is not None and sample_labels is not None and len(samples) == len(prompts) and position == "last":
        return leace_samples(samples, sample_labels, masks)
    return fit_leace(model, site, prompts, labels, masks, position=position, batch_size=batch_size, remote=remote,
                     progress=progress)


def check_leace_config(cfg: Any) -> None:
    """What a run config (``nslens.pipeline.RunConfig``) can be told about LEACE without the model: it works on the
    site's neurons, so not with an SAE."""
    wants = "leace" in cfg.operators or "leace" in cfg.steering
    if wants and (cfg.sae_path or cfg.sae_release):
        raise NsLensError("LEACE is fitted on the site's neurons, not SAE features; run it without an SAE")


def run_leace(model: Any, site: Any, cfg: Any, data: Any, masks: Sequence[RangeMask], rec: Any = None,
              progress: Any = None) -> list[Leace]:
    """A run's LEACE operators (one per mask) fitted on its training split (``nslens.pipeline.PreparedData``) at
    the recording's positions, from the recording's raw samples when ``rec`` holds all of them."""
    if data is None or masks is None:
        raise NsLensError("the leace operator is fitted on the concepts' training split: pass the run's data and "
                          "masks (run_operators(..., data=, masks=))")
    names = list(data.train.label_names)
    if [m.concept for m in masks] != names:
        raise NsLensError(f"LEACE is fitted per concept: the masks are for {[m.concept for m in masks]} but the "
                          f"dataset's concepts are {names}")
    return leace_operators(model, site, data.prompts(data.train), data.train.labels, masks,
                           samples=getattr(rec, "samples", None), sample_labels=getattr(rec, "sample_labels", None),
                           position=cfg.record_position, batch_size=cfg.batch_size, remote=cfg.remote,
                           progress=progress)
