"""Paper Appendix M, Tables 28-30: difference-in-means steering (mean-token and last-token vectors), range-gated
steering, directional ablation and range masking of the full vector (tau = 1), with MMLU / perplexity, on
Llama-3.2-3B (AG News) at layer 14, the middle of its 28 blocks, steering strength a = -2.

    python experiments/steering.py                                        # the paper's setting (Hub)
    python experiments/steering.py --model embedded --dataset synthetic --limit 24 --lm-eval-limit 8   # offline
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nslens
from nslens.config import RunConfig, SideEffectsConfig, SteeringConfig
from nslens.pipeline import run_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_dataset, check_out, default_dataset, progress, run, run_parser  # noqa: E402

CONFIG = RunConfig(
    model="meta-llama/Llama-3.2-3B", dataset="ag_news", layer=14, operators=["zero"], n_per_class=3000,
    only_correct=True, max_correct_per_class=2000, steering=SteeringConfig(runs=["steer", "ablate", "arm"], alpha=-2.0, tau=1.0),
    side_effects=SideEffectsConfig(enabled=True), analyses=False, dtype="bfloat16",
)


def main(argv: list[str] | None = None) -> None:
    args = run_parser(__doc__, CONFIG, "runs/steering", lm_eval=True).parse_args(argv)
    check_out(args.out)
    check_dataset(default_dataset(args.model, args.dataset, CONFIG.dataset))  # before the model loads
    model = nslens.load_model(args.model, dtype=None if args.model == "embedded" else CONFIG.dtype, remote=args.remote)
    layer = nslens.resolve_site(model).n_layers // 2  # the middle block (14 of Llama-3.2-3B's 28)
    base = CONFIG.replace(model=args.model, dataset=default_dataset(args.model, args.dataset, CONFIG.dataset),
                   layer=layer, remote=args.remote, only_correct=not args.all_samples,
                   side_effects={"limit": args.lm_eval_limit}, batch_size=args.batch_size,
                   dtype=None if args.model == "embedded" else CONFIG.dtype,
                   n_per_class=args.limit or CONFIG.n_per_class)
    rows = ["| vectors | run | ΔAcc | ΔCAcc | ΔCConf | ΔPPL | ΔMMLU |", "|---|---|---|---|---|---|---|"]
    for source, tables in (("mean", "Tables 28 and 30"), ("last", "Table 29")):
        with progress() as cb:
            out = run_pipeline(base.replace(steering={"source": source}), args.out / source, model=model, overwrite=True,
                               progress=cb)
        summary = json.loads((out / "summary.json").read_text())
        for name, column, label in (("steer", "neuron", "steering"), ("steer", "range", "range-gated steering"),
                                    ("ablate", "neuron", "directional ablation"), ("arm", "range", "range masking")):
            e = summary["erasure"][name][column]
            side = summary.get("side_effects", {}).get(name, {}).get(column, {})
            ppl = next((v for k, v in side.items() if k.endswith("perplexity")), float("nan"))
            acc = next((v for k, v in side.items() if k.endswith("/acc")), float("nan"))
            rows.append(f"| {source} token ({tables}) | {label} | {e['acc']:+.3f} | {e['cacc']:+.3f} | "
                        f"{e['cconf']:+.3f} | {ppl:+.3f} | {acc:+.3f} |")
    text = "\n".join(rows) + "\n"
    (args.out / "steering.md").write_text(text)
    print(text)
    print(f"full reports: {args.out / 'mean' / 'report.md'}, {args.out / 'last' / 'report.md'}")


if __name__ == "__main__":
    run(main)
