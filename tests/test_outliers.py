"""nslens.outliers against plain numpy on raw samples with planted massive dimensions."""

from __future__ import annotations

import numpy as np
import pytest

from nslens.errors import NsLensError
from nslens.outliers import (
    exclude_dims,
    outlier_dims,
    pooled_mean_std,
    pooled_rms,
    range_coverage,
    rank_standardised,
)
from nslens.ranges import build_range_masks
from nslens.rank import rank_max, select_top
from nslens.stats import ConceptStats


@pytest.fixture
def planted():
    """3 concepts x 40 samples, 50 dims: N(concept offset, 1) except dims 7 and 31, which sit near +500 and -300
    for every input (massive, concept-independent)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 50))
    x[:, :6] += 2.0 * (labels[:, None] == np.arange(6)[None, :] % 3)  # concept-specific shifts in dims 0-5
    x[:, 7] = 500 + 5 * rng.normal(size=120)
    x[:, 31] = -300 + 3 * rng.normal(size=120)
    return x, labels, ConceptStats.from_samples(x, labels, ["a", "b", "c"])


def test_pooled_moments_and_rms_equal_numpy(planted):
    x, _, st = planted
    mean, std = pooled_mean_std(st)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(std, x.std(0), rtol=1e-10)
    np.testing.assert_allclose(pooled_rms(st), np.sqrt((x**2).mean(0)), rtol=1e-10)


def test_outlier_dims_finds_the_planted_ones_largest_first(planted):
    _, _, st = planted
    assert outlier_dims(st).tolist() == [7, 31]
    assert outlier_dims(st, ratio=1000).tolist() == []
    with pytest.raises(NsLensError):
        outlier_dims(st, ratio=0.5)


def test_max_ranking_picks_the_outliers_and_exclusion_removes_them(planted):
    _, _, st = planted
    scores = rank_max(st)
    for c in range(3):
        assert set(select_top(scores[c], 0.04).tolist()) == {7, 31}
    ex = exclude_dims(scores, [7, 31])
    assert np.isneginf(ex[:, [7, 31]]).all() and np.array_equal(ex[:, :7], scores[:, :7])
    masks = build_range_masks(st, fraction=0.3, scores=ex)
    assert all({7, 31}.isdisjoint(m.neurons.tolist()) for m in masks)
    with pytest.raises(NsLensError):
        exclude_dims(scores, [50])


def test_standardised_ranking_equals_numpy_and_ignores_constant_offsets(planted):
    x, labels, st = planted
    ref = np.stack([np.abs(x[labels == c].mean(0) - x.mean(0)) / x.std(0) for c in range(3)])
    np.testing.assert_allclose(rank_standardised(st), ref, rtol=1e-9)
    top = select_top(rank_standardised(st)[0], 0.04)
    assert {7, 31}.isdisjoint(top.tolist()) and set(top.tolist()) <= {0, 3}


def test_range_coverage_equals_a_loop(planted):
    x, labels, st = planted
    mask = build_range_masks(st, fraction=0.1, tau=1.0)[0]
    cov = range_coverage(mask, x, labels, 3)
    for c in range(3):
        for i, j in enumerate(mask.neurons.tolist()):
            xs = x[labels == c, j]
            inside = [(v >= float(mask.lo[i])) and (v <= float(mask.hi[i])) for v in xs]
            assert cov[c, i] == pytest.approx(np.mean(inside))
    # the massive dims' ranges hold most samples of every concept: range masking there is not concept-specific
    j7 = mask.neurons.tolist().index(7)
    assert (cov[:, j7] > 0.5).all()
