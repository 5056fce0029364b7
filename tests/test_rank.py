import numpy as np
import pytest

from nslens.rank import rank, rank_probe, select_top
from nslens.stats import ConceptStats


def planted(rng, n=300, d=20, c=3):
    y = rng.integers(0, c, size=n)
    x = rng.normal(size=(n, d))
    plant = {0: 7, 1: 13, 2: 2}
    for k, j in plant.items():
        x[y == k, j] += 6.0  # neuron j's mean is planted far away for concept k
    return x, y, plant


@pytest.mark.parametrize("method", ["max", "probeless", "probe"])
def test_planted_neuron_ranks_first(rng, method):
    x, y, plant = planted(rng)
    st = ConceptStats.from_samples(x, y, ["a", "b", "c"])
    scores = rank(method, st, samples=x, labels=y)
    for k, j in plant.items():
        assert select_top(scores[k], 0.05)[0] == j


def test_probeless_matches_definition(rng):
    x, y, _ = planted(rng)
    st = ConceptStats.from_samples(x, y, ["a", "b", "c"])
    q = np.stack([x[y == k].mean(0) for k in range(3)])
    expected = np.stack([sum(np.abs(q[k] - q[o]) for o in range(3) if o != k) for k in range(3)])
    np.testing.assert_allclose(rank("probeless", st), expected, rtol=1e-10)
    np.testing.assert_allclose(rank("max", st), np.stack([np.abs(x[y == k]).mean(0) for k in range(3)]), rtol=1e-12)


def test_select_top_fraction():
    s = np.array([0.1, 0.9, 0.5, 0.7])
    assert select_top(s, 0.5).tolist() == [1, 3]
    assert select_top(s, 1.0).tolist() == [1, 3, 2, 0]
    assert select_top(s, 0.01).tolist() == [1]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            select_top(s, bad)


def test_bad_methods(rng):
    st = ConceptStats.from_samples(rng.normal(size=(10, 3)), np.r_[[0] * 5, [1] * 5], ["a", "b"])
    with pytest.raises(ValueError, match="unknown ranking method 'foo'; choose one of max, probeless, probe"):
        rank("foo", st)
    with pytest.raises(ValueError, match="needs raw samples"):
        rank("probe", st)
    with pytest.raises(ValueError, match="needs raw samples"):
        rank_probe(None, None, 2)


def test_top_fraction_count_is_the_authors_floor():
    """The authors take int(p * d) neurons (at least one): 19 of 64 for 30 %, 28 of 100 for 29 %."""
    assert len(select_top(np.arange(64.0), 0.3)) == int(0.3 * 64) == 19
    assert len(select_top(np.arange(100.0), 0.29)) == int(0.29 * 100) == 28
    assert len(select_top(np.arange(3.0), 0.2)) == 1


def test_probe_uses_the_current_elastic_net_api_with_the_same_result():
    import warnings

    import sklearn
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6))
    y = (x[:, 2] > 0).astype(int) + (x[:, 4] > 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated argument on the current scikit-learn
        w = rank_probe(x, y, 3, max_iter=200)
    if tuple(int(v) for v in sklearn.__version__.split(".")[:2]) < (1, 10):  # the old spelling still runs here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = LogisticRegression(penalty="elasticnet", solver="saga", l1_ratio=0.5, C=1.0, max_iter=200,
                                     random_state=0).fit(StandardScaler().fit_transform(x), y)
        np.testing.assert_allclose(w, np.abs(ref.coef_), rtol=1e-10)


def test_rankings_are_registered_classes_with_their_flags(rng):
    from nslens.rank import RANKING_METHODS, MaxRanking, ProbeRanking, get_ranking

    assert tuple(RANKING_METHODS) == ("max", "probeless", "probe", "neurgrad")
    assert isinstance(get_ranking("max"), MaxRanking) and not get_ranking("max").needs_samples
    probe = get_ranking("probe", max_iter=200, seed=1)
    assert isinstance(probe, ProbeRanking) and probe.needs_samples and not probe.needs_model
    x, y, _ = planted(rng, n=90)
    st = ConceptStats.from_samples(x, y, ["a", "b", "c"])
    np.testing.assert_array_equal(probe.scores(st, x, y), rank_probe(x, y, 3, max_iter=200, seed=1))
    np.testing.assert_array_equal(rank("probe", st, x, y, max_iter=200, seed=1), probe.scores(st, x, y))
    neurgrad = get_ranking("neurgrad")
    assert neurgrad.needs_model and type(neurgrad).__module__ == "nslens.neurgrad"
    with pytest.raises(ValueError, match="needs the model: compute it with get_ranking"):
        neurgrad.scores(st)
    with pytest.raises(ValueError, match="computed from a recording's statistics"):
        get_ranking("max").scores_from_model(None, None, [], y, None)


def test_probe_samples_of_another_width_or_labels_past_the_concepts_are_refused(rng):
    """Samples narrower than the statistics gave masks drawn from their first columns only; labels past the
    concepts trained a probe with an extra class; mismatched lengths were sklearn's error."""
    from nslens.errors import NsLensError
    from nslens.ranges import build_range_masks

    x, y, _ = planted(rng)
    st = ConceptStats.from_samples(x, y, ["a", "b", "c"])
    with pytest.raises(NsLensError, match=r"samples \[n, 20\] .* got samples of shape \(300, 10\) and 300 labels"):
        build_range_masks(st, method="probe", samples=x[:, :10], sample_labels=y)
    with pytest.raises(NsLensError, match=r"got samples of shape \(300, 20\) and 299 labels"):
        rank("probe", st, samples=x, labels=y[1:])
    with pytest.raises(NsLensError, match="label 3 is not a concept index: 3 concepts take 0 to 2"):
        rank("probe", st, samples=x, labels=y + 1)
    with pytest.raises(NsLensError, match="scores contain NaN"):  # NaN sorted first: neurons 0, 1, 2, ...
        build_range_masks(st, scores=np.full((3, 20), np.nan))
