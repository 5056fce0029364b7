"""Per-concept streaming statistics of site activations.

Recording reduces each batch *inside the trace* to Welford partials (count, mean, sum of squared deviations
``M2``, sum of ``|h|``) per concept; batches are merged here with Chan et al.'s parallel formula, which is
numerically stable and independent of how the data was split. Memory is O(concepts x d_model) for any N.

sigma follows the paper (population standard deviation, ddof=0): sigma = sqrt(M2 / n).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import NsLensError
from .files import atomic_path

__all__ = ["ConceptStats", "batch_partials"]


def batch_partials(x: torch.Tensor, labels: torch.Tensor, n_concepts: int,
                   weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Welford partials of one batch, as pure tensor code (runs inside a trace, locally or remotely).

    ``x``: ``[N, d]`` activations; ``labels``: ``[N]`` concept ids; ``weights``: optional ``[N]`` 0/1 weights
    (padding positions get 0). Computed in float64 so a batch's partials are exact to the last bit that
    matters. Returns counts ``[C]``, mean ``[C, d]``, m2 ``[C, d]``, abs_sum ``[C, d]`` and ``finite`` (bool).
    """
    x64 = x.to(torch.float64)
    onehot = torch.nn.functional.one_hot(labels.to(x.device), n_concepts).to(torch.float64)
    if weights is not None:
        onehot = onehot * weights.to(device=x.device, dtype=torch.float64)[:, None]
    counts = onehot.sum(0)
    mean = (onehot.T @ x64) / counts.clamp(min=1.0)[:, None]
    centered = x64 - onehot @ mean  # rows with weight 0 get a zero one-hot row, so they drop out below
    m2 = onehot.T @ centered.square()
    abs_sum = onehot.T @ x64.abs()
    finite = torch.isfinite(x64).all()
    return {"count": counts.cpu(), "mean": mean.cpu(), "m2": m2.cpu(), "abs_sum": abs_sum.cpu(),
            "finite": finite.cpu()}


@dataclass
class ConceptStats:
    """Count, mean, M2 and sum |h| per concept (float64, numpy), plus what was recorded where."""

    count: np.ndarray  # [C]
    mean: np.ndarray  # [C, d]
    m2: np.ndarray  # [C, d]
    abs_sum: np.ndarray  # [C, d]
    label_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def empty(cls, n_concepts: int, d: int, label_names: list[str], meta: dict[str, Any] | None = None) -> ConceptStats:
        z = np.zeros((n_concepts, d))
        return cls(np.zeros(n_concepts), z.copy(), z.copy(), z.copy(), list(label_names), dict(meta or {}))

    @classmethod
    def from_samples(cls, x: np.ndarray, labels: np.ndarray, label_names: list[str]) -> ConceptStats:
        """Direct two-pass statistics from raw samples (the reference the streaming path must equal)."""
        x = np.asarray(x, dtype=np.float64)
        c = len(label_names)
        out = cls.empty(c, x.shape[1], label_names)
        for k in range(c):
            xs = x[labels == k]
            out.count[k] = len(xs)
            if len(xs):
                out.mean[k] = xs.mean(0)
                out.m2[k] = ((xs - out.mean[k]) ** 2).sum(0)
                out.abs_sum[k] = np.abs(xs).sum(0)
        return out

    @property
    def n_concepts(self) -> int:
        return len(self.label_names)

    @property
    def d(self) -> int:
        return int(self.mean.shape[1])

    def update(self, partials: dict[str, Any]) -> None:
        """Merge one batch's partials (Chan et al. 1979 parallel update)."""
        nb = np.asarray(partials["count"], dtype=np.float64)
        mb = np.asarray(partials["mean"], dtype=np.float64)
        m2b = np.asarray(partials["m2"], dtype=np.float64)
        na = self.count
        n = na + nb
        safe = np.where(n > 0, n, 1.0)
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / safe)[:, None]
        self.m2 = self.m2 + m2b + delta**2 * (na * nb / safe)[:, None]
        self.abs_sum = self.abs_sum + np.asarray(partials["abs_sum"], dtype=np.float64)
        self.count = n

    def merge(self, other: ConceptStats) -> ConceptStats:
        out = ConceptStats(self.count.copy(), self.mean.copy(), self.m2.copy(), self.abs_sum.copy(),
                           list(self.label_names), dict(self.meta))
        out.update({"count": other.count, "mean": other.mean, "m2": other.m2, "abs_sum": other.abs_sum})
        return out

    def var(self) -> np.ndarray:
        return self.m2 / np.where(self.count > 0, self.count, 1.0)[:, None]

    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0), as in the paper's definition of sigma."""
        return np.sqrt(np.maximum(self.var(), 0.0))

    def abs_mean(self) -> np.ndarray:
        return self.abs_sum / np.where(self.count > 0, self.count, 1.0)[:, None]

    def check(self, min_samples: int = 2) -> None:
        bad = [f"{n} ({int(c)})" for n, c in zip(self.label_names, self.count) if c < min_samples]
        if bad:
            raise NsLensError(f"concepts with fewer than {min_samples} recorded samples (sigma undefined): "
                             f"{', '.join(bad)}")

    # ------------------------------------------------------------------------------------------- io

    def save(self, path: str | Path) -> Path:
        """``.safetensors`` with the arrays and JSON metadata; written to a temp file, then renamed."""
        # safetensors inside the method: ConceptStats travels by value with remote traces, and its reader type in
        # this module's globals does not survive that serialisation
        from safetensors.numpy import save_file

        path = Path(path)
        meta = {"label_names": json.dumps(self.label_names), "meta": json.dumps(self.meta, default=str),
                "format": "nslens.stats/1"}
        with atomic_path(path) as tmp:
            save_file({"count": self.count, "mean": self.mean, "m2": self.m2, "abs_sum": self.abs_sum}, tmp,
                      metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ConceptStats:
        from safetensors import safe_open  # inside the method: see save

        path = Path(path)
        if not path.exists():
            raise NsLensError(f"statistics file not found: {path}")
        try:
            with safe_open(str(path), framework="np") as f:
                md = f.metadata() or {}
                if md.get("format") != "nslens.stats/1":
                    raise NsLensError(f"{path} is not an nslens statistics file (format {md.get('format')!r})")
                arrays = {k: f.get_tensor(k) for k in ("count", "mean", "m2", "abs_sum")}
        except NsLensError:
            raise
        except Exception as e:  # safetensors' own errors: not safetensors, truncated, a missing tensor
            raise NsLensError(f"{path} is not a readable nslens statistics file (safetensors: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); is it truncated?") from e
        try:
            label_names, meta = json.loads(md["label_names"]), json.loads(md["meta"])
        except (KeyError, json.JSONDecodeError) as e:
            raise NsLensError(f"{path} has damaged metadata ({type(e).__name__}: {e}); record it again") from e
        return cls(**arrays, label_names=label_names, meta=meta)
