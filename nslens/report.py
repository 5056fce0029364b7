"""The run report: one Markdown file built from what a run directory holds."""

from __future__ import annotations

from pathlib import Path

from .effects import SideEffectTable
from .erasure import METRICS, ErasureTable
from .errors import NsLensError
from .files import read_json, write_text
from .mdtable import cell
from .sae import table31_markdown
from .sweeps import Sweep

__all__ = ["section", "write_report"]


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` from ``summary.json``, ``config.json`` and the ``erasure_*.json`` tables."""
    run = Path(run_dir)
    if not (run / "summary.json").exists():
        raise NsLensError(f"{run} is not an nslens run directory (no summary.json)")
    summary = read_json(run / "summary.json")
    cfg = read_json(run / "config.json")
    site = summary["site"]
    lines = [
        "# nslens run report", "",
        f"- model: `{summary['model_id']}` ({site['family']}, {site['n_layers']} layers, d_model {site['d_model']})",
        f"- site: output of layer {site['layer']} (`{site['path']}`)",
        f"- dataset: `{summary['dataset']}`; {summary['n_train']} train / {summary['n_test']} test samples"
        + ("; next-token concepts (raw contexts; Acc/Conf: the model predicts the token that followed)"
           if summary.get("next_token") else ""),
        f"- ranking `{cfg['method']}`, top {cfg['fraction']:.0%} = {summary['neurons_per_concept']} neurons per "
        f"concept, tau = {cfg['tau']}",
        f"- interventions at {cfg['positions']} positions", "",
        "## Concept erasure", "",
        "Acc/Conf on the target concept, CAcc/CConf averaged over the other concepts (see each table's footer); "
        "the last row is the 10 % trimmed mean across concepts. Neuron masking changes every value of the selected neurons, range "
        "masking only values inside [mu - tau*sigma, mu + tau*sigma].", "",
    ]
    for tab in _erasure_tables(run):
        if not tab.meta.get("steering"):  # steering runs have their own section
            lines += [f"### Operator `{tab.operator}`", "", tab.to_markdown()]
    lines += _steering_sections(run)
    lines += _side_effect_sections(run)
    lines += _sae_sections(run)
    lines += _analysis_sections(run)
    lines += _sweep_sections(run)
    lines += _neg_sections(run)
    failed = summary.get("failed_steps") or {}
    if failed or summary.get("status", "complete") != "complete":
        lines += ["## Run status", "", f"Status: {summary.get('status', 'complete')}.", ""]
        lines += [f"- step `{step}` failed: {msg}" for step, msg in failed.items()] + [""]

    return write_text(run / "report.md", "\n".join(lines))


def section(run_dir: str | Path, name: str) -> str:
    """One part of a run's report as Markdown, from the run directory (empty when the run has none): ``sae``,
    ``steering``, ``side_effects``, ``analyses``, ``sweeps`` or ``neg``. The CLI prints these."""
    builders = {"sae": _sae_sections, "steering": _steering_sections, "side_effects": _side_effect_sections,
                "analyses": _analysis_sections, "sweeps": _sweep_sections, "neg": _neg_sections}
    if name not in builders:
        raise NsLensError(f"unknown report section {name!r}; choose one of {', '.join(builders)}")
    return "\n".join(builders[name](Path(run_dir)))


def _erasure_tables(run: Path) -> list[ErasureTable]:
    return [read_json(path, ErasureTable.from_json) for path in sorted(run.glob("erasure_*.json"))]


def _steering_sections(run: Path) -> list[str]:
    steering = [tab for tab in _erasure_tables(run) if tab.meta.get("steering")]
    if not steering:
        return []
    lines = ["## Steering baselines (paper App. M, Tables 28-30)", "",
             f"Full-vector masks with ranges mu -/+ tau sigma, tau = {steering[0].meta.get('steer_tau')}; "
             f"steering vectors from the {steering[0].meta.get('steer_source')}-token statistics. `steer`: "
             "neuron columns = difference-in-means steering, range columns = range-gated steering. `ablate`: "
             "directional ablation (neuron columns). `arm`: range columns = range masking of the full vector.",
             ""]
    for tab in steering:
        lines += [f"### `{tab.meta['steering']}` ({tab.operator})", "", tab.to_markdown()]
    return lines


def _side_effect_sections(run: Path) -> list[str]:
    side = sorted(run.glob("side_effects_*.json"))
    if not side:
        return []

    lines = ["## Side effects (lm-eval)", "",
             "Each concept's mask applied at every position while lm-eval scores the model; deltas vs the "
             "clean model (paper Table 4). PPL is token perplexity where the task has it (the paper's PPL, "
             "task `nslens_wikipedia_ppl`), else word perplexity.", ""]
    for path in side:
        tab = read_json(path, SideEffectTable.from_json)
        name = path.stem.removeprefix("side_effects_")
        title = f"Operator `{tab.operator}`" if name in (tab.operator, tab.operator.split("(")[0]) \
            else f"`{name}` ({tab.operator})"
        lines += [f"### {title}", "", tab.to_markdown()]
    return lines


def _analysis_sections(run: Path) -> list[str]:
    path = run / "analysis.json"
    if not path.exists():
        return []
    a = read_json(path)
    norm = a["normality"]
    lines = ["## Normality of concept-conditioned activations", "",
             "Skewness, Pearson kurtosis (normal = 3) and the share of practically normal neurons (KS statistic of "
             f"the standardised activations against N(0, 1) <= {norm['ks_threshold']}), per concept; all neurons "
             "and the concept's selected neurons.", "",
             "| concept | skewness | kurtosis | practically normal | selected: skewness | kurtosis | practically normal |",
             "|---|---|---|---|---|---|---|"]
    for name, v in norm["all_neurons"].items():
        w = norm["salient_neurons"][name]
        lines.append(f"| {cell(name)} | {v['skewness']:+.3f} | {v['kurtosis']:.3f} | {v['practically_normal']:.3f} | "
                     f"{w['skewness']:+.3f} | {w['kurtosis']:.3f} | {w['practically_normal']:.3f} |")
    p = a["polysemanticity"]
    lines += ["", "## Polysemanticity", "",
              f"Share of each concept's top {p['fraction']:.0%} salient neurons that are also salient for another "
              f"concept (rows: concept a, columns: concept b). {len(p['common_neurons'])} neurons are salient for "
              "every concept.", "", "![polysemanticity](figures/polysemanticity.png)", ""]
    d = a["distribution_overlap"]
    lines += ["## Distribution overlap", "", f"Overlap = {d['definition']}; 1 = identical, 0 = separated.", "",
              "| overlap quartile | share of (neuron, concept pair) |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in d["quartiles"].items()]
    lines += ["", "## Activation patterns", "",
              "Per-concept KDEs of the top-, middle- and bottom-ranked neuron of each concept; the shaded band is "
              "the concept's range.", ""]
    lines += [f"![patterns](figures/{f.name})" for f in sorted((run / "figures").glob("patterns_*.png"))]
    lines += ["", "Neurons salient for every concept:", "", "![common](figures/common_neurons.png)", "",
              "## Samples at the bounds", ""]
    for name, b in a["bound_samples"].items():
        lines.append(f"**{name}**, neuron {b['neuron']} (texts nearest the range's lower bound, mean mu and upper bound):")
        for where in ("lower", "mean", "upper"):
            text, act = b[where][0]
            lines.append(f"- {where} ({act:+.3f}): `{text[:120]}`")
        lines.append("")
    return lines


def _sweep_sections(run: Path) -> list[str]:
    files = sorted(run.glob("sweep_*.json"))
    if not files:
        return []
    lines = ["## Sweeps", "", "Accuracy after intervention (10 % trimmed means across concepts): target concept "
             "(Acc) and the other concepts (CAcc).", ""]
    for f in files:
        sw = read_json(f, Sweep.from_json)
        lines += [f"### {sw.param}", "", sw.to_markdown(), f"![sweep](figures/sweep_{sw.param}.png)", ""]
    return lines


def _sae_sections(run: Path) -> list[str]:
    path = run / "sae.json"
    if not path.exists():
        return []

    meta = read_json(path)
    src = meta["sae"].get("release", "") + " " + meta["sae"].get("sae_id", meta["sae"].get("source", ""))
    lines = ["## SAE features (paper Appendix N)", "",
             f"SAE `{src.strip()}`: d_in {meta['d_in']}, {meta['d_sae']} features. Feature selection statistics "
             "(paper Table 31):", "", table31_markdown(meta["table31"]),
             "Feature masking (every value of the selected features) vs range masking (values in the concept's "
             "range), 10 % trimmed means across concepts (paper Table 32):", "",
             "| operator | masking | ΔAcc | ΔConf | ΔCAcc | ΔCConf | ΔPPL |", "|---|---|---|---|---|---|---|"]
    summary = read_json(run / "summary.json")
    for op, s in summary["erasure"].items():
        side = summary.get("side_effects", {}).get(op, {})
        for part, label in (("neuron", "feature"), ("range", "range")):
            ppl = [v for k, v in side.get(part, {}).items() if k.endswith(("token_perplexity", "word_perplexity"))]
            lines.append(f"| {op} | {label} | " + " | ".join(f"{s[part][k]:+.3f}" for k in METRICS) + " | "
                         + (f"{ppl[0]:+.3f}" if ppl else "n/a") + " |")
    return [*lines, ""]


def _neg_sections(run: Path) -> list[str]:
    lines = []
    if (run / "neg.md").exists():
        lines += ["## Neuron empirical gradients", "",
                  "Ground-truth NEG (zero-intercept slope of p(target) against a shift v sign(a) of one neuron) vs "
                  "NeurGrad = dp/da x sign(a), over sampled (prompt, neuron) pairs (NEG paper Tables 1-2).", "",
                  (run / "neg.md").read_text(), ""]
    if (run / "probes.md").exists():
        lines += ["## Skill-neuron probes", "", "Probes on NeurGrad features; test accuracy on a split that shares no "
                  "query with training or validation (NEG paper Section 5).", "", (run / "probes.md").read_text(), ""]
    return lines
