"""Range masking of SAE features (paper Appendix N): Gemma Scope JumpReLU SAEs on the residual stream.

At the SAE's site, inside the trace: f = JumpReLU(x W_enc + b_enc), error e = x - decode(f); the operator edits
the selected features (range-gated, or ungated = feature masking) and decode(f') + e is written back. The error term
is kept, so with no feature changed the activations come back equal to the original (to float rounding).

Feature selection follows the paper: a feature is a *candidate* for a concept if it fires (> 0) on at least 10 % of
the concept's training samples; the top 20 % of candidates by mean activation are selected. The range of a selected
feature is mu -/+ tau*sigma over the concept's *firing* samples by default (``ranges_over="firing"``: the zeros of
a JumpReLU are a spike, not part of the bump), or over all its samples (``"all"``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batching import Progress, batches, tokenize
from .errors import NsLensError, check_number
from .files import atomic_path, write_text
from .mdtable import cell
from .models import Site, model_id, read_site
from .ranges import RangeMask, check_tau
from .remote import maybe_retry, trace_args

__all__ = [
    "NPZ_KEYS",
    "build_synthetic_sae",
    "check_feature_selection",
    "FeatureStats",
    "JumpReLUSAE",
    "build_feature_masks",
    "feature_table31",
    "load_sae",
    "load_sae_npz",
    "record_features",
    "select_features",
]

NPZ_KEYS = ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")


@dataclass
class JumpReLUSAE:
    """A Gemma Scope JumpReLU SAE: ``W_enc [d, F]``, ``b_enc [F]``, ``threshold [F]``, ``W_dec [F, d]``, ``b_dec [d]``."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    threshold: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for k in NPZ_KEYS:
            setattr(self, k, torch.as_tensor(np.asarray(getattr(self, k)), dtype=torch.float32))
        d, f = self.W_enc.shape
        expected = {"b_enc": (f,), "threshold": (f,), "W_dec": (f, d), "b_dec": (d,)}
        for k, shape in expected.items():
            if tuple(getattr(self, k).shape) != shape:
                raise NsLensError(f"SAE {k} has shape {tuple(getattr(self, k).shape)}, expected {shape}")

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = x.float() @ self.W_enc.to(x.device) + self.b_enc.to(x.device)
        return torch.where(pre > self.threshold.to(x.device), torch.relu(pre), torch.zeros_like(pre))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec.to(f.device) + self.b_dec.to(f.device)

    def check(self, site: Site) -> None:
        if self.d_in != site.d_model:
            raise NsLensError(f"SAE d_in {self.d_in} does not match the model's d_model {site.d_model}")

    def save_npz(self, path: str | Path) -> Path:
        """Gemma Scope's ``params.npz`` layout."""
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz" to it
            np.savez(f, **{k: getattr(self, k).numpy() for k in NPZ_KEYS})
        return path


