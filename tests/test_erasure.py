import numpy as np
import pytest
from scipy.stats import trim_mean

import nslens
from nslens.erasure import ErasureTable, Predictions, concept_metrics, erasure_table, predict


def test_concept_metrics_by_hand():
    p = Predictions(np.array([1, 0, 1, 1, 0, 1], bool), np.array([0.9, 0.2, 0.8, 0.7, 0.1, 0.6]), np.zeros(6))
    labels = np.array([0, 0, 1, 1, 2, 2])
    m = concept_metrics(p, labels, 0)
    assert m == pytest.approx({"acc": 0.5, "conf": 0.55, "cacc": 0.75, "cconf": 0.55})


def test_summary_is_scipy_trimmed_mean(rng):
    rows = [{k: float(v) for k, v in zip(("acc", "conf", "cacc", "cconf"), rng.random(4))} for _ in range(14)]
    tab = ErasureTable([str(i) for i in range(14)], rows, rows, rows)
    s = tab.summary()
    assert s["base"]["acc"] == pytest.approx(trim_mean([r["acc"] for r in rows], 0.1))
    back = ErasureTable.from_json(tab.to_json())
    assert back.summary() == s
    assert tab.to_markdown().count("\n|") == 14 + 3 and len(tab.to_csv().splitlines()) == 16


def test_predict_matches_plain_forward(embedded, site, synth):
    from conftest import encode, plain_forward

    prompts = synth["test_prompts"][:8]
    ids = nslens.label_token_ids(embedded.tokenizer, synth["ds"].label_words)
    gold = np.asarray(ids)[synth["test"].labels[:8]]
    p = predict(embedded, site, prompts, gold, batch_size=3)
    logits = plain_forward(embedded, encode(embedded, prompts)).logits[:, -1].float()
    probs = logits.softmax(-1).numpy()
    np.testing.assert_allclose(p.conf, probs[np.arange(8), gold], rtol=1e-5)
    np.testing.assert_array_equal(p.correct, logits.argmax(-1).numpy() == gold)


def test_end_to_end_target_accuracy_drops(embedded, site, synth):
    tr, te = synth["train"], synth["test"]
    ids = nslens.label_token_ids(embedded.tokenizer, tr.label_words)
    rec = nslens.record(embedded, site, synth["train_prompts"], tr.labels, tr.label_names, batch_size=32)
    masks = nslens.build_range_masks(rec.stats, method="max", fraction=0.5)
    tab = erasure_table(embedded, site, synth["test_prompts"], te.labels, ids, masks, nslens.zero(), batch_size=32)
    s = tab.summary()
    assert s["base"]["acc"] > 0.9
    assert s["range"]["acc"] < -0.2 and s["neuron"]["acc"] < -0.2  # the target concept is erased
    # range masking spares the other concepts' confidence at least as well as neuron masking
    assert s["range"]["cconf"] >= s["neuron"]["cconf"]
    with pytest.raises(ValueError, match="1 masks for 4 concepts"):
        erasure_table(embedded, site, synth["test_prompts"], te.labels, ids, masks[:1], nslens.zero())


@pytest.mark.parametrize("per_pass", [1, 3, 8])
def test_fast_path_equals_naive_path(embedded, site, synth, per_pass):
    tr, te = synth["train"], synth["test"]
    ids = nslens.label_token_ids(embedded.tokenizer, tr.label_words)
    rec = nslens.record(embedded, site, synth["train_prompts"], tr.labels, tr.label_names, batch_size=32)
    masks = nslens.build_range_masks(rec.stats, method="max", fraction=0.5)
    args = (embedded, site, synth["test_prompts"][:30], te.labels[:30], ids, masks, nslens.adaptive_dampen(0.5))
    fast = erasure_table(*args, batch_size=7, fast=True, per_pass=per_pass)
    naive = erasure_table(*args, batch_size=7, fast=False)
    for part in ("base", "neuron", "range"):
        for a, b in zip(getattr(fast, part), getattr(naive, part)):
            assert a == pytest.approx(b, abs=1e-6)


