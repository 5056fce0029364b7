
import numpy as np
import pytest
import torch

import nslens
from nslens.probes import ActProbe, MagnProbe, PolarProbe, evaluate_probes, probe_features, split_queries


def planted(rng, n=400, k=3, w=60, skill=8):
    """NEG features where neurons 0..skill-1 carry the answer (correct option's NEG high and positive)."""
    neg = rng.normal(size=(n, k, w))
    answers = rng.integers(0, k, size=n)
    neg[np.arange(n), answers, :skill] = np.abs(neg[np.arange(n), answers, :skill]) + 1.5
    return neg, answers, [f"query {i}" for i in range(n)]


def test_probes_beat_chance_on_planted_skill_neurons(rng):
    neg, answers, queries = planted(rng)
    res = evaluate_probes(neg, answers, queries)
    assert res.chance == pytest.approx(1 / 3)
    for name, acc in res.accuracy.items():
        assert acc > 0.8, (name, acc)
    p = PolarProbe().fit(neg, answers)
    assert set(p.order[:8].tolist()) == set(range(8))  # the planted neurons rank first
    m = MagnProbe().fit(neg, answers)
    assert set(m.order[:8].tolist()) == set(range(8)) and m.prefers_high[:8].all()


def test_random_features_stay_near_chance(rng):
    neg = rng.normal(size=(600, 2, 30))
    answers = rng.integers(0, 2, size=600)
    res = evaluate_probes(neg, answers, [f"q{i}" for i in range(600)])
    assert all(abs(a - 0.5) < 0.2 for a in res.accuracy.values())


def test_splits_are_disjoint_even_with_duplicate_queries():
    queries = [f"q{i % 50}" for i in range(200)] + ["  Q7 "]  # duplicates, incl. a whitespace/case variant
    tr, va, te = split_queries(queries, seed=1)
    assert len(tr) + len(va) + len(te) == len(queries)
    norm = [" ".join(q.split()).lower() for q in queries]
    sets = [{norm[i] for i in part} for part in (tr, va, te)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert abs(len(tr) / len(queries) - 6 / 8) < 0.1
    with pytest.raises(ValueError, match="too few"):
        split_queries(["a", "b"])


def test_probes_on_embedded_model_neurgrad(embedded, synth):
    """End to end: NeurGrad features of the embedded model read its topic skill far above chance."""
    from nslens.neg import neurgrad, resolve_neuron_site

    ds = synth["ds"].subset(np.arange(160))
    ids = nslens.label_token_ids(embedded.tokenizer, ds.label_words)
    prompts = nslens.FewShotPrompter(list(ds.label_words)).prompts(ds.texts)
    neg = neurgrad(embedded, resolve_neuron_site(embedded, -2, "residual"), prompts, options=ids, batch_size=16)
    res = evaluate_probes(neg, ds.labels, ds.texts)
    assert max(res.accuracy.values()) > 0.6  # chance is 0.25


def test_lm_prob_and_act_baselines(embedded, synth):
    """LM-Prob = argmax of the options' probabilities (checked against a plain forward); Act reads a planted skill
    neuron and stays at chance on noise."""
    from conftest import encode, plain_forward

    from nslens.neg import resolve_neuron_site

    ds = synth["ds"].subset(np.arange(40))
    ids = nslens.label_token_ids(embedded.tokenizer, ds.label_words)
    prompts = nslens.FewShotPrompter(list(ds.label_words)).prompts(ds.texts)
    ns = resolve_neuron_site(embedded, 2, "residual")  # hidden_states[3] (the last entry is after the final norm)
    probs, acts = probe_features(embedded, ns, prompts, ids, batch_size=16)
    out = plain_forward(embedded, encode(embedded, prompts[:8]))
    ref = torch.softmax(out.logits[:, -1].float(), -1)[:, ids].numpy()
    np.testing.assert_allclose(probs[:8], ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(acts[:8], out.hidden_states[3][:, -1].numpy(), rtol=1e-4, atol=1e-5)
    rng = np.random.default_rng(0)
    answers = rng.integers(0, 3, 600)
    noise = rng.normal(size=(600, 20))
    planted = noise.copy()
    planted[:, 7] = answers * 2.0 + rng.normal(scale=0.1, size=600)  # neuron 7 encodes the answer
    neg = rng.normal(size=(600, 3, 5))
    queries = [f"q{i}" for i in range(600)]
    good = evaluate_probes(neg, answers, queries, activations=planted, option_probs=np.eye(3)[answers] + 0.1)
    assert good.accuracy["Act"] > 0.95 and good.accuracy["LM-Prob"] == 1.0
    bad = evaluate_probes(neg, answers, queries, activations=noise)
    assert bad.accuracy["Act"] < 0.5
    act = ActProbe(3).fit(planted, answers)
    assert act.order[0] == 7
    with pytest.raises(ValueError, match=r"option_probs must be \[queries, options\]"):
        evaluate_probes(neg, answers, queries, option_probs=np.zeros((600, 2)))


def test_probe_features_under_remote_local_equal_local(embedded, synth):
    from nslens.neg import resolve_neuron_site

    ds = synth["ds"].subset(np.arange(10))
    ids = nslens.label_token_ids(embedded.tokenizer, ds.label_words)
    prompts = nslens.FewShotPrompter(list(ds.label_words)).prompts(ds.texts)
    ns = resolve_neuron_site(embedded, 2, "product")
    local = probe_features(embedded, ns, prompts, ids, batch_size=4)
    remote = probe_features(embedded, ns, prompts, ids, batch_size=4, remote="local")
    for a, b in zip(local, remote):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_answers_that_are_no_option_and_nan_neg_are_refused():
    """Answers past the options (or -1) gave accuracies or an IndexError, 0.5 was truncated, NaN NEG gave
    accuracies without a word, and list inputs were an AttributeError."""
    import numpy as np
    import pytest

    from nslens.errors import NsLensError
    from nslens.probes import evaluate_probes

    rng = np.random.default_rng(0)
    neg = rng.normal(size=(30, 3, 8))
    queries = [f"q{i}" for i in range(30)]
    answers = np.arange(30) % 3
    with pytest.raises(NsLensError, match="label 3 is not a concept index: 3 concepts take 0 to 2"):
        evaluate_probes(neg, answers + 1, queries)
    with pytest.raises(NsLensError, match="labels must be a flat list of integer concept indices"):
        evaluate_probes(neg, answers + 0.5, queries)
    with pytest.raises(NsLensError, match=r"need finite NEG \[queries, options, neurons\]"):
        evaluate_probes(np.full_like(neg, np.nan), answers, queries)
    with pytest.raises(NsLensError, match=r"need finite NEG \[queries, options, neurons\], got shape \(30, 3, 0\)"):
        evaluate_probes(neg[:, :, :0], answers, queries)  # no neurons: sklearn's error
    res = evaluate_probes(neg.tolist(), answers.tolist(), queries)  # lists read as arrays
    assert set(res.accuracy) >= {"Polar-Probe", "Magn-Probe", "Tree-Probe"}