def load_sae_npz(path: str | Path) -> JumpReLUSAE:
    """Load Gemma Scope's ``params.npz`` (keys W_enc, b_enc, threshold, W_dec, b_dec)."""
    path = Path(path)
    if not path.exists():
        raise NsLensError(f"SAE file not found: {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # pickled data, not numpy at all, a truncated zip
        raise NsLensError(f"SAE file {path} is not a readable .npz archive ({type(e).__name__}); Gemma Scope's "
                         f"params.npz holds {list(NPZ_KEYS)}") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise NsLensError(f"SAE file {path} is a single array (.npy), not an .npz archive of {list(NPZ_KEYS)}")
    try:
        with z:
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise NsLensError(f"SAE file {path.name} lacks {missing}; Gemma Scope params.npz has {list(NPZ_KEYS)}")
            arrays = [z[k] for k in NPZ_KEYS]
            bad = [k for k, a in zip(NPZ_KEYS, arrays) if not np.isfinite(a).all()]
            if bad:  # every feature then read as zero, without a word
                raise NsLensError(f"SAE file {path.name} has NaN/inf values in {bad}")
            return JumpReLUSAE(*arrays, meta={"source": str(path)})
    except NsLensError:
        raise
    except Exception as e:  # a member that cannot be read (truncated archive)
        raise NsLensError(f"SAE file {path} could not be read ({type(e).__name__}: {e}); is it truncated?") from e


def load_sae(release: str, sae_id: str, *, device: str = "cpu") -> JumpReLUSAE:
    """Load a JumpReLU SAE through sae-lens by release and id (e.g. ``gemma-scope-2b-pt-res``,
    ``layer_25/width_16k/average_l0_285``). Unknown releases or ids are an error listing the valid ones."""
    try:  # optional extra [sae]
        from sae_lens import SAE
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError as e:
        raise NsLensError("loading an SAE by release needs sae-lens: pip install 'nslens[sae]' "
                         "(or pass a Gemma Scope params.npz path)") from e
    directory = get_pretrained_saes_directory()
    if release not in directory:
        close = sorted(r for r in directory if "gemma-scope" in r)[:10]
        raise NsLensError(f"unknown SAE release {release!r}; Gemma Scope releases include: {', '.join(close)}")
    ids = sorted(directory[release].saes_map)
    if sae_id not in ids:
        prefix = sae_id.split("/")[0]
        near = [i for i in ids if i.startswith(prefix)] or ids[:10]
        raise NsLensError(f"ID {sae_id!r} not found in release {release!r}. Valid IDs include: {', '.join(near[:12])}")
    loaded = SAE.from_pretrained(release, sae_id, device=device)
    sae = loaded[0] if isinstance(loaded, tuple) else loaded
    sd = {k: v.detach().cpu() for k, v in sae.state_dict().items()}
    missing = [k for k in NPZ_KEYS if k not in sd]
    if missing:
        raise NsLensError(f"SAE {release}/{sae_id} is not a JumpReLU SAE (lacks {missing})")
    return JumpReLUSAE(*(sd[k] for k in NPZ_KEYS), meta={"release": release, "sae_id": sae_id})


# --------------------------------------------------------------------------------------------- statistics


def _masked_partials(f: torch.Tensor, labels: torch.Tensor, c: int) -> dict[str, torch.Tensor]:
    """Per concept: all-sample partials (count [C], mean, m2 [C, F]) and firing-only partials (count, mean, m2 all
    [C, F]); computed in float64 inside the trace."""
    x = f.to(torch.float64)
    onehot = torch.nn.functional.one_hot(labels.to(x.device), c).to(torch.float64)
    n = onehot.sum(0)
    mean = (onehot.T @ x) / n.clamp(min=1)[:, None]
    m2 = onehot.T @ (x - onehot @ mean).square()
    w = (x > 0).to(torch.float64)
    fn = onehot.T @ w
    fmean = (onehot.T @ (x * w)) / fn.clamp(min=1)
    fm2 = onehot.T @ ((x - onehot @ fmean).square() * w)
    l0 = onehot.T @ w.sum(1, keepdim=True)
    return {k: v.cpu() for k, v in {"n": n, "mean": mean, "m2": m2, "fn": fn, "fmean": fmean, "fm2": fm2,
                                     "l0": l0[:, 0], "finite": torch.isfinite(x).all()}.items()}


def _merge(n_a: np.ndarray, mean_a: np.ndarray, m2_a: np.ndarray, n_b: np.ndarray, mean_b: np.ndarray,
           m2_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chan et al. merge with counts broadcastable to the means ([C, 1] or [C, F])."""
    n = n_a + n_b
    safe = np.where(n > 0, n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * n_b / safe, m2_a + m2_b + delta**2 * n_a * n_b / safe


@dataclass
class FeatureStats:
    """Per-concept SAE-feature statistics over all samples and over firing samples only (float64, numpy)."""

    n: np.ndarray  # [C]
    mean: np.ndarray  # [C, F]
    m2: np.ndarray
    fire_n: np.ndarray  # [C, F]
    fire_mean: np.ndarray
    fire_m2: np.ndarray
    l0_sum: np.ndarray  # [C] sum over samples of active features
    label_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def empty(cls, c: int, f: int, names: Sequence[str], meta: dict[str, Any]) -> FeatureStats:
        z = np.zeros((c, f))
        return cls(np.zeros(c), z.copy(), z.copy(), z.copy(), z.copy(), z.copy(), np.zeros(c), list(names), meta)

    def update(self, p: dict[str, torch.Tensor]) -> None:
        n_b = p["n"].numpy()[:, None]
        n, self.mean, self.m2 = _merge(self.n[:, None], self.mean, self.m2, n_b, p["mean"].numpy(), p["m2"].numpy())
        self.n = n[:, 0]
        self.fire_n, self.fire_mean, self.fire_m2 = _merge(self.fire_n, self.fire_mean, self.fire_m2,
                                                           p["fn"].numpy(), p["fmean"].numpy(), p["fm2"].numpy())
        self.l0_sum = self.l0_sum + p["l0"].numpy()

    def fire_rate(self) -> np.ndarray:
        return self.fire_n / np.where(self.n > 0, self.n, 1.0)[:, None]

    def std(self, over: str = "firing") -> np.ndarray:
        if over == "firing":
            return np.sqrt(self.fire_m2 / np.where(self.fire_n > 0, self.fire_n, 1.0))
        return np.sqrt(self.m2 / np.where(self.n > 0, self.n, 1.0)[:, None])


def record_features(model: Any, site: Site, sae: JumpReLUSAE, prompts: Sequence[str], labels: np.ndarray,
                    label_names: Sequence[str], *, batch_size: int = 16, remote: bool | str = False,
                    progress: Progress | None = None) -> FeatureStats:
    """SAE feature statistics at the last token of every prompt, reduced inside the trace."""
    sae.check(site)
    labels = np.asarray(labels, dtype=np.int64)
    if len(prompts) != len(labels) or len(prompts) == 0:
        raise NsLensError(f"need matching, non-empty prompts and labels (got {len(prompts)} and {len(labels)})")
    c = len(label_names)
    st = FeatureStats.empty(c, sae.d_sae, label_names, {"model_id": model_id(model), **site.describe(),
                                                       "basis": "sae", "d_sae": sae.d_sae, **sae.meta})
    parts = batches(len(prompts), batch_size)
    for i, sl in enumerate(parts):
        enc = tokenize(model, prompts[sl])
        lab = torch.as_tensor(labels[sl])

        def run(enc: dict[str, torch.Tensor] = enc, lab: torch.Tensor = lab) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                with model.trace(enc, **trace_args(model, remote)) as tracer:
                    f = sae.encode(read_site(model, site)[:, -1, :])
                    part = _masked_partials(f, lab, c).save()
                    tracer.stop()
            return part

        part = maybe_retry(remote, run, what=f"record features batch {i}")
        if not bool(part["finite"]):
            raise NsLensError(f"non-finite SAE feature activations at {site.path} in batch {i}")
        st.update(part)
        if progress is not None:
            progress("record SAE features", i + 1, len(parts))
    return st


def check_feature_selection(min_fire: float, top: float) -> None:
    """``min_fire`` and ``top`` are shares in (0, 1]: checked with the configuration, before any model loads."""
    if not 0 < check_number("min_fire", min_fire) <= 1 or not 0 < check_number("top", top) <= 1:
        raise NsLensError(f"min_fire and top must be in (0, 1], got {min_fire} and {top}")


def select_features(st: FeatureStats, *, min_fire: float = 0.1, top: float = 0.2) -> list[np.ndarray]:
    """Per concept: candidates fire on >= ``min_fire`` of its samples; keep the top ``top`` of them by mean
    activation (over all the concept's samples), most active first."""
    check_feature_selection(min_fire, top)
    out = []
    rate = st.fire_rate()
    for c, name in enumerate(st.label_names):
        cand = np.flatnonzero(rate[c] >= min_fire)
        if len(cand) == 0:
            raise NsLensError(f"no SAE feature fires on >= {min_fire:.0%} of concept {name!r}'s samples")
        k = max(1, int(np.ceil(top * len(cand) - 1e-9)))
        order = np.argsort(-st.mean[c, cand], kind="stable")
        out.append(cand[order[:k]])
    return out


def build_feature_masks(st: FeatureStats, selection: Sequence[np.ndarray], *, tau: float = 2.5,
                        ranges_over: str = "firing") -> list[RangeMask]:
    """One RangeMask per concept whose ``neurons`` are SAE feature indices (``meta["basis"] == "sae"``)."""
    check_tau(tau)
    if ranges_over not in ("firing", "all"):
        raise NsLensError(f"unknown ranges_over {ranges_over!r}; choose firing or all")
    mean = st.fire_mean if ranges_over == "firing" else st.mean
    sd = st.std(ranges_over)
    d_sae = mean.shape[1]
    if len(selection) != len(st.label_names):  # a shorter selection gave fewer masks than concepts
        raise NsLensError(f"{len(selection)} feature selections for {len(st.label_names)} concepts; give one each")
    for c, idx in enumerate(selection):
        arr = np.asarray(idx)
        if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= d_sae):
            raise NsLensError(f"concept {st.label_names[c]!r}: feature indices must lie in [0, {d_sae - 1}], got "
                              f"{arr.reshape(-1)[:5].tolist()}")
    masks = []
    for c, idx in enumerate(selection):
        mu, sigma = mean[c, idx], sd[c, idx]
        md = {**st.meta, "tau": float(tau), "ranking": "sae-mean-activation", "concept": st.label_names[c],
              "concept_index": c, "samples_used": int(st.n[c]), "ranges_over": ranges_over}
        masks.append(RangeMask(torch.as_tensor(idx), mu - tau * sigma, mu + tau * sigma, mu, sigma, md))
    return masks


def feature_table31(st: FeatureStats, selection: Sequence[np.ndarray], min_fire: float = 0.1) -> dict[str, Any]:
    """Paper Table 31 per concept and averaged: features active per sample (mean L0), features active for the
    concept (fire on any sample), consistent (candidates, fire on >= min_fire), ablated (selected)."""
    rows = {}
    for c, name in enumerate(st.label_names):
        rows[name] = {"active_per_sample": float(st.l0_sum[c] / max(st.n[c], 1)),
                      "per_concept": int((st.fire_n[c] > 0).sum()),
                      "consistent": int((st.fire_rate()[c] >= min_fire).sum()),
                      "ablated": int(len(selection[c]))}
    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in next(iter(rows.values()))}
    return {"per_concept": rows, "mean": mean, "d_sae": int(st.mean.shape[1])}


def table31_markdown(t: dict[str, Any]) -> str:
    lines = ["| concept | active per sample | active for concept | consistent (>= 10 %) | ablated |",
             "|---|---|---|---|---|"]
    for name, r in [*t["per_concept"].items(), ("mean", t["mean"])]:
        lines.append(f"| {cell(name)} | {r['active_per_sample']:.1f} | {r['per_concept']:.0f} | {r['consistent']:.0f} | "
                     f"{r['ablated']:.0f} / {t['d_sae']} |")
    return "\n".join(lines) + "\n"


def save_sae_meta(path: Path, sae: JumpReLUSAE, t31: dict[str, Any]) -> None:
    """The SAE's identity and sizes with its Table 31, as JSON (written atomically)."""
    write_text(path, json.dumps({"sae": sae.meta, "d_in": sae.d_in, "d_sae": sae.d_sae, "table31": t31}, indent=2))


def build_synthetic_sae(samples: np.ndarray, d_sae: int = 256, fire_rate: float = 0.3, seed: int = 0) -> JumpReLUSAE:
    """A JumpReLU SAE for the embedded model, for offline tests of the Gemma Scope path: unit decoder directions,
    a tied encoder, and per-feature thresholds at the (1 - fire_rate) quantile of the pre-activations over
    ``samples`` (residual vectors at the site), so each feature fires on about ``fire_rate`` of them. Each
    threshold lies halfway between two neighbouring pre-activations, never on one: a sample exactly at its
    threshold would fire or not by float rounding (another batch size, another padding)."""
    rng = np.random.default_rng(seed)
    d = samples.shape[1]
    w_dec = rng.normal(size=(d_sae, d))
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    pre = np.sort(samples @ w_dec.T, axis=0)
    k = min(max(int(round((1.0 - fire_rate) * len(pre))), 1), len(pre) - 1)
    threshold = np.maximum((pre[k - 1] + pre[k]) / 2, 1e-3)
    return JumpReLUSAE(w_dec.T.copy(), np.zeros(d_sae), threshold, w_dec, np.zeros(d),
                       meta={"source": f"nslens.sae.build_synthetic_sae(d_sae={d_sae}, seed={seed})"})
