import numpy as np
import pytest

import nslens
from nslens.erasure import erasure_table
from nslens.sweeps import Sweep, fraction_sweep, layer_sweep, tau_sweep


@pytest.fixture(scope="module")
def setup(embedded, site, synth):
    tr, te = synth["train"], synth["test"]
    rec = nslens.record(embedded, site, synth["train_prompts"], tr.labels, tr.label_names, batch_size=32)
    ids = nslens.label_token_ids(embedded.tokenizer, tr.label_words)
    return rec, (synth["test_prompts"][:40], te.labels[:40], ids, nslens.zero())


def test_fraction_and_tau_sweeps_equal_direct_tables(embedded, site, setup):
    rec, test = setup
    sw = fraction_sweep(embedded, site, rec.stats, *test, fractions=[0.1, 1.0], batch_size=32)
    for f, s in zip(sw.values, sw.summaries):
        direct = erasure_table(embedded, site, *test[:3], nslens.build_range_masks(rec.stats, fraction=f), test[3],
                               batch_size=32).summary()
        assert s == direct
    assert sw.curve("neuron", "acc")[1] <= sw.curve("neuron", "acc")[0]  # masking every neuron erases more
    tw = tau_sweep(embedded, site, rec.stats, *test, taus=[0.5, 2.5], fraction=0.5, batch_size=32)
    # neuron masking ignores tau; a wider range masks more values
    assert tw.summaries[0]["neuron"] == tw.summaries[1]["neuron"]
    assert tw.curve("range", "acc")[1] <= tw.curve("range", "acc")[0]
    assert Sweep.from_json(tw.to_json()).summaries == tw.summaries and "| 2.5 |" in tw.to_markdown()
    with pytest.raises(ValueError, match="at least one value"):
        tau_sweep(embedded, site, rec.stats, *test, taus=[])


def test_layer_sweep_records_each_layer(embedded, synth):
    """Each layer's row is that layer's table: statistics of the layer's own output (a plain forward hook; numpy
    means and deviations) ranked and cut there, then the erasure table at that layer; the last layer included."""
    from conftest import encode, plain_forward

    tr, te = synth["train"], synth["test"]
    ids = nslens.label_token_ids(embedded.tokenizer, tr.label_words)
    prompts, labels = synth["train_prompts"][:40], tr.labels[:40]
    test = (synth["test_prompts"][:24], te.labels[:24], ids)
    sw = layer_sweep(embedded, prompts, labels, tr.label_names, *test, nslens.zero(), layers=[0, 3], batch_size=32,
                     fraction=0.25, tau=2.0)
    assert sw.values == [0.0, 3.0] and sw.meta["fraction"] == 0.25 and sw.meta["tau"] == 2.0
    # the decoder layers' outputs from plain forward hooks (output_hidden_states applies the final norm to the last)
    hidden, layers = {}, embedded._module.model.layers
    handles = [layers[i].register_forward_hook(lambda m, a, out, i=i: hidden.__setitem__(i, out)) for i in (0, 3)]
    try:
        plain_forward(embedded, encode(embedded, prompts))
    finally:
        for h in handles:
            h.remove()
    for layer, summary in zip([0, 3], sw.summaries):
        x = hidden[layer][:, -1].double().numpy()
        rec = nslens.record(embedded, nslens.resolve_site(embedded, layer), prompts, labels, tr.label_names,
                            batch_size=32)
        for c in range(len(tr.label_names)):
            np.testing.assert_allclose(rec.stats.mean[c], x[labels == c].mean(0), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(rec.stats.std()[c], x[labels == c].std(0), rtol=1e-3, atol=1e-5)
        masks = nslens.build_range_masks(rec.stats, fraction=0.25, tau=2.0)
        site = nslens.resolve_site(embedded, layer)
        assert summary == erasure_table(embedded, site, *test, masks, nslens.zero(), batch_size=32).summary()
    assert sw.summaries[0] != sw.summaries[1]


def test_a_sweep_takes_the_runs_own_scores(embedded, site, setup):
    """A ranking that needs raw samples or the model is computed once and passed as scores= (they depend on neither
    fraction nor tau); without them the sweep says so instead of silently ranking by max."""
    rec, test = setup
    scores = -nslens.rank("max", rec.stats)  # any [C, d] scores: the least active neurons first
    sw = fraction_sweep(embedded, site, rec.stats, *test, fractions=[0.25], method="probe", scores=scores,
                        batch_size=32)
    masks = nslens.build_range_masks(rec.stats, fraction=0.25, scores=scores)
    assert sw.summaries[0] == erasure_table(embedded, site, *test[:3], masks, test[3], batch_size=32).summary()
    assert sw.meta["method"] == "probe"
    for method, needs in (("probe", "raw samples"), ("neurgrad", "the model")):
        with pytest.raises(ValueError, match=f"the {method} ranking needs {needs}: pass its scores="):
            tau_sweep(embedded, site, rec.stats, *test, taus=[1.0], method=method)


@pytest.mark.parametrize("layers, words", [([], r"distinct layers, got \[\]"), ([-1, 3], r"distinct layers, got \[-1, 3\]"),
                                           ([1.7], "sweep layer must be an integer, got 1.7"),
                                           ([9], "layer 9 out of range")])
def test_layer_sweep_layers_are_distinct_whole_layers(embedded, synth, layers, words):
    """[] gave an empty sweep, 1.7 ran layer 1 labelled 1.0 and -1 with 3 ran the last layer twice."""
    tr, te = synth["train"], synth["test"]
    ids = nslens.label_token_ids(embedded.tokenizer, tr.label_words)
    with pytest.raises(nslens.NsLensError, match=words):
        layer_sweep(embedded, synth["train_prompts"][:8], tr.labels[:8], tr.label_names, synth["test_prompts"][:4],
                    te.labels[:4], ids, nslens.zero(), layers=layers)


def test_fraction_and_tau_sweeps_take_lists_of_numbers(embedded, site, setup):
    """fractions=0.3 was a TypeError and ['a'] a ValueError from float()."""
    rec, test = setup
    with pytest.raises(nslens.NsLensError, match="the fraction sweep takes a list of values, got 0.3"):
        fraction_sweep(embedded, site, rec.stats, *test, fractions=0.3)
    with pytest.raises(nslens.NsLensError, match="tau sweep value must be a finite number, got 'a'"):
        tau_sweep(embedded, site, rec.stats, *test, taus=["a"])
