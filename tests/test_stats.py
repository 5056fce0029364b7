import numpy as np
import pytest
import torch

from nslens.errors import NsLensError
from nslens.stats import ConceptStats, batch_partials


def streamed(x, y, c, splits):
    st = ConceptStats.empty(c, x.shape[1], [str(i) for i in range(c)])
    for part in np.array_split(np.arange(len(x)), splits):
        if len(part):
            st.update(batch_partials(torch.tensor(x[part], dtype=torch.float32), torch.tensor(y[part]), c))
    return st


@pytest.mark.parametrize("splits", [1, 3, 17, 200])
def test_streaming_equals_numpy_whatever_the_split(rng, splits):
    x = (rng.normal(5.0, 3.0, size=(200, 8)) + 1000.0).astype(np.float32)  # large offset: stability matters
    y = rng.integers(0, 3, size=200)
    st = streamed(x, y, 3, splits)
    x64 = x.astype(np.float64)
    for c in range(3):
        xs = x64[y == c]
        assert st.count[c] == len(xs)
        np.testing.assert_allclose(st.mean[c], xs.mean(0), rtol=1e-12)
        np.testing.assert_allclose(st.std()[c], xs.std(0, ddof=0), rtol=1e-9)
        np.testing.assert_allclose(st.abs_mean()[c], np.abs(xs).mean(0), rtol=1e-12)


def test_weights_drop_padding(rng):
    x = rng.normal(size=(10, 4)).astype(np.float32)
    y = np.zeros(10, dtype=int)
    w = torch.tensor([1, 0] * 5)
    part = batch_partials(torch.tensor(x), torch.tensor(y), 2, weights=w)
    np.testing.assert_allclose(part["mean"][0].numpy(), x[::2].astype(np.float64).mean(0), rtol=1e-12)
    assert part["count"].tolist() == [5.0, 0.0]


def test_merge_and_roundtrip(tmp_path, rng):
    x, y = rng.normal(size=(50, 6)), rng.integers(0, 2, size=50)
    a = ConceptStats.from_samples(x[:20], y[:20], ["p", "q"])
    b = ConceptStats.from_samples(x[20:], y[20:], ["p", "q"])
    ref = ConceptStats.from_samples(x, y, ["p", "q"])
    m = a.merge(b)
    np.testing.assert_allclose(m.mean, ref.mean, rtol=1e-12)
    np.testing.assert_allclose(m.m2, ref.m2, rtol=1e-10)
    m.meta["layer"] = 2
    m.save(tmp_path / "s.safetensors")
    back = ConceptStats.load(tmp_path / "s.safetensors")
    assert back.label_names == ["p", "q"] and back.meta["layer"] == 2
    np.testing.assert_array_equal(back.m2, m.m2)
    assert not list(tmp_path.glob(".*tmp"))


def test_nonfinite_flag():
    x = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    assert not bool(batch_partials(x, torch.tensor([0, 1]), 2)["finite"])


def test_bad_statistics_files_are_one_line_errors(tmp_path):
    (tmp_path / "a.safetensors").write_text("not safetensors")
    with pytest.raises(NsLensError, match="a.safetensors is not a readable nslens statistics file"):
        ConceptStats.load(tmp_path / "a.safetensors")
    st = ConceptStats.empty(2, 3, ["x", "y"])
    st.save(tmp_path / "b.safetensors")
    data = (tmp_path / "b.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(NsLensError, match="is it truncated"):
        ConceptStats.load(tmp_path / "b.safetensors")
    # the right format, its label names lost
    from safetensors.numpy import save_file

    save_file({k: getattr(st, k) for k in ("count", "mean", "m2", "abs_sum")}, str(tmp_path / "c.safetensors"),
              metadata={"format": "nslens.stats/1", "meta": "{}"})
    with pytest.raises(NsLensError, match="c.safetensors has damaged metadata"):
        ConceptStats.load(tmp_path / "c.safetensors")
