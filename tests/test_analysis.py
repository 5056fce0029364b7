import numpy as np
import pytest
import torch
from scipy import stats

from nslens.analysis import (
    bound_samples,
    normality,
    overlap_quartiles,
    pairwise_auroc_overlap,
    salient_overlap,
)
from nslens.errors import NsLensError
from nslens.ranges import RangeMask


def test_normality_against_known_distributions(rng):
    n = 4000
    x = np.column_stack([rng.normal(2.0, 3.0, n), rng.exponential(1.0, n), rng.uniform(0, 1, n)])
    labels = np.zeros(n, dtype=int)
    x = np.vstack([x, x[:50]])
    labels = np.r_[labels, np.ones(50, dtype=int)]
    rep = normality(x, labels, ["a", "b"])
    # known moments: normal skew 0 / kurtosis 3; exponential 2 / 9; uniform 0 / 1.8
    np.testing.assert_allclose(rep.skewness[0], [0.0, 2.0, 0.0], atol=0.25)
    for j, (expected, tol) in enumerate([(3.0, 0.25), (9.0, 2.0), (1.8, 0.1)]):
        assert rep.kurtosis[0, j] == pytest.approx(expected, abs=tol)
    # equals scipy on the same data
    np.testing.assert_allclose(rep.skewness[0], stats.skew(x[labels == 0], axis=0))
    np.testing.assert_allclose(rep.kurtosis[0], stats.kurtosis(x[labels == 0], axis=0, fisher=False))
    z = (x[labels == 0, 1] - x[labels == 0, 1].mean()) / x[labels == 0, 1].std()
    assert rep.ks[0, 1] == pytest.approx(stats.kstest(z, "norm").statistic)
    # a standardised uniform is within KS 0.058 of N(0, 1): "practically normal" by the paper's 0.1 criterion
    grid = np.linspace(-np.sqrt(3), np.sqrt(3), 20001)
    uniform_ks = np.max(np.abs((grid + np.sqrt(3)) / (2 * np.sqrt(3)) - stats.norm.cdf(grid)))
    assert rep.ks[0, 2] == pytest.approx(uniform_ks, abs=0.02)
    assert rep.practically_normal()[0].tolist() == [True, False, True]
    s = rep.summary()
    assert s["a"]["practically_normal"] == pytest.approx(2 / 3) and "dataset" in s
    with pytest.raises(ValueError, match="needs at least 3"):
        normality(x[:2], np.array([0, 1]), ["a", "b"])


def test_auroc_overlap_matches_gaussian_theory(rng):
    n, delta = 3000, 1.0
    x = np.r_[rng.normal(0, 1, n), rng.normal(delta, 1, n)][:, None]
    labels = np.r_[np.zeros(n, int), np.ones(n, int)]
    masks = [RangeMask([0], [-1.0], [1.0], [0.0], [1.0], {"concept": c}) for c in "ab"]
    ov = pairwise_auroc_overlap(x, labels, masks)
    auroc = stats.norm.cdf(delta / np.sqrt(2))  # P(X_b > X_a) for unit-variance Gaussians delta apart
    assert ov[0, 0, 1] == pytest.approx(1 - 2 * abs(auroc - 0.5), abs=0.03)
    assert np.isnan(ov[0, 0, 0])
    q = overlap_quartiles(np.array([0.1, 0.3, 0.6, 0.9, 1.0, np.nan]))
    assert q == {"0-25%": 0.2, "25-50%": 0.2, "50-75%": 0.2, "75-100%": 0.4}


def test_auroc_overlap_equals_sklearn_per_neuron_with_ties(rng):
    from sklearn.metrics import roc_auc_score

    n, d = 90, 6
    x = rng.normal(0, 1, (n, d))
    x[:, 2] = np.round(x[:, 2])  # many ties
    x[:, 3] = 0.5  # a constant neuron: AUROC 0.5, overlap 1
    labels = rng.integers(0, 3, n)
    x[labels == 1, 0] += 2.0
    masks = [RangeMask(nb, [0.0] * 3, [1.0] * 3, [0.0] * 3, [1.0] * 3, {"concept": str(i)})
             for i, nb in enumerate(([0, 2, 3], [3, 1, 5], [4, 0, 2]))]
    ov = pairwise_auroc_overlap(x, labels, masks)
    for a, mask in enumerate(masks):
        for b in range(3):
            sel = (labels == a) | (labels == b)
            for i, j in enumerate(mask.neurons.tolist()):
                if a == b:
                    assert np.isnan(ov[a, i, b])
                else:
                    ref = 1 - 2 * abs(roc_auc_score(labels[sel] == a, x[sel, j]) - 0.5)
                    assert ov[a, i, b] == pytest.approx(ref, abs=1e-12)
    assert ov[0, 2, 1] == 1.0 and ov[0, 0, 1] < 0.5
    with pytest.raises(NsLensError, match="needs samples of both"):
        pairwise_auroc_overlap(x, np.where(labels == 2, 0, labels), masks)


def test_salient_overlap_by_hand():
    scores = np.array([[4, 3, 2, 1, 0], [0, 3, 4, 1, 2], [0, 1, 2, 3, 4]], dtype=float)
    m = salient_overlap(scores, 0.4)  # top-2 sets: {0,1}, {2,1}, {4,3}
    np.testing.assert_allclose(m, [[1, 0.5, 0], [0.5, 1, 0], [0, 0, 1]])


def test_bound_samples_nearest_texts():
    acts = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    labels = np.array([0, 0, 0, 0, 1])
    texts = ["t0", "t1", "t2", "t3", "other"]
    mask = RangeMask(torch.tensor([0]), [0.2], [2.9], [1.6], [0.5], {"concept": "a", "concept_index": 0})
    b = bound_samples(acts, labels, texts, mask, 0, k=2)
    assert [t for t, _ in b["lower"]] == ["t0", "t1"]
    assert [t for t, _ in b["mean"]] == ["t2", "t1"]
    assert [t for t, _ in b["upper"]] == ["t3", "t2"]
    with pytest.raises(ValueError, match="neuron 5 is not in the mask"):
        bound_samples(acts, labels, texts, mask, 5)


def test_a_subset_of_masks_or_of_concepts_is_refused_not_scored_against_other_concepts(rng):
    """masks[2:] scored concept 2's neurons on concept 0's samples; normality with three of four names dropped
    the fourth concept; a label past the names or a length mismatch was an IndexError."""
    x = rng.normal(size=(80, 6))
    labels = np.repeat(np.arange(4), 20)
    masks = [RangeMask([c, 5], [-1.0, -1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0],
                       {"concept": f"c{c}", "concept_index": c}) for c in range(4)]
    assert pairwise_auroc_overlap(x, labels, masks).shape == (4, 2, 4)
    with pytest.raises(NsLensError, match="one mask per concept, in concept order"):
        pairwise_auroc_overlap(x, labels, masks[2:])
    with pytest.raises(NsLensError, match="one mask per concept, in concept order"):
        pairwise_auroc_overlap(x, labels, [])
    with pytest.raises(NsLensError, match="label 3 is not a concept index: 3 concepts take 0 to 2"):
        normality(x, labels, ["a", "b", "c"])
    with pytest.raises(NsLensError, match=r"samples \[n, d\] need one label each"):
        normality(x, labels[:-1], ["a", "b", "c", "d"])
    with pytest.raises(NsLensError, match=r"the samples hold concepts \[0, 1, 2\], not all 4"):
        normality(x[:60], labels[:60], ["a", "b", "c", "d"])
