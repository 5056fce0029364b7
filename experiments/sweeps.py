"""Paper Fig. 4 and Tables 10-11, 17: erasure against the masking fraction (5 %-100 %), tau (0.3-4.5) and the layer,
neuron vs range masking, on Llama-3.2-3B with AG News; plus the distribution analyses (Tables 1, 5, 7, 9; Fig. 2, 3).

    python experiments/sweeps.py                                   # the paper's setting (Hub or a local cache)
    python experiments/sweeps.py --model embedded --limit 24       # offline smoke run (embedded: synthetic data)
"""

from __future__ import annotations

import sys
from pathlib import Path

from nslens.config import RunConfig, SweepConfig
from nslens.pipeline import run_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_out, default_dataset, progress, run, run_parser  # noqa: E402

CONFIG = RunConfig(
    model="meta-llama/Llama-3.2-3B", dataset="ag_news", layer=-1, method="max", fraction=0.3, tau=2.5,
    operators=["zero"], n_per_class=1000, only_correct=True, max_correct_per_class=2000, dtype="bfloat16",
    analyses=True, sweeps=SweepConfig(params=["fraction", "tau", "layer"]),
)


def main(argv: list[str] | None = None) -> None:
    ap = run_parser(__doc__, CONFIG, "runs/sweeps")
    ap.add_argument("--sweeps", nargs="+", default=CONFIG.sweeps.params)
    args = ap.parse_args(argv)
    check_out(args.out)
    cfg = CONFIG.replace(model=args.model, dataset=default_dataset(args.model, args.dataset, CONFIG.dataset),
                         sweeps={"params": args.sweeps}, remote=args.remote, batch_size=args.batch_size,
                         dtype=None if args.model == "embedded" else CONFIG.dtype, only_correct=not args.all_samples)
    if args.limit:
        cfg = cfg.replace(n_per_class=args.limit, sweeps={"fractions": [0.1, 0.5, 1.0], "taus": [0.5, 2.5, 4.5]})
    with progress() as cb:
        out = run_pipeline(cfg, args.out, overwrite=True, progress=cb)
    for param in cfg.sweeps.params:
        print(f"## {param}\n{(out / f'sweep_{param}.md').read_text()}")
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    run(main)
