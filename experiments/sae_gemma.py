"""Paper Appendix N (Tables 31-32): range masking of Gemma Scope SAE features vs whole-feature masking, Gemma-2-2B on
DBPedia-14, residual SAEs at layer 25 (width 16k / L0 285 and width 65k / L0 197).

    python experiments/sae_gemma.py                              # needs the Hub (model, dataset, SAE) and sae-lens
    python experiments/sae_gemma.py --smoke                      # offline: embedded model + a synthetic npz SAE
"""

from __future__ import annotations

import sys
from pathlib import Path

from nslens.config import RunConfig, SaeConfig, SideEffectsConfig
from nslens.pipeline import run_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_sample_args, check_out, parser, progress, run  # noqa: E402

CONFIG = RunConfig(
    model="google/gemma-2-2b", dataset="dbpedia_14", layer=25, operators=["zero"], n_per_class=1000,
    only_correct=True, max_correct_per_class=2000, 
    sae=SaeConfig(release="gemma-scope-2b-pt-res", id="layer_25/width_16k/average_l0_285", ranges_over="firing"),
    side_effects=SideEffectsConfig(enabled=True), analyses=False,
    dtype="bfloat16",
)
SAE_IDS = ["layer_25/width_16k/average_l0_285", "layer_25/width_65k/average_l0_197"]


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--smoke", action="store_true", help="embedded model and a synthetic SAE, offline")
    add_sample_args(ap)
    ap.add_argument("--lm-eval-limit", type=float, default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/sae_gemma"))
    args = ap.parse_args(argv)
    check_out(args.out)
    if args.lm_eval_limit is not None and not args.lm_eval_limit > 0:  # 0 became 8; -2 failed after recording
        ap.error(f"--lm-eval-limit must be > 0, got {args.lm_eval_limit:g}")
    if args.smoke:
        import nslens
        from nslens.sae import build_synthetic_sae
        from nslens.synthetic import synthetic_concepts

        model = nslens.load_model("embedded")
        site = nslens.resolve_site(model)  # the run's site (the last block): the SAE is fitted where it is used
        ds = synthetic_concepts(40, seed=7)
        prompts = nslens.FewShotPrompter.from_dataset(ds).prompts(ds.texts)
        rec = nslens.record(model, site, prompts, ds.labels, ds.label_names, batch_size=32, keep_samples=True)
        args.out.mkdir(parents=True, exist_ok=True)
        path = build_synthetic_sae(rec.samples).save_npz(args.out / "synthetic_sae.npz")
        runs = {"synthetic": RunConfig(
            sae=SaeConfig(path=str(path)), n_per_class=args.limit or 24, batch_size=32,
            side_effects=SideEffectsConfig(enabled=True, limit=8 if args.lm_eval_limit is None else args.lm_eval_limit), analyses=False,
            only_correct=not args.all_samples)}
    else:
        runs = {sid.split("/")[1]: CONFIG.replace(sae={"id": sid}, side_effects={"limit": args.lm_eval_limit},
                                           n_per_class=args.limit or CONFIG.n_per_class,
                                           only_correct=not args.all_samples) for sid in SAE_IDS}
    for name, cfg in runs.items():
        with progress() as cb:
            out = run_pipeline(cfg, args.out / name, overwrite=True, progress=cb)
        report = (out / "report.md").read_text()
        print(report[report.index("## SAE features"):].split("\n## ")[0])


if __name__ == "__main__":
    run(main)
