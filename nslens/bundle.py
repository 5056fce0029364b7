"""Shareable intervention bundles: one directory that says exactly how to edit a model, for a colleague, another
machine or lm-eval.

A bundle is ``manifest.json`` (versioned, ``nslens.bundle/1``) plus ``tensors.safetensors``. The manifest names,
for each intervention in order: the concept, gated or not, the positions, the mask's metadata, and the operator by
its registry name with its scalar parameters; every tensor (the mask's neurons, bounds, mu and sigma; an
operator's steering vector, replacement values or LEACE eraser) lives in the safetensors file under
``iv<i>.mask.<name>`` / ``iv<i>.op.<field>``. It also records the site (layer, path, d_model, n_layers, family),
the model's id and fingerprints (``model_fingerprint``: id, config and a weight checksum; a config-only one for
models without local weights, e.g. on NDIF) and the tokenizer's, the dataset's concepts, and the intervention
fingerprint, which loading recomputes to prove the tensors were read back exactly.

Loading against a model refuses a mismatch in one line (another model, tokenizer or site shape), unless
``allow_other_model`` (a fine-tuned copy: the site's shape must still agree). Any registered operator class with
tensor, number, string or boolean fields round-trips (``nslens.ops.OPERATOR_REGISTRY``); SAE-basis interventions
are not bundled (their SAE comes from its own release).

``export_lm_eval_steering`` writes the part of a bundle that lm-eval's own ``steered`` model can express:
ungated additive steering at every position (``Steer`` interventions, the vector zero outside the mask's
neurons), as its ``.pt`` steering file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import NsLensError
from .files import atomic_path, is_leftover, write_text
from .intervene import Intervention, intervention_fingerprint
from .models import Site, model_fingerprint, model_id, resolve_site, tokenizer_fingerprint
from .ops import OPERATOR_REGISTRY, Operator, Steer
from .ranges import RangeMask

__all__ = ["BUNDLE_FORMAT", "Bundle", "check_bundle_dir", "export_lm_eval_steering", "load_bundle", "save_bundle"]

BUNDLE_FORMAT = "nslens.bundle/1"
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
_MASK_TENSORS = ("neurons", "lo", "hi", "mu", "sigma")


def config_fingerprint(model: Any) -> str:
    """The model's config alone (no id, no weights): what a remote model (no local weights) can be checked by."""
    cfg = getattr(model, "config", None)
    text = cfg.to_json_string(use_diff=False) if cfg is not None and hasattr(cfg, "to_json_string") else ""
    drop = {"_name_or_path", "transformers_version", "name_or_path"}
    data = {k: v for k, v in json.loads(text or "{}").items() if k not in drop}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _has_local_weights(model: Any) -> bool:
    return any(p.device.type != "meta" for p in model._module.parameters())


@dataclass
class Bundle:
    """What ``load_bundle`` returns: the interventions (ready for ``erasure_table``, ``side_effects``,
    ``generate`` ...), the site they edit, and the manifest they came from."""

    interventions: list[Intervention]
    layer: int
    manifest: dict[str, Any] = field(repr=False)
    source: str = "bundle"  # how messages name it: "bundle <path>"

    @property
    def concepts(self) -> list[str]:
        return list(self.manifest.get("concepts") or [])

    def site(self, model: Any) -> Site:
        """The bundle's site on ``model`` (the layer it was made at)."""
        return resolve_site(model, self.layer)

    def check_fits(self, model: Any, *, allow_other_model: bool = False) -> None:
        """Refuse ``model`` if the bundle was made for another model (weights or config fingerprint; a fine-tuned
        copy with ``allow_other_model``), tokenizer, width or depth."""
        _check_model(self.manifest, model, self.source, allow_other_model)
        site = self.manifest.get("site") or {}
        here = resolve_site(model, self.layer).describe()
        diffs = [f"{k}: bundle has {site.get(k)!r}, model has {here[k]!r}" for k in ("d_model", "n_layers")
                 if site.get(k) != here[k]]
        if diffs:
            raise NsLensError(f"{self.source} does not fit this model: " + "; ".join(diffs))


