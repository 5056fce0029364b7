"""Side-effect evaluation cost: the nnsight lm-eval adapter with a range-gated intervention active, divided by
lm-eval's stock HFLM evaluating the clean model, same task and batches. Goal: <= 1.15.

    python benchmarks/bench_side_effects.py           # ~56M-parameter random Llama on CPU
    python benchmarks/bench_side_effects.py --quick   # CI smoke (tiny model; the ratio is not meaningful)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUICK, best_of, n_params, random_llama  # noqa: E402

import nslens  # noqa: E402
from nslens.harness import NsLensLM, local_tasks_dir  # noqa: E402
from nslens.synthetic import build_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tok = build_tokenizer()
    hf = random_llama(tok, **(QUICK if args.quick else {"hidden": 768, "intermediate": 2048, "layers": 8, "heads": 12}))
    model = nslens.load_model(hf, tokenizer=tok)
    site = nslens.resolve_site(model, -2)
    d = site.d_model
    k = max(1, int(0.3 * d))
    g = torch.Generator().manual_seed(0)
    mu, sigma = torch.randn(k, generator=g) * 0.1, torch.rand(k, generator=g) * 0.5 + 0.1
    mask = nslens.RangeMask(torch.randperm(d, generator=g)[:k], mu - 2.5 * sigma, mu + 2.5 * sigma, mu, sigma,
                            {"tau": 2.5, "concept": "bench", **site.describe()})
    iv = nslens.Intervention(mask, nslens.zero(), gated=True)
    limit = args.limit or (8 if args.quick else 40)
    repeats = args.repeats or (1 if args.quick else 3)
    tm = TaskManager(include_path=str(local_tasks_dir()), include_defaults=False)

    def evaluate(lm):
        return lm_eval.simple_evaluate(model=lm, tasks=["nslens_synth_ppl"], task_manager=tm, limit=limit,
                                       log_samples=False, bootstrap_iters=0, verbosity="ERROR", num_fewshot=0)

    stock = HFLM(pretrained=hf, tokenizer=tok, batch_size=8, device="cpu")
    ours = NsLensLM(model, site, iv, batch_size=8)
    evaluate(stock)  # warm-up (task loading, allocator)
    t_stock = best_of(lambda: evaluate(stock), repeats)
    t_ours = best_of(lambda: evaluate(ours), repeats)
    ratio = t_ours / t_stock
    print(f"model: random Llama, {n_params(hf) / 1e6:.1f}M parameters, {site.n_layers} layers, d_model {d}; "
          f"task nslens_synth_ppl, limit {limit}, best of {repeats}")
    print(f"stock HFLM clean: {t_stock:.3f} s   nslens adapter + range mask ({k} neurons): {t_ours:.3f} s")
    print(f"ratio adapter/stock = {ratio:.3f} (goal <= 1.15)")
    return ratio


if __name__ == "__main__":
    main()
