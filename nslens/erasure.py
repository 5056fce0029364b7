"""Concept-erasure evaluation: the paper's Acc / Conf / CAcc / CConf table (Section 5.3, Table 3).

For every concept c as the target: Acc (greedy next token == gold label's first token) and Conf (softmax
probability of that token over the whole vocabulary) on c's test samples; CAcc and CConf on all other concepts'
test samples pooled. Base values come from one clean pass; neuron masking (ungated) and range masking (gated)
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
from typing import Any

import numpy as np
import torch

from .intervene import Intervention, apply_in_trace
from .models import Site
from .ops import Operator
from .ranges import RangeMask
from .record import Progress, batches, prepare_remote, tokenize

__all__ = ["METRICS", "ErasureTable", "Predictions", "concept_metrics", "erasure_table", "predict"]

METRICS = ("acc", "conf", "cacc", "cconf")


@dataclass
class Predictions:
    """Per-sample correctness and gold-label probability."""

    correct: np.ndarray  # bool [N]
    conf: np.ndarray  # float [N]
    pred: np.ndarray  # int [N] predicted token id


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
) -> Predictions:
    """Greedy next-token predictions at the last position, optionally under interventions at the site."""
    gold = torch.as_tensor(np.asarray(gold_token_ids), dtype=torch.int64)
    if len(gold) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(gold)} gold labels")
    prepare_remote(remote)
    conf, pred = [], []
    parts = batches(len(prompts), batch_size)
    for i, sl in enumerate(parts):
        enc = tokenize(model, prompts[sl])
        g = gold[sl]
        with torch.no_grad():
            with model.trace(enc, remote=remote):
                apply_in_trace(model, site, interventions)
                logits = model.output.logits[:, -1, :].float()
                p = torch.softmax(logits, dim=-1)
                out = {"conf": p.gather(-1, g.to(p.device)[:, None])[:, 0].cpu(),
                       "pred": logits.argmax(-1).cpu()}
                out = out.save()
        conf.append(out["conf"])
        pred.append(out["pred"])
        if progress is not None:
            progress(desc, i + 1, len(parts))
    pred_t = torch.cat(pred)
    return Predictions((pred_t == gold).numpy(), torch.cat(conf).numpy().astype(np.float64), pred_t.numpy())


def concept_metrics(p: Predictions, labels: np.ndarray, target: int) -> dict[str, float]:
    """Acc/Conf on the target concept's samples, CAcc/CConf on all other samples pooled."""
    on = labels == target
    if not on.any() or on.all():
        raise ValueError(f"concept {target} needs test samples of its own and of other concepts")
    return {"acc": float(p.correct[on].mean()), "conf": float(p.conf[on].mean()),
            "cacc": float(p.correct[~on].mean()), "cconf": float(p.conf[~on].mean())}


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
            lines.append("| " + " | ".join([str(r[0]), *(f"{v:+.3f}" if j >= 4 else f"{v:.3f}"
                                                          for j, v in enumerate(r[1:]))]) + " |")
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
    label_token_ids: Sequence[int],
    masks: Sequence[RangeMask],
    operator: Operator,
    *,
    positions: str = "all",
    batch_size: int = 16,
    remote: bool | str = False,
    progress: Progress | None = None,
) -> ErasureTable:
    """The full table: one clean pass, then neuron and range masking of every concept's mask."""
    labels = np.asarray(labels, dtype=np.int64)
    label_token_ids = list(label_token_ids)
    if len(masks) != len(label_token_ids):
        raise ValueError(f"{len(masks)} masks for {len(label_token_ids)} concepts")
    gold = np.asarray(label_token_ids)[labels]
    concepts = [m.concept for m in masks]

    def run(ivs: Intervention | None, desc: str) -> Predictions:
        return predict(model, site, prompts, gold, interventions=ivs, batch_size=batch_size, remote=remote,
                       progress=progress, desc=desc)

    clean = run(None, "erase: clean")
    base, neuron, rng = [], [], []
    for c, mask in enumerate(masks):
        b = concept_metrics(clean, labels, c)
        base.append(b)
        for gated, out in ((False, neuron), (True, rng)):
            iv = Intervention(mask, operator, gated=gated, positions=positions)
            m = concept_metrics(run(iv, f"erase: {mask.concept} ({iv.kind})"), labels, c)
            out.append({k: m[k] - b[k] for k in METRICS})
    return ErasureTable(concepts, base, neuron, rng, operator=operator.label,
                        meta={"positions": positions, "n_test": int(len(prompts)), **site.describe()})
