"""The papers' findings on a real pretrained Llama: SmolLM2-135M-Instruct (``smollm2-135m``) on Debian fortunes text.

One command, a run directory (default runs/real_model) with ``report.md`` and ``report.json``:

- **topics**: classification of ``fortunes:computers,food,love,kids,sports,medicine`` with the model's registered
  protocol (``nslens.protocols``: one demonstration per class of at most 24 words, the calibrated readout) and the
  paper's only-correct filter, at the last block, ``max`` ranking, top 30 %, tau 2.5,
  zeroing: Table 1 normality, Table 5 overlap quartiles, Fig. 3 KDE panels (``topics/figures``), Table 3 erasure,
  Table 4 side effects (token perplexity on the held-out fortunes, ``nslens_fortunes_ppl``; no multiple-choice
  task is available offline), and Table 3 again with the probeless and probe rankings (the same recording);
- **next**: App. K next-token concepts (he / she / they) on fortunes text written into the run directory: the same
  tables, App. M steering (steer, ablate, arm), a layer sweep (App. F: where is range masking selective?);
- **outliers**: the massive-activation finding (``nslens.outliers``) on both runs: which neurons the rankings pick,
  how range masks behave on them, and erasure with them excluded, with a standardised ranking, and with only them;
- **neg**: NEG linearity (NEG paper Tables 1-2) on the model's MLP neurons for next-token prompts;
- **quantized**: the next-token erasure table with the model loaded in nf4 and int8 (bitsandbytes), and how far its
  numbers move from full precision.

The next-token run keeps every sample (``only_correct=False``: he / she / they are guessed right about half the
time and the filter would halve a small dataset); the report gives the clean accuracy its deltas start from.

    python experiments/real_model.py                 # about 15 minutes on 2 shared cores
    python experiments/real_model.py --smoke         # tiny sizes (the CI smoke test)
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_out, parser, progress, run  # noqa: E402


@dataclass
class RealModelConfig:
    """Sizes and settings of the experiment (chosen so the full run fits 30 minutes on two CPU cores)."""

    model: str = "smollm2-135m"
    topics: str | None = None
    """None: the model's protocol dataset (nslens.protocols)."""
    topics_per_class: int = 30
    topics_only_correct: bool = True
    """The paper's only-correct filter on the topics run."""
    k_shot: int | None = None
    """None: the model's protocol (nslens.protocols)."""
    max_words: int | None = None
    next_family: str = "pronouns"
    next_per_class: int = 40
    next_max_words: int = 24
    fraction: float = 0.3
    tau: float = 2.5
    rankings: list[str] = field(default_factory=lambda: ["probeless", "probe"])
    """Rankings besides max, evaluated on the max run's recording."""
    steering: list[str] = field(default_factory=lambda: ["steer", "ablate", "arm"])
    sweep_layers: list[int] = field(default_factory=lambda: [15, 25])
    ppl_docs: int = 3
    ppl_max_tokens: int = 256
    neg_prompts: int = 4
    neg_neurons: int = 16
    neg_layers: list[int] = field(default_factory=lambda: [14, 29])
    ig_steps: int = 8
    quantize: list[str] = field(default_factory=lambda: ["nf4", "int8"])
    outlier_ratio: float = 20.0
    batch_size: int = 16
    seed: int = 0


SMOKE = RealModelConfig(topics="fortunes:computers,food,love,kids", topics_per_class=6, topics_only_correct=False,
                        k_shot=1, max_words=8, next_per_class=8, next_max_words=12,
                        rankings=["probeless"], steering=["steer"], sweep_layers=[28], ppl_docs=1, ppl_max_tokens=48,
                        neg_prompts=1, neg_neurons=4, neg_layers=[29], ig_steps=2, quantize=["nf4"])

METRICS = ("acc", "conf", "cacc", "cconf")


