"""Bytes on the wire against a real NDIF server (tests/ndif_stack: ndif 0.1.2 on this machine, serving the
embedded model): what each remote nslens request uploads and downloads, per batch. Counted twice: the payloads
(the serialised request nnsight POSTs, the result blob it downloads, however it travels: over the websocket or
from the server's object store) and everything that passes a proxy between the client and the API (HTTP and
websocket framing, status messages; results fetched from the object store bypass it). Beside them the full-logits baseline (saving ``model.output.logits``
and reducing on the client) measured at the model's vocabulary and scaled to Llama 3's 128,256 tokens; and the
latency of a first and of later requests.

    python benchmarks/bench_remote.py            # starts a stack of its own (about 1.5 min), stops it at the end
    NSLENS_NDIF_REUSE=1 python benchmarks/bench_remote.py   # use the stack `make ndif-up` started
    python benchmarks/bench_remote.py --quick    # CI smoke: fewer batches
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
LLAMA3_VOCAB = 128_256


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batches", type=int, default=None, help="batches per measurement (default 8, quick 2)")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    from ndif_stack import stack as ndif

    reuse = os.environ.get("NSLENS_NDIF_REUSE") == "1"
    live = ndif.load(ndif.CLI_STATE_DIR) if reuse else None
    if reuse and (live is None or not live.is_running()):
        sys.exit("NSLENS_NDIF_REUSE=1 but no stack from `make ndif-up` is running")
    if live is None:
        print("starting a local NDIF stack (about 1.5 min) ...", flush=True)
        live = ndif.start(ndif.CACHE / f"bench-{os.getpid()}", tie_to_parent=True)
    try:
        return run(live, args.batches or (2 if args.quick else 8), args.batch_size)
    finally:
        if not reuse:
            live.stop()


def run(live, n_batches: int, batch_size: int) -> list[dict]:
    import torch
    from ndif_stack.proxy import Proxy
    from nnsight import CONFIG

    import nslens
    from nslens.harness import LOCAL_TASKS, local_tasks_dir, side_effects
    from nslens.remote import trace_args
    from nslens.synthetic import synthetic_concepts

    n = n_batches * batch_size
    ds = synthetic_concepts(max(1, n // 4 + 1), seed=9)
    prompts = nslens.FewShotPrompter.from_dataset(ds, k=1, seed=0).prompts(ds.texts)[:n]
    labels = ds.labels[:n]
    local = nslens.load_model("embedded")
    site_l = nslens.resolve_site(local, -2)
    masks = nslens.build_range_masks(nslens.record(local, site_l, prompts, labels, ds.label_names,
                                                   batch_size=batch_size).stats, fraction=0.5)
    ids = nslens.label_token_ids(local.tokenizer, ds.label_names)
    proxy = Proxy(live.host)
    payload = {"up": 0, "down": 0}
    from nnsight.intervention.backends.remote import RemoteBackend

    serialize, finalize = RemoteBackend._serialize, RemoteBackend.finalize

    def counted_serialize(self, tracer):
        blob = serialize(self, tracer)
        payload["up"] += len(blob)
        return blob

    def counted_finalize(self, content):
        payload["down"] += len(content)
        return finalize(self, content)

    RemoteBackend._serialize, RemoteBackend.finalize = counted_serialize, counted_finalize
    rows: list[dict] = []
    with live.configured():
        model = nslens.load_model(live.models[0], remote=True)  # preflight against the real server
        CONFIG.API.HOST = proxy.url  # every request from here on goes through the counting proxy
        site = nslens.resolve_site(model, -2)
        seq = max(len(model.tokenizer(p)["input_ids"]) for p in prompts)

        def measure(what: str, fn, per: int, unit: str, expect: str) -> None:
            proxy.reset()
            payload.update(up=0, down=0)
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
            rows.append({"what": what, "up": payload["up"] / per, "down": payload["down"] / per,
                         "api_up": proxy.sent / per, "api_down": proxy.received / per, "unit": unit,
                         "expect": expect, "seconds": dt})

        # latency: this process's first remote request (connections, nslens's code pickled by value for the first
        # time) and later ones
        times = []
        for _ in range(6):
            t = time.perf_counter()
            nslens.predict(model, site, prompts[:batch_size], np.asarray(ids)[labels[:batch_size]], remote=True,
                           batch_size=batch_size)
            times.append(time.perf_counter() - t)

        c, d = len(ds.label_names), site.d_model
        measure("record, last position", lambda: nslens.record(model, site, prompts, labels, ds.label_names,
                                                               batch_size=batch_size, remote=True),
                n_batches, "batch", f"O(C*d): partials {8 * c * (1 + 3 * d):,} B")
        measure("record, all positions", lambda: nslens.record(model, site, prompts, labels, ds.label_names,
                                                               batch_size=batch_size, position="all",
                                                               remote=True),
                n_batches, "batch", "the same: independent of sequence length")
        for fast in (True, False):
            measure(f"erasure table ({'fast' if fast else 'naive'}), C={c}",
                    lambda fast=fast: nslens.erasure_table(model, site, prompts, labels, ids, masks, nslens.zero(),
                                                           batch_size=batch_size, remote=True, fast=fast),
                    n_batches, "batch", f"2 numbers x {batch_size} prompts x {2 * c + 1} runs")

        inc = local_tasks_dir(ROOT / ".cache" / "bench_remote_tasks", n_mc=4 * n_batches, n_ppl=n_batches)
        ivs = {"range": nslens.Intervention(masks[0], nslens.zero())}
        requests = {}

        def side() -> None:
            def count(desc, done, total):
                requests["n"] = total

            side_effects(model, site, ivs, tasks=list(LOCAL_TASKS), include_path=inc, remote=True, progress=count,
                         batch_size=batch_size)

        measure("side effects (clean + 1 intervention)", side, 1, "table", "O(lm-eval requests)")
        rows[-1]["requests"] = requests.get("n")

        def logits() -> None:
            for i in range(n_batches):
                enc = dict(model.tokenizer(prompts[i * batch_size:(i + 1) * batch_size], return_tensors="pt",
                                           padding=True))
                with torch.no_grad(), model.trace(enc, **trace_args(model, True)):
                    out = model.output.logits.save()
                assert out.shape[-1] == len(model.tokenizer)

        measure("full-logits baseline (save model.output.logits)", logits, n_batches, "batch",
                f"{batch_size} x seq x vocab x 4 B")
        vocab = len(model.tokenizer)
        base = rows[-1]["down"]
        nan = float("nan")
        rows.append({"what": f"full-logits baseline scaled to a {LLAMA3_VOCAB:,}-token vocabulary", "up": nan,
                     "down": base * LLAMA3_VOCAB / vocab, "api_up": nan, "api_down": nan, "unit": "batch",
                     "expect": f"computed: measured x 128,256 / {vocab}", "seconds": nan})

    proxy.close()
    RemoteBackend._serialize, RemoteBackend.finalize = serialize, finalize
    print(f"\nembedded model on a local NDIF (ndif 0.1.2), site layer {site.layer}, C = {c}, d_model {d}, "
          f"batch {batch_size}, {n_batches} batches, longest prompt {seq} tokens, vocabulary {vocab}\n")
    print("| request | payload up | payload down | all bytes to / from the API | unit | expected down | wall s |")
    print("|---|---|---|---|---|---|---|")

    def b(x: float) -> str:
        return "-" if x != x else f"{x:,.0f} B"

    for r in rows:
        extra = f" ({r['requests']} requests)" if r.get("requests") else ""
        secs = "-" if r["seconds"] != r["seconds"] else f"{r['seconds']:.2f}"
        print(f"| {r['what']}{extra} | {b(r['up'])} | {b(r['down'])} | {b(r['api_up'])} / {b(r['api_down'])} | "
              f"{r['unit']} | {r['expect']} | {secs} |")
    record_down = rows[0]["down"]
    print(f"\nfull logits at 128,256 tokens / recorded partials, per batch: {rows[-1]['down'] / record_down:,.0f}x")
    print(f"latency of one predict batch: first {times[0]:.3f} s, later median {statistics.median(times[1:]):.3f} s")
    return rows


if __name__ == "__main__":
    main()
