import numpy as np
import pytest
import torch
from conftest import encode, plain_forward

import nslens
from nslens.record import record
from nslens.stats import ConceptStats


def test_record_equals_numpy_on_raw_site_values(embedded, site, synth):
    prompts, tr = synth["train_prompts"][:40], synth["train"]
    labels = tr.labels[:40]
    res = record(embedded, site, prompts, labels, tr.label_names, batch_size=7, keep_samples=True)
    # independent reference: the raw HF module's hidden states, one prompt at a time (no padding at all)
    ref_x = []
    for p in prompts:
        enc = encode(embedded, [p])
        ref_x.append(plain_forward(embedded, enc).hidden_states[site.layer + 1][0, -1].numpy())
    ref_x = np.stack(ref_x).astype(np.float64)
    np.testing.assert_allclose(res.samples, ref_x, rtol=1e-4, atol=1e-5)
    ref = ConceptStats.from_samples(ref_x, labels, tr.label_names)
    np.testing.assert_array_equal(res.stats.count, ref.count)
    np.testing.assert_allclose(res.stats.mean, ref.mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res.stats.std(), ref.std(), rtol=1e-3, atol=1e-5)
    # whatever the batch split
    res2 = record(embedded, site, prompts, labels, tr.label_names, batch_size=40)
    np.testing.assert_allclose(res2.stats.mean, res.stats.mean, rtol=1e-5, atol=1e-6)
    assert res.stats.meta["layer"] == site.layer and res.stats.meta["n_samples"] == 40


def test_kept_samples_are_bounded_and_saved(embedded, site, synth, tmp_path):
    from safetensors.numpy import load_file

    prompts, tr = synth["train_prompts"][:20], synth["train"]
    full = record(embedded, site, prompts, tr.labels[:20], tr.label_names, batch_size=6, keep_samples=True)
    capped = record(embedded, site, prompts, tr.labels[:20], tr.label_names, batch_size=6, keep_samples=True,
                    max_samples=8)
    assert capped.samples.shape == (8, site.d_model) and len(capped.sample_index) == 8
    assert capped.sample_labels.tolist() == tr.labels[:20][capped.sample_index].tolist()
    np.testing.assert_array_equal(full.sample_index, np.arange(20))
    np.testing.assert_array_equal(capped.samples, full.samples[capped.sample_index])
    np.testing.assert_array_equal(capped.stats.count, full.stats.count)  # statistics still use every sample
    back = load_file(str(capped.save_samples(tmp_path / "s.safetensors")))
    np.testing.assert_array_equal(back["samples"], capped.samples)
    np.testing.assert_array_equal(back["index"], capped.sample_index)
    with pytest.raises(ValueError, match="no raw samples were kept"):
        record(embedded, site, prompts[:2], tr.labels[:2], tr.label_names).save_samples(tmp_path / "x.safetensors")


def test_remote_local_equals_local(embedded, site, synth):
    prompts, labels = synth["train_prompts"][:12], synth["train"].labels[:12]
    a = record(embedded, site, prompts, labels, synth["train"].label_names, batch_size=5)
    b = record(embedded, site, prompts, labels, synth["train"].label_names, batch_size=5, remote="local")
    np.testing.assert_array_equal(a.stats.mean, b.stats.mean)
    np.testing.assert_array_equal(a.stats.m2, b.stats.m2)


def test_all_positions_count_real_tokens(embedded, site, synth):
    prompts, labels = synth["train_prompts"][:6], synth["train"].labels[:6]
    res = record(embedded, site, prompts, labels, synth["train"].label_names, batch_size=4, position="all")
    n_tokens = [len(embedded.tokenizer(p)["input_ids"]) for p in prompts]
    expected = np.bincount(labels, weights=n_tokens, minlength=4)
    np.testing.assert_array_equal(res.stats.count, expected)


