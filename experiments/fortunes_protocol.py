"""Clean accuracy per concept of a few-shot protocol on real fortunes text (nslens.protocols): the numbers behind
``PROTOCOLS['smollm2-135m']``.

For each seed: the dataset balanced to ``--limit`` per class and split as a run splits it (test 0.3), the
demonstrations drawn from the train part (``FewShotPrompter.from_dataset``), and every sample's prompt predicted
by ``nslens.predict`` under each readout of ``--readouts`` (``nslens.readout``: argmax next token vs the label
word's first token, the paper's rule; the best label token; the best label token after the prompt's content-free
prior), the only-correct filter's rule. Prints per readout and concept the accuracy over all samples (train and
test: what the filter keeps from both), chance, and how often each label was predicted; writes
``protocol.json`` and ``protocol.md`` into ``--out``.

    python experiments/fortunes_protocol.py                                   # smollm2-135m, its protocol
    python experiments/fortunes_protocol.py --dataset fortunes:computers,politics,science,sports --k-shot 2
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_out, parser, positive_int, progress, run, seed_list  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    import nslens
    from nslens.files import write_text
    from nslens.protocols import protocol_for
    from nslens.readout import READOUTS, make_readout

    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default=None, help="default: the model's protocol dataset")
    ap.add_argument("--k-shot", type=int, default=None)
    ap.add_argument("--max-words", type=positive_int, default=None)
    ap.add_argument("--label-words", default=None, help="comma-separated, one per concept")
    ap.add_argument("--limit", type=positive_int, default=40, help="samples per class")
    ap.add_argument("--seeds", type=seed_list, default="0,1,2", help="comma-separated seeds (>= 0)")
    ap.add_argument("--readouts", default=",".join(READOUTS), help="comma-separated, of " + ", ".join(READOUTS))
    ap.add_argument("--batch-size", type=positive_int, default=16)
    ap.add_argument("--out", type=Path, default=Path("runs/fortunes_protocol"))
    args = ap.parse_args(argv)
    proto = protocol_for(args.model)
    dataset = args.dataset or (proto.dataset if proto else "fortunes")
    k = args.k_shot if args.k_shot is not None else (proto.k_shot if proto else 1)
    max_words = args.max_words or (proto.max_words if proto else 64)
    if k < 1:
        ap.error(f"--k-shot must be >= 1, got {k}")
    readouts = [r.strip() for r in args.readouts.split(",")]
    bad = [r for r in readouts if r not in READOUTS]
    if bad:
        ap.error(f"unknown readout {bad[0]!r}; choose from {', '.join(READOUTS)}")
    check_out(args.out)
    base = nslens.load_dataset(dataset)  # the data and its label words before the model loads
    if args.label_words:
        base.label_words = [w.strip() for w in args.label_words.split(",")]
        base.__post_init__()
    model = nslens.load_model(args.model)
    site = nslens.resolve_site(model, -1)
    ids = nslens.label_token_ids(model.tokenizer, base.label_words)
    results = []
    with progress() as cb:
        for seed in args.seeds:
            ds = base.balanced(args.limit, seed=seed)
            train, _ = ds.split(0.3, seed=seed)
            prompter = nslens.FewShotPrompter.from_dataset(train, k=k, seed=seed, max_words=max_words)
            gold = np.asarray(ids)[ds.labels]
            for kind in readouts:
                t0 = time.perf_counter()
                readout = make_readout(model, kind, ids, prompter)
                p = nslens.predict(model, site, prompter.prompts(ds.texts), gold, batch_size=args.batch_size,
                                   progress=cb, desc=f"seed {seed} {kind}", readout=readout)
                results.append({
                    "seed": seed, "readout": kind, "n": int(len(ds)),
                    "seconds": round(time.perf_counter() - t0, 1),
                    "acc": {c: float(p.correct[ds.labels == i].mean()) for i, c in enumerate(ds.label_names)},
                    "correct": {c: int(p.correct[ds.labels == i].sum()) for i, c in enumerate(ds.label_names)},
                    "predicted": {w: int((p.pred == t).sum()) for w, t in zip(ds.label_words, ids)},
                    "other": int((~np.isin(p.pred, ids)).sum()),
                    "last_demo": ds.label_words[prompter.demos[-1][1]]})
    names = base.label_names

    def over(kind: str, f: Any) -> dict[str, float]:
        return {c: float(f([r["acc"][c] for r in results if r["readout"] == kind])) for c in names}

    summary = {"model": args.model, "dataset": dataset, "k_shot": k, "max_words": max_words,
               "label_words": list(base.label_words), "chance": 1.0 / base.n_concepts, "per_seed": results,
               "mean": {r: over(r, np.mean) for r in readouts}, "min": {r: over(r, np.min) for r in readouts},
               "max": {r: over(r, np.max) for r in readouts}}
    lines = [f"# Clean accuracy: {args.model} on {dataset}", "",
             f"k_shot {k}, max_words {max_words}, label words {', '.join(base.label_words)}; chance "
             f"{summary['chance']:.2f}; {args.limit} samples per class; seeds {args.seeds}.", "",
             "| readout | concept | mean | min | max |", "|---|---|---|---|---|"]
    lines += [f"| {r} | {c} | {summary['mean'][r][c]:.3f} | {summary['min'][r][c]:.3f} | {summary['max'][r][c]:.3f} |"
              for r in readouts for c in names]
    lines += ["", "| seed | readout | last demo | predicted (label counts) | other |", "|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['readout']} | {r['last_demo']} | {r['predicted']} | {r['other']} |"
              for r in results]
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "protocol.json", json.dumps(summary, indent=2) + "\n")
    write_text(args.out / "protocol.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    run(main)
