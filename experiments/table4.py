"""Paper Table 4 and the operator comparison of Tables 12-16: token perplexity on Wikipedia (the paper's PPL) and
MMLU (zero-shot) under neuron vs range masking of every concept, for zeroing, dampening (alpha 0.125), mean replacement and adaptive
dampening (beta 0.5), on Llama-3.2-3B (last decoder block, the paper's 'penultimate layer', top 30 %, tau 2.5), with the erasure table beside them.

    python experiments/table4.py --dataset dbpedia_14                # the paper's setting (Hub or local cache)
    python experiments/table4.py --limit 100 --lm-eval-limit 20      # cheaper: fewer samples / lm-eval docs
    python experiments/table4.py --model embedded --dataset synthetic --limit 16 --lm-eval-limit 8 --operators zero
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nslens.config import RunConfig, SideEffectsConfig
from nslens.pipeline import run_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_out, default_dataset, progress, run, run_parser  # noqa: E402

CONFIG = RunConfig(
    model="meta-llama/Llama-3.2-3B", dataset="ag_news", layer=-1, method="max", fraction=0.3, tau=2.5,
    operators=["zero", "dampen", "mean", "adaptive"], n_per_class=3000, only_correct=True,
    max_correct_per_class=2000, side_effects=SideEffectsConfig(enabled=True, tasks=["mmlu", "nslens_wikipedia_ppl"]),
    dtype="bfloat16",
)


def main(argv: list[str] | None = None) -> None:
    ap = run_parser(__doc__, CONFIG, "runs/table4", lm_eval=True)
    ap.add_argument("--operators", nargs="+", default=CONFIG.operators)
    args = ap.parse_args(argv)
    check_out(args.out)
    cfg = CONFIG.replace(model=args.model, dataset=default_dataset(args.model, args.dataset, CONFIG.dataset),
                  operators=args.operators, remote=args.remote, side_effects={"limit": args.lm_eval_limit},
                  batch_size=args.batch_size, dtype=None if args.model == "embedded" else CONFIG.dtype,
                  only_correct=not args.all_samples, n_per_class=args.limit or CONFIG.n_per_class)
    with progress() as cb:
        run_out = run_pipeline(cfg, args.out, overwrite=True, progress=cb)
    summary = json.loads((run_out / "summary.json").read_text())
    lines = ["| operator | task metric | clean | neuron Δ | range Δ |", "|---|---|---|---|---|"]
    for op, s in summary["side_effects"].items():
        for key, delta in s["neuron"].items():
            task, metric = key.split("/")
            lines.append(f"| {op} | {task} {metric} | {s['clean'][task][metric]:.4f} | {delta:+.4f} | "
                         f"{s['range'][key]:+.4f} |")
    (run_out / "table4.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"full report: {run_out / 'report.md'}")


if __name__ == "__main__":
    run(main)
