"""The general-text mean (mean replacement's value): every real token's site activation averaged, cached."""

import numpy as np
import pytest
import torch
from conftest import encode, plain_forward

import nslens
from nslens.general import general_mean, general_texts


def test_general_mean_is_the_mean_over_every_real_token(embedded, site, tmp_path, monkeypatch):
    texts = general_texts(embedded, n_docs=12)
    assert len(texts) == 12 and len({len(t.split()) for t in texts}) > 1  # ragged: padding must be excluded
    got = general_mean(embedded, site, texts, batch_size=5, cache_dir=tmp_path)
    enc = encode(embedded, texts)
    hs = plain_forward(embedded, enc).hidden_states[site.layer + 1].double().numpy()
    real = enc["attention_mask"].numpy().astype(bool)
    np.testing.assert_allclose(got.numpy(), hs[real].mean(0), rtol=1e-5, atol=1e-6)
    assert got.dtype == torch.float32 and got.shape == (site.d_model,)
    # cached: the second call records nothing
    import nslens.general as g

    monkeypatch.setattr(g, "record", lambda *a, **k: pytest.fail("recorded again"))
    assert torch.equal(general_mean(embedded, site, texts, cache_dir=tmp_path), got)
    assert len(list(tmp_path.glob("general_mean_*.safetensors"))) == 1
    other = nslens.resolve_site(embedded, 1)  # another site is another cache entry
    monkeypatch.undo()
    assert not torch.equal(general_mean(embedded, other, texts, cache_dir=tmp_path), got)


def test_run_with_mean_uses_the_general_mean(embedded, tmp_path):
    from nslens.pipeline import RunConfig, run_operators

    cfg = RunConfig(operators=["mean", "mean_concept", "zero"])
    site = nslens.resolve_site(embedded)
    ops = run_operators(embedded, site, cfg)
    assert ops["mean"].site_values.shape == (site.d_model,) and ops["mean_concept"].site_values is None
    expect = general_mean(embedded, site)
    assert torch.equal(ops["mean"].site_values, expect)
