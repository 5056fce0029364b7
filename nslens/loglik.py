"""lm-eval log-likelihoods computed where the model runs, for many interventions in one sweep.

lm-eval's ``HFLM`` asks the model for the full logits ``[batch, seq, vocab]`` and reduces them on its side: a
float32 log-softmax, the continuation tokens' log-probabilities summed, and an is-greedy flag. On NDIF the logits
would have to cross the network (about 1 GB per batch of 8 x 512 tokens with Llama-3's 128,256-token vocabulary).
Here the same reduction runs *inside the trace* (``loglik_readout``), so a batch returns two numbers per request
(one for a perplexity window: lm-eval discards its is-greedy flag, so it is not computed).

``LoglikSweep`` answers each batch of requests for a list of interventions at once: the clean pass computes the
layers up to the site, and every intervention replays only the layers above it (``nslens.replay``). The answers
are kept per intervention and request, so one lm-eval evaluation per intervention can read its own, and lm-eval
computes every metric itself.

With a large vocabulary the LM head is computed inside the readout instead, a chunk of the needed positions at a
time (``ChunkedHead``), and the model's own head is skipped: the logits of a whole pass (tiles x rows x positions
x vocabulary: 393 MB a tile for a batch of 8 x 250 tokens at SmolLM2's 49,152 tokens) are never written out and
read back, which made them cost about as much again as their matrix product on a CPU. Each chunk's log-softmax is
HFLM's; the chunk's matrix product equals the whole one up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import NsLensError
from .intervene import apply_in_trace
from .models import Site, get_family, model_family, submodule
from .remote import maybe_retry, trace_args
from .replay import chunked, replay_batch, returned_bytes

__all__ = ["HEAD_CHUNK_BYTES", "ChunkedHead", "LoglikPlan", "LoglikSweep", "RowSpec", "loglik_readout"]

#: the float32 logits one chunk of the head computes inside the readout, at most: on a CPU they stay in cache and
#: below glibc's mmap threshold (at 49,152 tokens a 25 MB chunk took 4.4 s where the whole pass's logits took
#: 8.1 s, the same products); elsewhere (a GPU, the server of a remote run) ``DEVICE_HEAD_CHUNK_BYTES``
HEAD_CHUNK_BYTES = 32 << 20
DEVICE_HEAD_CHUNK_BYTES = 512 << 20

#: one row of an lm-eval batch: (input length, the row's continuation length, every request's continuation tokens)
RowSpec = tuple[int, int, list[list[int]]]
#: (sum of the continuation's log-probabilities, whether every continuation token is the greedy one; None where the
#: request did not ask: a perplexity window, whose flag lm-eval's ``loglikelihood_rolling`` discards)
Answer = tuple[float, bool | None]


@dataclass
class LoglikPlan:
    """Which logits one right-padded lm-eval batch needs, and how each request reduces them (tensor form).

    Mirrors ``HFLM._loglikelihood_tokens``: row r's window is positions ``[inplen - contlen, inplen)``; a request
    sharing the row (lm-eval's one-token-continuation cache) reads its log-probabilities from the first
    ``len(cont)`` window positions and its greedy check from the last ``len(cont)``, exactly as HFLM slices them.
    """

    rows: torch.Tensor  # [N] batch row of every needed position
    pos: torch.Tensor  # [N] its position
    lp_idx: torch.Tensor  # [M] position (index into N) each continuation token's log-prob is read from
    greedy_idx: torch.Tensor  # [M] position (index into N) its greedy check uses
    tokens: torch.Tensor  # [M] the continuation tokens
    spans: torch.Tensor  # [R, 2] each request's slice of M
    n_rows: int
    first_pos: int  # the first position any request needs (the replays compute logits from there on)
    ends: torch.Tensor  # [n_rows] each row's last real position (input length - 1): where a last-position edit goes
    greedy: bool = True  # compute the is-greedy flags (an argmax over the vocabulary at every needed position)

    @classmethod
    def build(cls, rows: Sequence[RowSpec], greedy: bool = True) -> LoglikPlan:
        r_idx, p_idx, lp_idx, g_idx, toks, spans = [], [], [], [], [], []
        for r, (inplen, contlen, members) in enumerate(rows):
            base = len(r_idx)
            r_idx += [r] * contlen
            p_idx += list(range(inplen - contlen, inplen))
            for cont in members:
                n = len(cont)
                if n > contlen:
                    raise NsLensError(f"a continuation of {n} tokens in a window of {contlen}")
                spans.append((len(toks), len(toks) + n))
                lp_idx += range(base, base + n)
                g_idx += range(base + contlen - n, base + contlen)
                toks += cont
        t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        return cls(t(r_idx), t(p_idx), t(lp_idx), t(g_idx), t(toks), t(spans).reshape(-1, 2), len(rows),
                   min(p_idx) if p_idx else 0, t([inplen - 1 for inplen, _, _ in rows]), greedy)

    @property
    def n_requests(self) -> int:
        return int(self.spans.shape[0])

    def args(self, dtype: torch.dtype | None, head: ChunkedHead | None = None) -> tuple:
        return (self.rows, self.pos, self.lp_idx, self.greedy_idx, self.tokens, self.spans, self.n_rows, dtype, head,
                self.greedy)


@dataclass(frozen=True)
class ChunkedHead:
    """The LM head as the readout computes it: the module at ``path`` (a plain ``nn.Linear``), then the model's
    final logit soft-capping where it has one (Gemma 2: ``tanh(x / cap) * cap``)."""

    path: str
    softcap: float | None = None

    @classmethod
    def of(cls, model: Any) -> ChunkedHead | None:
        """The head of ``model`` where the logits are exactly that (soft-capping aside), else None (then the
        model's own head runs): a head that is not a plain linear layer, or a config that scales the logits."""
        family = get_family(model_family(model))
        module = family.part(getattr(model, "_module", model), family.head)
        cfg = getattr(model, "config", None)
        if type(module) is not torch.nn.Linear or any(getattr(cfg, a, None) not in (None, 1, 1.0)
                                                       for a in ("logit_scale", "logits_scaling")):
            return None
        return cls(family.head, getattr(cfg, "final_logit_softcapping", None))

    def logits(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = torch.nn.functional.linear(x, weight, bias)
        return out if self.softcap is None else torch.tanh(out / self.softcap) * self.softcap


def loglik_readout(model: Any, rows: torch.Tensor, pos: torch.Tensor, lp_idx: torch.Tensor,
                   greedy_idx: torch.Tensor, tokens: torch.Tensor, spans: torch.Tensor, n_rows: int,
                   dtype: torch.dtype | None, head: ChunkedHead | None = None, greedy: bool = True,
                   tiles: int = 1, offset: int = 0) -> dict[str, torch.Tensor]:
    """Inside a trace: every request's continuation log-likelihood and is-greedy flag (``[tiles * R]`` each).

    The same arithmetic as HFLM: log-softmax over the vocabulary in ``dtype`` (HFLM's ``softmax_dtype``), the
    continuation tokens' log-probs gathered and summed per request, greedy = argmax equals the token everywhere.
    Only the needed positions are normalised; ``offset`` is the first position whose logits the pass computed.
    With ``head`` the model's head is skipped and its logits are computed here, a chunk of positions at a time.
    Without ``greedy`` no argmax runs and only ``"ll"`` comes back (perplexity windows score every position, and
    the argmax over the vocabulary there was 3.8-5.3 % of a side-effect table at a 49,152-token vocabulary)."""
    if head is None:
        logits = model.output.logits
        dev = logits.device
        rows, pos, lp_idx, greedy_idx, tokens = (x.to(dev) for x in (rows, pos, lp_idx, greedy_idx, tokens))
        reduced = [_reduce(torch.log_softmax(logits[rows + j * n_rows, pos - offset], dim=-1, dtype=dtype),
                           lp_idx, greedy_idx, tokens, greedy) for j in range(tiles)]
    else:
        reduced = _chunked_head(model, head, rows, pos, lp_idx, greedy_idx, tokens, n_rows, dtype, tiles, offset,
                                greedy)
    bounds = spans.tolist()
    ll, hits = [], []
    for tok_lp, hit in reduced:
        for s, e in bounds:
            ll.append(tok_lp[s:e].sum())
            if greedy:
                hits.append(hit[s:e].all())
    out = {"ll": torch.stack(ll).cpu()}
    if greedy:
        out["greedy"] = torch.stack(hits).cpu()
    return out


def _reduce(lp: torch.Tensor, lp_idx: torch.Tensor, greedy_idx: torch.Tensor, tokens: torch.Tensor,
            greedy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per continuation token: its log-prob and (with ``greedy``) whether it is the argmax, from the needed
    positions' log-softmax."""
    return lp[lp_idx, tokens], lp.argmax(-1)[greedy_idx] == tokens if greedy else None


def _chunked_head(model: Any, head: ChunkedHead, rows: torch.Tensor, pos: torch.Tensor, lp_idx: torch.Tensor,
                  greedy_idx: torch.Tensor, tokens: torch.Tensor, n_rows: int, dtype: torch.dtype | None,
                  tiles: int, offset: int, greedy: bool = True) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Inside a trace: ``_reduce`` of every tile from the head's input, the head computed for ``per`` needed
    positions at a time; each chunk's tokens are gathered from it (in ``lp_idx`` order, then put back)."""
    module = submodule(model, head.path)
    hidden = module.input  # [tiles * rows, kept positions, d_model]: what the model's head would multiply
    module.skip(hidden[..., :1])  # the model's own product never runs: nothing reads model.output.logits
    weight, bias = module.weight, module.bias
    dev = hidden.device
    rows, pos, lp_idx, greedy_idx, tokens = (x.to(dev) for x in (rows, pos, lp_idx, greedy_idx, tokens))
    budget = HEAD_CHUNK_BYTES if dev.type == "cpu" else DEVICE_HEAD_CHUNK_BYTES
    per = max(1, budget // (int(weight.shape[0]) * 4))
    n = int(rows.shape[0])
    order = torch.argsort(lp_idx, stable=True)
    cuts = torch.searchsorted(lp_idx[order], torch.arange(0, n + per, per, device=dev)).tolist()
    out = []
    for j in range(tiles):
        h = hidden[rows + j * n_rows, pos - offset]
        picked, argmax = [], []
        for k, s in enumerate(range(0, n, per)):
            lp = torch.log_softmax(head.logits(h[s:s + per], weight, bias), dim=-1, dtype=dtype)
            if greedy:
                argmax.append(lp.argmax(-1))
            idx = order[cuts[k]:cuts[k + 1]]
            picked.append(lp[lp_idx[idx] - s, tokens[idx]])
        tok_lp = torch.empty(int(lp_idx.shape[0]), dtype=picked[0].dtype, device=dev)
        tok_lp[order] = torch.cat(picked)
        out.append((tok_lp, torch.cat(argmax)[greedy_idx] == tokens if greedy else None))
    return out


@dataclass
class LoglikSweep:
    """Answers to lm-eval log-likelihood requests under several interventions, computed together.

    ``interventions[i]`` is an ``Intervention``, a sequence applied in order, or ``None`` (the clean model).
    ``answers`` maps a request's (context tokens, continuation tokens) to its answer under each intervention, so
    an evaluation of intervention i finds its answers computed by whichever evaluation asked first.
    ``batch_bytes`` records what each batch returned from the trace(s) (what crosses the network remotely) and
    ``batch_shapes`` its ``(rows, tokens)``.
    """

    model: Any
    site: Site | None
    interventions: list[Any]
    per_pass: int = 8
    remote: bool | str = False
    max_logits_bytes: int = 2 << 30
    """Bound on the float32 logits one replay pass computes (tiles x rows x kept positions x vocabulary): with
    Llama-3's 128,256-token vocabulary and 8 x 512-token batches one tile is 2 GiB, so fewer interventions share a
    pass there. Results do not depend on it."""
    chunked_head: bool = True
    """Compute the head inside the readout (``ChunkedHead``) where one tile's needed logits exceed
    ``HEAD_CHUNK_BYTES`` and the model's head allows it; below that the model's head runs, so small-vocabulary
    answers stay bit-for-bit HFLM's."""
    answers: dict[tuple[tuple[int, ...], tuple[int, ...]], list[Answer]] = field(default_factory=dict)
    batch_bytes: list[int] = field(default_factory=list)
    batch_shapes: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.interventions:
            raise NsLensError("a sweep needs at least one intervention (None = the clean model)")
        if self.site is None and any(iv is not None for iv in self.interventions):
            raise NsLensError("an intervention needs its site")
        chunked(self.interventions, self.per_pass)  # validates per_pass
        cfg = getattr(self.model, "config", None)
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or 0)
        self.head = ChunkedHead.of(self.model) if self.chunked_head else None

    def tiles_per_pass(self, rows: int, positions: int) -> int:
        """Interventions per replay pass for a batch: ``per_pass``, fewer where the logits would exceed
        ``max_logits_bytes``."""
        one = rows * positions * max(self.vocab_size, 1) * 4
        return max(1, min(self.per_pass, self.max_logits_bytes // max(one, 1)))

    def answer(self, input_ids: torch.Tensor, rows: Sequence[RowSpec], dtype: torch.dtype | None,
               greedy: bool = True) -> list[list[Answer]]:
        """One right-padded batch: per request (row order, then each row's requests), its answer under every
        intervention. One trace locally per pass; remotely one session (request) per batch, with retries. Without
        ``greedy`` the flags are not computed and read None."""
        plan = LoglikPlan.build(rows, greedy)
        keep = int(input_ids.shape[1]) - plan.first_pos
        head = self.head if int(plan.rows.shape[0]) * self.vocab_size * 4 > HEAD_CHUNK_BYTES else None
        # the chunked head never holds a pass's logits: only the model's own head needs the logits bound
        chunks = chunked(self.interventions, self.per_pass if head else self.tiles_per_pass(plan.n_rows, keep))
        out = maybe_retry(self.remote, lambda: self._run(input_ids, plan, dtype, chunks, keep, head),
                          what="lm-eval batch")
        self.batch_bytes.append(returned_bytes(out))
        self.batch_shapes.append((int(input_ids.shape[0]), int(input_ids.shape[1])))
        n = plan.n_requests
        per_iv = [None] * len(self.interventions)
        clean, outs = out
        for i, iv in enumerate(self.interventions):
            if iv is None:
                per_iv[i] = clean
        for chunk, o in zip(chunks, outs):
            for t, (i, _) in enumerate(chunk):
                per_iv[i] = {k: v[t * n:(t + 1) * n] for k, v in o.items()}
        lls = [p["ll"].tolist() for p in per_iv]
        hits = [p["greedy"].tolist() if greedy else [None] * n for p in per_iv]
        return [[(lls[i][r], None if hits[i][r] is None else bool(hits[i][r])) for i in range(len(self.interventions))]
                for r in range(n)]

    def _run(self, input_ids: torch.Tensor, plan: LoglikPlan, dtype: torch.dtype | None, chunks: list,
             keep: int, head: ChunkedHead | None) -> tuple[Any, list]:
        enc = {"input_ids": input_ids}
        args = plan.args(dtype, head)
        ivs = self.interventions
        ends = plan.ends  # the batch is right-padded: an edit of the last position goes to each row's last token
        if len(ivs) == 1:  # one evaluation: a plain (optionally intervened) forward is all it takes
            with torch.no_grad(), self.model.trace(enc, **trace_args(self.model, self.remote)):
                if ivs[0] is not None:
                    apply_in_trace(self.model, self.site, ivs[0], ends)
                res = loglik_readout(self.model, *args).save()
            return (res, []) if ivs[0] is None else (None, [res])
        return replay_batch(self.model, self.site, enc, chunks, loglik_readout, args, remote=self.remote,
                            logits_to_keep=keep, clean_readout=any(iv is None for iv in ivs), ends=ends)
