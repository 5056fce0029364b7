"""Side-effect cost: the whole side-effect table (clean + neuron and range masking of every concept, lm-eval on a
multiple-choice and a perplexity task) divided by ONE stock-HFLM clean evaluation of the same tasks, at the last
and the second-to-last layer of a 16-layer random Llama, for C = 4 and C = 14 concepts, measured in one run.
Goals: last block <= 1.2 (C = 4) and <= 1.5 (C = 14), second-to-last block <= 2.0 and <= 4.0; the naive way (one
full evaluation per run) costs about 2C + 1.
Also: one intervened evaluation through the adapter vs stock HFLM (goal <= 1.15), and the bytes one batch returns
from the trace(s) vs the full-logits path for a 128,256-token vocabulary (Llama 3).

    python benchmarks/bench_side_effects.py           # ~50M-parameter random Llama on CPU
    python benchmarks/bench_side_effects.py --quick   # CI smoke (tiny model; the ratios are not meaningful)
    python benchmarks/bench_side_effects.py --shape real   # SmolLM2-135M's shape
    python benchmarks/bench_side_effects.py --shape real --profile=-2,14 --limit 10   # where one table's time goes

On a GPU, benchmarks/bench_gpu.py runs this on Llama-3.2-3B's shape in bf16.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_erasure import masks_for  # noqa: E402
from common import QUICK, SHAPES, best_of, n_params, random_llama  # noqa: E402

import nslens  # noqa: E402
from nslens.harness import (  # noqa: E402
    LOCAL_TASKS,
    NsLensLM,
    local_tasks_dir,
    quiet_lm_eval,
    side_effect_table,
    side_effects,
)
from nslens.synthetic import build_tokenizer  # noqa: E402

TASKS = list(LOCAL_TASKS)  # the offline stand-ins of the paper's tasks: MMLU-format choice, token perplexity
LLAMA3_VOCAB = 128_256


def masks_at(site, c: int) -> list[nslens.RangeMask]:
    """The erasure benchmark's random masks, stamped with the site they are for."""
    return [nslens.RangeMask(m.neurons, m.lo, m.hi, m.mu, m.sigma, {**m.meta, **site.describe()})
            for m in masks_for(site, c)]


