"""NEG paper Tables 1-2 (linearity, polarity, NeurGrad vs ground truth) and the skill-neuron probes (Section 5) on a
real model. Zero-shot prompts over a concept dataset: the options are its label words.

    python experiments/neg_tables.py --model meta-llama/Llama-3.2-3B --dataset ag_news
    python experiments/neg_tables.py --model embedded --dataset synthetic --smoke     # offline smoke run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nslens
from nslens.data import FewShotPrompter, label_token_ids
from nslens.neg import linearity_report, neurgrad, resolve_neuron_site, resolve_neuron_sites
from nslens.probes import evaluate_probes, probe_features

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_dataset, check_out, default_dataset, parser, positive_int, run  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", default="meta-llama/Llama-3.2-3B")
    ap.add_argument("--dataset", default=None, help="default: ag_news (synthetic for the embedded model)")
    ap.add_argument("--layer", type=int, default=-1, help="the probes' layer; NEG sweeps sample all layers")
    ap.add_argument("--one-layer", action="store_true", help="NEG sweeps at --layer only (the paper: all layers)")
    ap.add_argument("--kind", default="product")
    ap.add_argument("--n-per-class", type=positive_int, default=500)
    ap.add_argument("--sweep-prompts", type=positive_int, default=100)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes")
    ap.add_argument("--out", type=Path, default=Path("runs/neg_tables"))
    args = ap.parse_args(argv)
    args.dataset = default_dataset(args.model, args.dataset, "ag_news")
    check_out(args.out)
    check_dataset(args.dataset)  # before the model loads
    if args.smoke:
        args.n_per_class, args.sweep_prompts = 12, 2
    model = nslens.load_model(args.model)
    ns = resolve_neuron_site(model, args.layer, args.kind)
    ds = nslens.load_dataset(args.dataset, **({"n_per_class": args.n_per_class} if args.dataset == "synthetic"
                                               else {})).balanced(args.n_per_class)
    ids = label_token_ids(model.tokenizer, ds.label_words)
    prompts = FewShotPrompter(list(ds.label_words)).prompts(ds.texts)
    sites = [ns] if args.one_layer else resolve_neuron_sites(model, args.kind)
    rep = linearity_report(model, sites, prompts[: args.sweep_prompts],
                           [ids[y] for y in ds.labels[: args.sweep_prompts]], n_neurons=4 if args.smoke else 100,
                           ig_steps=4 if args.smoke else 20)
    probs, acts = probe_features(model, ns, prompts, ids)
    probes = evaluate_probes(neurgrad(model, ns, prompts, options=ids), ds.labels, ds.texts, option_probs=probs,
                             activations=acts)
    args.out.mkdir(parents=True, exist_ok=True)
    text = f"## NEG linearity\n\n{rep.to_markdown()}\n## Skill-neuron probes\n\n{probes.to_markdown()}"
    (args.out / "neg_tables.md").write_text(text)
    (args.out / "neg_tables.json").write_text(json.dumps({"linearity": rep.summary(), "probes": probes.accuracy}))
    print(text)


if __name__ == "__main__":
    run(main)