def _erasure(model: Any, site: Any, data: Any, masks: list, batch_size: int) -> dict:
    """Table 3 summary (trimmed means: base, neuron deltas, range deltas) of zeroing ``masks``."""
    import nslens

    return nslens.erasure_table(model, site, data.prompts(data.test), data.test.labels, data.label_ids, masks,
                                nslens.zero(), gold_token_ids=data.test_gold, batch_size=batch_size,
                                readout=data.readout).summary()


def _recording(run_dir: Path) -> tuple[Any, np.ndarray, np.ndarray]:
    """The stats and raw samples a pipeline run saved."""
    from safetensors.numpy import load_file

    from nslens.stats import ConceptStats

    raw = load_file(str(run_dir / "samples.safetensors"))
    return ConceptStats.load(run_dir / "stats.safetensors"), raw["samples"], raw["labels"].astype(np.int64)


def outlier_study(model: Any, site: Any, data: Any, run_dir: Path, rc: RealModelConfig) -> dict:
    """Part 6: the massive-activation dimensions of a run's site and what each ranking does with them."""
    from nslens.outliers import exclude_dims, outlier_dims, pooled_rms, range_coverage, rank_standardised
    from nslens.ranges import build_range_masks
    from nslens.rank import rank, select_top

    stats, samples, labels = _recording(run_dir)
    dims = outlier_dims(stats, rc.outlier_ratio)
    rms = pooled_rms(stats)
    d, k = stats.d, max(1, int(rc.fraction * stats.d))
    out: dict[str, Any] = {
        "ratio": rc.outlier_ratio, "median_rms": float(np.median(rms)), "dims": dims.tolist(),
        "dim_rms": [round(float(rms[j]), 1) for j in dims],
        "dim_range": {int(j): [round(float(samples[:, j].min()), 1), round(float(samples[:, j].max()), 1)]
                      for j in dims},
        "neurons_per_concept": k, "rankings": {}}
    rankings = {"max": rank("max", stats), "probeless": rank("probeless", stats),
                "probe": rank("probe", stats, samples, labels), "standardised": rank_standardised(stats)}
    rankings["max_excl_outliers"] = exclude_dims(rankings["max"], dims)
    only = np.zeros_like(rankings["max"])
    only[:, dims] = 1.0
    for name, scores in rankings.items():
        masks = build_range_masks(stats, fraction=rc.fraction, tau=rc.tau, scores=scores)
        tops = [set(select_top(s, rc.fraction).tolist()) for s in scores]
        cov = [range_coverage(m, samples, labels, stats.n_concepts) for m in masks]
        other = [np.delete(c, i, axis=0) for i, c in enumerate(cov)]
        is_out = [np.isin(m.neurons.numpy(), dims) for m in masks]
        entry = {
            "outliers_in_top": [int(len(t & set(dims.tolist()))) for t in tops],
            "first_neuron": [int(m.neurons[0]) for m in masks],
            "common_to_all": len(set.intersection(*tops)),
            "other_concept_coverage": float(np.nanmean(np.concatenate([o.ravel() for o in other]))),
            "other_coverage_outliers": float(np.nanmean(np.concatenate(
                [o[:, f].ravel() for o, f in zip(other, is_out)]))) if any(f.any() for f in is_out) else None,
        }
        if name in ("max", *rc.rankings):
            entry["erasure"] = None  # the max run and the extra rankings' tables are in the Table 3 section
        else:
            entry["erasure"] = _erasure(model, site, data, masks, rc.batch_size)
        out["rankings"][name] = entry
    if len(dims):
        frac = len(dims) / d
        masks = build_range_masks(stats, fraction=frac, tau=rc.tau, scores=only)
        out["only_outliers"] = {"neurons": len(masks[0]), "erasure": _erasure(model, site, data, masks,
                                                                              rc.batch_size)}
    return out