def test_progress_and_bad_inputs(embedded, site, synth):
    calls = []
    record(embedded, site, synth["train_prompts"][:5], synth["train"].labels[:5], synth["train"].label_names,
           batch_size=2, progress=lambda *a: calls.append(a))
    assert calls == [("record", 1, 3), ("record", 2, 3), ("record", 3, 3)]
    with pytest.raises(ValueError, match="unknown position 'first'; choose one of last, all"):
        record(embedded, site, ["a"], [0], ["x", "y"], position="first")
    with pytest.raises(ValueError, match="dataset is empty"):
        record(embedded, site, [], [], ["x", "y"])
    with pytest.raises(ValueError, match="2 prompts but 1 labels"):
        record(embedded, site, ["a", "b"], [0], ["x", "y"])


def test_nonfinite_activations_are_an_error(embedded, synth):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(embedded._module.config)
    hf.load_state_dict(embedded._module.state_dict())
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model = nslens.load_model(hf.eval(), tokenizer=embedded.tokenizer)
    site = nslens.resolve_site(model, -2)
    with pytest.raises(ValueError, match=r"non-finite activations \(NaN/inf\) at model.layers.2 in batch 0"):
        record(model, site, synth["train_prompts"][:3], [0, 1, 2], synth["train"].label_names)


def test_raw_samples_are_a_balanced_sample_of_every_concept_on_class_grouped_data(embedded, site, synth):
    """Hub datasets such as DBPedia-14 are stored grouped by class: the kept raw samples must still cover every
    concept (a balanced, seeded sample), and each kept vector is that prompt's activation (plain forward)."""
    from conftest import encode, plain_forward

    from nslens.record import sample_per_concept

    order = np.argsort(synth["train"].labels, kind="stable")  # class-grouped, as on the Hub
    prompts = [synth["train_prompts"][i] for i in order]
    labels = synth["train"].labels[order]
    rec = record(embedded, site, prompts, labels, synth["train"].label_names, batch_size=8, keep_samples=True,
                 max_samples=20)
    assert np.bincount(rec.sample_labels, minlength=4).tolist() == [5, 5, 5, 5]
    assert np.array_equal(rec.sample_labels, labels[rec.sample_index]) and np.all(np.diff(rec.sample_index) > 0)
    enc = encode(embedded, [prompts[i] for i in rec.sample_index[:6]])
    ref = plain_forward(embedded, enc).hidden_states[site.layer + 1][:, -1].numpy()
    np.testing.assert_allclose(rec.samples[:6], ref, rtol=1e-4, atol=1e-5)
    # unequal classes: a small class gives its unused share to the others; seeded and reproducible
    lab = np.array([0] * 3 + [1] * 50 + [2] * 50)
    idx = sample_per_concept(lab, 43, seed=1)
    assert np.bincount(lab[idx]).tolist() == [3, 20, 20]
    assert np.array_equal(idx, sample_per_concept(lab, 43, seed=1))
    assert np.array_equal(sample_per_concept(lab, 500), np.arange(len(lab)))


@pytest.mark.parametrize("labels, words", [
    ([0.5, 0.5, 0.5], "labels must be a flat list of integer concept indices, got float64"),
    (["a", "b", "c"], "labels must be a flat list of integer concept indices"),
    ([0, 1, 9], "label 9 is not a concept index: 4 concepts take 0 to 3"),
    ([0, -1, 2], "label -1 is not a concept index"),
])
def test_labels_that_are_no_concept_indices_are_refused(embedded, site, synth, labels, words):
    """A float label was truncated (every sample became concept 0); one past the names failed in the statistics."""
    with pytest.raises(nslens.NsLensError, match=words):
        record(embedded, site, synth["train_prompts"][:3], labels, synth["train"].label_names)
    assert record(embedded, site, synth["train_prompts"][:3], [0.0, 1.0, 3.0],  # whole floats are indices
                  synth["train"].label_names).stats.count.tolist() == [1, 1, 0, 1]
