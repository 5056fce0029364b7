"""Recording throughput: nslens ``record`` (per-concept statistics reduced inside the trace) divided by a plain
Hugging Face forward over the same batches, as samples per second. Goal: >= 0.90.

Recording stops the forward right after the site, so at the penultimate layer it skips the last layer and the
LM head that the plain forward computes.

    python benchmarks/bench_record.py           # ~56M-parameter random Llama on CPU
    python benchmarks/bench_record.py --quick   # CI smoke (tiny model; ratio not meaningful)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUICK, SHAPES, bench_prompts, best_of, n_params, random_llama  # noqa: E402

import nslens  # noqa: E402
from nslens.record import batches, tokenize  # noqa: E402
from nslens.synthetic import build_tokenizer  # noqa: E402


def measure(model, hf, n: int, repeats: int) -> dict[str, float]:
    """Samples per second of a plain forward and of ``record`` at the penultimate block (printed and returned)."""
    site = nslens.resolve_site(model, -2)
    prompts = bench_prompts(n)
    labels = np.arange(n) % 4
    encs = [{k: v.to(hf.device) for k, v in tokenize(model, prompts[sl]).items()} for sl in batches(n, 16)]

    def plain() -> None:
        with torch.no_grad():
            for enc in encs:
                hf(**enc)

    def rec() -> None:
        nslens.record(model, site, prompts, labels, ["a", "b", "c", "d"], batch_size=16)

    plain()
    rec()  # warm-up
    t_plain, t_rec = best_of(plain, repeats), best_of(rec, repeats)
    ratio = t_plain / t_rec
    print(f"model: random Llama, {n_params(hf) / 1e6:.1f}M parameters, {site.n_layers} layers; site layer "
          f"{site.layer}; {n} prompts, batch 16, best of {repeats}")
    print(f"plain HF forward: {n / t_plain:.1f} samples/s   nslens record: {n / t_rec:.1f} samples/s")
    print(f"throughput ratio record/plain = {ratio:.3f} (goal >= 0.90)", flush=True)
    return {"plain_s": t_plain, "record_s": t_rec, "ratio": ratio}


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--shape", choices=["real"], default=None, help="real: SmolLM2-135M's shape")
    args = ap.parse_args(argv)
    tok = build_tokenizer()
    hf = random_llama(tok, **(QUICK if args.quick else SHAPES["real"] if args.shape else {
        "hidden": 768, "intermediate": 2048, "layers": 8, "heads": 12}))
    model = nslens.load_model(hf, tokenizer=tok)
    return measure(model, hf, args.samples or (32 if args.quick else 256), args.repeats or (1 if args.quick else 3))["ratio"]


if __name__ == "__main__":
    main()