def extra_rankings(model: Any, site: Any, data: Any, run_dir: Path, rc: RealModelConfig) -> dict:
    """Table 3 with the other rankings, on the max run's recording and split."""
    from nslens.ranges import build_range_masks

    stats, samples, labels = _recording(run_dir)
    return {m: _erasure(model, site, data, build_range_masks(stats, method=m, fraction=rc.fraction, tau=rc.tau,
                                                             samples=samples, sample_labels=labels), rc.batch_size)
            for m in rc.rankings}


def neg_study(model: Any, cfg: Any, rc: RealModelConfig) -> dict:
    """NEG Tables 1-2 on the MLP neurons of ``neg_layers`` for next-token prompts (their gold next token)."""
    from nslens.neg import linearity_report, resolve_neuron_site
    from nslens.pipeline import prepare_data

    site = __import__("nslens").resolve_site(model, -1)
    data = prepare_data(model, site, cfg)
    n = rc.neg_prompts
    rep = linearity_report(model, [resolve_neuron_site(model, layer, "product") for layer in rc.neg_layers],
                           list(data.test.texts)[:n], [int(t) for t in data.test_gold[:n]],
                           n_neurons=rc.neg_neurons, ig_steps=rc.ig_steps, only_correct=False)
    return {"layers": rc.neg_layers, "summary": rep.summary(), "markdown": rep.to_markdown()}


def _fmt_erasure(rows: dict[str, dict]) -> list[str]:
    lines = ["| setting | Acc | Conf | CAcc | CConf | N ΔAcc | N ΔCAcc | R ΔAcc | R ΔCAcc |", "|" + "---|" * 9]
    for name, s in rows.items():
        if s is None:
            continue
        vals = [s["base"][k] for k in METRICS] + [s[p][k] for p in ("neuron", "range") for k in ("acc", "cacc")]
        lines.append(f"| {name} | " + " | ".join(f"{v:+.3f}" if i >= 4 else f"{v:.3f}" for i, v in enumerate(vals))
                     + " |")
    return lines


