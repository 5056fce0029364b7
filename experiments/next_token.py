"""Paper Appendix K, Tables 18-22: fine-grained next-token concepts. Pronouns (he, she, they and the pairs he/his,
she/her, they/them: Table 19), terminal punctuation (? ! .: Table 20), opening delimiters ([ { (: Table 21) and
subject-verb agreement (do, does, go, goes: Table 22), each curated from WikiText (500 contexts per concept: 400
for ranks and ranges, 100 held out), probeless ranking of the top 20 % of neurons, tau 2.5, zeroing at the last
decoder block of Llama-3.2-3B, ΔPPL from the Wikipedia token perplexity. Table 18 compares the max and probeless
rankings on the pronouns (range masking, mean over the concepts).

    python experiments/next_token.py                                       # the paper's setting (Hub)
    python experiments/next_token.py --model embedded --lm-eval-limit 40   # offline: the embedded model's text

Each family is a run directory (``--out``/<family>); ``next_token.md`` collects the tables. ``nslens nexttoken``
exports a family's samples for the manual check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import nslens
from nslens.config import RunConfig, SideEffectsConfig
from nslens.pipeline import run_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_dataset, check_out, default_dataset, progress, run, run_parser  # noqa: E402

CONFIG = RunConfig(
    model="meta-llama/Llama-3.2-3B", dataset="next:pronouns", layer=-1, method="probeless", fraction=0.2, tau=2.5,
    operators=["zero"], n_per_class=500, test_size=0.2, only_correct=True,
    side_effects=SideEffectsConfig(enabled=True, tasks=["nslens_wikipedia_ppl"]), analyses=False, dtype="bfloat16",
)
#: family -> the paper's table
TABLES = {"pronouns": "Table 19", "pronoun_pairs": "Table 19", "punctuation": "Table 20", "delimiters": "Table 21",
          "agreement": "Table 22"}
COLUMNS = ("acc", "conf", "cacc", "cconf")


def _ppl(side: dict[str, Any], kind: str, i: int) -> float:
    row = side[kind][i]
    return next((m["token_perplexity"] for m in row.values() if "token_perplexity" in m), float("nan"))


def family_table(run_out: Path, title: str) -> list[str]:
    """Per concept: neuron masking, then range masking: ΔAcc ΔConf ΔCAcc ΔCConf ΔPPL (the paper's layout)."""
    erasure = json.loads((run_out / "erasure_zero.json").read_text())
    side_path = run_out / "side_effects_zero.json"
    side = json.loads(side_path.read_text()) if side_path.exists() else None
    head = " | ".join(f"{k} Δ{c}" for k in ("N", "R") for c in ("Acc", "Conf", "CAcc", "CConf", "PPL"))
    rows = [f"**{title}**", "", f"| concept | base Acc | {head} |", "|---" * 12 + "|"]
    for i, concept in enumerate(erasure["concepts"]):
        cells = []
        for kind in ("neuron", "range"):
            cells += [f"{erasure[kind][i][c]:+.2f}" for c in COLUMNS]
            cells.append(f"{_ppl(side, kind, i):+.2f}" if side else "n/a")
        rows.append(f"| {concept} | {erasure['base'][i]['acc']:.2f} | " + " | ".join(cells) + " |")
    return rows + [""]


def main(argv: list[str] | None = None) -> None:
    ap = run_parser(__doc__, CONFIG, "runs/next_token", lm_eval=True,
                    dataset_help="running text to extract from: wikitext (default), synthetic (the embedded "
                                 "model's) or a .txt file")
    ap.add_argument("--families", nargs="+", default=list(TABLES), choices=list(TABLES))
    ap.add_argument("--no-table18", action="store_true", help="skip the max-ranking run on pronouns (Table 18)")
    args = ap.parse_args(argv)
    source = default_dataset(args.model, args.dataset, "wikitext")
    check_out(args.out)
    for family in args.families:  # the text source before the model loads
        check_dataset(f"next:{family}:{source}")
    base = CONFIG.replace(model=args.model, remote=args.remote, only_correct=not args.all_samples,
                          side_effects={"limit": args.lm_eval_limit}, batch_size=args.batch_size,
                   dtype=None if args.model == "embedded" else CONFIG.dtype,
                   n_per_class=args.limit or CONFIG.n_per_class)
    model = nslens.load_model(args.model, dtype=base.dtype, remote=args.remote)
    runs = [(family, "probeless") for family in args.families]
    if not args.no_table18 and "pronouns" in args.families:
        runs.append(("pronouns", "max"))
    lines = [f"Next-token concepts (paper App. K) on {args.model}, text: {source}", ""]
    summaries = {}
    for family, method in runs:
        name = family if method == "probeless" else f"{family}_{method}"
        cfg = base.replace(dataset=f"next:{family}:{source}", method=method)
        with progress() as cb:
            out = run_pipeline(cfg, args.out / name, model=model, overwrite=True, progress=cb)
        if family == "pronouns":
            summaries[method] = json.loads((out / "summary.json").read_text())
        if method == "probeless":
            lines += family_table(out, f"{TABLES[family]}: {family} (probeless, top {cfg.fraction:.0%})")
    if summaries.get("max"):
        lines += ["**Table 18: pronouns, range masking, max vs probeless ranking** (mean over the concepts)", "",
                  "| ranking | ΔAcc | ΔConf | ΔCAcc | ΔCConf | ΔPPL |", "|---|---|---|---|---|---|"]
        for method in ("max", "probeless"):
            s = summaries[method]
            e = s["erasure"]["zero"]["range"]
            ppl = next((v for k, v in s.get("side_effects", {}).get("zero", {}).get("range", {}).items()
                        if k.endswith("token_perplexity")), float("nan"))
            lines.append(f"| {method} | " + " | ".join(f"{e[c]:+.2f}" for c in COLUMNS) + f" | {ppl:+.2f} |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "next_token.md").write_text(text)
    print(text)


if __name__ == "__main__":
    run(main)
