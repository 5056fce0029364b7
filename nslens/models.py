"""Model loading and the *site*: the residual-stream output of one decoder layer.

Everything nslens does to a model happens inside nnsight traces at a site, so the same code runs on a local,
a bitsandbytes-quantized or a remote (NDIF) model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .embedded import build_embedded_model, embedded_model_dir
from .errors import NsLensError
from .gguf import GGUF_ALIASES, find_gguf, gguf_checkpoint, gguf_n_layers
from .registry import Registry
from .remote import check_remote, is_public_host

__all__ = [
    "FAMILY_REGISTRY",
    "ModelFamily",
    "QUANTIZE_MODES",
    "family_of",
    "get_family",
    "register_family",
    "check_layer",
    "local_n_layers",
    "SUPPORTED_FAMILIES",
    "Site",
    "load_model",
    "model_family",
    "model_id",
    "model_fingerprint",
    "read_site",
    "resolve_site",
    "site_module",
    "submodule",
    "tokenizer_fingerprint",
    "write_site",
]

logger = logging.getLogger(__name__)



def submodule(model: Any, path: str) -> Any:
    """The submodule at dotted ``path`` (integers index lists) of ``model``: an nnsight Envoy inside a trace, or
    the Hugging Face module itself."""
    obj = model
    for piece in path.split("."):
        obj = obj[int(piece)] if piece.isdigit() else getattr(obj, piece)
    return obj


@dataclass(frozen=True)
class ModelFamily:
    """Where one decoder-only family (a transformers ``model_type``) keeps its parts: dotted paths from the
    nnsight model, which are also the paths in the Hugging Face ``...ForCausalLM`` it wraps.

    ``layers`` is the decoder-layer list (each layer's output is the residual stream after it: the site);
    ``embedding`` the token embedding (NeurGrad asks its output for gradients), ``final_norm`` and ``head`` the
    logit lens (LPI); ``mlp`` is the MLP's path inside a layer and ``pre_mlp_norm`` the norm whose input is the
    residual stream entering it. A gated MLP (``gated_mlp``: act_fn(gate) * up, then down_proj) has the NEG paper's
    neuron kinds (``mlp_down``/``mlp_up``/``mlp_act`` name its parts); ``norm_offset`` is 1 where the final RMSNorm
    scales by 1 + weight (Gemma) and 0 where by weight. ``layer_kind`` names the family's decoder-layer kind in
    ``nslens.lastpos.LAYER_KINDS`` (the last layer computed for the last position only, exact); None runs it in
    full."""

    model_type: str
    layers: str = "model.layers"
    embedding: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    mlp: str = "mlp"
    pre_mlp_norm: str = "post_attention_layernorm"
    gated_mlp: bool = True
    mlp_down: str = "down_proj"
    mlp_up: str = "up_proj"
    mlp_act: str = "act_fn"
    norm_offset: float = 0.0
    layer_kind: str | None = None

    def part(self, model: Any, path: str) -> Any:
        """The submodule at dotted ``path`` of ``model`` (``submodule``)."""
        return submodule(model, path)

    def layer_path(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def mlp_path(self, layer: int) -> str:
        return f"{self.layers}.{layer}.{self.mlp}"


FAMILY_REGISTRY: Registry[ModelFamily] = Registry("model family")


def register_family(family: ModelFamily, *, replace: bool = False) -> ModelFamily:
    """Make models of ``family.model_type`` loadable and traceable (sites, NeurGrad, LPI)."""
    if not isinstance(family, ModelFamily):
        raise NsLensError(f"register_family needs a ModelFamily, got {family!r}")
    FAMILY_REGISTRY.register(family.model_type, family, replace=replace)
    return family


def get_family(model_type: str) -> ModelFamily:
    """The layout of ``model_type`` (an error listing the supported families otherwise)."""
    if model_type not in FAMILY_REGISTRY:
        raise NsLensError(f"unknown model family {model_type!r}; supported: {', '.join(sorted(FAMILY_REGISTRY))}")
    return FAMILY_REGISTRY.get(model_type)


for _family in (*(ModelFamily(t, layer_kind="rope-prenorm") for t in ("llama", "mistral", "qwen2", "qwen3")),
                ModelFamily("gemma", norm_offset=1.0),
                ModelFamily("gemma2", pre_mlp_norm="pre_feedforward_layernorm", norm_offset=1.0),
                ModelFamily("gemma3_text", pre_mlp_norm="pre_feedforward_layernorm", norm_offset=1.0),
                ModelFamily("gpt2", layers="transformer.h", embedding="transformer.wte", final_norm="transformer.ln_f",
                            pre_mlp_norm="ln_2", gated_mlp=False, mlp_down="c_proj", mlp_up="c_fc",
                            mlp_act="act")):
    register_family(_family)


class _FamilyLayers(Mapping[str, str]):
    """model_type -> dotted path of the decoder-layer list, read from ``FAMILY_REGISTRY`` at each use."""

    def __getitem__(self, model_type: str) -> str:
        if model_type not in FAMILY_REGISTRY:
            raise KeyError(model_type)
        return FAMILY_REGISTRY.get(model_type).layers

    def __iter__(self) -> Iterator[str]:
        return iter(FAMILY_REGISTRY.names())

    def __len__(self) -> int:
        return len(FAMILY_REGISTRY)

    def __repr__(self) -> str:
        return repr(dict(self))


#: model_type -> dotted path of the decoder-layer list (derived from ``FAMILY_REGISTRY``). Each layer's output is
#: the residual stream after it.
SUPPORTED_FAMILIES: Mapping[str, str] = _FamilyLayers()
QUANTIZE_MODES = ("nf4", "int8")


@dataclass(frozen=True)
class Site:
    """Where nslens reads and edits: the output of decoder layer ``layer`` (0-based, already resolved)."""

    layer: int
    path: str
    n_layers: int
    d_model: int
    family: str

    def describe(self) -> dict[str, Any]:
        return {"layer": self.layer, "path": self.path, "n_layers": self.n_layers, "d_model": self.d_model,
                "family": self.family}


def _hf_config(model: Any) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise NsLensError("model has no `config`; pass an nnsight-wrapped Hugging Face causal LM")
    return _decoder_config(cfg)


def _decoder_config(cfg: Any) -> Any:
    if getattr(cfg, "model_type", None) not in SUPPORTED_FAMILIES and getattr(cfg, "text_config", None) is not None:
        return cfg.text_config  # multimodal wrappers (e.g. Gemma-3) keep the decoder config here
    return cfg


def _n_layers(cfg: Any) -> int:
    return int(getattr(cfg, "num_hidden_layers", None) or cfg.n_layer)


def check_layer(layer: Any, n_layers: int) -> int:
    """``layer`` as an index into ``n_layers`` decoder layers (negative counts from the end), or a one-line error."""
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise NsLensError(f"layer must be an integer, got {layer!r}")
    if not -n_layers <= layer < n_layers:
        raise NsLensError(f"layer {layer} out of range for a model with {n_layers} layers "
                         f"(valid: {-n_layers}..{n_layers - 1})")
    return layer % n_layers


def local_n_layers(name: str) -> int | None:
    """The depth of model ``name`` read from its config where that is local (the embedded model once built, a
    local directory, the hub cache), without loading the model; None when it is not."""
    from transformers import AutoConfig

    if name == "embedded":
        name = str(embedded_model_dir())
    try:
        n = gguf_n_layers(name)
    except ValueError:  # a missing package or a bad file: load_model says so
        return None
    if n is not None:
        return n
    try:
        return _n_layers(_decoder_config(AutoConfig.from_pretrained(name, local_files_only=True)))
    except Exception:  # not cached, not a model: the check after loading reports it
        return None


def model_family(model: Any) -> str:
    """The model_type, checked against the supported layouts."""
    cfg = _hf_config(model)
    family = getattr(cfg, "model_type", None)
    get_family(family)
    return family


def model_id(model: Any) -> str:
    """A stable name for artifacts: the hub id or local path the model was loaded from."""
    name = getattr(model, "_nslens_id", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    return str(name) or "in-memory"


def model_fingerprint(model: Any) -> str:
    """What cached per-model results depend on: the model id, its config and a checksum of (a sample of) its
    weights where they are local, so a retrained model with the same id never reads another's cache."""
    h = hashlib.sha256(model_id(model).encode())
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        h.update(cfg.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for p in list(model._module.parameters())[:: 7]:
            if p.device.type != "meta":
                h.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_token_ids(model: Any, ids: Any, what: str = "token id") -> torch.Tensor:
    """``ids`` as int64 token ids the model's logits have: -1 indexed the last token without a word, 1.5 was
    truncated, and one past the vocabulary failed inside a trace as an index error."""
    arr = np.asarray(ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids)
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise NsLensError(f"{what}s must be whole numbers, got {arr.dtype} values {arr.reshape(-1)[:3].tolist()}")
    t = torch.as_tensor(arr.astype(np.int64))
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    bad = t[(t < 0) | (t >= vocab)] if isinstance(vocab, int) else t[t < 0]
    if len(bad):
        size = f" of {vocab} tokens" if isinstance(vocab, int) else ""
        raise NsLensError(f"{what} {int(bad[0])} is outside the vocabulary{size}")
    return t


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the tokenizer's vocabulary: masks made with one tokenizer do not fit another's label tokens."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


def resolve_site(model: Any, layer: int = -1) -> Site:
    """The residual-stream site after decoder layer ``layer``; negative layers count from the end.

    The default, -1, is the last decoder block's output: the paper's "penultimate layer" is the layer before the
    output head (the authors mask block 27 of Llama-3.2-3B's 28, GPT-2's 12 of 12, and the Gemma Scope SAEs sit
    at layer 25 of Gemma-2-2B's 26)."""
    family = model_family(model)
    cfg = _hf_config(model)
    n_layers = _n_layers(cfg)
    d_model = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
    idx = check_layer(layer, n_layers)
    return Site(layer=idx, path=get_family(family).layer_path(idx), n_layers=n_layers, d_model=d_model,
                family=family)


def site_module(model: Any, site: Site) -> Any:
    """The nnsight Envoy of the site's decoder layer."""
    return submodule(model, site.path)


def family_of(site: Site) -> ModelFamily:
    """The layout of the site's model family."""
    return get_family(site.family)


def read_site(model: Any, site: Site) -> torch.Tensor:
    """Inside a trace: the hidden states ``[batch, seq, d_model]`` at the site.

    transformers 5 decoder layers return a tensor, 4.x a tuple whose first item is the hidden states; ``[0]``
    of a tensor would silently select batch row 0, so the type is checked.
    """
    out = site_module(model, site).output
    return out[0] if isinstance(out, tuple) else out


def write_site(model: Any, site: Site, value: torch.Tensor) -> None:
    """Inside a trace: replace the site's hidden states (keeping a tuple's other items)."""
    env = site_module(model, site)
    out = env.output
    env.output = (value, *out[1:]) if isinstance(out, tuple) else value


# --------------------------------------------------------------------------------------------- loading


def _prepare_tokenizer(tok: Any) -> Any:
    tok.padding_side = "left"  # the last position is every row's last real token
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise NsLensError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        tok.pad_token = tok.eos_token
    return tok


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise NsLensError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)}")
    return names[dtype]


