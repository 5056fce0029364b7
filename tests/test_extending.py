"""docs/extending.md, done through the public API: an operator and a ranking defined outside nslens, registered,
and run through the erasure table on the embedded model, against independent references (the toy operator equals
the built-in dampen(0.5), the toy ranking selects what numpy computes from the raw samples)."""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

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
