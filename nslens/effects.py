"""What a side-effect measurement returns: lm-eval's metrics per run and task, their deltas against the clean
model, and the paper's Table 4 built from them (neuron vs range masking per concept).

Plain data and formatting only, so a report can read and print side-effect results without lm-eval (or the
adapter that runs it) being importable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .erasure import trim_note
from .files import write_text
from .mdtable import cell

__all__ = ["METRIC_KEYS", "SideEffectTable", "SideEffects", "main_metric", "task_metrics"]

#: the metrics nslens reports from lm-eval's results
METRIC_KEYS = ("acc", "perplexity", "token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte",
               "exact_match")


def task_metrics(results: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for the metrics nslens reports (acc, perplexities, bits per byte, a generative
    task's exact match)."""
    out: dict[str, dict[str, float]] = {}
    for t in tasks:
        r = results["results"].get(t) or results.get("groups", {}).get(t, {})  # groups such as mmlu
        vals = {k.split(",")[0]: float(v) for k, v in r.items()
                if "," in k and k.split(",")[0] in METRIC_KEYS and isinstance(v, (int, float))}
        out[t] = vals
    return out


class SideEffects(dict):
    """``{run name: {task: {metric: value}}}`` with ``clean`` first; ``deltas()`` subtracts the clean values.
    ``batch_bytes``: what each computed batch returned from the model's traces (what crosses the network remotely);
    ``batch_shapes``: its ``(rows, tokens)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_bytes: list[int] = []
        self.batch_shapes: list[tuple[int, int]] = []

    def deltas(self) -> dict[str, dict[str, dict[str, float]]]:
        clean = self["clean"]
        return {name: {t: {k: v - clean[t][k] for k, v in ms.items() if k in clean.get(t, {})}
                       for t, ms in res.items()} for name, res in self.items() if name != "clean"}

    def to_markdown(self) -> str:
        rows = ["| run | task | metric | value | Δ vs clean |", "|---|---|---|---|---|"]
        d = self.deltas()
        for name, res in self.items():
            for t, ms in res.items():
                for k, v in ms.items():
                    delta = "" if name == "clean" else f"{d[name][t].get(k, float('nan')):+.4f}"
                    rows.append(f"| {cell(name)} | {t} | {k} | {v:.4f} | {delta} |")
        return "\n".join(rows) + "\n"


def main_metric(metrics: Mapping[str, float]) -> str:
    """The column a task contributes to the Table-4 view: token perplexity (the paper's PPL) where the task has
    it, else word perplexity, else perplexity, else accuracy (exact match for a generative task)."""
    for k in ("token_perplexity", "word_perplexity", "perplexity"):
        if k in metrics:
            return k
    return "exact_match" if "exact_match" in metrics and "acc" not in metrics else "acc"


@dataclass
class SideEffectTable:
    """Paper Table 4: per concept, each task's main metric under neuron vs range masking (deltas vs clean)."""

    concepts: list[str]
    tasks: list[str]
    clean: dict[str, dict[str, float]]
    neuron: list[dict[str, dict[str, float]]]
    range: list[dict[str, dict[str, float]]]
    operator: str = "zero"
    meta: dict[str, Any] = field(default_factory=dict)

    def _cols(self) -> list[tuple[str, str]]:
        return [(t, main_metric(self.clean[t])) for t in self.tasks]

    def summary(self) -> dict[str, dict[str, float]]:
        """10 % trimmed mean across concepts of every delta."""
        from scipy.stats import trim_mean  # heavy: only the summary needs it, not reading or listing results

        return {part: {f"{t}/{k}": float(trim_mean([row[t][k] for row in getattr(self, part)], 0.1))
                       for t, k in self._cols()} for part in ("neuron", "range")}

    def to_markdown(self) -> str:
        cols = self._cols()
        names = [f"{t} {'PPL' if k.endswith('perplexity') else k}" for t, k in cols]
        head = ["Concept", *(f"neuron Δ{n}" for n in names), *(f"range Δ{n}" for n in names)]
        clean = ", ".join(f"{n} = {self.clean[t][k]:.4f}" for n, (t, k) in zip(names, cols))
        lines = [f"Operator: `{self.operator}`. Clean model: {clean}. Deltas vs clean.", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows = [(c, self.neuron[i], self.range[i]) for i, c in enumerate(self.concepts)]
        for c, n, r in rows:
            lines.append("| " + " | ".join([cell(c), *(f"{n[t][k]:+.4f}" for t, k in cols),
                                            *(f"{r[t][k]:+.4f}" for t, k in cols)]) + " |")
        s = self.summary()
        lines.append("| trimmed mean (10%) | " + " | ".join(
            [*(f"{s['neuron'][f'{t}/{k}']:+.4f}" for t, k in cols),
             *(f"{s['range'][f'{t}/{k}']:+.4f}" for t, k in cols)]) + " |")
        lines += ["", trim_note(len(self.concepts))]
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "summary": self.summary()}, indent=2, default=str)

    def write(self, stem: str | Path) -> None:
        """``<stem>.md`` and ``<stem>.json``, each written atomically."""
        for ext, text in (("md", self.to_markdown()), ("json", self.to_json())):
            write_text(f"{stem}.{ext}", text)

    @classmethod
    def from_json(cls, text: str) -> SideEffectTable:
        d = json.loads(text)
        d.pop("summary", None)
        return cls(**d)
