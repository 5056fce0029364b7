"""Shared pieces of the ratio benchmarks: a random Llama big enough that the forward pass dominates."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def random_llama(tokenizer, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int | None = None,
                 vocab: int | None = None, tied: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A randomly initialised Llama over ``tokenizer``'s vocabulary, or ``vocab`` rows (a real model's LM-head
    cost; the tokenizer's ids stay below it), seeded. Built on ``device`` in ``dtype`` directly: a 3B model
    initialised in float32 on the host first would take 13 GB and most of a minute."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=max(vocab or 0, len(tokenizer)), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      tie_word_embeddings=tied,
                      max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(before)


QUICK = {"hidden": 128, "intermediate": 256, "layers": 4, "heads": 4}  # CI smoke: runs, ratios not judged
#: the default benchmark model: a ~50M-parameter random Llama, 16 layers, d_model 512
DEFAULT = {"hidden": 512, "intermediate": 1376, "layers": 16, "heads": 8}
#: SmolLM2-135M's shape (the real model of docs/real-model.md): 30 layers, d_model 576, 9 / 3 heads, MLP 1536,
#: vocabulary 49,152, tied embeddings
REAL = {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3, "vocab": 49152, "tied": True}
#: Llama-3.2-3B's shape (the GPU benchmark, benchmarks/bench_gpu.py): 28 layers, d_model 3072, 24 / 8 heads, MLP
#: 8192, vocabulary 128,256, tied embeddings
LLAMA_3B = {"hidden": 3072, "intermediate": 8192, "layers": 28, "heads": 24, "kv_heads": 8, "vocab": 128256,
            "tied": True}
SHAPES = {"default": DEFAULT, "real": REAL, "3b": LLAMA_3B}


def bench_prompts(n: int) -> list[str]:
    """``n`` synthetic prompts over 4 topics (about 26 tokens each), seeded: the record and erasure benchmarks'."""
    import random

    from nslens.synthetic import synthetic_text

    rng = random.Random(0)
    return [f"Text: {synthetic_text(i % 4, rng)} {synthetic_text(i % 4, rng)}\nLabel:" for i in range(n)]


def sync() -> None:
    """Wait for queued GPU work (CUDA runs asynchronously: a timer read without this measures the launch only)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time of ``repeats`` calls (the least-disturbed measurement), queued GPU work included."""
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
