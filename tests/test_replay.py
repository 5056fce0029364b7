"""Replaying the layers above the site from a cached value: equal to a full forward with a plain torch hook."""

import pytest
import torch

import nslens
import nslens.replay as replay
from nslens.replay import chunked, pass_tiles, replay_batch, returned_bytes


def last_logits(model, tiles=1, offset=0):
    return {"logits": model.output.logits[:, -1, :].cpu()}


def test_replay_equals_full_forward_with_a_plain_hook(embedded, site, synth, monkeypatch):
    from conftest import encode, plain_forward

    enc = encode(embedded, synth["test_prompts"][:5])
    d = site.d_model
    mask = nslens.RangeMask(torch.arange(0, d, 3), -torch.ones(len(range(0, d, 3))) * .5,
                            torch.ones(len(range(0, d, 3))) * .5, torch.zeros(len(range(0, d, 3))),
                            torch.ones(len(range(0, d, 3))) * .2, {"tau": 2.5, **site.describe()})
    ivs = [None, nslens.Intervention(mask, nslens.zero(), gated=False), nslens.Intervention(mask, nslens.zero()),
           [nslens.Intervention(mask, nslens.dampen(0.5), gated=False), nslens.Intervention(mask, nslens.zero())]]
    chunks = chunked(ivs, 2)
    assert [[i for i, _ in c] for c in chunks] == [[1, 2], [3]]
    clean, outs = replay_batch(embedded, site, enc, chunks, last_logits)
    ref_clean = plain_forward(embedded, enc).logits[:, -1]
    torch.testing.assert_close(clean["logits"], ref_clean, rtol=1e-5, atol=1e-5)
    cols = mask.neurons

    def hook_for(ops_gated):
        def hook(module, args, output):
            hs = output.clone()
            for op, gated in ops_gated:
                x = hs[..., cols]
                inside = (x >= mask.lo) & (x <= mask.hi) if gated else torch.ones_like(x, dtype=torch.bool)
                hs[..., cols] = torch.where(inside, op(x), x)
            return hs
        return hook

    refs = [[(lambda x: torch.zeros_like(x), False)], [(lambda x: torch.zeros_like(x), True)],
            [(lambda x: 0.5 * x, False), (lambda x: torch.zeros_like(x), True)]]
    got = torch.cat([o["logits"] for o in outs])
    n = enc["input_ids"].shape[0]
    layer = embedded._module.model.layers[site.layer]
    for j, r in enumerate(refs):
        ref = plain_forward(embedded, enc, hook_for(r), layer).logits[:, -1]
        torch.testing.assert_close(got[j * n:(j + 1) * n], ref, rtol=1e-5, atol=1e-5)
    # the clean pass may stop at the site when nobody reads the clean outputs
    none, outs2 = replay_batch(embedded, site, enc, chunks, last_logits, clean_readout=False)
    assert none is None and torch.equal(torch.cat([o["logits"] for o in outs2]), got)
    # on a CPU the chunks run in passes of at most pass_tiles tiles: one tile per pass here, same outputs in order
    passes = []
    one_pass = replay._replay

    def spy(model, site, enc, part, *rest):
        passes.append(len(part))
        return one_pass(model, site, enc, part, *rest)

    monkeypatch.setattr(replay, "_replay", spy)
    monkeypatch.setattr(replay, "CPU_PASS_BYTES", 1)
    clean1, outs1 = replay_batch(embedded, site, enc, chunks, last_logits)
    assert passes == [1, 1, 1] and [o["logits"].shape[0] for o in outs1] == [2 * n, n]
    torch.testing.assert_close(torch.cat([o["logits"] for o in outs1]), got, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clean1["logits"], clean["logits"], rtol=1e-5, atol=1e-5)
    # the model is clean afterwards
    torch.testing.assert_close(plain_forward(embedded, enc).logits[:, -1], ref_clean, rtol=0, atol=0)


def test_chunked_and_returned_bytes():
    assert chunked([None, None], 3) == []
    with pytest.raises(ValueError, match="per_pass must be >= 1, got 0"):
        chunked([None], 0)
    assert returned_bytes({"a": torch.zeros(3), "b": [torch.zeros(2, dtype=torch.bool), (torch.zeros(1),)]},
                          None) == 3 * 4 + 2 + 4


def test_pass_tiles_bounds_the_widest_activation_on_a_cpu(embedded, site, monkeypatch):
    cfg = embedded.config
    width = max(cfg.intermediate_size, 4 * cfg.hidden_size)
    one = 4 * 10 * width * 4  # 4 rows x 10 positions x width x float32
    monkeypatch.setattr(replay, "CPU_PASS_BYTES", 3 * one + 1)
    assert pass_tiles(embedded, site, 4, 10) == 3 and pass_tiles(embedded, site, 4, 1) == 30
    monkeypatch.setattr(replay, "CPU_PASS_BYTES", 1)
    assert pass_tiles(embedded, site, 4, 10) == 1  # never below one tile
    assert pass_tiles(embedded, nslens.resolve_site(embedded, -1), 4, 10) is None  # no decoder layer is replayed

    class OffCpu(torch.nn.Module):  # a model whose weights live elsewhere gets no bound
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2, device="meta"))

    assert pass_tiles(OffCpu(), site, 4, 10) is None
