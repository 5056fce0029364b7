"""Shared pieces of the ratio benchmarks: a random Llama big enough that the forward pass dominates."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def random_llama(tokenizer, *, hidden: int, intermediate: int, layers: int, heads: int):
    """A randomly initialised Llama over ``tokenizer``'s vocabulary (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


QUICK = {"hidden": 128, "intermediate": 256, "layers": 4, "heads": 4}  # CI smoke: runs, ratios not judged


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time of ``repeats`` calls (the least-disturbed measurement)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
