"""lm-eval log-likelihoods computed where the model runs, for many interventions in one sweep.

lm-eval's ``HFLM`` asks the model for the full logits ``[batch, seq, vocab]`` and reduces them on its side: a
float32 log-softmax, the continuation tokens' log-probabilities summed, and an is-greedy flag. On NDIF the logits
would have to cross the network (about 1 GB per batch of 8 x 512 tokens with Llama-3's 128,256-token vocabulary).
Here the same reduction runs *inside the trace* (``loglik_readout``), so a batch returns two numbers per request.

``LoglikSweep`` answers each batch of requests for a list of interventions at once: the clean pass computes the
layers up to the site, and every intervention replays only the layers above it (``nslens.replay``). The answers
are kept per intervention and request, so one lm-eval evaluation per intervention can read its own, and lm-eval
computes every metric itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import NsLensError
from .intervene import apply_in_trace
from .models import Site
from .remote import maybe_retry, trace_args
from .replay import chunked, replay_batch, returned_bytes

__all__ = ["LoglikPlan", "LoglikSweep", "RowSpec", "loglik_readout"]

#: one row of an lm-eval batch: (input length, the row's continuation length, every request's continuation tokens)
RowSpec = tuple[int, int, list[list[int]]]
#: (sum of the continuation's log-probabilities, whether every continuation token is the greedy one)
Answer = tuple[float, bool]


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

    @classmethod
    def build(cls, rows: Sequence[RowSpec]) -> LoglikPlan:
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
                   min(p_idx) if p_idx else 0)

    @property
    def n_requests(self) -> int:
        return int(self.spans.shape[0])

    def args(self, dtype: torch.dtype | None) -> tuple:
        return (self.rows, self.pos, self.lp_idx, self.greedy_idx, self.tokens, self.spans, self.n_rows, dtype)


def loglik_readout(model: Any, rows: torch.Tensor, pos: torch.Tensor, lp_idx: torch.Tensor,
                   greedy_idx: torch.Tensor, tokens: torch.Tensor, spans: torch.Tensor, n_rows: int,
                   dtype: torch.dtype | None, tiles: int = 1, offset: int = 0) -> dict[str, torch.Tensor]:
    """Inside a trace: every request's continuation log-likelihood and is-greedy flag (``[tiles * R]`` each).

    The same arithmetic as HFLM: log-softmax over the vocabulary in ``dtype`` (HFLM's ``softmax_dtype``), the
    continuation tokens' log-probs gathered and summed per request, greedy = argmax equals the token everywhere.
    Only the needed positions are normalised; ``offset`` is the first position whose logits the pass computed."""
    logits = model.output.logits
    dev = logits.device
    rows, pos, lp_idx, greedy_idx, tokens = (x.to(dev) for x in (rows, pos, lp_idx, greedy_idx, tokens))
    bounds = spans.tolist()
    ll, greedy = [], []
    for j in range(tiles):
        lp = torch.log_softmax(logits[rows + j * n_rows, pos - offset], dim=-1, dtype=dtype)
        tok_lp = lp[lp_idx, tokens]
        hit = lp.argmax(-1)[greedy_idx] == tokens
        for s, e in bounds:
            ll.append(tok_lp[s:e].sum())
            greedy.append(hit[s:e].all())
    return {"ll": torch.stack(ll).cpu(), "greedy": torch.stack(greedy).cpu()}


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

    def tiles_per_pass(self, rows: int, positions: int) -> int:
        """Interventions per replay pass for a batch: ``per_pass``, fewer where the logits would exceed
        ``max_logits_bytes``."""
        one = rows * positions * max(self.vocab_size, 1) * 4
        return max(1, min(self.per_pass, self.max_logits_bytes // max(one, 1)))

    def answer(self, input_ids: torch.Tensor, rows: Sequence[RowSpec],
               dtype: torch.dtype | None) -> list[list[Answer]]:
        """One right-padded batch: per request (row order, then each row's requests), its answer under every
        intervention. One trace locally per pass; remotely one session (request) per batch, with retries."""
        plan = LoglikPlan.build(rows)
        keep = int(input_ids.shape[1]) - plan.first_pos
        chunks = chunked(self.interventions, self.tiles_per_pass(plan.n_rows, keep))
        out = maybe_retry(self.remote, lambda: self._run(input_ids, plan, dtype, chunks, keep), what="lm-eval batch")
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
        greedy = [p["greedy"].tolist() for p in per_iv]
        return [[(lls[i][r], bool(greedy[i][r])) for i in range(len(self.interventions))] for r in range(n)]

    def _run(self, input_ids: torch.Tensor, plan: LoglikPlan, dtype: torch.dtype | None, chunks: list,
             keep: int) -> tuple[Any, list]:
        enc = {"input_ids": input_ids}
        args = plan.args(dtype)
        ivs = self.interventions
        if len(ivs) == 1:  # one evaluation: a plain (optionally intervened) forward is all it takes
            with torch.no_grad(), self.model.trace(enc, **trace_args(self.model, self.remote)):
                if ivs[0] is not None:
                    apply_in_trace(self.model, self.site, ivs[0])
                res = loglik_readout(self.model, *args).save()
            return (res, []) if ivs[0] is None else (None, [res])
        return replay_batch(self.model, self.site, enc, chunks, loglik_readout, args, remote=self.remote,
                            logits_to_keep=keep, clean_readout=any(iv is None for iv in ivs))