def test_predict_many_matches_predict_and_runs_remote_local(embedded, site, synth):
    from nslens.erasure import predict_many

    tr = synth["train"]
    ids = nslens.label_token_ids(embedded.tokenizer, tr.label_words)
    rec = nslens.record(embedded, site, synth["train_prompts"], tr.labels, tr.label_names, batch_size=32)
    mask = nslens.build_range_masks(rec.stats, fraction=0.3)[1]
    ivs = [None, nslens.Intervention(mask, nslens.zero(), gated=False),
           [nslens.Intervention(mask, nslens.dampen(0.5), gated=True),
            nslens.Intervention(mask, nslens.zero(), gated=True, positions="last")],
           # the last position alone: one position per layer above the site, from the clean keys and values
           nslens.Intervention(mask, nslens.zero(), gated=False, positions="last"),
           nslens.Intervention(mask, nslens.dampen(0.5), gated=True, positions="last")]
    prompts = synth["test_prompts"][:9]
    gold = np.asarray(ids)[synth["test"].labels[:9]]
    many = predict_many(embedded, site, prompts, gold, ivs, batch_size=4, per_pass=2)
    remote = predict_many(embedded, site, prompts, gold, ivs, batch_size=4, per_pass=2, remote="local")
    for iv, got, rem in zip(ivs, many, remote):
        ref = predict(embedded, site, prompts, gold, interventions=iv, batch_size=4)
        np.testing.assert_array_equal(got.pred, ref.pred)
        np.testing.assert_allclose(got.conf, ref.conf, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(rem.pred, got.pred)
        np.testing.assert_array_equal(rem.conf, got.conf)
    with pytest.raises(ValueError, match="per_pass must be >= 1"):
        predict_many(embedded, site, prompts, gold, ivs, per_pass=0)


def test_cacc_is_the_class_average_by_default_pooled_on_request():
    # concept 1 has 1 test sample (correct), concept 2 has 3 (all wrong): class average 0.5, pooled 0.25
    labels = np.array([0, 0, 1, 2, 2, 2])
    p = Predictions(np.array([True, True, True, False, False, False]), np.array([.9, .9, .8, .1, .2, .3]),
                    np.zeros(6, dtype=np.int64))
    m = concept_metrics(p, labels, 0)
    assert m["cacc"] == pytest.approx(np.mean([1.0, 0.0])) and m["cconf"] == pytest.approx(np.mean([.8, .2]))
    pooled = concept_metrics(p, labels, 0, "pooled")
    assert pooled["cacc"] == pytest.approx(0.25) and pooled["cconf"] == pytest.approx(np.mean([.8, .1, .2, .3]))
    with pytest.raises(ValueError, match="unknown average 'x'; choose one of class, pooled"):
        concept_metrics(p, labels, 0, "x")


def test_footer_says_what_the_trimmed_mean_cut():
    from nslens.erasure import trim_note

    assert "removes nothing" in trim_note(4) and "plain mean" in trim_note(9)
    assert trim_note(14).startswith("Trimmed mean: 1 of 14 concepts cut from each tail")
    x = np.arange(14.0) ** 2
    assert trim_mean(x, 0.1) == pytest.approx(np.mean(np.sort(x)[1:-1]))  # what the footer claims
    assert trim_mean(x[:9], 0.1) == pytest.approx(np.mean(x[:9]))


def test_bad_labels_gold_tokens_and_no_prompts_are_one_line_errors(embedded, site, synth):
    """Each failed deep inside: torch.cat of nothing, an IndexError, a RuntimeError from the logits' gather."""
    te = synth["test"]
    m = nslens.RangeMask([1], [0.0], [1.0], [0.5], [0.1], {"concept": "a"})
    masks = [m, nslens.RangeMask([2], [0.0], [1.0], [0.5], [0.1], {"concept": "b"})]
    prompts = synth["test_prompts"][:3]
    with pytest.raises(nslens.NsLensError, match="no prompts given"):
        erasure_table(embedded, site, [], [], [5, 6], masks, nslens.zero())
    with pytest.raises(nslens.NsLensError, match="label 2 is not a concept index: 2 concepts take 0 to 1"):
        erasure_table(embedded, site, prompts, [0, 1, 2], [5, 6], masks, nslens.zero())
    with pytest.raises(nslens.NsLensError, match="labels must be a flat list of integer concept indices"):
        erasure_table(embedded, site, prompts, [0.5, 1, 0], [5, 6], masks, nslens.zero())
    vocab = embedded.config.vocab_size
    with pytest.raises(nslens.NsLensError, match=f"gold token id {vocab} is outside the vocabulary of {vocab}"):
        erasure_table(embedded, site, prompts, [0, 1, 0], [5, vocab], masks, nslens.zero())
    with pytest.raises(nslens.NsLensError, match="gold token id -1 is outside the vocabulary"):
        predict(embedded, site, prompts, [-1, 5, 5])
    assert len(te.labels)  # the fixture's own labels still run
