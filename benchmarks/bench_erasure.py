"""Erasure-table cost: the whole table (clean + neuron + range masking of every concept) divided by one clean
pass over the same test set, at the penultimate layer of a 16-layer random Llama, for C = 4 and C = 14 concepts.
Goals: <= 2.5 (C = 4) and <= 5.0 (C = 14); the naive path (2C + 1 full passes) is printed beside it.

    python benchmarks/bench_erasure.py           # ~50M-parameter random Llama on CPU
    python benchmarks/bench_erasure.py --quick   # CI smoke (tiny model; ratios not meaningful)
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUICK, best_of, n_params, random_llama  # noqa: E402

import nslens  # noqa: E402
from nslens.erasure import erasure_table, predict  # noqa: E402
from nslens.synthetic import build_tokenizer, synthetic_text  # noqa: E402


def masks_for(site, c: int, fraction: float = 0.3) -> list[nslens.RangeMask]:
    g = torch.Generator().manual_seed(c)
    k = max(1, int(fraction * site.d_model))
    out = []
    for i in range(c):
        mu, sigma = torch.randn(k, generator=g) * 0.1, torch.rand(k, generator=g) * 0.5 + 0.1
        out.append(nslens.RangeMask(torch.randperm(site.d_model, generator=g)[:k], mu - 2.5 * sigma,
                                    mu + 2.5 * sigma, mu, sigma, {"tau": 2.5, "concept": f"c{i}"}))
    return out


def main(argv: list[str] | None = None) -> dict[int, tuple[float, float]]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--samples", type=int, default=None, help="test prompts")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    import random

    tok = build_tokenizer()
    size = QUICK if args.quick else {"hidden": 512, "intermediate": 1376, "layers": 16, "heads": 8}  # ~50M params
    hf = random_llama(tok, **size)
    hidden = size["hidden"]
    model = nslens.load_model(hf, tokenizer=tok)
    site = nslens.resolve_site(model, -2)
    rng = random.Random(0)
    n = args.samples or (16 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 2)
    prompts = [f"Text: {synthetic_text(i % 4, rng)} {synthetic_text(i % 4, rng)}\nLabel:" for i in range(n)]
    print(f"model: random Llama, {n_params(hf) / 1e6:.1f}M parameters, {site.n_layers} layers, d_model {hidden}; "
          f"site layer {site.layer}; {n} test prompts, batch 16, best of {repeats}")
    results = {}
    predict(model, site, prompts[:16], np.zeros(min(n, 16), dtype=int) + 10, batch_size=16)  # warm-up
    for c in (4, 14):
        labels = np.arange(n) % c
        ids = list(range(10, 10 + c))
        masks = masks_for(site, c)
        gold = np.asarray(ids)[labels]
        table = partial(erasure_table, model, site, prompts, labels, ids, masks, nslens.zero(), batch_size=16)
        t_clean = best_of(partial(predict, model, site, prompts, gold, batch_size=16), repeats)
        t_fast = best_of(partial(table, fast=True), repeats)
        t_naive = best_of(partial(table, fast=False), repeats)
        results[c] = (t_fast / t_clean, t_naive / t_clean)
        goal = 2.5 if c == 4 else 5.0
        print(f"C = {c:2d}: clean pass {t_clean:.3f} s; table fast {t_fast:.3f} s, naive {t_naive:.3f} s; "
              f"ratio fast/clean = {t_fast / t_clean:.2f} (goal <= {goal}), naive/clean = {t_naive / t_clean:.2f}")
    return results


if __name__ == "__main__":
    main()
