"""Each neuron's mean over general text: the replacement value of mean replacement (paper App. G.2).

The paper replaces a neuron's value with "the mean activation of the neuron computed over a general next-token
prediction task on the Wikipedia", not with the concept's own mean mu (which pulls the concept towards its most
typical value and erases nothing). ``general_mean`` records it once per model and site, streamed over every
(non-padding) position of a general corpus inside the traces (``nslens.record`` with ``position="all"``), and
caches it under ``$NSLENS_HOME/general_means``. The corpus: the first 200 articles of the authors' Wikipedia
snapshot cut to 512 tokens (the same text as the paper's perplexity), or, for the embedded model, its plain
synthetic text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from .batching import Progress
from .data import cut_to_tokens, wikipedia_articles
from .errors import NsLensError
from .files import atomic_path, nslens_home
from .models import Site, model_fingerprint, model_id
from .record import record
from .synthetic import synthetic_corpus

__all__ = ["general_mean", "general_texts"]


def general_texts(model: Any, n_docs: int = 200, max_tokens: int = 512) -> list[str]:
    """The general corpus for ``model``: Wikipedia articles cut to ``max_tokens`` of its tokenizer, or the
    embedded model's plain synthetic text (offline)."""
    if model_id(model) == "embedded":
        return synthetic_corpus(n_docs, seed=2024)
    return cut_to_tokens(model.tokenizer, wikipedia_articles(n_docs), max_tokens)


def _cache_dir() -> Path:
    return nslens_home() / "general_means"


def general_mean(model: Any, site: Site, texts: Sequence[str] | None = None, *, batch_size: int = 8,
                 remote: bool | str = False, cache_dir: str | Path | None = None,
                 progress: Progress | None = None) -> torch.Tensor:
    """Per-neuron mean ``[d_model]`` (float32) of the site over every real token of ``texts`` (default:
    ``general_texts(model)``), cached by model fingerprint, site and corpus."""
    texts = list(texts) if texts is not None else general_texts(model)
    if not texts:
        raise NsLensError("the general-text mean needs at least one text")
    h = hashlib.sha256(json.dumps([model_fingerprint(model), site.describe()]).encode())
    for t in texts:
        h.update(t.encode() + b"\0")
    path = Path(cache_dir if cache_dir is not None else _cache_dir()) / f"general_mean_{h.hexdigest()[:16]}.safetensors"
    if path.exists():
        return torch.from_numpy(load_file(str(path))["mean"])
    rec = record(model, site, texts, np.zeros(len(texts), dtype=np.int64), ["general text"], position="all",
                 batch_size=batch_size, remote=remote, progress=progress,
                 meta={"corpus": "general text", "n_texts": len(texts)})
    mean = rec.stats.mean[0].astype(np.float32)
    with atomic_path(path) as tmp:
        save_file({"mean": mean}, tmp, metadata={"model_id": model_id(model), "site": json.dumps(site.describe()),
                                                  "n_texts": str(len(texts)),
                                                  "n_tokens": str(int(rec.stats.count[0]))})
    return torch.from_numpy(mean)