def _quantization_config(quantize: str | None, dtype: torch.dtype | None) -> Any:
    if quantize is None:
        return None
    if quantize not in QUANTIZE_MODES:
        raise NsLensError(f"unknown quantize mode {quantize!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise NsLensError("quantize needs bitsandbytes: pip install 'nslens[quant]'") from e
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=dtype or torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def _check_nf4_on_cpu(hf: Any) -> None:
    """bitsandbytes packs 4-bit weights for the CPU in blocks of 32 output rows (and pairs of inputs) and asserts it
    only at the first forward; say so at load time, naming the layer."""
    import bitsandbytes as bnb

    for name, mod in hf.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit) and mod.weight.device.type == "cpu" \
                and (mod.out_features % 32 or mod.in_features % 2):
            raise NsLensError(f"nf4 on the CPU needs quantized layers whose output width is a multiple of 32 and input "
                             f"width even (bitsandbytes' CPU packing); {name} is {mod.in_features} -> "
                             f"{mod.out_features}. Use quantize='int8' or a GPU")


def load_model(
    name_or_path: Any,
    *,
    tokenizer: Any = None,
    dtype: Any = None,
    device_map: Any = None,
    quantize: str | None = None,
    remote: bool = False,
) -> Any:
    """Load a causal LM as an nnsight ``TransformersModel`` with its tokenizer passed explicitly.

    ``name_or_path`` is a hub id, a local directory, ``"embedded"`` (the offline default, built on first use), a
    GGUF model (a ``.gguf`` file, a folder holding one, ``pkg:<distribution>`` or an alias such as
    ``smollm2-135m``: dequantised once into a cache under ``$NSLENS_HOME/gguf``, see ``nslens.gguf``) or an
    already-built ``PreTrainedModel`` (then ``tokenizer`` is required). The tokenizer pads on the left and has a
    pad token. ``remote=True`` returns a meta model whose traces run on NDIF: a hub id on the public service; on a
    self-hosted NDIF (``NDIF_HOST``) whatever id it serves, a checkpoint path included.
    """
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    torch_dtype = _resolve_dtype(dtype)
    if isinstance(name_or_path, PreTrainedModel):
        if tokenizer is None:
            raise NsLensError("an in-memory model needs its tokenizer: load_model(model, tokenizer=tok)")
        if remote:
            raise NsLensError("remote=True needs a hub model id, not an in-memory model")
        model = TransformersModel(name_or_path, tokenizer=_prepare_tokenizer(tokenizer))
        model_family(model)
        return model

    name = str(name_or_path)
    if name == "embedded":
        name = str(build_embedded_model())
        label = "embedded"
    else:
        label = name
        if remote and (name in GGUF_ALIASES or name.startswith("pkg:") or name.endswith(".gguf")):
            raise NsLensError(f"remote=True needs a hub model id (e.g. meta-llama/Llama-3.1-70B), not the local "
                             f"GGUF model {name!r}")
        gguf_file = None if remote else find_gguf(name)
        if gguf_file is not None:
            name = str(gguf_checkpoint(gguf_file, families=SUPPORTED_FAMILIES))
    is_local = Path(name).exists()
    if remote:
        if is_local and is_public_host():
            raise NsLensError(f"remote=True needs a hub model id (e.g. meta-llama/Llama-3.1-70B), not the local path "
                             f"{name!r} (a self-hosted NDIF set with NDIF_HOST may serve checkpoint paths)")
        if quantize:
            raise NsLensError("quantize applies to local models; remote models run as NDIF hosts them")
        check_remote(name)
        if is_local:  # a self-hosted server serving a checkpoint by its path: its id is the path, no Hub lookup
            import nnsight.modeling.huggingface as nnsight_hf

            nnsight_hf._ID_CACHE.setdefault(name, name)
    if not is_local and not remote and "/" not in name:
        raise NsLensError(f"model {name!r} is neither a local directory, 'embedded', a GGUF model (a .gguf file, "
                         f"pkg:<distribution>, or an alias: {', '.join(GGUF_ALIASES)}) nor a hub id (org/name)")
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:  # not on the Hub, no network, a gated repo, a folder without one
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise NsLensError(f"could not load the model {name!r}: {first[:300]}") from e
    tok = tokenizer
    tok = _prepare_tokenizer(tok)
    if remote:
        model = TransformersModel(name, tokenizer=tok, task="text-generation")
    else:
        kwargs: dict[str, Any] = {}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        if device_map is not None:
            kwargs["device_map"] = device_map
        qcfg = _quantization_config(quantize, torch_dtype)
        if qcfg is not None:
            kwargs["quantization_config"] = qcfg
            kwargs.setdefault("device_map", "auto")
        hf = AutoModelForCausalLM.from_pretrained(name, **kwargs).eval()
        if quantize == "nf4":
            _check_nf4_on_cpu(hf)
        model = TransformersModel(hf, tokenizer=tok)
    model._nslens_id = label  # type: ignore[attr-defined]
    model_family(model)
    return model
