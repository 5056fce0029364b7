"""docs/extending.md, done through the public API: an operator and a ranking defined outside nslens, registered,
and run through the erasure table on the embedded model, against independent references (the toy operator equals
the built-in dampen(0.5), the toy ranking selects what numpy computes from the raw samples)."""

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

import nslens
from nslens.erasure import erasure_table
from nslens.ops import OPERATOR_REGISTRY, OPERATORS, Operator, make_operator, register_operator
from nslens.rank import RANKING_METHODS, RANKING_REGISTRY, Ranking, get_ranking, register_ranking


@dataclass(frozen=True)
class Halve(Operator):
    """phi(x) = x / 2."""

    name: ClassVar[str] = "halve"

    def __call__(self, x, mu, sigma, tau, neurons=None):
        return x / 2


@dataclass(frozen=True)
class ReverseMax(Ranking):
    """The least active neurons first: minus the max ranking's mean |h|."""

    name: ClassVar[str] = "reverse_max"

    def scores(self, stats, samples=None, labels=None):
        return -stats.abs_mean()


@pytest.fixture
def toys():
    register_operator(Halve)
    register_ranking(ReverseMax)
    try:
        yield
    finally:
        OPERATOR_REGISTRY.unregister("halve")
        RANKING_REGISTRY.unregister("reverse_max")


def test_toy_operator_and_ranking_run_through_the_erasure_table(toys, embedded, site, synth):
    assert "halve" in OPERATORS and "reverse_max" in RANKING_METHODS
    tr, te = synth["train"], synth["test"]
    ids = nslens.label_token_ids(embedded.tokenizer, tr.label_words)
    rec = nslens.record(embedded, site, synth["train_prompts"], tr.labels, tr.label_names, batch_size=32,
                        keep_samples=True)
    masks = nslens.build_range_masks(rec.stats, method="reverse_max", fraction=0.5)
    x, y = rec.samples, rec.sample_labels
    for c, mask in enumerate(masks):
        least_active = np.argsort(np.abs(x[y == c]).mean(0), kind="stable")[: site.d_model // 2]
        assert set(mask.neurons.tolist()) == set(least_active.tolist())
        assert mask.meta["ranking"] == "reverse_max"
    args = (embedded, site, synth["test_prompts"][:24], te.labels[:24], ids, masks)
    toy = erasure_table(*args, make_operator("halve"), batch_size=32)
    builtin = erasure_table(*args, nslens.dampen(0.5), batch_size=32)
    assert toy.operator == "halve"
    for part in ("base", "neuron", "range"):
        assert getattr(toy, part) == getattr(builtin, part)
    assert any(row["conf"] != 0 for row in toy.neuron)  # the operator ran: halving moved the confidences


@dataclass(frozen=True)
class SampleSpread(Ranking):
    """The widest neurons first: each concept's standard deviation over its raw samples."""

    name: ClassVar[str] = "sample_spread"
    needs_samples: ClassVar[bool] = True

    def scores(self, stats, samples=None, labels=None):
        if samples is None:
            raise nslens.NsLensError("sample_spread needs the raw samples")
        return np.stack([samples[labels == c].std(0) for c in range(len(stats.label_names))])


def test_a_registered_ranking_that_needs_samples_gets_them_in_a_run(embedded, tmp_path):
    """The run keeps the raw samples for any ranking whose ``needs_samples`` says so (not for built-in names only):
    the scores it saved equal the population deviations of its own recorded statistics."""
    from nslens.pipeline import RunConfig, run_pipeline
    from nslens.stats import ConceptStats

    register_ranking(SampleSpread)
    try:
        run = run_pipeline(RunConfig(method="sample_spread", fraction=0.5, n_per_class=16, batch_size=32,
                                     analyses=False), tmp_path / "run", model=embedded)
    finally:
        RANKING_REGISTRY.unregister("sample_spread")
    stats = ConceptStats.load(run / "stats.safetensors")
    np.testing.assert_allclose(np.load(run / "scores.npy"), stats.std(), rtol=1e-4, atol=1e-6)


@dataclass(frozen=True)
class TrainMean(Operator):
    """A fitted operator: each concept's selected neurons set to their mean over the concept's training samples."""

    name: ClassVar[str] = "train_mean"
    build: ClassVar[str] = "fitted"
    values: torch.Tensor | None = None

    def __call__(self, x, mu, sigma, tau, neurons=None):
        return self.values.to(x).expand_as(x)


def fit_train_mean(model, site, cfg, data, masks, rec=None, progress=None):
    x, y = rec.samples, rec.sample_labels
    return [TrainMean(torch.from_numpy(x[y == c][:, m.neurons.numpy()].mean(0)).float()) for c, m in enumerate(masks)]


def test_a_registered_fitted_operator_is_fitted_by_a_run(embedded, tmp_path):
    """A run fits an operator whose ``build`` is "fitted" with the fit it was registered with (not only the
    built-in leace): replacing by each concept's training mean gives the built-in mean_concept's table (mu is that
    mean). A fitted operator without its fit, or a fit for one that is not fitted, is refused."""
    from nslens.ops import OPERATOR_FITTERS
    from nslens.pipeline import RunConfig, run_pipeline

    with pytest.raises(nslens.NsLensError, match="a fitted operator needs fit="):
        register_operator(TrainMean)
    with pytest.raises(nslens.NsLensError, match="fit= is for fitted operators"):
        register_operator(Halve, fit=fit_train_mean)
    register_operator(TrainMean, fit=fit_train_mean)
    try:
        with pytest.raises(nslens.NsLensError, match="train_mean is fitted per concept"):
            make_operator("train_mean")
        run = run_pipeline(RunConfig(operators=["train_mean", "mean_concept"], fraction=0.5, n_per_class=16,
                                     batch_size=32), tmp_path / "run", model=embedded)
    finally:
        OPERATOR_REGISTRY.unregister("train_mean")
        OPERATOR_FITTERS.unregister("train_mean")
    fitted, builtin = (json.loads((run / f"erasure_{name}.json").read_text()) for name in ("train_mean",
                                                                                          "mean_concept"))
    for part in ("base", "neuron", "range"):
        for a, b in zip(fitted[part], builtin[part], strict=True):
            assert a == pytest.approx(b, abs=1e-6), part
    assert any(row["conf"] != 0 for row in fitted["neuron"])  # the replacement ran


def test_registry_errors_and_cleanup(toys):
    register_operator(Halve)  # the same class again: nothing changes

    @dataclass(frozen=True)
    class OtherHalve(Halve):
        pass

    with pytest.raises(nslens.NsLensError, match="operator 'halve' is already registered; pass replace=True"):
        register_operator(OtherHalve)
    with pytest.raises(nslens.NsLensError, match="unknown operator 'clamp'; choose one of zero, .*, leace, halve$"):
        make_operator("clamp")
    with pytest.raises(nslens.NsLensError, match="unknown ranking method 'x'; choose one of max, probeless, probe, "
                                                 "neurgrad, reverse_max$"):
        get_ranking("x")
    with pytest.raises(nslens.NsLensError, match="needs an Operator subclass with a name"):
        register_operator(int)
    OPERATOR_REGISTRY.unregister("halve")
    assert "halve" not in OPERATORS
    register_operator(Halve)  # the fixture unregisters it again
