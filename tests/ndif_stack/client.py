"""Client side: how a plain nnsight 0.8.1 client talks to the local stack, without the Hugging Face Hub.

What a client needs (this is all of it; nothing here is specific to nslens):

1. **Where**: ``NDIF_HOST=<stack.host>`` in the environment before nnsight is imported, or
   ``nnsight.CONFIG.API.HOST = stack.host``, or ``model.trace(..., remote=stack.host)`` per call.
2. **Key**: the stack checks API keys (ndif's Postgres auth), so ``NDIF_API_KEY=<stack.api_key>`` before nnsight is
   imported, or ``nnsight.CONFIG.API.APIKEY = stack.api_key`` (``trace`` takes no key argument; a
   ``RemoteBackend(..., api_key=...)`` passed as ``backend=`` does).
3. **The model**: ``TransformersModel(model_id, tokenizer=AutoTokenizer.from_pretrained(model_id),
   task="text-generation")``, where ``model_id`` is the checkpoint directory the stack printed.
4. **No Hub**: before the first remote trace, ``nnsight.modeling.huggingface._ID_CACHE[model_id] = model_id``.
   nnsight canonicalises a repo id through ``HfApi().model_info`` when it builds the remote key; the seeded cache
   answers instead. ``task=`` must be given (inferring it asks the Hub too). ``HF_HUB_OFFLINE=1`` (the Makefile
   sets it) keeps transformers from trying.
"""

from __future__ import annotations

import contextlib
import os

TASK = "text-generation"


def seed_id_cache(model_id: str) -> None:
    """Make nnsight's remote key for ``model_id`` without asking the Hub (step 4 above)."""
    import nnsight.modeling.huggingface as hf

    hf._ID_CACHE.setdefault(model_id, model_id)


def tokenizer(model_id: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_id)


def remote_model(model_id: str, **kwargs):
    """A meta (weightless) model whose traces can run on the stack: ``model.trace(..., remote=True)``."""
    from nnsight.modeling.transformers import TransformersModel

    seed_id_cache(model_id)
    return TransformersModel(model_id, tokenizer=tokenizer(model_id), task=TASK, **kwargs)


def local_model(model_id: str, **kwargs):
    """The same checkpoint loaded here, on CPU, for comparison."""
    from nnsight.modeling.transformers import TransformersModel

    return TransformersModel(model_id, tokenizer=tokenizer(model_id), task=TASK, dispatch=True,
                             device_map="cpu", **kwargs)


def remote_backend(model, host: str, api_key: str | None, *, quiet: bool = True, **kwargs):
    """A ``RemoteBackend`` for ``model`` against ``host`` with ``api_key`` (no global config touched);
    pass it as ``model.trace(..., backend=...)``. ``quiet`` turns the status spinner off."""
    from nnsight.intervention.backends.display import StatusDisplay
    from nnsight.intervention.backends.remote import RemoteBackend

    backend = RemoteBackend(model.to_model_key(), host=host, api_key=api_key or None,
                            env=model._remoteable_get_env(), **kwargs)
    if quiet:
        backend.display = StatusDisplay(enabled=False, verbose=False)
    return backend


@contextlib.contextmanager
def configured(host: str, api_key: str | None, model_ids=()):
    """Point nnsight's global config (``CONFIG.API.HOST``/``APIKEY``) and the ``NDIF_HOST``/``NDIF_API_KEY``
    environment variables at the stack for the duration, seeding the id cache for ``model_ids``; restores all."""
    from nnsight import CONFIG

    saved = (CONFIG.API.HOST, CONFIG.API.APIKEY, os.environ.get("NDIF_HOST"), os.environ.get("NDIF_API_KEY"))
    CONFIG.API.HOST, CONFIG.API.APIKEY = host, api_key
    os.environ["NDIF_HOST"] = host
    if api_key:
        os.environ["NDIF_API_KEY"] = api_key
    else:
        os.environ.pop("NDIF_API_KEY", None)
    for model_id in model_ids:
        seed_id_cache(model_id)
    try:
        yield
    finally:
        CONFIG.API.HOST, CONFIG.API.APIKEY = saved[0], saved[1]
        for var, value in (("NDIF_HOST", saved[2]), ("NDIF_API_KEY", saved[3])):
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def check_trace(host: str, api_key: str | None, model_id: str, prompt: str = "the cat sat on the") -> tuple:
    """Run one real remote trace (the last logits) and return their shape; raises if the server cannot."""
    import torch

    model = remote_model(model_id)
    with model.trace([prompt], backend=remote_backend(model, host, api_key)):
        logits = model.lm_head.output.save()
    if not isinstance(logits, torch.Tensor) or not torch.isfinite(logits).all():
        raise RuntimeError(f"{model_id}: the remote trace returned {type(logits).__name__}, not finite logits")
    return tuple(logits.shape)
