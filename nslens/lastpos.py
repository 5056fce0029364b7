"""Decoder layers computed at their last positions only: exact shortcuts for readouts of the last positions.

Two uses, both tensor code inside the trace (so they run remotely too):

- **The last layer at the kept positions** (``last_positions``). A readout of the last ``keep`` positions (the
  erasure table's predictions and the label readouts read the last one; lm-eval's log-likelihoods read the
  continuation's) needs the last layer's keys and values at every position, since those queries attend to all
  earlier positions, but its queries, attention output, MLP and residual at the kept positions only. With one
  kept position the last layer then costs its key and value projections: about a sixth of a Llama layer at
  d_model 512 without grouped-query attention, less with it. At the penultimate block the replay of the layers
  above the site (``nslens.replay``) is exactly this one layer.
- **Every layer above a site at the last position** (``upper_layers``), for an edit of the last position alone
  (``positions="last"``, the paper's setting). Causal attention keeps every earlier position clean at every layer
  above the site, so the clean pass keeps those layers' keys and values and each replay computes one position per
  layer: about 1/seq of a full replay. The clean pass runs the last layer at the kept positions there too, and its
  keys and values come from that computation.

One small class per decoder-layer kind holds the tensor code (``LAYER_KINDS``). A family names its kind in
``ModelFamily.layer_kind``; a family without one runs every layer in full. The code reads what the model hands
each layer (hidden states, rotary cos/sin, the attention mask as the model built it) and replaces the layers'
outputs with ``Envoy.skip``. Positions that no readout reads keep their input there: only the final norm reads
them, and the LM head computes the kept positions only (``logits_to_keep``). The results equal the full layers up
to float rounding (tested against plain forwards and hooks, under ``remote="local"`` and on a real NDIF server).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .models import Site, get_family, submodule
from .registry import Registry

__all__ = ["LAYER_KINDS", "LastPositions", "LayerKind", "RopePreNormLayer", "UpperLayers", "last_positions",
           "upper_layers"]


class LayerKind:
    """One kind of decoder layer computed at its last positions only (inside a trace)."""

    name: str = ""

    def supports(self, model: Any, path: str, layer: int, seq: int) -> dict[str, Any] | None:
        """The settings ``last_output`` needs (plain Python values, read on the client), or None where the shortcut
        would not be exact for this model and ``seq`` positions (then the layer runs in full)."""
        raise NotImplementedError

    def last_output(self, layer: Any, hidden: torch.Tensor, kwargs: dict[str, Any], settings: dict[str, Any],
                    keep: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Inside a trace: the layer's output ``[batch, keep, d_model]`` at the last ``keep`` positions, from its
        input ``hidden`` ``[batch, seq, d_model]`` and the keyword arguments the model passed it, and its keys and
        values at every position as ``keys_values`` gives them (computed on the way: the clean pass of a
        one-position replay keeps them, ``UpperLayers.record``)."""
        raise NotImplementedError

    def keys_values(self, layer: Any, kwargs: dict[str, Any], settings: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """Inside a trace, while the layer runs in full: its keys and values ``[batch, kv_heads, seq, head_dim]``
        as its attention uses them (read from its projections' outputs), for ``step``."""
        raise NotImplementedError

    def step(self, layer: Any, x: torch.Tensor, past: tuple[torch.Tensor, ...], kwargs: dict[str, Any],
             settings: dict[str, Any], tiles: int) -> torch.Tensor:
        """Inside a trace: the layer's output ``[tiles * batch, 1, d_model]`` for new last positions ``x``
        ``[tiles * batch, 1, d_model]`` (``tiles`` differently edited copies of one batch) whose earlier
        positions' keys and values ``past`` (from ``keys_values``, without the last position) the copies share;
        ``kwargs`` hold the last position's rotary cos/sin and mask row."""
        raise NotImplementedError


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _query_mask(mask: Any, hidden: torch.Tensor, keep: int) -> Any:
    """The attention mask rows of the last ``keep`` queries, in a form ``scaled_dot_product_attention`` takes:
    the model's 4-d mask (boolean "may attend" or additive float; causal and padding) sliced to those rows; else
    the causal rows (None for the last query alone, which may attend to every position) and a 2-d padding mask."""
    if mask is not None and mask.dim() == 4:
        return mask[:, :, -keep:, :]
    batch, seq = hidden.shape[:2]
    causal = torch.ones(keep, seq, dtype=torch.bool, device=hidden.device).tril(diagonal=seq - keep)
    if mask is None:
        return None if keep == 1 else causal
    return mask.bool().view(batch, 1, 1, seq) & causal


class RopePreNormLayer(LayerKind):
    """Llama, Mistral, Qwen2 and Qwen3 decoder layers: ``x + attn(input_layernorm(x))``, then
    ``+ mlp(post_attention_layernorm(.))``; rotary queries and keys (Qwen3: an RMSNorm on each head's query and
    key first), grouped-query attention scaled by ``head_dim ** -0.5``."""

    name = "rope-prenorm"

    def supports(self, model: Any, path: str, layer: int, seq: int) -> dict[str, Any] | None:
        cfg = model.config
        if getattr(cfg, "_attn_implementation", "eager") not in ("eager", "sdpa"):
            return None  # other kernels (flash) take other mask formats: the layer runs in full
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        windowed = window is not None and (types is None or types[layer] == "sliding_attention")
        if windowed and seq > window:
            return None  # a query sees only its window: not written out here
        module = submodule(model, path)
        module = getattr(module, "_module", module)  # the torch module behind an nnsight Envoy
        attn = getattr(module, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) or not all(
                hasattr(module, p) for p in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return None
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return {"heads": heads, "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
                "head_dim": head_dim, "scaling": head_dim ** -0.5,
                "qk_norm": hasattr(attn, "q_norm") and hasattr(attn, "k_norm")}

    def last_output(self, layer: Any, hidden: torch.Tensor, kwargs: dict[str, Any], settings: dict[str, Any],
                    keep: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        cos, sin = kwargs["position_embeddings"]
        k, v = self._keys_values(attn, attn.k_proj(normed), attn.v_proj(normed), cos, sin, settings)
        q = self._queries(attn, normed[:, -keep:], cos[:, -keep:], sin[:, -keep:], settings)
        out = self._finish(layer, hidden[:, -keep:], q, k, v, _query_mask(kwargs.get("attention_mask"), hidden, keep),
                           settings)
        return out, (k, v)

    def keys_values(self, layer: Any, kwargs: dict[str, Any], settings: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        attn = layer.self_attn
        cos, sin = kwargs["position_embeddings"]
        return self._keys_values(attn, attn.k_proj.output, attn.v_proj.output, cos, sin, settings)

    def step(self, layer: Any, x: torch.Tensor, past: tuple[torch.Tensor, ...], kwargs: dict[str, Any],
             settings: dict[str, Any], tiles: int) -> torch.Tensor:
        attn = layer.self_attn
        normed = layer.input_layernorm(x)
        cos, sin = kwargs["position_embeddings"]
        k1, v1 = self._keys_values(attn, attn.k_proj(normed), attn.v_proj(normed), cos, sin, settings)
        q = self._queries(attn, normed, cos, sin, settings)
        # one query per row over the shared past and its own new key: the copies broadcast over the past (no
        # copy of it per tile); query head h reads key head h // groups, as the model's repeated keys do
        keys, values = past
        batch, kvh, _, hd = keys.shape
        groups = settings["heads"] // kvh
        q = q.reshape(tiles, batch, kvh, groups, hd)
        k1, v1 = k1.reshape(tiles, batch, kvh, 1, hd), v1.reshape(tiles, batch, kvh, 1, hd)
        scores = torch.cat([torch.einsum("tbkgd,bknd->tbkgn", q, keys), (q * k1).sum(-1, keepdim=True)], dim=-1)
        scores = scores.float() * settings["scaling"]
        mask = kwargs.get("attention_mask")
        if mask is not None:  # the last position's mask row [batch | 1, 1, 1, seq]
            mask = mask.reshape(1, mask.shape[0], 1, 1, mask.shape[-1])
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        p = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.einsum("tbkgn,bknd->tbkgd", p[..., :-1], values) + p[..., -1:] * v1
        out = out.reshape(tiles * batch, 1, -1)
        resid = x + attn.o_proj(out)
        return resid + layer.mlp(layer.post_attention_layernorm(resid))

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of ``x`` ``[batch, heads, n, head_dim]`` at cos/sin ``[batch | 1, n, head_dim]``."""
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return x * cos + _rotate_half(x) * sin

    def _queries(self, attn: Any, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 settings: dict[str, Any]) -> torch.Tensor:
        batch, n, _ = normed.shape
        q = attn.q_proj(normed).view(batch, n, settings["heads"], settings["head_dim"])
        if settings["qk_norm"]:
            q = attn.q_norm(q)
        return self._rope(q.transpose(1, 2), cos, sin)

    def _keys_values(self, attn: Any, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     settings: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (normed where the family norms them, rotated) and values, ``[batch, kv_heads, n, head_dim]``, from
        the key and value projections' outputs ``[batch, n, kv_heads * head_dim]``."""
        batch, n, _ = k.shape
        shape = (batch, n, settings["kv_heads"], settings["head_dim"])
        k = k.view(shape)
        if settings["qk_norm"]:
            k = attn.k_norm(k)
        return self._rope(k.transpose(1, 2), cos, sin), v.view(shape).transpose(1, 2)

    def _finish(self, layer: Any, resid: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: Any, settings: dict[str, Any]) -> torch.Tensor:
        """Attention of queries ``q`` over ``k``/``v`` (grouped heads repeated), the output projection, then the
        residual and the MLP: the layer's output at the queries' positions (``resid`` is its input there)."""
        batch, _, n, _ = q.shape
        groups = settings["heads"] // settings["kv_heads"]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=settings["scaling"])
        resid = resid + layer.self_attn.o_proj(out.transpose(1, 2).reshape(batch, n, -1))
        return resid + layer.mlp(layer.post_attention_layernorm(resid))


#: layer kind -> its last-positions computation (``ModelFamily.layer_kind`` names one)
LAYER_KINDS: Registry[LayerKind] = Registry("last-layer kind")
LAYER_KINDS.register(RopePreNormLayer.name, RopePreNormLayer())


@dataclass(frozen=True)
class LastPositions:
    """The shortcut for one model, sequence length and number of kept positions: which layer, its kind, the
    settings it reads."""

    path: str
    kind: str
    settings: dict[str, Any]
    keep: int

    def apply(self, model: Any, inputs: tuple[torch.Tensor, dict[str, Any]] | None = None) -> tuple[torch.Tensor, ...]:
        """Inside a trace, before the last layer runs: compute its kept positions from its inputs (read here, or
        ``inputs`` = (hidden states, keyword arguments) already read from it) and skip it. Returns its keys and
        values at every position."""
        layer = submodule(model, self.path)
        if inputs is None:
            args, kwargs = layer.inputs
            hidden = args[0] if args else kwargs["hidden_states"]
        else:
            hidden, kwargs = inputs
        last, keys_values = LAYER_KINDS.get(self.kind).last_output(layer, hidden, kwargs, self.settings, self.keep)
        value = torch.cat([hidden[:, :-self.keep], last], dim=1)
        layer.skip(value)  # transformers 5 decoder layers return the tensor itself
        return keys_values


#: the last layer at the kept positions only where they are at most this part of the sequence: near all of it the
#: saving is small and the explicit causal mask of several queries is slower than the model's own attention
MAX_KEPT_FRACTION = 0.5


def last_positions(model: Any, site: Site, seq: int, keep: int) -> LastPositions | None:
    """The shortcut for a readout of the last ``keep`` of ``seq`` positions that runs the layers above ``site``,
    or None where it does not apply: too little is saved (``keep`` is 0, meaning all, or more than
    ``MAX_KEPT_FRACTION`` of the positions), the
    site is the last layer (nothing runs above it), the family names no kind, or the kind says the model is not one
    it computes exactly."""
    last = site.n_layers - 1
    kind = get_family(site.family).layer_kind
    if not 0 < keep <= seq * MAX_KEPT_FRACTION or site.layer >= last or kind is None:
        return None
    path = f"{site.path.rsplit('.', 1)[0]}.{last}"  # the site's own layer list (a wrapper may nest it)
    settings = LAYER_KINDS.get(kind).supports(model, path, last, seq)
    return None if settings is None else LastPositions(path, kind, settings, keep)


def _tile(t: Any, tiles: int) -> Any:
    """``tiles`` copies of ``t`` along the batch (a batch of one broadcasts and stays as it is)."""
    if t is None or tiles == 1 or t.shape[0] == 1:
        return t
    return t.repeat(tiles, *([1] * (t.dim() - 1)))


@dataclass(frozen=True)
class UpperLayers:
    """The layers above a site at the last position only, from the clean pass's keys and values: the exact replay
    of an edit of the last position alone (``positions="last"``). Causal attention keeps every earlier position
    clean at every layer above, so each layer needs its clean keys and values there and computes one position."""

    paths: tuple[str, ...]
    kind: str
    settings: tuple[dict[str, Any], ...]

    def record(self, model: Any, last_layer: LastPositions | None = None) -> dict[str, Any]:
        """Inside the clean pass, while the layers above the site run: what ``replay`` needs (the last position's
        rotary cos/sin and mask row, each layer's keys and values without the last position). With
        ``last_layer`` the last layer runs at the kept positions only (``LastPositions.apply``), and its keys and
        values come from there."""
        impl = LAYER_KINDS.get(self.kind)
        args, kwargs = submodule(model, self.paths[0]).inputs
        hidden = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        last = {"position_embeddings": (cos[:, -1:], sin[:, -1:]),
                "attention_mask": _query_mask(kwargs.get("attention_mask"), hidden, 1)}
        past = []
        for path, settings in zip(self.paths, self.settings):
            if last_layer is not None and path == last_layer.path:  # the first layer's inputs are read once
                k, v = last_layer.apply(model, (hidden, kwargs) if path == self.paths[0] else None)
            else:
                k, v = impl.keys_values(submodule(model, path), kwargs, settings)
            past.append((k[:, :, :-1], v[:, :, :-1]))
        return {"last": last, "past": past}

    def replay(self, model: Any, x: torch.Tensor, state: dict[str, Any], tiles: int) -> torch.Tensor:
        """Inside a trace: the last layer's output ``[tiles * batch, 1, d_model]`` for the edited site value at the
        last position ``x`` (``tiles`` copies of the clean batch, edited differently)."""
        impl = LAYER_KINDS.get(self.kind)
        cos, sin = state["last"]["position_embeddings"]
        kwargs = {"position_embeddings": (_tile(cos, tiles), _tile(sin, tiles)),
                  "attention_mask": state["last"]["attention_mask"]}
        for path, settings, past in zip(self.paths, self.settings, state["past"]):
            x = impl.step(submodule(model, path), x, past, kwargs, settings, tiles)
        return x


def upper_layers(model: Any, site: Site, seq: int) -> UpperLayers | None:
    """The last-position replay of the layers above ``site`` for ``seq`` positions, or None where it does not
    apply: the site is the last layer (nothing runs above it), the family names no kind, or the kind says some
    layer above is not one it computes exactly."""
    kind = get_family(site.family).layer_kind
    if site.layer >= site.n_layers - 1 or kind is None or seq < 2:
        return None
    prefix = site.path.rsplit(".", 1)[0]
    paths = tuple(f"{prefix}.{i}" for i in range(site.layer + 1, site.n_layers))
    impl = LAYER_KINDS.get(kind)
    settings = [impl.supports(model, p, site.layer + 1 + j, seq) for j, p in enumerate(paths)]
    return None if any(s is None for s in settings) else UpperLayers(paths, kind, tuple(settings))
