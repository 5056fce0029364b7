"""Cutting prompts into batches and encoding them: shared by every module that runs prompts through the model
batch by batch (recording, the erasure table, NEG, SAE features, probes, LEACE, generation).

Every batch is left-padded, so the last column is each row's last real token: the position the paper reads
(the one that predicts the label) is ``[:, -1]`` for every row without per-row indexing inside the trace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import NsLensError

__all__ = ["Progress", "batches", "tokenize"]

#: progress callback: (task description, done, total)
Progress = Callable[[str, int, int], None]


def tokenize(model: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Left-padded batch encoding (the last column is every row's last real token). A prompt of no tokens is
    refused: the model cannot run on it (it failed as a reshape error deep in attention)."""
    tok = model.tokenizer
    if tok.padding_side != "left":
        raise NsLensError("the tokenizer must pad on the left; load the model with nslens.load_model")
    prompts = list(prompts)
    if not prompts:
        raise NsLensError("no prompts given")
    enc = dict(tok(prompts, return_tensors="pt", padding=True))
    empty = [p for p, n in zip(prompts, enc["attention_mask"].sum(-1).tolist()) if n == 0]
    if empty:
        raise NsLensError(f"prompt {empty[0]!r} has no tokens; every prompt needs at least one")
    return enc


def batches(n: int, batch_size: int) -> list[slice]:
    """Consecutive slices of at most ``batch_size`` of ``n`` items, in order."""
    if batch_size < 1:
        raise NsLensError(f"batch_size must be >= 1, got {batch_size}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