def report(res: dict) -> str:
    """The markdown report of ``res`` (what report.json holds)."""
    L = [f"# {res['model']} on fortunes text", "", f"nslens {res['nslens_version']}; total {res['seconds']:.0f} s; "
         "erasure rows are 10 % trimmed means over concepts, deltas are masked minus clean.", ""]
    for run_name in ("topics", "next"):
        r = res.get(run_name)
        if not r:
            continue
        a = r.get("analysis", {})
        L += [f"## {run_name}: {r['dataset']}", "", f"site {r['site']}, {r['n_train']} train / {r['n_test']} test "
              f"samples, settings {r['settings']}, {r['seconds']:.0f} s.", ""]
        if a:
            norm = a["normality"]
            L += ["Table 1 (normality: mean skewness, kurtosis, share practically normal):", "",
                  "| neurons | concept | skewness | kurtosis | practically normal |", "|---|---|---|---|---|"]
            L += [f"| {part} | {c} | {v['skewness']:+.3f} | {v['kurtosis']:.3f} | {v['practically_normal']:.3f} |"
                  for part in ("all_neurons", "salient_neurons") for c, v in norm[part].items()]
            L += ["",
                  "Table 5 (distribution overlap quartiles): " + ", ".join(
                      f"{k} {v:.3f}" for k, v in a["distribution_overlap"]["quartiles"].items()), "",
                  f"Fig. 3 KDE panels: {run_name}/figures/patterns_*.png; common salient neurons "
                  f"{len(a['polysemanticity']['common_neurons'])}.", ""]
        rows = {"max": r["erasure"], **r.get("rankings", {}), **r.get("steering", {})}
        L += ["Table 3 (erasure by zeroing; steering rows: App. M):", "", *_fmt_erasure(rows), ""]
        if r.get("side_effects"):
            L += ["Table 4 (side effects, held-out fortunes token perplexity; no offline MC task):", "",
                  "```", json.dumps(r["side_effects"], indent=1), "```", ""]
        if r.get("sweep"):
            L += ["Layer sweep (App. F):", "", r["sweep"], ""]
    for run_name in ("topics", "next"):
        o = res.get("outliers", {}).get(run_name)
        if not o:
            continue
        L += [f"## Massive activations ({run_name})", "",
              f"{len(o['dims'])} outlier dimensions (pooled RMS > {o['ratio']:g} x median {o['median_rms']:.3f}): "
              + ", ".join(f"{j} (RMS {v}, range {o['dim_range'][j] if j in o['dim_range'] else o['dim_range'][str(j)]})"
                          for j, v in zip(o["dims"], o["dim_rms"])) + f"; {o['neurons_per_concept']} neurons per "
              "concept.", "",
              "| ranking | outliers in top set (per concept) | first neuron | common to all | other-concept samples "
              "inside the range (all / outlier neurons) |", "|---|---|---|---|---|"]
        for name, e in o["rankings"].items():
            oc = "n/a" if e["other_coverage_outliers"] is None else f"{e['other_coverage_outliers']:.3f}"
            L.append(f"| {name} | {e['outliers_in_top']} | {e['first_neuron']} | {e['common_to_all']} | "
                     f"{e['other_concept_coverage']:.3f} / {oc} |")
        rows = {n: e["erasure"] for n, e in o["rankings"].items() if e["erasure"]}
        if "only_outliers" in o:
            rows[f"only the {o['only_outliers']['neurons']} outlier dims"] = o["only_outliers"]["erasure"]
        L += ["", *_fmt_erasure(rows), ""]
    if res.get("neg"):
        L += [f"## NEG linearity (MLP neurons, layers {res['neg']['layers']})", "", res["neg"]["markdown"], ""]
    if res.get("quantized"):
        L += ["## Quantized (next-token erasure table)", "", *_fmt_erasure(
            {"full": res["next"]["erasure"], **{q: v["erasure"] for q, v in res["quantized"].items()}}), "",
              "| quantization | max \\|Δ\\| vs full precision over all cells | load + run s |", "|---|---|---|"]
        L += [f"| {q} | {v['max_abs_diff']:.3f} | {v['seconds']:.0f} |" for q, v in res["quantized"].items()]
    return "\n".join(L) + "\n"


