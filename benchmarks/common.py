"""Shared pieces of the ratio benchmarks: a random Llama big enough that the forward pass dominates."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def random_llama(tokenizer, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int | None = None,
                 vocab: int | None = None, tied: bool = False):
    """A randomly initialised Llama over ``tokenizer``'s vocabulary, or ``vocab`` rows (a real model's LM-head
    cost; the tokenizer's ids stay below it), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=max(vocab or 0, len(tokenizer)), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      tie_word_embeddings=tied,
                      max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


QUICK = {"hidden": 128, "intermediate": 256, "layers": 4, "heads": 4}  # CI smoke: runs, ratios not judged
#: the default benchmark model: a ~50M-parameter random Llama, 16 layers, d_model 512
DEFAULT = {"hidden": 512, "intermediate": 1376, "layers": 16, "heads": 8}
#: SmolLM2-135M's shape (the real model of docs/real-model.md): 30 layers, d_model 576, 9 / 3 heads, MLP 1536,
#: vocabulary 49,152, tied embeddings
REAL = {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3, "vocab": 49152, "tied": True}
SHAPES = {"default": DEFAULT, "real": REAL}


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
