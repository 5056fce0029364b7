"""Shared fixtures: the embedded model (trained once, cached under NSLENS_HOME) and tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NSLENS_HOME", str(Path(__file__).resolve().parents[1] / ".cache" / "nslens"))
# a remote test that waits on a server which will never answer fails after 5 minutes instead of 6 hours
os.environ.setdefault("NSLENS_REMOTE_TIMEOUT", "300")

# The real NDIF server the remote tests run against (session fixture `ndif_stack`; see tests/ndif_stack/README.md).
from ndif_stack.fixture import ndif_stack  # noqa: E402, F401


@pytest.fixture(scope="session")
def embedded():
    import nslens

    return nslens.load_model("embedded")


@pytest.fixture(scope="session")
def site(embedded):
    import nslens

    return nslens.resolve_site(embedded, -2)


@pytest.fixture(scope="session")
def synth():
    """A small synthetic concept split and its prompts."""
    from nslens import FewShotPrompter
    from nslens.synthetic import synthetic_concepts

    ds = synthetic_concepts(60, seed=11)
    train, test = ds.split(0.3, seed=0)
    prompter = FewShotPrompter.from_dataset(train, k=1, seed=0)
    return {"ds": ds, "train": train, "test": test, "prompter": prompter,
            "train_prompts": prompter.prompts(train.texts), "test_prompts": prompter.prompts(test.texts)}


def encode(model, prompts):
    enc = model.tokenizer(list(prompts), return_tensors="pt", padding=True)
    return dict(enc)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """What nnsight passes for left-padded batches: positions count from each row's first real token."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def plain_forward(model, enc, hook=None, layer_module=None):
    """The raw HF module's forward (no nnsight), optionally with a plain torch forward hook."""
    hf = model._module
    handle = layer_module.register_forward_hook(hook) if hook is not None else None
    try:
        with torch.no_grad():
            return hf(**enc, position_ids=position_ids(enc["attention_mask"]), output_hidden_states=True)
    finally:
        if handle is not None:
            handle.remove()


def hook_reference(embedded, site, enc, mask, phi, gated):
    """A mask's edit written as a plain torch forward hook on the raw HF module (``phi(x, mu, sigma)`` per selected
    neuron, applied where the value lies in the range when ``gated``); returns the logits."""
    def hook(module, args, output):
        hs = output[0] if isinstance(output, tuple) else output
        hs = hs.clone()
        for k, j in enumerate(mask.neurons.tolist()):
            col = hs[..., j]
            new = phi(col, mask.mu[k], mask.sigma[k])
            hs[..., j] = torch.where((col >= mask.lo[k]) & (col <= mask.hi[k]), new, col) if gated else new
        return (hs, *output[1:]) if isinstance(output, tuple) else hs

    layer = embedded._module.model.layers[site.layer]
    return plain_forward(embedded, enc, hook=hook, layer_module=layer).logits


@pytest.fixture
def rng():
    return np.random.default_rng(0)
