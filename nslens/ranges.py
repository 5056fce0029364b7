"""Attribution ranges: for a concept's selected neurons, [mu - tau*sigma, mu + tau*sigma] (paper Eq. AR).

A ``RangeMask`` is the artifact users keep: ``.safetensors`` with ``neurons`` (int64), ``lo``, ``hi``, ``mu``,
``sigma`` (float32) and its metadata as JSON (in the file's metadata and in a ``.json`` sidecar). Loading it for a
model with another layer count, d_model or layer is an error that says what differs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import NsLensError
from .files import atomic_path, slug, write_text
from .models import model_id, tokenizer_fingerprint
from .rank import check_fraction, rank, select_top
from .stats import ConceptStats

__all__ = ["DEFAULT_TAU", "MASK_FORMAT", "RangeMask", "check_masks_fit", "build_range_masks", "check_tau", "load_masks",
           "save_masks"]

logger = logging.getLogger(__name__)

#: the ``format`` a range mask's safetensors metadata carries
MASK_FORMAT = "nslens.rangemask/1"

DEFAULT_TAU = 2.5  # the paper's value (~98.76 % of a Gaussian); the authors' CLI defaulted to 2.0


def check_tau(tau: float) -> None:
    """tau (the range's half-width in standard deviations) is a positive finite number; else a one-line error."""
    if not (isinstance(tau, (int, float)) and np.isfinite(tau) and tau > 0):
        raise NsLensError(f"tau must be a positive number, got {tau!r}")


@dataclass
class RangeMask:
    """The selected neurons of one concept with their attribution ranges (all tensors ``[k]``)."""

    neurons: torch.Tensor  # int64
    lo: torch.Tensor
    hi: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.neurons = torch.as_tensor(self.neurons, dtype=torch.int64)
        for name in ("lo", "hi", "mu", "sigma"):
            setattr(self, name, torch.as_tensor(getattr(self, name), dtype=torch.float32))
        k = self.neurons.numel()
        for name in ("lo", "hi", "mu", "sigma"):
            if getattr(self, name).shape != (k,):
                raise NsLensError(f"RangeMask.{name} has shape {tuple(getattr(self, name).shape)}, expected ({k},)")
        if k == 0:
            raise NsLensError("RangeMask selects no neurons")
        if int(self.neurons.min()) < 0:
            raise NsLensError(f"RangeMask selects neuron {int(self.neurons.min())}; indices start at 0")
        if bool((self.lo > self.hi).any()):
            raise NsLensError("RangeMask has lo > hi for some neurons")

    def __len__(self) -> int:
        return int(self.neurons.numel())

    @property
    def concept(self) -> str:
        return str(self.meta.get("concept", "?"))

    # ------------------------------------------------------------------------------------------- io

    def save(self, path: str | Path) -> Path:
        # safetensors inside the method: RangeMask travels by value with remote traces, and its reader type in
        # this module's globals does not survive that serialisation
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        meta = {"nslens": json.dumps(self.meta, default=str), "format": MASK_FORMAT}
        tensors = {"neurons": self.neurons.contiguous(), "lo": self.lo.contiguous(), "hi": self.hi.contiguous(),
                   "mu": self.mu.contiguous(), "sigma": self.sigma.contiguous()}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)
        write_text(path.with_suffix(".json"), json.dumps(self.meta, indent=2, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path, *, expect: dict[str, Any] | None = None) -> RangeMask:
        """Load a mask; ``expect`` (e.g. ``site.describe()``) must agree on d_model, n_layers and layer."""
        from safetensors import safe_open  # inside the method: see save

        path = Path(path)
        if not path.exists():
            raise NsLensError(f"range file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise NsLensError(f"cannot read range file {path}: {e}") from e
        if md.get("format") != MASK_FORMAT:
            raise NsLensError(f"{path} is not an nslens range mask (format {md.get('format')!r})")
        missing = sorted({"neurons", "lo", "hi", "mu", "sigma"} - set(tensors))
        if missing:
            raise NsLensError(f"range file {path} lacks tensors {missing}")
        try:
            meta = json.loads(md.get("nslens", "{}"))
        except json.JSONDecodeError as e:
            raise NsLensError(f"range file {path} has damaged metadata ({e}); build the masks again") from e
        mask = cls(**tensors, meta=meta)
        if expect is not None:
            mask.validate(expect, source=str(path))
        return mask

    def validate(self, expect: dict[str, Any], source: str = "range mask") -> None:
        diffs = [f"{k}: mask has {self.meta[k]!r}, model has {expect[k]!r}"  # a hand-made mask names no site
                 for k in ("d_model", "n_layers", "layer") if k in expect and k in self.meta
                 and self.meta[k] != expect[k]]
        if diffs:
            raise NsLensError(f"{source} was made for another model/site: " + "; ".join(diffs))
        if self.meta.get("basis") == "sae":
            if int(self.neurons.max()) >= int(self.meta.get("d_sae", 0)):
                raise NsLensError(f"{source} selects SAE feature {int(self.neurons.max())} >= d_sae {self.meta.get('d_sae')}")
        elif "d_model" in expect and int(self.neurons.max()) >= int(expect["d_model"]):
            raise NsLensError(f"{source} selects neuron {int(self.neurons.max())} >= d_model {expect['d_model']}")


def build_range_masks(
    stats: ConceptStats,
    *,
    method: str = "max",
    fraction: float = 0.3,
    tau: float = DEFAULT_TAU,
    samples: np.ndarray | None = None,
    sample_labels: np.ndarray | None = None,
    meta: dict[str, Any] | None = None,
    scores: np.ndarray | None = None,
) -> list[RangeMask]:
    """One ``RangeMask`` per concept: rank, keep the top ``fraction``, attribute [mu -/+ tau*sigma].

    Neurons whose concept-conditioned sigma is 0 keep the degenerate range [mu, mu] (range-gated operators then
    fire only on exactly mu); their number is logged and stored in the metadata.
    """
    check_tau(tau)
    check_fraction(fraction)
    stats.check(min_samples=2)
    if not (np.isfinite(stats.mean).all() and np.isfinite(stats.m2).all()):
        raise NsLensError("statistics contain NaN/inf; re-record with finite activations")
    scores = rank(method, stats, samples, sample_labels) if scores is None else scores
    if np.shape(scores) != stats.mean.shape:
        raise NsLensError(f"scores have shape {np.shape(scores)}, expected {stats.mean.shape}")
    if np.isnan(scores).any():  # all-NaN scores took neurons 0, 1, 2, ... (-inf is how a neuron is left out)
        raise NsLensError("scores contain NaN; give every neuron a saliency (-inf keeps it out of the masks)")
    sigma_all = stats.std()
    masks = []
    for c, name in enumerate(stats.label_names):
        idx = select_top(scores[c], fraction)
        mu, sigma = stats.mean[c, idx], sigma_all[c, idx]
        n_zero = int((sigma == 0).sum())
        if n_zero:
            logger.warning("concept %r: %d selected neurons have sigma = 0 (degenerate range [mu, mu])", name, n_zero)
        md = {
            **{k: v for k, v in stats.meta.items() if k not in ("n_samples",)},
            "tau": float(tau), "ranking": method, "fraction": float(fraction), "concept": name,
            "concept_index": c, "samples_used": int(stats.count[c]), "sigma_zero_neurons": n_zero,
            "nslens_version": __version__, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **(meta or {}),
        }
        masks.append(RangeMask(torch.as_tensor(idx), mu - tau * sigma, mu + tau * sigma, mu, sigma, md))
    return masks


def save_masks(masks: Sequence[RangeMask], directory: str | Path) -> list[Path]:
    """Write ``masks`` as ``directory``'s range masks, one per concept (``00_<concept>.safetensors`` and its JSON),
    and then remove the masks an earlier write left there: ``load_masks`` reads every mask of a directory, and a
    directory of four concepts' masks rewritten with three held seven, which every later command read as seven
    concepts. Files that are not range masks stay."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NsLensError(f"cannot write the range masks to {directory}: it exists and is not a directory")
    earlier = [f for f in directory.glob("*.safetensors") if _is_mask_file(f)] if directory.is_dir() else []
    written = [m.save(directory / f"{i:02d}_{slug(m.concept)}.safetensors") for i, m in enumerate(masks)]
    for f in sorted(set(earlier) - set(written)):
        f.unlink(missing_ok=True)
        f.with_suffix(".json").unlink(missing_ok=True)
    return written


def _is_mask_file(path: Path) -> bool:
    """Whether ``path`` is a range mask (its safetensors metadata says so), without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == MASK_FORMAT
    except Exception:  # not a safetensors file, or damaged: not a mask this writer made
        return False


def load_masks(directory: str | Path, *, expect: dict[str, Any] | None = None) -> list[RangeMask]:
    """All masks of a directory, in concept order."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    files = [f for f in files if f.name not in ("stats.safetensors", "samples.safetensors")]
    if not files:
        raise NsLensError(f"no range masks (*.safetensors) in {directory}")
    masks = [RangeMask.load(f, expect=expect) for f in files]
    return sorted(masks, key=lambda m: m.meta.get("concept_index", 0))


def check_masks_fit(masks: Sequence[RangeMask], *, label_names: Sequence[str] | None = None, model: Any = None,
                    dataset: str | None = None, site: dict[str, Any] | None = None, allow_other_model: bool = False,
                    source: str = "the masks") -> None:
    """Refuse masks whose metadata says they were made for other concepts (names or order), another model,
    tokenizer, dataset or site (``site``: ``Site.describe()``, as ``RangeMask.validate``), so that no result is
    ever printed under the wrong name. ``allow_other_model`` lets a fine-tuned copy of the model use them (the
    model id check only). Commands read the masks before the model loads and check them here once it has."""
    if not masks:
        raise NsLensError(f"{source}: no masks")
    if site is not None:
        for m in masks:
            m.validate(site, source=f"{source}: {m.concept!r}")
    concepts = [m.concept for m in masks]
    if label_names is not None and concepts != list(label_names):
        raise NsLensError(f"{source} are for the concepts {concepts} but the dataset has {list(label_names)}; "
                         "record and build masks on this dataset")
    meta = masks[0].meta
    if model is not None:
        made, here = meta.get("model_id"), model_id(model)
        if made is not None and made != here and not allow_other_model:
            raise NsLensError(f"{source} were recorded on model {made!r}, not {here!r} "
                             "(pass --allow-other-model for a fine-tuned copy of it)")
        tok = meta.get("tokenizer")
        if tok is not None and getattr(model, "tokenizer", None) is not None \
                and tok != tokenizer_fingerprint(model.tokenizer):
            raise NsLensError(f"{source} were made with another tokenizer than this model's")
    if dataset is not None and meta.get("dataset") not in (None, dataset):
        raise NsLensError(f"{source} were made from the dataset {meta.get('dataset')!r}, not {dataset!r}")
