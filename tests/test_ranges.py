import numpy as np
import pytest
import torch

from nslens.ranges import RangeMask, build_range_masks, load_masks, save_masks
from nslens.stats import ConceptStats


def stats(rng, n=120, d=10):
    x = rng.normal(size=(n, d)) * np.arange(1, d + 1)
    y = np.arange(n) % 3
    st = ConceptStats.from_samples(x, y, ["a", "b", "c"])
    st.meta.update({"model_id": "m", "layer": 2, "n_layers": 4, "d_model": d, "family": "llama"})
    return x, y, st


def test_ranges_are_mu_plus_minus_tau_sigma(rng):
    x, y, st = stats(rng)
    masks = build_range_masks(st, method="max", fraction=0.3, tau=2.0)
    assert len(masks) == 3 and all(len(m) == 3 for m in masks)
    for c, m in enumerate(masks):
        idx = m.neurons.numpy()
        xs = x[y == c][:, idx]
        mu, sd = xs.mean(0), xs.std(0, ddof=0)
        np.testing.assert_allclose(m.lo.numpy(), mu - 2.0 * sd, rtol=1e-5)
        np.testing.assert_allclose(m.hi.numpy(), mu + 2.0 * sd, rtol=1e-5)
        assert m.meta["concept"] == "abc"[c] and m.meta["tau"] == 2.0 and m.meta["ranking"] == "max"
        assert m.meta["samples_used"] == 40 and m.meta["d_model"] == 10


def test_default_tau_is_paper_value(rng):
    _, _, st = stats(rng)
    assert build_range_masks(st)[0].meta["tau"] == 2.5


def test_save_load_and_validation(tmp_path, rng):
    _, _, st = stats(rng)
    masks = build_range_masks(st, fraction=0.5)
    for i, m in enumerate(masks):
        m.save(tmp_path / f"{i}.safetensors")
    assert (tmp_path / "0.json").exists()
    back = load_masks(tmp_path, expect={"d_model": 10, "n_layers": 4, "layer": 2})
    for a, b in zip(masks, back):
        assert torch.equal(a.neurons, b.neurons) and torch.equal(a.lo, b.lo) and a.meta == b.meta
    with pytest.raises(ValueError, match="made for another model/site: d_model: mask has 10, model has 64"):
        RangeMask.load(tmp_path / "0.safetensors", expect={"d_model": 64, "n_layers": 4, "layer": 2})
    with pytest.raises(ValueError, match="layer: mask has 2, model has 1"):
        RangeMask.load(tmp_path / "0.safetensors", expect={"d_model": 10, "n_layers": 4, "layer": 1})
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="cannot read range file"):
        RangeMask.load(tmp_path / "bad.safetensors")


def test_bad_inputs(rng):
    _, _, st = stats(rng)
    for tau in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="tau must be a positive number"):
            build_range_masks(st, tau=tau)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        build_range_masks(st, fraction=1.2)
    few = ConceptStats.from_samples(rng.normal(size=(3, 4)), np.array([0, 0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match=r"fewer than 2 recorded samples \(sigma undefined\): b \(1\)"):
        build_range_masks(few)
    nan = ConceptStats.from_samples(np.array([[np.nan, 1.0]] * 4), np.array([0, 0, 1, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="NaN/inf"):
        build_range_masks(nan)


def test_sigma_zero_gives_point_range(rng):
    x = rng.normal(size=(20, 3))
    x[:, 1] = 4.0  # constant neuron: sigma = 0
    st = ConceptStats.from_samples(x, np.arange(20) % 2, ["a", "b"])
    m = build_range_masks(st, fraction=1.0)[0]
    j = int((m.neurons == 1).nonzero()[0, 0])
    assert m.sigma[j] == 0 and m.lo[j] == m.hi[j] == 4.0
    assert m.meta["sigma_zero_neurons"] == 1


def test_failed_write_leaves_nothing(tmp_path, rng, monkeypatch):
    _, _, st = stats(rng)
    m = build_range_masks(st)[0]
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        m.save(tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_check_masks_fit_refuses_what_would_print_under_the_wrong_name(embedded):
    from nslens.models import tokenizer_fingerprint
    from nslens.ranges import check_masks_fit

    def mask(concept, **meta):
        return RangeMask(torch.tensor([0]), torch.zeros(1), torch.ones(1), torch.zeros(1), torch.ones(1),
                         {"concept": concept, "model_id": "embedded", "dataset": "synthetic",
                          "tokenizer": tokenizer_fingerprint(embedded.tokenizer), **meta})

    masks = [mask("sports"), mask("science")]
    check_masks_fit(masks, label_names=["sports", "science"], model=embedded, dataset="synthetic")
    with pytest.raises(ValueError, match=r"are for the concepts \['sports', 'science'\] but the dataset has "
                                         r"\['science', 'sports'\]"):
        check_masks_fit(masks, label_names=["science", "sports"])
    other = [mask("sports", model_id="meta-llama/Llama-3.2-3B")]
    with pytest.raises(ValueError, match="recorded on model 'meta-llama/Llama-3.2-3B', not 'embedded'"):
        check_masks_fit(other, model=embedded)
    check_masks_fit(other, model=embedded, allow_other_model=True)
    with pytest.raises(ValueError, match="another tokenizer"):
        check_masks_fit([mask("sports", tokenizer="0" * 16)], model=embedded, allow_other_model=True)
    with pytest.raises(ValueError, match="made from the dataset 'synthetic', not 'ag_news'"):
        check_masks_fit(masks, dataset="ag_news")


def test_save_masks_leaves_exactly_the_new_masks(tmp_path, rng):
    """Masks of four concepts rewritten with three: the directory reads back as the three (it held the four old
    files beside them, and every command read seven concepts), and files that are not masks stay."""
    x = rng.normal(size=(160, 10))
    four = ConceptStats.from_samples(x, np.arange(160) % 4, ["a", "b", "c", "d"])
    three = ConceptStats.from_samples(x[:120], np.arange(120) % 3, ["x", "y", "z"])
    out = tmp_path / "ranges"
    save_masks(build_range_masks(four, fraction=0.5), out)
    (out / "notes.txt").write_text("mine")
    (out / "stats.safetensors").write_bytes(b"the statistics beside the masks")
    new = build_range_masks(three, fraction=0.3)
    save_masks(new, out)
    back = load_masks(out)
    assert [m.concept for m in back] == ["x", "y", "z"]
    assert all(torch.equal(a.neurons, b.neurons) and torch.equal(a.lo, b.lo) for a, b in zip(new, back))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["00_x.json", "00_x.safetensors", "01_y.json", "01_y.safetensors", "02_z.json", "02_z.safetensors",
         "notes.txt", "stats.safetensors"])
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        save_masks(new, tmp_path / "file")
