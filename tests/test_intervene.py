import pytest
import torch
from conftest import encode, hook_reference, plain_forward

import nslens
from nslens.intervene import Intervention, applied, apply_in_trace, edit_hidden
from nslens.ops import adaptive_dampen, dampen, mean_replace, zero
from nslens.ranges import RangeMask


def mask_for(h: torch.Tensor, neurons, tau=1.0):
    """A mask whose ranges cover about the middle of each neuron's observed values."""
    idx = torch.tensor(neurons)
    vals = h[..., idx].reshape(-1, len(neurons))
    mu, sigma = vals.mean(0), vals.std(0, unbiased=False)
    return RangeMask(idx, mu - tau * sigma, mu + tau * sigma, mu, sigma, {"tau": tau, "concept": "x"})


@pytest.fixture(scope="module")
def batch(embedded, site, synth):
    enc = encode(embedded, synth["test_prompts"][:6])
    h = plain_forward(embedded, enc).hidden_states[site.layer + 1]
    return enc, h


def test_gated_zero_changes_exactly_in_range_values(batch):
    _, h = batch
    mask = mask_for(h, [3, 17, 40])
    out = edit_hidden(h, Intervention(mask, zero(), gated=True))
    sel = h[..., mask.neurons]
    inside = (sel >= mask.lo) & (sel <= mask.hi)
    assert inside.any() and (~inside).any()
    assert torch.equal(out[..., mask.neurons], torch.where(inside, torch.zeros_like(sel), sel))
    other = torch.ones(h.shape[-1], dtype=torch.bool)
    other[mask.neurons] = False
    assert torch.equal(out[..., other], h[..., other])  # every other value bit-identical


def test_ungated_zeroes_whole_neurons(batch):
    _, h = batch
    mask = mask_for(h, [5, 6])
    out = edit_hidden(h, Intervention(mask, zero(), gated=False))
    assert torch.equal(out[..., mask.neurons], torch.zeros_like(out[..., mask.neurons]))
    keep = [j for j in range(h.shape[-1]) if j not in (5, 6)]
    assert torch.equal(out[..., keep], h[..., keep])


def test_last_position_only(batch):
    _, h = batch
    mask = mask_for(h, [1, 2])
    out = edit_hidden(h, Intervention(mask, zero(), gated=False, positions="last"))
    assert torch.equal(out[:, :-1], h[:, :-1])
    assert torch.equal(out[:, -1, mask.neurons], torch.zeros(h.shape[0], 2))


