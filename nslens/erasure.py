"""Concept-erasure evaluation: the paper's Acc / Conf / CAcc / CConf table (Section 5.3, Table 3).

For every concept c as the target: Acc (greedy next token == gold label's first token) and Conf (softmax
probability of that token over the whole vocabulary) on c's test samples; CAcc and CConf over the other concepts:
the mean of each other concept's value (the paper's "average ... across other classes"; ``cacc_average="pooled"``
pools their samples instead). Base values come from one clean pass; neuron masking (ungated) and range masking (gated)
are reported as deltas from base. The dataset summary is the 10 % trimmed mean across concepts
(``scipy.stats.trim_mean(x, 0.1)``: 10 % cut from *each* tail).

Predictions are computed inside traces and only ``[batch]``-sized results leave them (remote-friendly).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .concepts import concept_labels
from .errors import NsLensError
from .files import write_text
from .intervene import Intervention, apply_in_trace, check_site
from .mdtable import cell
from .models import Site, check_token_ids
from .ops import Operator
from .ranges import RangeMask
from .readout import Readout, predict_token
from .record import Progress, batches, tokenize
from .remote import maybe_retry, trace_args
from .replay import chunked, replay_batch

__all__ = ["CACC_AVERAGES", "METRICS", "ErasureTable", "Predictions", "concept_metrics", "erasure_table", "predict", "predict_many",
           "sample_gold"]

METRICS = ("acc", "conf", "cacc", "cconf")
#: how CAcc / CConf average over the other concepts (see ``concept_metrics``)
CACC_AVERAGES = ("class", "pooled")


@dataclass
class Predictions:
    """Per-sample correctness and gold-label probability."""

    correct: np.ndarray  # bool [N]
    conf: np.ndarray  # float [N]
    pred: np.ndarray  # int [N] predicted token id


def _gold_tensor(model: Any, prompts: Sequence[str],
                 gold_token_ids: Sequence[int] | np.ndarray) -> torch.Tensor:
    """The gold token per prompt, refused when it cannot index the logits (it failed inside the trace)."""
    if not len(prompts):
        raise NsLensError("no prompts given")
    gold = check_token_ids(model, gold_token_ids, "gold token id")
    if len(gold) != len(prompts):
        raise NsLensError(f"{len(prompts)} prompts but {len(gold)} gold labels")
    return gold


def _predict_batch(model: Any, site: Site, enc: dict[str, torch.Tensor], g: torch.Tensor,
                   interventions: Any, remote: bool | str, rule: tuple) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        with model.trace(enc, **trace_args(model, remote)):
            apply_in_trace(model, site, interventions)
            out = _last_token_outputs(model, g, *rule).save()
    return out


def predict(
    model: Any,
    site: Site,
    prompts: Sequence[str],
    gold_token_ids: Sequence[int] | np.ndarray,
    *,
    interventions: Intervention | Sequence[Intervention] | None = None,
    batch_size: int = 16,
    remote: bool | str = False,
    progress: Progress | None = None,
    desc: str = "predict",
    readout: Readout | None = None,
) -> Predictions:
    """Greedy next-token predictions at the last position, optionally under interventions at the site; with a
    ``readout`` (``nslens.readout``) the prediction is the best label token by that rule instead."""
    check_site(site, interventions)
    gold = _gold_tensor(model, prompts, gold_token_ids)
    rule = _rule(readout)
    conf, pred = [], []
    parts = batches(len(prompts), batch_size)
    for i, sl in enumerate(parts):
        enc = tokenize(model, prompts[sl])
        g = gold[sl]
        out = maybe_retry(remote, lambda enc=enc, g=g: _predict_batch(model, site, enc, g, interventions, remote, rule),
                          what=f"predict batch {i}")
        conf.append(out["conf"])
        pred.append(out["pred"])
        if progress is not None:
            progress(desc, i + 1, len(parts))
    pred_t = torch.cat(pred)
    return Predictions((pred_t == gold).numpy(), torch.cat(conf).numpy().astype(np.float64), pred_t.numpy())


def _rule(readout: Readout | None) -> tuple:
    """The readout as the extra arguments ``_last_token_outputs`` takes: () for the greedy token."""
    return () if readout is None else readout.tensors()


def _last_token_outputs(model: Any, gold: torch.Tensor, ids: torch.Tensor | None = None,
                        prior: torch.Tensor | None = None, tiles: int = 1, offset: int = 0) -> dict[str, torch.Tensor]:
    """Inside a trace: gold-label probability and predicted token at the last position (small, remote-friendly):
    the greedy token, or with ``ids`` the readout's label token (``nslens.readout.predict_token``). ``tiles``
    copies of the batch share the pass (``replay_batch``); only the last position is read."""
    logits = model.output.logits[:, -1, :].float()
    p = torch.softmax(logits, dim=-1)
    g = gold.repeat(tiles) if tiles > 1 else gold
    return {"conf": p.gather(-1, g.to(p.device)[:, None])[:, 0].cpu(), "pred": predict_token(logits, ids, prior).cpu()}


def predict_many(
    model: Any,
    site: Site,
    prompts: Sequence[str],
    gold_token_ids: Sequence[int] | np.ndarray,
    interventions: Sequence[Intervention | Sequence[Intervention] | None],
    *,
    batch_size: int = 16,
    per_pass: int = 8,
    remote: bool | str = False,
    progress: Progress | None = None,
    desc: str = "erase",
    readout: Readout | None = None,
) -> list[Predictions]:
    """Predictions under many interventions, computing the layers below the site once per batch.

    For each batch, one clean pass keeps the site's value; every intervention then edits that cached value and
    replays only the layers above the site. A batch's passes form one nnsight session, so remotely they are one
    request and the site value stays on the server (``Envoy.skip`` on the site layer and those below it returns the
    edited value without running them). Up to ``per_pass`` interventions share one forward (the batch is tiled)
    and only the last position's logits are computed (``logits_to_keep=1``). The results equal ``predict`` run
    once per intervention (tested), at a fraction of the cost. ``None`` in ``interventions`` means the clean model.
    """
    check_site(site, interventions)
    chunks = chunked(interventions, per_pass)
    gold = _gold_tensor(model, prompts, gold_token_ids)
    rule = _rule(readout)
    conf: list[list[torch.Tensor]] = [[] for _ in interventions]
    pred: list[list[torch.Tensor]] = [[] for _ in interventions]
    parts = batches(len(prompts), batch_size)
    for b, sl in enumerate(parts):
        enc = tokenize(model, prompts[sl])
        g = gold[sl]
        clean, outs = maybe_retry(
            remote, lambda enc=enc, g=g: replay_batch(model, site, enc, chunks, _last_token_outputs, (g, *rule),
                                                      remote=remote, logits_to_keep=1),
            what=f"erase batch {b}")
        rows = len(g)
        for i, iv in enumerate(interventions):
            if iv is None:
                conf[i].append(clean["conf"])
                pred[i].append(clean["pred"])
        for chunk, out in zip(chunks, outs):
            for j, (i, _) in enumerate(chunk):
                conf[i].append(out["conf"][j * rows:(j + 1) * rows])
                pred[i].append(out["pred"][j * rows:(j + 1) * rows])
        if progress is not None:
            progress(desc, b + 1, len(parts))
    result = []
    for i in range(len(interventions)):
        p = torch.cat(pred[i])
        result.append(Predictions((p == gold).numpy(), torch.cat(conf[i]).numpy().astype(np.float64), p.numpy()))
    return result


def sample_gold(labels: np.ndarray, label_token_ids: Sequence[int] | None,
                gold_token_ids: Sequence[int] | np.ndarray | None = None, *, n_concepts: int) -> np.ndarray:
    """Each sample's gold token: its own (``gold_token_ids``) or its concept's label token."""
    if gold_token_ids is None and label_token_ids is None:
        raise NsLensError("give label_token_ids (one per concept) or gold_token_ids (one per sample)")
    if gold_token_ids is None and len(label_token_ids) != n_concepts:
        raise NsLensError(f"{n_concepts} masks for {len(label_token_ids)} concepts")
    labels = concept_labels(labels, n_concepts)
    if gold_token_ids is not None:
        gold = np.asarray(gold_token_ids, dtype=np.int64)
        if gold.shape != labels.shape:
            raise NsLensError(f"{len(gold)} gold tokens for {len(labels)} samples")
        return gold
    return np.asarray(list(label_token_ids), dtype=np.int64)[labels]


def concept_metrics(p: Predictions, labels: np.ndarray, target: int, average: str = "class") -> dict[str, float]:
    """Acc/Conf on the target concept's samples; CAcc/CConf over the other concepts.

    ``average="class"`` (default) is the paper's "average ... across other classes": the mean of each other
    concept's accuracy (confidence), so every class weighs the same however many test samples it has.
    ``"pooled"`` averages over all other samples together (large classes weigh more)."""
    if average not in CACC_AVERAGES:
        raise NsLensError(f"unknown average {average!r}; choose one of {', '.join(CACC_AVERAGES)}")
    on = labels == target
    if not on.any() or on.all():
        raise NsLensError(f"concept {target} needs test samples of its own and of other concepts")
    if average == "pooled":
        cacc, cconf = float(p.correct[~on].mean()), float(p.conf[~on].mean())
    else:
        others = [c for c in np.unique(labels) if c != target]
        cacc = float(np.mean([p.correct[labels == c].mean() for c in others]))
        cconf = float(np.mean([p.conf[labels == c].mean() for c in others]))
    return {"acc": float(p.correct[on].mean()), "conf": float(p.conf[on].mean()), "cacc": cacc, "cconf": cconf}


def trim_note(n_concepts: int, proportion: float = 0.1) -> str:
    """What the 10 % trimmed mean across concepts actually cut (scipy cuts int(0.1 * C) from each tail)."""
    cut = int(proportion * n_concepts)
    if cut == 0:
        return (f"Trimmed mean: {proportion:.0%} cut from each tail across {n_concepts} concepts removes nothing "
                f"below 10 concepts, so it is the plain mean here.")
    return f"Trimmed mean: {cut} of {n_concepts} concepts cut from each tail ({proportion:.0%})."


@dataclass
class ErasureTable:
    """Base values and deltas (intervened - base) per concept, for neuron and range masking."""

    concepts: list[str]
    base: list[dict[str, float]]
    neuron: list[dict[str, float]]
    range: list[dict[str, float]]
    operator: str = "zero"
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, float]]:
        """10 % trimmed mean across concepts of every column."""
        from scipy.stats import trim_mean

        return {part: {k: float(trim_mean([row[k] for row in getattr(self, part)], 0.1)) for k in METRICS}
                for part in ("base", "neuron", "range")}

    def rows(self) -> list[list[Any]]:
        out = []
        for i, c in enumerate(self.concepts):
            out.append([c, *(self.base[i][k] for k in METRICS), *(self.neuron[i][k] for k in METRICS),
                        *(self.range[i][k] for k in METRICS)])
        s = self.summary()
        out.append(["trimmed mean (10%)", *(s["base"][k] for k in METRICS), *(s["neuron"][k] for k in METRICS),
                    *(s["range"][k] for k in METRICS)])
        return out

    @staticmethod
    def header() -> list[str]:
        return ["concept", *(f"base {k}" for k in METRICS), *(f"neuron Δ{k}" for k in METRICS),
                *(f"range Δ{k}" for k in METRICS)]

    def to_markdown(self) -> str:
        head = ["Concept", "Acc", "Conf", "CAcc", "CConf", "ΔAcc", "ΔConf", "ΔCAcc", "ΔCConf",
                "ΔAcc", "ΔConf", "ΔCAcc", "ΔCConf"]
        lines = [f"Operator: `{self.operator}`. Base values, then deltas for neuron masking (columns 6-9) and "
                 "range masking (columns 10-13).", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows():
            lines.append("| " + " | ".join([cell(r[0]), *(f"{v:+.3f}" if j >= 4 else f"{v:.3f}"
                                                          for j, v in enumerate(r[1:]))]) + " |")
        pooled = self.meta.get("cacc_average", "class") == "pooled"
        how = "the other concepts' samples pooled" if pooled else "the mean over the other concepts (class average)"
        lines += ["", f"CAcc/CConf: {how}. " + trim_note(len(self.concepts))]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(self.header())
        for r in self.rows():
            w.writerow([r[0], *(f"{v:.6f}" for v in r[1:])])
        return buf.getvalue()

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "summary": self.summary()}, indent=2, default=str)

    def write(self, stem: str | Path) -> None:
        """``<stem>.md``, ``<stem>.csv`` and ``<stem>.json``, each written atomically."""
        for ext, text in (("md", self.to_markdown()), ("csv", self.to_csv()), ("json", self.to_json())):
            write_text(f"{stem}.{ext}", text)

    @classmethod
    def from_json(cls, text: str) -> ErasureTable:
        d = json.loads(text)
        d.pop("summary", None)
        return cls(**d)


def erasure_table(
    model: Any,
    site: Site,
    prompts: Sequence[str],
    labels: np.ndarray,
    label_token_ids: Sequence[int] | None,
    masks: Sequence[RangeMask],
    operator: Operator | Sequence[Operator],
    *,
    gold_token_ids: Sequence[int] | np.ndarray | None = None,
    positions: str = "all",
    batch_size: int = 16,
    remote: bool | str = False,
    progress: Progress | None = None,
    fast: bool = True,
    per_pass: int = 8,
    sae: Any = None,
    cacc_average: str = "class",
    readout: Readout | None = None,
) -> ErasureTable:
    """The full table: the clean model, then neuron and range masking of every concept's mask.

    ``fast`` (default) computes the layers below the site once per batch (``predict_many``); ``fast=False`` runs
    2C + 1 full forward passes over the test set (the reference path; same numbers). With ``sae`` the masks select
    SAE features and "neuron" masking is feature masking. ``operator`` may be one per mask (per-concept steering
    vectors, ``nslens.steering``). The gold token of a sample is its concept's label token, or, with
    ``gold_token_ids`` (next-token concepts, ``nslens.nexttoken``), the sample's own. ``readout``: how logits
    become predictions (``nslens.readout``; None: the greedy token, the paper's rule).
    """
    ops = list(operator) if isinstance(operator, (list, tuple)) else [operator] * len(masks)
    if len(ops) != len(masks):
        raise NsLensError(f"{len(ops)} operators for {len(masks)} masks")
    if cacc_average not in CACC_AVERAGES:
        raise NsLensError(f"unknown cacc_average {cacc_average!r}; choose one of {', '.join(CACC_AVERAGES)}")
    gold = sample_gold(labels, label_token_ids, gold_token_ids, n_concepts=len(masks))
    labels = concept_labels(labels, len(masks))
    concepts = [m.concept for m in masks]

    ivs = [Intervention(mask, op, gated=gated, positions=positions, sae=sae)
           for mask, op in zip(masks, ops) for gated in (False, True)]
    if fast:
        preds = predict_many(model, site, prompts, gold, [None, *ivs], batch_size=batch_size, per_pass=per_pass,
                             remote=remote, progress=progress, desc=f"erase ({ops[0].label})", readout=readout)
    else:
        preds = [predict(model, site, prompts, gold, interventions=iv, batch_size=batch_size, remote=remote,
                         progress=progress, readout=readout, desc="erase: " + (f"{iv.mask.concept} ({iv.kind})" if iv else "clean"))
                 for iv in [None, *ivs]]
    clean = preds[0]
    base, neuron, rng = [], [], []
    for c in range(len(masks)):
        b = concept_metrics(clean, labels, c, cacc_average)
        base.append(b)
        for gated, out in ((False, neuron), (True, rng)):
            m = concept_metrics(preds[1 + 2 * c + int(gated)], labels, c, cacc_average)
            out.append({k: m[k] - b[k] for k in METRICS})
    return ErasureTable(concepts, base, neuron, rng, operator=ops[0].label,
                        meta={"positions": positions, "n_test": int(len(prompts)), "cacc_average": cacc_average,
                              "readout": readout.kind if readout is not None else "argmax",
                              **site.describe()})
