"""nslens.readout: the label-word readouts against numpy and a plain HF forward, in every prediction path."""

import numpy as np
import pytest
import torch

import nslens
from nslens.errors import NsLensError
from nslens.readout import CONTENT_FREE, Readout, make_readout, predict_token


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_predict_token_equals_numpy(rng):
    logits = rng.normal(size=(50, 40)).astype(np.float32) * 3
    ids = np.array([7, 3, 31, 12])
    prior = rng.normal(size=4).astype(np.float32)
    t = torch.from_numpy(logits)
    np.testing.assert_array_equal(predict_token(t).numpy(), logits.argmax(-1))
    got = predict_token(t, torch.from_numpy(ids), torch.from_numpy(prior)).numpy()
    np.testing.assert_array_equal(got, ids[(_log_softmax(logits)[:, ids] - prior).argmax(-1)])
    # a prior large enough for one label makes every prediction that label's token
    big = np.zeros(4, np.float32)
    big[[0, 1, 3]] = 100.0
    assert set(predict_token(t, torch.from_numpy(ids), torch.from_numpy(big)).tolist()) == {31}


def _fixture(embedded, synth, n=12):
    from conftest import encode, plain_forward

    ids = nslens.label_token_ids(embedded.tokenizer, synth["ds"].label_words)
    prompts = synth["test_prompts"][:n]
    gold = np.asarray(ids)[synth["test"].labels[:n]]
    logits = plain_forward(embedded, encode(embedded, prompts)).logits[:, -1].float().numpy()
    return ids, prompts, gold, logits


def test_calibrated_prior_and_predictions_equal_a_plain_forward(embedded, site, synth):
    from conftest import encode, plain_forward

    ids, prompts, gold, logits = _fixture(embedded, synth)
    prompter = synth["prompter"]
    cf = plain_forward(embedded, encode(embedded, [prompter(t) for t in CONTENT_FREE])).logits[:, -1].float().numpy()
    prior = _log_softmax(cf)[:, ids].mean(0)
    readout = make_readout(embedded, "calibrated", ids, prompter)
    assert readout.kind == "calibrated" and readout.label_ids == tuple(ids)
    np.testing.assert_allclose(readout.prior, prior, rtol=1e-5, atol=1e-6)
    p = nslens.predict(embedded, site, prompts, gold, batch_size=5, readout=readout)
    ref = np.asarray(ids)[(_log_softmax(logits)[:, ids] - np.asarray(readout.prior)).argmax(-1)]
    np.testing.assert_array_equal(p.pred, ref)
    np.testing.assert_array_equal(p.correct, ref == gold)
    # conf stays the gold token's probability over the whole vocabulary, whatever the readout
    probs = np.exp(_log_softmax(logits))
    np.testing.assert_allclose(p.conf, probs[np.arange(len(gold)), gold], rtol=1e-5)


def test_labels_readout_is_the_best_label_token(embedded, site, synth):
    ids, prompts, gold, logits = _fixture(embedded, synth)
    readout = make_readout(embedded, "labels", ids)
    assert readout.prior == (0.0,) * len(ids)
    p = nslens.predict(embedded, site, prompts, gold, batch_size=4, readout=readout)
    np.testing.assert_array_equal(p.pred, np.asarray(ids)[logits[:, ids].argmax(-1)])
    assert make_readout(embedded, "argmax", ids) is None


def test_readout_in_the_fast_erasure_path_and_remote_local(embedded, site, synth, synth_masks):
    """The calibrated rule in the shared replay (locally and under remote="local") and in the erasure table equals
    numpy's calibrated argmax over a plain forward's logits, with the edit as a plain hook."""
    from conftest import encode, hook_reference, plain_forward

    from nslens.erasure import predict_many

    ids, prompts, gold, _ = _fixture(embedded, synth, n=9)
    prior = np.array([0.3, -0.2, 0.1, 0.0])[:len(ids)]
    readout = Readout("calibrated", tuple(ids), tuple(prior))
    mask = synth_masks[0]
    ivs = [None, nslens.Intervention(mask, nslens.zero(), gated=False),
           nslens.Intervention(mask, nslens.zero(), gated=True)]
    many = predict_many(embedded, site, prompts, gold, ivs, batch_size=4, per_pass=2, readout=readout)
    remote = predict_many(embedded, site, prompts, gold, ivs, batch_size=4, per_pass=2, remote="local",
                          readout=readout)
    enc = encode(embedded, prompts)
    zero = lambda x, mu, sigma: torch.zeros_like(x)  # noqa: E731
    for iv, got, rem in zip(ivs, many, remote):
        logits = (plain_forward(embedded, enc).logits if iv is None
                  else hook_reference(embedded, site, enc, mask, zero, iv.gated))[:, -1].float().numpy()
        ref = np.asarray(ids)[(_log_softmax(logits)[:, ids] - prior).argmax(-1)]
        np.testing.assert_array_equal(got.pred, ref)
        np.testing.assert_array_equal(rem.pred, got.pred)
        np.testing.assert_allclose(got.conf, np.exp(_log_softmax(logits))[np.arange(len(gold)), gold], rtol=1e-5)
    prompts, labels = synth["test_prompts"][:48], synth["test"].labels[:48]
    tab = nslens.erasure_table(embedded, site, prompts, labels, ids, synth_masks, nslens.zero(), batch_size=32,
                               readout=readout)
    assert tab.meta["readout"] == "calibrated"
    logits = plain_forward(embedded, encode(embedded, prompts)).logits[:, -1].float().numpy()
    correct = np.asarray(ids)[(_log_softmax(logits)[:, ids] - prior).argmax(-1)] == np.asarray(ids)[labels]
    for c in range(len(ids)):
        assert tab.base[c]["acc"] == pytest.approx(correct[labels == c].mean())
        others = [correct[labels == o].mean() for o in range(len(ids)) if o != c]
        assert tab.base[c]["cacc"] == pytest.approx(np.mean(others))


def test_bad_readouts_are_one_line_errors(embedded):
    with pytest.raises(NsLensError, match="unknown readout 'best'; choose one of argmax, labels, calibrated"):
        make_readout(embedded, "best", [1, 2])
    with pytest.raises(NsLensError, match="needs a classification dataset"):
        make_readout(embedded, "labels", None)
    with pytest.raises(NsLensError, match="needs the few-shot prompter"):
        make_readout(embedded, "calibrated", [1, 2])
    with pytest.raises(NsLensError, match="unknown readout 'best'"):
        nslens.RunConfig(readout="best").validate()
    with pytest.raises(NsLensError, match="next-token datasets"):
        nslens.RunConfig(dataset="next:pronouns:synthetic", readout="labels").validate()


def test_prepare_data_filters_by_the_readout_and_says_to_try_it(embedded, site):
    from nslens.prepare import prepare_data

    cfg = nslens.RunConfig(dataset="synthetic", n_per_class=24, layer=-2, readout="labels", batch_size=32)
    data = prepare_data(embedded, site, cfg)
    assert data.readout is not None and data.readout.kind == "labels"
    p = nslens.predict(embedded, site, data.prompts(data.test), data.test_gold, readout=data.readout)
    assert p.correct.all()  # the filter kept exactly what this readout gets right
    from nslens.prepare import _check_correct

    part = data.test
    with pytest.raises(NsLensError, match="--readout calibrated"):
        _check_correct(part, np.zeros(len(part), bool), "test", 1, cfg)
