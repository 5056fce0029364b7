"""The run report: one Markdown file built from what a run directory holds."""

from __future__ import annotations

import json
from pathlib import Path

from .erasure import ErasureTable

__all__ = ["write_report"]


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` from ``summary.json``, ``config.json`` and the ``erasure_*.json`` tables."""
    run = Path(run_dir)
    summary = json.loads((run / "summary.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    site = summary["site"]
    lines = [
        "# nslens run report", "",
        f"- model: `{summary['model_id']}` ({site['family']}, {site['n_layers']} layers, d_model {site['d_model']})",
        f"- site: output of layer {site['layer']} (`{site['path']}`)",
        f"- dataset: `{summary['dataset']}`; {summary['n_train']} train / {summary['n_test']} test samples",
        f"- ranking `{cfg['method']}`, top {cfg['fraction']:.0%} = {summary['neurons_per_concept']} neurons per "
        f"concept, tau = {cfg['tau']}",
        f"- interventions at {cfg['positions']} positions", "",
        "## Concept erasure", "",
        "Acc/Conf on the target concept, CAcc/CConf on all other concepts pooled; the last row is the 10 % "
        "trimmed mean across concepts. Neuron masking changes every value of the selected neurons, range "
        "masking only values inside [mu - tau*sigma, mu + tau*sigma].", "",
    ]
    for path in sorted(run.glob("erasure_*.json")):
        tab = ErasureTable.from_json(path.read_text())
        lines += [f"### Operator `{tab.operator}`", "", tab.to_markdown()]
    side = sorted(run.glob("side_effects_*.json"))
    if side:
        from .harness import SideEffectTable

        lines += ["## Side effects (lm-eval)", "",
                  "Each concept's mask applied at every position while lm-eval scores the model; deltas vs the "
                  "clean model (paper Table 4). PPL is word perplexity.", ""]
        for path in side:
            tab = SideEffectTable.from_json(path.read_text())
            lines += [f"### Operator `{tab.operator}`", "", tab.to_markdown()]
    out = run / "report.md"
    out.write_text("\n".join(lines))
    return out