OPS = {
    "zero": (zero(), lambda x, mu, s: torch.zeros_like(x)),
    "dampen": (dampen(0.125), lambda x, mu, s: 0.125 * x),
    "mean": (mean_replace(), lambda x, mu, s: torch.full_like(x, float(mu))),
    "adaptive": (adaptive_dampen(0.5),
                 lambda x, mu, s: torch.clamp(0.5 * (x - mu).abs() / (1.0 * s), max=0.5) * x),
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("gated", [True, False])
def test_trace_edit_equals_plain_hook(embedded, site, batch, op, gated):
    enc, h = batch
    mask = mask_for(h, list(range(0, 64, 3)))
    operator, phi = OPS[op]
    with torch.no_grad():
        with embedded.trace(enc):
            apply_in_trace(embedded, site, Intervention(mask, operator, gated=gated))
            logits = embedded.output.logits.save()
    ref = hook_reference(embedded, site, enc, mask, phi, gated)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    clean = plain_forward(embedded, enc).logits
    assert not torch.allclose(logits, clean)
    # nothing persists: the next trace is bit-identical to the clean model
    with torch.no_grad():
        with embedded.trace(enc):
            after = embedded.output.logits.save()
    assert torch.equal(after, clean)


def test_remote_local_equals_local(embedded, site, batch):
    enc, h = batch
    iv = Intervention(mask_for(h, [0, 9, 33]), adaptive_dampen(0.5), gated=True)
    out = {}
    for remote in (False, "local"):
        with torch.no_grad():
            with embedded.trace(enc, remote=remote):
                apply_in_trace(embedded, site, iv)
                lg = embedded.output.logits.save()
        out[remote] = lg
    assert torch.equal(out[False], out["local"])


def test_applied_context_is_removed(embedded, site, batch):
    enc, h = batch
    iv = Intervention(mask_for(h, [4, 8]), zero(), gated=False)
    clean = plain_forward(embedded, enc).logits
    with torch.no_grad():
        with applied(embedded, site, iv):
            with embedded.trace(enc):
                edited = embedded.output.logits.save()
        with embedded.trace(enc):
            after = embedded.output.logits.save()
    assert not torch.equal(edited, clean)
    assert torch.equal(after, clean)
    with pytest.raises(RuntimeError), torch.no_grad():
        with applied(embedded, site, iv):
            raise RuntimeError("boom")
    with torch.no_grad():
        with embedded.trace(enc):
            after2 = embedded.output.logits.save()
    assert torch.equal(after2, clean)


def test_bad_positions(batch):
    _, h = batch
    with pytest.raises(ValueError, match="unknown positions 'first'; choose one of all, last"):
        Intervention(mask_for(h, [1]), zero(), positions="first")


def test_public_api_exports():
    for name in nslens.__all__:
        assert hasattr(nslens, name), name


@pytest.mark.parametrize("gated", [True, False])
def test_general_mean_replacement_equals_plain_hook(embedded, site, batch, gated):
    """mean: each selected neuron replaced by its own general-text mean (a site-wide vector), as a plain hook."""
    enc, h = batch
    neurons = list(range(1, 64, 4))
    mask = mask_for(h, neurons)
    general = torch.linspace(-1.0, 1.0, site.d_model)
    with torch.no_grad():
        with embedded.trace(enc):
            apply_in_trace(embedded, site, Intervention(mask, mean_replace(site_values=general), gated=gated))
            logits = embedded.output.logits.save()
    values = iter(general[neurons])
    ref = hook_reference(embedded, site, enc, mask, lambda x, mu, s: torch.full_like(x, float(next(values))), gated)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mean has 10 site values for a mask over"):
        Intervention(mask, mean_replace(site_values=torch.zeros(10)))


def test_an_intervention_for_another_site_or_of_wrong_parts_is_refused_before_any_trace(embedded, site, synth, batch):
    """Applied at another layer, a mask ran and gave a table that looked right; a neuron past the width failed in
    the trace as a bare IndexError; a string operator failed there as a TypeError."""
    from nslens.erasure import erasure_table, predict, predict_many
    from nslens.generate import generate

    _, h = batch
    m = mask_for(h, [1, 2])
    m.meta.update(site.describe())  # made at the site, as build_range_masks records it
    with pytest.raises(nslens.NsLensError, match="takes a RangeMask and an operator .*got RangeMask and str"):
        Intervention(m, "zero")
    with pytest.raises(nslens.NsLensError, match="RangeMask selects neuron -1; indices start at 0"):
        RangeMask([-1], [0.0], [1.0], [0.5], [0.1])
    below = nslens.resolve_site(embedded, 0)
    prompts, gold = synth["test_prompts"][:4], [1, 2, 3, 4]
    other_layer = f"made for another model/site: layer: mask has {site.layer}, model has 0"
    with pytest.raises(nslens.NsLensError, match=other_layer):
        predict(embedded, below, prompts, gold, interventions=Intervention(m, zero()))
    with pytest.raises(nslens.NsLensError, match=other_layer):
        predict_many(embedded, below, prompts, gold, [None, [Intervention(m, zero())]])
    with pytest.raises(nslens.NsLensError, match=other_layer):
        erasure_table(embedded, below, prompts, [0, 0, 0, 0], [5], [m], zero())
    with pytest.raises(nslens.NsLensError, match=other_layer):
        generate(embedded, below, prompts[:1], interventions=Intervention(m, zero()))
    wide = RangeMask([site.d_model], [0.0], [1.0], [0.5], [0.1], {"concept": "w"})
    with pytest.raises(nslens.NsLensError, match=f"selects neuron {site.d_model} >= d_model {site.d_model}"):
        with applied(embedded, site, Intervention(wide, zero())):
            pass
    predict(embedded, site, prompts, gold, interventions=Intervention(m, zero()))  # its own site is fine
    with pytest.raises(nslens.NsLensError, match="interventions are Intervention objects .*got str"):
        predict(embedded, site, prompts, gold, interventions="zero")  # recursed into its letters without end
