"""Erasure-table cost: the whole table (clean + neuron and range masking of every concept, 2C + 1 predictions)
divided by ONE plain Hugging Face forward over the same prompts (``LlamaForCausalLM`` with ``logits_to_keep=1``,
same batch size, tokenising included), on a random Llama.

Settings and goals (the default 16-layer, d_model 512 model, the edit at every position): C = 4 at most 1.3 and
C = 14 at most 2.0 at the penultimate block (layer 14 of 16); C = 4 at most 3.0 at the middle layer (8 of 16).
Also, without a goal, the middle layer with the edit at the last position only (``positions="last"``, the
paper's setting), which replays one position per layer. Each setting alternates the plain forward and the table
``repeats`` times and divides the best of each. The naive path (2C + 1 full predictions) is printed beside each. ``--shape real`` runs the same settings on SmolLM2-135M's shape
(30 layers, d_model 576, vocabulary 49,152; penultimate = 28, middle = 15), where no goal is set.

    python benchmarks/bench_erasure.py                # ~50M-parameter random Llama on CPU
    python benchmarks/bench_erasure.py --shape real   # SmolLM2-135M's shape
    python benchmarks/bench_erasure.py --quick        # CI smoke (tiny model; ratios not meaningful)
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUICK, SHAPES, bench_prompts, best_of, n_params, random_llama  # noqa: E402

import nslens  # noqa: E402
from nslens.erasure import erasure_table  # noqa: E402
from nslens.synthetic import build_tokenizer  # noqa: E402

BATCH = 16
#: (concepts, where: "penultimate" or "middle", where the edit applies: "all" or "last" positions, goal on the
#: default shape or None)
SETTINGS = ((4, "penultimate", "all", 1.3), (14, "penultimate", "all", 2.0), (4, "middle", "all", 3.0),
            (4, "middle", "last", None), (14, "middle", "last", None))


def masks_for(site, c: int, fraction: float = 0.3) -> list[nslens.RangeMask]:
    g = torch.Generator().manual_seed(c)
    k = max(1, int(fraction * site.d_model))
    out = []
    for i in range(c):
        mu, sigma = torch.randn(k, generator=g) * 0.1, torch.rand(k, generator=g) * 0.5 + 0.1
        out.append(nslens.RangeMask(torch.randperm(site.d_model, generator=g)[:k], mu - 2.5 * sigma,
                                    mu + 2.5 * sigma, mu, sigma, {"tau": 2.5, "concept": f"c{i}"}))
    return out


def plain_forward(hf, tok, prompts: list[str]) -> None:
    """The denominator: one plain HF forward over the prompts, last-position logits only."""
    with torch.no_grad():
        for i in range(0, len(prompts), BATCH):
            enc = tok(prompts[i:i + BATCH], return_tensors="pt", padding=True).to(hf.device)
            hf(**enc, logits_to_keep=1)


def table_gap(a, b) -> float:
    """The largest absolute difference between two erasure tables' cells (0.0: the same numbers)."""
    return max((abs(x - y) for ra, rb in zip(a.rows(), b.rows()) for x, y in zip(ra[1:], rb[1:])), default=0.0)


def measure(model, hf, tok, prompts: list[str], repeats: int, *, naive: bool = True, judged: str | None = None,
            settings=SETTINGS) -> dict[str, dict]:
    """Every setting's table against the plain forward (printed, and returned by name: seconds, ratios, the site
    layer, and with ``naive`` the naive path's time and its largest difference from the fast table). ``judged``:
    what to print in place of the goal (None: the setting's goal)."""
    n, n_layers = len(prompts), hf.config.num_hidden_layers
    plain_forward(hf, tok, prompts[:BATCH])  # warm-up
    plain = partial(plain_forward, hf, tok, prompts)
    results = {}
    for c, where, positions, goal in settings:
        site = nslens.resolve_site(model, -2 if where == "penultimate" else n_layers // 2)
        labels = np.arange(n) % c
        ids = list(range(10, 10 + c))
        table = partial(erasure_table, model, site, prompts, labels, ids, masks_for(site, c), nslens.zero(),
                        batch_size=BATCH, positions=positions)
        fast = table(fast=True)  # warm-up of this setting's shapes
        # the plain forward and the table alternate, so that a slower spell of a shared machine slows both
        t_plain = t_fast = float("inf")
        for _ in range(repeats):
            t_plain = min(t_plain, best_of(plain, 1))
            t_fast = min(t_fast, best_of(partial(table, fast=True), 1))
        got = {"site_layer": site.layer, "plain_s": t_plain, "table_s": t_fast, "ratio": t_fast / t_plain}
        naive_text = ""
        if naive:
            slow: list = []
            t_naive = best_of(lambda slow=slow, table=table: slow.append(table(fast=False)), 1)
            got.update(naive_s=t_naive, naive_ratio=t_naive / t_plain, max_abs_diff=table_gap(fast, slow[0]))
            naive_text = (f"; naive {t_naive:.3f} s, {t_naive / t_plain:.2f}, largest difference from the fast "
                          f"table {got['max_abs_diff']:.2g}")
        key = f"C={c} {where}" + (" last" if positions == "last" else "")
        results[key] = got
        note = judged or ("(no goal)" if goal is None else f"(goal <= {goal})")
        print(f"{key:23s} (site layer {site.layer}, edit at {positions} positions): plain forward {t_plain:.3f} s, "
              f"table {t_fast:.3f} s, ratio {t_fast / t_plain:.2f} {note}{naive_text}", flush=True)
    return results


def main(argv: list[str] | None = None) -> dict[str, dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="default")
    ap.add_argument("--samples", type=int, default=None, help="test prompts")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-naive", action="store_true", help="skip the naive path")
    args = ap.parse_args(argv)
    tok = build_tokenizer()
    size = QUICK if args.quick else SHAPES[args.shape]
    hf = random_llama(tok, **size)
    model = nslens.load_model(hf, tokenizer=tok)
    n = args.samples or (16 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    print(f"model: random Llama ({args.shape if not args.quick else 'quick'}), {n_params(hf) / 1e6:.1f}M parameters, "
          f"{size['layers']} layers, d_model {size['hidden']}, vocabulary {hf.config.vocab_size}; {n} test prompts, "
          f"batch {BATCH}, best of {repeats}; torch threads {torch.get_num_threads()}")
    judged = "(smoke run)" if args.quick else "(no goal on this shape)" if args.shape != "default" else None
    return measure(model, hf, tok, bench_prompts(n), repeats, naive=not args.no_naive, judged=judged)


if __name__ == "__main__":
    main()