def run_experiment(rc: RealModelConfig, out: Path, model: Any = None, log: Any = print) -> dict:
    """Everything, into ``out``; ``model``: the loaded model (else loaded from ``rc.model``)."""
    import nslens
    from nslens.config import RunConfig, SideEffectsConfig, SteeringConfig, SweepConfig
    from nslens.files import write_text
    from nslens.fortunes import fortune_categories, read_items
    from nslens.pipeline import prepare_data, run_pipeline
    from nslens.protocols import protocol_for, protocol_settings
    from nslens.realtext import fortunes_ppl_task_dir

    t_all = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = nslens.load_model(rc.model)
    site = nslens.resolve_site(model, -1)
    res: dict[str, Any] = {"model": rc.model, "nslens_version": nslens.__version__, "config": asdict(rc),
                           "outliers": {}}
    text_file = out / "fortunes_text.txt"  # the concept (non-held-out) items of every category, one a line
    write_text(text_file, "".join(t + "\n" for c in fortune_categories() for t in read_items(c)))
    proto = protocol_for(rc.model)
    topics = rc.topics or (proto.dataset if proto else "fortunes")
    settings = protocol_settings(rc.model, topics)
    settings.update({k: v for k, v in (("k_shot", rc.k_shot), ("max_words", rc.max_words)) if v is not None})
    ppl_dir = fortunes_ppl_task_dir(model.tokenizer, max_tokens=rc.ppl_max_tokens, n_docs=rc.ppl_docs)
    common = {"model": rc.model, "method": "max", "fraction": rc.fraction, "tau": rc.tau, "only_correct": False,
              "batch_size": rc.batch_size, "seed": rc.seed}
    runs = {
        "topics": RunConfig(dataset=topics, n_per_class=rc.topics_per_class, **settings,
                            side_effects=SideEffectsConfig(enabled=True, tasks=["nslens_fortunes_ppl"],
                                                           include=str(ppl_dir)),
                            **{**common, "only_correct": rc.topics_only_correct}),
        "next": RunConfig(dataset=f"next:{rc.next_family}:{text_file}", n_per_class=rc.next_per_class,
                          max_words=rc.next_max_words, steering=SteeringConfig(runs=list(rc.steering)),
                          sweeps=SweepConfig(params=["layer"], layers=list(rc.sweep_layers)), **common),
    }
    for name, cfg in runs.items():
        t0 = time.perf_counter()
        log(f"[{name}] {cfg.dataset}")
        with progress() as cb:
            rd = run_pipeline(cfg, out / name, model=model, overwrite=True, progress=cb)
        s = json.loads((rd / "summary.json").read_text())
        entry = {"dataset": cfg.dataset, "site": s["site"], "n_train": s["n_train"], "n_test": s["n_test"],
                 "settings": {k: getattr(cfg, k) for k in ("k_shot", "max_words", "only_correct", "readout")},
                 "erasure": s["erasure"]["zero"], "failed_steps": s["failed_steps"],
                 "steering": {k: v for k, v in s["erasure"].items() if k != "zero"},
                 "side_effects": s.get("side_effects")}
        if (rd / "analysis.json").exists():
            entry["analysis"] = json.loads((rd / "analysis.json").read_text())
        if (rd / "sweep_layer.md").exists():
            entry["sweep"] = (rd / "sweep_layer.md").read_text()
        log(f"[{name}] rankings {rc.rankings}")
        data = prepare_data(model, site, cfg)  # the run's split (and filter) again, once: deterministic
        entry["rankings"] = extra_rankings(model, site, data, rd, rc)
        log(f"[{name}] outlier study")
        res["outliers"][name] = outlier_study(model, site, data, rd, rc)
        entry["seconds"] = time.perf_counter() - t0
        res[name] = entry
        write_text(out / "report.json", json.dumps(res, indent=2, default=str) + "\n")
    log("[neg] linearity")
    t0 = time.perf_counter()
    res["neg"] = neg_study(model, runs["next"], rc)
    res["neg"]["seconds"] = time.perf_counter() - t0
    res["quantized"] = {}
    full = res["next"]["erasure"]
    for q in rc.quantize:
        log(f"[quantized] {q}")
        t0 = time.perf_counter()
        cfg = runs["next"].replace(quantize=q, steering={"runs": []}, sweeps={"params": []}, analyses=False)
        with progress() as cb:
            rd = run_pipeline(cfg, out / f"next_{q}", overwrite=True, progress=cb)
        tab = json.loads((rd / "summary.json").read_text())["erasure"]["zero"]
        diff = max(abs(tab[p][k] - full[p][k]) for p in tab for k in tab[p])
        res["quantized"][q] = {"erasure": tab, "max_abs_diff": diff, "seconds": time.perf_counter() - t0}
    res["seconds"] = time.perf_counter() - t_all
    write_text(out / "report.json", json.dumps(res, indent=2, default=str) + "\n")
    md = report(res)
    write_text(out / "report.md", md)
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds, not minutes)")
    ap.add_argument("--out", type=Path, default=Path("runs/real_model"))
    ap.add_argument("--no-quantized", action="store_true", help="skip the nf4/int8 runs")
    args = ap.parse_args(argv)
    check_out(args.out)
    rc = replace(SMOKE if args.smoke else RealModelConfig())
    if args.no_quantized:
        rc.quantize = []
    res = run_experiment(rc, args.out)
    print((args.out / "report.md").read_text())
    return res


if __name__ == "__main__":
    run(main)