def _operator_entry(i: int, op: Operator, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    name = getattr(op, "name", "")
    if not name or name not in OPERATOR_REGISTRY or OPERATOR_REGISTRY.get(name) is not type(op):
        raise NsLensError(f"operator {type(op).__name__} is not registered under its name {name!r}: register it "
                          "(nslens.ops.register_operator) so a bundle can name it")
    params: dict[str, Any] = {}
    for f in dataclasses.fields(op):
        value = getattr(op, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f"iv{i}.op.{f.name}"] = value.detach().cpu().clone().contiguous()
            params[f.name] = {"tensor": f"iv{i}.op.{f.name}"}
        elif value is None or isinstance(value, (bool, int, float, str)):
            params[f.name] = value
        else:
            raise NsLensError(f"operator {name} field {f.name} is a {type(value).__name__}; a bundle stores tensors, "
                              "numbers, strings and booleans")
    return {"name": name, "params": params}


def check_bundle_dir(path: str | Path) -> None:
    """A bundle is written into a new or empty directory, or over an earlier bundle: its two files among other
    files (``bundle --out`` given the masks' own directory) made that directory unreadable as masks, since
    ``tensors.safetensors`` is not a range mask."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NsLensError(f"bundle path {out} exists and is not a directory")
    others = sorted(p.name for p in out.iterdir() if p.name not in (MANIFEST, TENSORS) and not is_leftover(p)) \
        if out.is_dir() else []
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise NsLensError(f"bundle directory {out} holds other files ({shown}); write the bundle to a new or empty "
                          "directory")


def save_bundle(path: str | Path, model: Any, site: Site,
                interventions: Intervention | Sequence[Intervention], *,
                concepts: Sequence[str] | None = None, dataset: str | None = None,
                description: str = "") -> Path:
    """Write ``interventions`` (applied in order at ``site`` of ``model``) as a bundle directory at ``path``.

    Both files are written atomically, manifest last, so a reader never sees a manifest without its tensors."""
    ivs = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    if not ivs:
        raise NsLensError("a bundle needs at least one intervention")
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for i, iv in enumerate(ivs):
        if iv.sae is not None:
            raise NsLensError("SAE-feature interventions are not bundled: share the SAE release and id with the "
                              "feature masks instead")
        for name in _MASK_TENSORS:
            tensors[f"iv{i}.mask.{name}"] = getattr(iv.mask, name).detach().cpu().clone().contiguous()
        entries.append({"concept": iv.mask.concept, "gated": iv.gated, "positions": iv.positions,
                        "kind": iv.kind, "mask_meta": iv.mask.meta, "operator": _operator_entry(i, iv.operator, tensors)})
    local = _has_local_weights(model)
    manifest = {
        "format": BUNDLE_FORMAT, "nslens_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "description": description,
        "model": {"id": model_id(model), "fingerprint": model_fingerprint(model) if local else None,
                  "config_fingerprint": config_fingerprint(model)},
        "tokenizer": {"fingerprint": tokenizer_fingerprint(model.tokenizer)},
        "site": site.describe(), "dataset": dataset,
        "concepts": list(concepts) if concepts is not None else [iv.mask.concept for iv in ivs],
        "interventions": entries, "intervention_fingerprint": intervention_fingerprint(ivs),
    }

    out = Path(path)
    check_bundle_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / TENSORS) as tmp:
        save_file(tensors, tmp, metadata={"format": BUNDLE_FORMAT})
    write_text(out / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
    return out


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not (path / MANIFEST).is_file():
        raise NsLensError(f"not an nslens bundle: {path / MANIFEST} not found")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NsLensError(f"cannot read bundle manifest {path / MANIFEST}: {e}") from e
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != BUNDLE_FORMAT:
        raise NsLensError(f"{path} is bundle format {fmt!r}; this nslens reads {BUNDLE_FORMAT}")
    damaged = [k for k, kind in (("model", dict), ("site", dict), ("interventions", list))
               if not isinstance(manifest.get(k), kind)]
    if damaged:
        raise NsLensError(f"bundle manifest {path / MANIFEST} is incomplete: {', '.join(damaged)} missing or damaged")
    try:
        with safe_open(str(path / TENSORS), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a missing or corrupt file
        raise NsLensError(f"cannot read bundle tensors {path / TENSORS}: {e}") from e
    return manifest, tensors


def _check_model(manifest: dict[str, Any], model: Any, source: str, allow_other_model: bool) -> None:
    made = manifest["model"]
    if not allow_other_model:
        if made.get("fingerprint") and _has_local_weights(model):
            ok, what = made["fingerprint"] == model_fingerprint(model), "weights"
        else:
            ok, what = made.get("config_fingerprint") == config_fingerprint(model), "config"
        if not ok:
            raise NsLensError(f"{source} was made for model {made.get('id')!r}; {model_id(model)!r} differs in its "
                              f"{what} (pass allow_other_model=True / --allow-other-model for a fine-tuned copy)")
    tok = manifest.get("tokenizer", {}).get("fingerprint")
    if tok and tok != tokenizer_fingerprint(model.tokenizer):
        raise NsLensError(f"{source} was made with another tokenizer than {model_id(model)!r}'s")


def load_bundle(path: str | Path, model: Any = None, *, allow_other_model: bool = False) -> Bundle:
    """Read a bundle; with ``model``, refuse one made for another model, tokenizer or site shape (one line).
    Without it the files are still checked in full, so a command can refuse a bad bundle before it loads the
    model and call ``Bundle.check_fits`` once it has."""
    path = Path(path)
    manifest, tensors = _read(path)
    source = f"bundle {path}"
    ivs = []
    try:
        for i, e in enumerate(manifest["interventions"]):
            mask = RangeMask(**{n: tensors[f"iv{i}.mask.{n}"] for n in _MASK_TENSORS}, meta=dict(e["mask_meta"]))
            op_cls = OPERATOR_REGISTRY.get(e["operator"]["name"])
            params = {k: tensors[v["tensor"]] if isinstance(v, dict) else v
                      for k, v in e["operator"]["params"].items()}
            ivs.append(Intervention(mask, op_cls(**params), gated=bool(e["gated"]), positions=e["positions"]))
    except KeyError as err:
        raise NsLensError(f"{source} is incomplete: {err} missing") from err
    if intervention_fingerprint(ivs) != manifest.get("intervention_fingerprint"):
        raise NsLensError(f"{source} does not read back as written (its intervention fingerprint differs)")
    bundle = Bundle(ivs, int((manifest.get("site") or {}).get("layer", -1)), manifest, source)
    if model is not None:
        bundle.check_fits(model, allow_other_model=allow_other_model)
    return bundle


def export_lm_eval_steering(bundle: Bundle | str | Path, out: str | Path) -> Path:
    """Write lm-eval's ``steered`` model file (``.pt``) for the bundle's ungated, all-position ``Steer``
    interventions: one hookpoint (``layers.<layer>`` of the decoder) with ``action="add"`` and the summed vectors,
    each zero outside its mask's neurons (what ``Steer`` adds). Anything else (gated edits, masking, LEACE, last
    position only) lm-eval's file cannot express, and is refused."""
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    site = b.manifest["site"]
    width = site.get("d_model")
    if not isinstance(width, int) or not isinstance(site.get("path"), str):
        raise NsLensError(f"bundle manifest {MANIFEST} names no site width and path (site.d_model, site.path): "
                          "write the bundle again")
    total = torch.zeros(width, dtype=torch.float32)
    for iv in b.interventions:
        if not isinstance(iv.operator, Steer) or iv.gated or iv.positions != "all":
            raise NsLensError(f"lm-eval's steered model adds a vector at every position; {iv.mask.concept}'s "
                              f"{iv.kind} {iv.operator.label} ({'gated' if iv.gated else 'ungated'}, positions "
                              f"{iv.positions}) cannot be exported")
        idx = iv.mask.neurons
        total[idx] += iv.operator.alpha * iv.operator.vector[idx]
    # lm-eval names hookpoints inside the HF model's base model (``model.layers.3`` -> ``layers.3``)
    path_parts = str(site["path"]).split(".")
    hookpoint = ".".join(path_parts[1:] if path_parts[0] in ("model", "transformer") else path_parts)
    out = Path(out)
    if out.suffix not in (".pt", ".pth"):
        raise NsLensError(f"lm-eval reads steering files ending in .pt or .pth, got {out.name}")
    config = {hookpoint: {"steering_vector": total, "steering_coefficient": 1.0, "action": "add", "bias": None,
                          "head_index": None}}
    with atomic_path(out) as tmp:
        torch.save(config, tmp)
    return out
