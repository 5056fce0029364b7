"""GPU figures in one run: the record, erasure-table and side-effect-table ratios with their absolute times, the peak
GPU memory of each, and nf4 through bitsandbytes, on a random Llama-3.2-3B-shaped model (28 layers, d_model 3072,
vocabulary 128,256) in bf16. Meant to end within 8 minutes on one H100/H200-class GPU: no part starts after
``--budget-s`` (420 s). It has not yet run on a GPU; the CPU smoke run below checks that it runs.

    python benchmarks/bench_gpu.py --out gpu.json                    # on a CUDA machine
    python benchmarks/bench_gpu.py --quick --device cpu --out q.json # smoke run anywhere (tiny model, float32)

The parts run in order (record, erasure, side effects, nf4), each with the same definitions as the CPU scripts
(bench_record.py, bench_erasure.py, bench_side_effects.py; the erasure part also times the naive path and reports
its largest difference from the fast table). ``--out`` is rewritten whole after every part, so a run stopped at a
time limit keeps what it measured; a part that fails is recorded with its error and the next one runs; a part
that would start after ``--budget-s`` seconds is recorded as skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_erasure  # noqa: E402
import bench_record  # noqa: E402
import bench_side_effects  # noqa: E402
from common import LLAMA_3B, QUICK, bench_prompts, n_params, random_llama, sync  # noqa: E402

import nslens  # noqa: E402
from nslens.synthetic import build_tokenizer  # noqa: E402

PACKAGES = ("torch", "transformers", "nnsight", "lm_eval", "bitsandbytes", "accelerate")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


@contextmanager
def peak_memory(into: dict):
    """Peak memory over the block into ``into``: GPU bytes allocated by torch on CUDA; on a CPU the process's
    peak resident set so far (it never resets, so only its growth over the run means anything)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        if cuda:
            sync()
            into["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
        else:
            into["peak_rss_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def write(path: Path, data: dict) -> None:
    """Whole-file replace: a reader (or a run killed mid-write) never sees half a JSON file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def nf4_part(hf, tok, args, prompts: list[str]) -> dict:
    """The same weights quantized to nf4 through ``nslens.load_model(..., quantize="nf4")``: its footprint and load
    time, the record ratio against its own plain forward, and the penultimate-block C = 4 erasure table against
    its own plain forward (with the naive path's largest difference from the fast table)."""
    out: dict = {"bf16_footprint_bytes": int(hf.get_memory_footprint())}
    with tempfile.TemporaryDirectory(prefix="nslens-gpu-bench-") as tmp:
        t = time.perf_counter()
        hf.save_pretrained(tmp)
        out["save_s"] = time.perf_counter() - t
        t = time.perf_counter()
        model = nslens.load_model(tmp, tokenizer=tok, quantize="nf4", dtype=args.dtype,
                                  device_map=None if args.device.startswith("cuda") else args.device)
        sync()
        out["load_s"] = time.perf_counter() - t
    q = model._module
    out["nf4_footprint_bytes"] = int(q.get_memory_footprint())
    out["record"] = bench_record.measure(model, q, args.record_samples, args.repeats)
    c4 = [s for s in bench_erasure.SETTINGS if s[:3] == (4, "penultimate", "all")]
    out["erasure"] = bench_erasure.measure(model, q, tok, prompts, args.repeats, naive=True, judged="(nf4)",
                                           settings=c4)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_gpu.json"), help="the JSON file of every figure")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 elsewhere")
    ap.add_argument("--quick", action="store_true", help="a tiny model: a smoke run, the ratios mean nothing")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no part after this many seconds")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--parts", default="record,erasure,side_effects,nf4")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench_gpu: no CUDA device here for --device {args.device}; run it on a GPU machine, or pass "
              "--device cpu (with --quick)", file=sys.stderr)
        raise SystemExit(1)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.record_samples = 32 if args.quick else 256
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - {"record", "erasure", "side_effects", "nf4"})
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; choose from record, erasure, side_effects, nf4")
    logging.disable(logging.WARNING)
    start = time.perf_counter()
    size = QUICK if args.quick else LLAMA_3B
    dtype = getattr(torch, args.dtype)
    tok = build_tokenizer()
    t = time.perf_counter()
    hf = random_llama(tok, **size, device=args.device, dtype=dtype)
    sync()
    model = nslens.load_model(hf, tokenizer=tok)
    data: dict = {
        "what": "benchmarks/bench_gpu.py", "commit": commit(), "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "dtype": args.dtype, "shape": "quick" if args.quick else "llama-3.2-3b", "size": size,
        "parameters": n_params(hf), "build_s": time.perf_counter() - t, "versions": versions(),
        "torch_threads": torch.get_num_threads(), "parts": {},
    }
    print(f"bench_gpu: random Llama ({data['shape']}), {data['parameters'] / 1e9:.2f}B parameters, {args.dtype} on "
          f"{data['device']}; built in {data['build_s']:.1f} s", flush=True)
    write(args.out, data)
    prompts = bench_prompts(16 if args.quick else 64)
    runs = {
        "record": lambda: bench_record.measure(model, hf, args.record_samples, args.repeats),
        "erasure": lambda: bench_erasure.measure(model, hf, tok, prompts, args.repeats, naive=True, judged="(GPU)"),
        "side_effects": lambda: bench_side_effects.measure(model, hf, tok, device=args.device,
                                                           limit=8 if args.quick else 40,
                                                           repeats=1 if args.quick else 2, batch_size=8),
        "nf4": lambda: nf4_part(hf, tok, args, prompts),
    }
    for name in parts:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            data["parts"][name] = {"skipped": f"{elapsed:.0f} s elapsed, budget {args.budget_s:.0f} s"}
            print(f"[{name}] skipped: {elapsed:.0f} s elapsed (budget {args.budget_s:.0f} s)", flush=True)
            write(args.out, data)
            continue
        print(f"[{name}] at {elapsed:.0f} s", flush=True)
        got: dict = {}
        t = time.perf_counter()
        try:
            with peak_memory(got):
                got["result"] = runs[name]()
        except Exception as e:  # one part's failure must not cost the others' figures
            got["error"] = f"{type(e).__name__}: {e}"
            got["traceback"] = traceback.format_exc(limit=8)
            print(f"[{name}] failed: {got['error']}", flush=True)
        got["seconds"] = time.perf_counter() - t
        mem = got.get("peak_gpu_bytes", got.get("peak_rss_bytes"))
        print(f"[{name}] {got['seconds']:.1f} s, peak {'GPU' if 'peak_gpu_bytes' in got else 'RSS'} memory "
              f"{mem / 2**30:.2f} GiB", flush=True)
        data["parts"][name] = got
        data["total_s"] = time.perf_counter() - start
        write(args.out, data)
    print(f"bench_gpu: {data.get('total_s', 0):.0f} s in all; figures in {args.out}", flush=True)
    return data


if __name__ == "__main__":
    main()
