"""Paper Table 3: concept erasure by neuron vs range masking, Llama-3.2-3B few-shot on AG News, Emotions and
DBPedia-14 (last decoder block, the paper's 'penultimate layer', top 30 % neurons by max activation, tau = 2.5, zeroing, only samples the clean
model classifies correctly, up to 2000 per class).

    python experiments/table3.py                         # the paper's setting (needs the Hub or a local cache)
    python experiments/table3.py --remote                # the same on NDIF
    python experiments/table3.py --model embedded --datasets synthetic --limit 40   # offline smoke run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nslens.config import RunConfig
from nslens.pipeline import run_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_sample_args,
    check_datasets,
    check_out,
    parser,
    positive_int,
    progress,
    run,
    run_dir,
)

CONFIG = RunConfig(
    model="meta-llama/Llama-3.2-3B",
    layer=-1,
    method="max",
    fraction=0.3,
    tau=2.5,
    operators=["zero"],
    n_per_class=3000,
    test_size=0.3,
    only_correct=True,
    max_correct_per_class=2000,
    k_shot=1,
    batch_size=16,
    dtype="bfloat16",
)
DATASETS = ["ag_news", "emotion", "dbpedia_14"]


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", default=CONFIG.model)
    ap.add_argument("--datasets", nargs="+", default=DATASETS)
    add_sample_args(ap)
    ap.add_argument("--out", type=Path, default=Path("runs/table3"))
    ap.add_argument("--remote", action="store_true")
    ap.add_argument("--batch-size", type=positive_int, default=CONFIG.batch_size)
    args = ap.parse_args(argv)
    check_out(args.out)
    check_datasets(args.datasets, args.out)  # all of them before the first run
    summary = {}
    for ds in args.datasets:
        cfg = CONFIG.replace(model=args.model, dataset=ds, remote=args.remote, batch_size=args.batch_size,
                      dtype=None if args.model == "embedded" else CONFIG.dtype, only_correct=not args.all_samples,
                      n_per_class=args.limit or CONFIG.n_per_class)
        with progress() as cb:
            out = run_pipeline(cfg, run_dir(args.out, ds), overwrite=True, progress=cb)
        summary[ds] = json.loads((out / "summary.json").read_text())["erasure"]["zero"]
    lines = ["| Dataset | Acc | Conf | CAcc | CConf | N ΔAcc | N ΔConf | N ΔCAcc | N ΔCConf | R ΔAcc | R ΔConf | "
             "R ΔCAcc | R ΔCConf |", "|" + "---|" * 13]
    for ds, s in summary.items():
        vals = [s[part][k] for part in ("base", "neuron", "range") for k in ("acc", "conf", "cacc", "cconf")]
        lines.append(f"| {ds} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    (args.out / "table3.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run(main)
