"""Many interventions per forward pass: compute the layers up to the site once, replay only the layers above it.

Every evaluation that compares interventions at one site (the erasure table, lm-eval side effects) needs the
same forward for each of them up to the site. ``replay_batch`` runs it once (the *clean pass*, which keeps the
site's value), then, for each chunk of interventions, tiles the batch, writes every intervention's edit of the
cached value into its tile and lets ``Envoy.skip`` hand that value out in place of the site layer and the layers
below it, so only the layers above the site run. What each pass returns is decided by a *readout*: a module-level
function ``readout(model, *args, tiles=k, offset=o)`` called inside the trace that reduces ``model.output`` to small
tensors (``tiles`` = how many copies of the batch the pass holds, ``offset`` = the first position whose logits were
computed). Remotely the clean pass and the replays of one batch form one nnsight session: one request, and the
cached site value never leaves the server.

With ``logits_to_keep`` set, both passes compute the last decoder layer at the kept positions only
(``nslens.lastpos``): its keys and values at every position, the rest at those. Interventions that edit the last
position alone (``positions="last"``) with a readout of the last position replay one position per layer: the
clean pass keeps the keys and values of the layers above the site, and every earlier position stays clean there.

On a CPU a chunk's tiles run in passes of at most ``CPU_PASS_BYTES`` of the widest activation (``pass_tiles``):
past a few MiB each large temporary is a fresh page-faulted allocation, and a long-document batch of lm-eval
tiled 8 times ran its replayed layers a third slower per row than 8 passes of one tile did.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import NsLensError
from .intervene import Intervention, edit_hidden
from .lastpos import last_positions, upper_layers
from .models import Site, read_site, site_module
from .remote import trace_args

__all__ = ["CPU_PASS_BYTES", "Chunk", "chunked", "layer_envoy", "pass_tiles", "replay_batch", "returned_bytes"]

#: interventions that share one forward: (index in the caller's list, intervention or sequence applied in order)
Chunk = list[tuple[int, Any]]

#: on a CPU, the largest widest-activation size of one replay pass: positions x element size x the wider of the MLP
#: width and 4 x d_model (a floor for narrow MLPs, and the width where a config names none). The allocator hands
#: out larger temporaries as fresh zeroed pages on every call (glibc's mmap threshold is at most 32 MiB), which
#: made the side-effect table at the second-to-last block cost 24 s in 8-tile passes against 16 s in 1-tile passes
#: (benchmarks/bench_side_effects.py's model and tasks). Results do not depend on it.
CPU_PASS_BYTES = 8 << 20


def chunked(interventions: Sequence[Intervention | Sequence[Intervention] | None], per_pass: int) -> list[Chunk]:
    """The non-clean interventions, ``per_pass`` to a forward (``None`` entries mean the clean model)."""
    if per_pass < 1:
        raise NsLensError(f"per_pass must be >= 1, got {per_pass}")
    edits = [(i, iv) for i, iv in enumerate(interventions) if iv is not None]
    return [edits[j:j + per_pass] for j in range(0, len(edits), per_pass)]


def layer_envoy(model: Any, site: Site, i: int) -> Any:
    """The envoy of decoder layer ``i`` (same module list as the site's layer)."""
    prefix = site.path.rsplit(".", 1)[0]
    return site_module(model, Site(i, f"{prefix}.{i}", site.n_layers, site.d_model, site.family))


def pass_tiles(model: Any, site: Site, rows: int, positions: int) -> int | None:
    """The most tiles of a ``rows`` x ``positions`` batch one local replay pass holds (``CPU_PASS_BYTES``), or
    None for no bound: a model off the CPU (on a GPU larger passes are faster), or a site at the last layer (its
    replays run no decoder layer, only the final norm and the head). At least 1."""
    module = getattr(model, "_module", model)
    param = next(iter(module.parameters()), None)
    if param is None or param.device.type != "cpu" or site.layer >= site.n_layers - 1:
        return None
    cfg = getattr(model, "config", None)
    width = max(int(getattr(cfg, "intermediate_size", 0) or 0), 4 * int(getattr(cfg, "hidden_size", 0) or 0), 1)
    one = rows * positions * width * param.element_size()
    return max(1, CPU_PASS_BYTES // max(one, 1))


def _edit_all(h: torch.Tensor, ivs: Any, ends: torch.Tensor | None = None) -> torch.Tensor:
    for one in [ivs] if isinstance(ivs, Intervention) else list(ivs):
        h = edit_hidden(h, one, ends)
    return h


def _last_only(ivs: Any) -> bool:
    """Every edit of ``ivs`` changes the last position only (an SAE edit rewrites every position up to rounding)."""
    items = [ivs] if isinstance(ivs, Intervention) else list(ivs)
    return bool(items) and all(iv.positions == "last" and iv.sae is None for iv in items)


def _traces(model: Any, site: Site, enc: dict[str, torch.Tensor], chunks: list[Chunk], readout: Callable,
            args: tuple, logits_to_keep: int, clean_readout: bool, in_session: bool,
            ends: torch.Tensor | None) -> tuple[Any, list]:
    import nnsight  # heavy (seconds): the modules that import this one load without it

    clean = None  # assigned before the trace: a local first set in a stopped trace is not handed back
    seq = enc["input_ids"].shape[1]
    keep = logits_to_keep if 0 < logits_to_keep < seq else 0
    offset = seq - keep if keep else 0
    # the last layer computes the kept positions only (its keys and values for all): nslens.lastpos
    last = last_positions(model, site, seq, keep)
    # edits of the last position alone replay one position per layer from the clean keys and values (where that
    # position is the last column: not in a right-padded batch, whose rows end where ``ends`` says; edits of every
    # position never take this path, so ``ends`` changes nothing for them)
    upper = upper_layers(model, site, seq) if keep == 1 and ends is None and any(
        _last_only(ivs) for c in chunks for _, ivs in c) else None
    with model.trace(enc, logits_to_keep=keep) as tracer:
        cached = {"h": read_site(model, site), "is_tuple": isinstance(site_module(model, site).output, tuple)}
        if upper is not None:  # the last layer's keys and values come from its kept-positions computation
            cached["upper"] = upper.record(model, last)
        if not in_session:  # in a session the next trace reads it where it lives; locally it must leave the trace
            cached = nnsight.save(cached)
        if clean_readout:
            if last is not None and upper is None:
                last.apply(model)
            clean = readout(model, *args, tiles=1, offset=offset).save()
        else:
            tracer.stop()  # nobody needs the clean model's outputs: the layers above the site never run
    outs = nnsight.save([]) if in_session else []  # a session returns only what is saved
    rows = int(enc["input_ids"].shape[0])
    for chunk in chunks:
        one_position = upper is not None and all(_last_only(ivs) for _, ivs in chunk)
        # locally, on a CPU, the chunk runs in passes of at most pass_tiles tiles, joined in tile order; in a
        # session (remote: the server's device) it is one pass
        tiles = None if in_session else pass_tiles(model, site, rows, 1 if one_position else seq)
        parts = [chunk] if tiles is None else [chunk[j:j + tiles] for j in range(0, len(chunk), tiles)]
        got = [_replay(model, site, enc, part, cached, upper if one_position else None, last, readout, args, keep,
                       offset, ends) for part in parts]
        outs.append(got[0] if len(got) == 1 else {key: torch.cat([g[key] for g in got]) for key in got[0]})
    return clean, outs


def _replay(model: Any, site: Site, enc: dict[str, torch.Tensor], part: Chunk, cached: dict[str, Any],
            upper: Any, last: Any, readout: Callable, args: tuple, keep: int, offset: int,
            ends: torch.Tensor | None = None) -> Any:
    """One replay pass of ``part``'s tiles from the clean pass's ``cached`` values: one position per layer with
    ``upper``, else every layer above the site (the last one at the kept positions with ``last``)."""
    h, is_tuple = cached["h"], cached["is_tuple"]
    k = len(part)
    out = []
    if upper is not None:
        with model.trace({"input_ids": enc["input_ids"][:, -1:].repeat(k, 1)}, logits_to_keep=1):
            x = upper.replay(model, torch.cat([_edit_all(h, ivs)[:, -1:] for _, ivs in part]), cached["upper"], k)
            x = (x,) if is_tuple else x
            for layer in range(site.n_layers):  # every layer's output is known: only the final norm and head run
                layer_envoy(model, site, layer).skip(x)
            out.append(readout(model, *args, tiles=k, offset=offset))
        return out[0]
    tiled = {key: v.repeat(k, 1) for key, v in enc.items()}
    with model.trace(tiled, logits_to_keep=keep):
        value = torch.cat([_edit_all(h, ivs, ends) for _, ivs in part])
        value = (value,) if is_tuple else value
        for layer in range(site.layer + 1):
            layer_envoy(model, site, layer).skip(value)
        if last is not None:
            last.apply(model)
        out.append(readout(model, *args, tiles=k, offset=offset))
    return out[0]


def replay_batch(
    model: Any,
    site: Site,
    enc: dict[str, torch.Tensor],
    chunks: list[Chunk],
    readout: Callable[..., dict[str, torch.Tensor]],
    args: tuple = (),
    *,
    remote: bool | str = False,
    logits_to_keep: int = 0,
    clean_readout: bool = True,
    ends: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor] | None, list[dict[str, torch.Tensor]]]:
    """One batch: the clean pass and one replay per chunk; returns (clean readout or None, readout per chunk).

    The readout of a chunk holds its ``k`` tiles in chunk order (``tiles=k``). ``logits_to_keep`` (0 = all)
    limits the logits the clean pass and the replays compute to the last positions: the LM head over every
    position of a large vocabulary costs several decoder layers, and a readout of the last positions needs none
    of the others. Without ``clean_readout`` the clean pass stops at the site. ``ends``: each row's last real
    position in a right-padded batch, where an edit of the last position applies (``edit_hidden``).
    """
    with torch.no_grad():
        if not remote:
            return _traces(model, site, enc, chunks, readout, args, logits_to_keep, clean_readout, in_session=False,
                           ends=ends)
        with model.session(**trace_args(model, remote)):
            with torch.no_grad():  # inside the block too: the block is what runs on the server
                clean, outs = _traces(model, site, enc, chunks, readout, args, logits_to_keep, clean_readout,
                                      in_session=True, ends=ends)
    return clean, list(outs)


def returned_bytes(*values: Any) -> int:
    """Bytes of the tensors in (nested) dicts, lists and tuples: what a remote batch sends back."""
    total = 0
    stack = list(values)
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return total