def measure(model, hf, tok, *, device: str, limit: int, repeats: int, batch_size: int) -> dict:
    """The stock evaluation, one intervened evaluation through the adapter and the side-effect tables at the last
    two blocks for C = 4 and 14, printed and returned (seconds; ratios to the best stock time so far, and at the end
    to the run's best stock time)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    inc = local_tasks_dir()
    tm = TaskManager(include_path=str(inc), include_defaults=False)
    bs = batch_size

    def stock_clean():
        with quiet_lm_eval():
            lm = HFLM(pretrained=hf, tokenizer=tok, batch_size=bs, device=device, softmax_dtype="float32")
            return lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=tm, limit=limit, log_samples=False,
                                           bootstrap_iters=0, verbosity="ERROR", num_fewshot=0)

    stock_clean()  # warm-up (task loading, allocator)
    t_stock = best_of(stock_clean, repeats)
    print(f"model: random Llama, {n_params(hf) / 1e6:.1f}M parameters, {hf.config.num_hidden_layers} layers, "
          f"d_model {hf.config.hidden_size}, {hf.dtype} on {device}; tasks {', '.join(TASKS)}, limit {limit}, "
          f"batch {bs}, best of {repeats}")
    print(f"ONE stock-HFLM clean evaluation: {t_stock:.3f} s", flush=True)

    site = nslens.resolve_site(model, -2)
    one = nslens.Intervention(masks_at(site, 1)[0], nslens.zero(), gated=True)

    def adapter_one():
        with quiet_lm_eval():
            lm = NsLensLM(model, site, one, batch_size=bs)
            return lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=tm, limit=limit, log_samples=False,
                                           bootstrap_iters=0, verbosity="ERROR", num_fewshot=0)

    t_one = best_of(adapter_one, repeats)
    print(f"one range-masked evaluation through the adapter: {t_one:.3f} s = {t_one / t_stock:.3f}x (goal <= 1.15)",
          flush=True)

    results: dict = {"stock_s": t_stock, "adapter_s": t_one, "adapter_ratio": t_one / t_stock, "tables": {}}
    goals = {(-1, 4): 1.2, (-1, 14): 1.5, (-2, 4): 2.0, (-2, 14): 4.0}  # (site layer, concepts) -> goal
    for layer in (-1, -2):
        site = nslens.resolve_site(model, layer)
        for c in (4, 14):
            masks = masks_at(site, c)
            # one more stock evaluation before each table, and the best stock time so far divides: a stock time
            # taken in a slow spell of this shared machine does not flatter the ratios
            t_stock = min(t_stock, best_of(stock_clean, 1))
            t = best_of(lambda masks=masks, site=site: side_effect_table(
                model, site, masks, nslens.zero(), tasks=TASKS, include_path=inc, limit=limit, batch_size=bs),
                repeats)
            results["tables"][f"layer {site.layer}, C={c}"] = {"table_s": t, "stock_s": t_stock, "ratio": t / t_stock}
            print(f"layer {site.layer} of {site.n_layers}, C = {c:2d}: stock {t_stock:.3f} s, whole table "
                  f"({2 * c + 1} runs) {t:.3f} s "
                  f"= {t / t_stock:.3f}x one clean evaluation (goal <= {goals[layer, c]}; naive about {2 * c + 1})",
                  flush=True)
    # the figures above divide by the best stock time so far; a slow first spell flatters the early ones, so the
    # same figures against the run's best stock time (every stock evaluation has run by now) close the run
    best = t_stock
    results["best_stock_s"] = best
    results["adapter_ratio_best"] = t_one / best
    for row in results["tables"].values():
        row["ratio_best"] = row["table_s"] / best
    print(f"against the run's best stock time, {best:.3f} s: adapter {t_one / best:.3f}x; "
          + "; ".join(f"{name} {row['ratio_best']:.3f}x" for name, row in results["tables"].items()), flush=True)
    res = side_effects(model, site, {"one": one}, tasks=TASKS, include_path=inc, limit=limit, batch_size=bs)
    per_batch = sum(res.batch_bytes) / len(res.batch_bytes)
    logits = sum(b * t * LLAMA3_VOCAB * 2 for b, t in res.batch_shapes) / len(res.batch_shapes)
    print(f"bytes returned per batch: {per_batch:,.0f} (log-likelihoods in the trace) vs {logits:,.0f} "
          f"(full bf16 logits at vocab {LLAMA3_VOCAB:,}; mean batch {sum(b for b, _ in res.batch_shapes) / len(res.batch_shapes):.1f} x "
          f"{sum(t for _, t in res.batch_shapes) / len(res.batch_shapes):.0f} tokens): {logits / per_batch:,.0f}x less")
    results["bytes_per_batch"] = per_batch
    return results


#: what a profiled table's time is spent on: (name, the function, the callers it counts under, or None for all)
PARTS = (("the LM head's matrix product (chunked head)", "{built-in method torch._C._nn.linear}", "logits"),
         ("nn.Linear's matrix products (layers; a model head)", "{built-in method torch._C._nn.linear}", "forward"),
         ("attention (scaled_dot_product_attention)", "{built-in method torch._C._nn.scaled_dot_product_attention}",
          None),
         ("log-softmax over the vocabulary", "{built-in method torch.log_softmax}", None),
         ("argmax over the vocabulary (lm-eval's is-greedy)", "{method 'argmax' of 'torch._C.TensorBase' objects}",
          None))


def profile_table(model, layer: int, c: int, *, limit: int, batch_size: int) -> dict[str, float]:
    """One side-effect table (the site ``layer``, ``c`` concepts) under cProfile: the seconds of each of ``PARTS``
    (the functions' own time; the matrix products split by caller: the chunked head's ``logits`` or a layer's
    ``nn.Linear.forward``) and of everything else (Python, the traces, tokenising, lm-eval), printed."""
    import cProfile
    import pstats
    import time

    site = nslens.resolve_site(model, layer)
    masks = masks_at(site, c)
    inc = local_tasks_dir()

    def run():
        return side_effect_table(model, site, masks, nslens.zero(), tasks=TASKS, include_path=inc, limit=limit,
                                 batch_size=batch_size)

    run()  # warm-up
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(run)
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, primitive calls, own time, cumulative, callers)}
    by_name = {pstats.func_std_string(k): v for k, v in stats.items()}
    parts = {}
    for name, func, caller in PARTS:
        entry = by_name.get(func)
        if entry is None:
            parts[name] = 0.0
        elif caller is None:
            parts[name] = entry[2]
        else:  # callers: {(file, line, name): (calls, primitive calls, own time, cumulative)}
            parts[name] = sum(v[2] for k, v in entry[4].items() if k[2] == caller)
    parts["everything else"] = total - sum(parts.values())
    print(f"layer {site.layer} of {site.n_layers}, C = {c}, limit {limit}: one table under the profiler {total:.1f} s")
    for name, t in parts.items():
        print(f"  {name:50s} {t:7.1f} s  {100 * t / total:5.1f} %")
    return {"total_s": total, **parts}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--shape", choices=["real"], default=None,
                    help="real: SmolLM2-135M's shape (30 layers, d_model 576, vocabulary 49,152); overrides the sizes")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--profile", metavar="LAYER,C", default=None,
                    help="instead of the ratios: where one table's time goes (e.g. --profile=-2,14: second-to-last block, "
                         "14 concepts)")
    args = ap.parse_args(argv)
    profile = None
    if args.profile is not None:
        try:
            layer, c = (int(x) for x in args.profile.split(","))
        except ValueError:
            ap.error(f"--profile: expected LAYER,C (two integers, e.g. -2,14), got {args.profile!r}")
        profile = (layer, c)
    logging.disable(logging.WARNING)
    tok = build_tokenizer()
    size = QUICK if args.quick else SHAPES["real"] if args.shape else {
        "hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "heads": args.heads}
    hf = random_llama(tok, **size, device=args.device, dtype=getattr(torch, args.dtype))
    model = nslens.load_model(hf, tokenizer=tok)
    limit = args.limit or (8 if args.quick else 40)
    if profile is not None:
        return profile_table(model, *profile, limit=limit, batch_size=args.batch_size)
    return measure(model, hf, tok, device=args.device, limit=limit,
                   repeats=args.repeats or (1 if args.quick else 2), batch_size=args.batch_size)


if __name__ == "__main__":
    main()
