import numpy as np
import pytest
import torch

from nslens.ops import adaptive_dampen, dampen, make_operator, mean_replace, steer, zero


@pytest.fixture
def xs():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    return x, torch.tensor([0.5, -1.0, 0.0, 2.0]), torch.tensor([1.0, 0.5, 0.0, 2.0])


def test_zero_dampen_mean(xs):
    x, mu, sigma = xs
    assert torch.equal(zero()(x, mu, sigma, 2.5), torch.zeros_like(x))
    assert torch.equal(dampen(0.125)(x, mu, sigma, 2.5), x * 0.125)
    assert torch.equal(mean_replace()(x, mu, sigma, 2.5), mu.expand_as(x))
    v = torch.tensor([9.0, 8.0, 7.0, 6.0])
    assert torch.equal(mean_replace(v)(x, mu, sigma, 2.5), v.expand_as(x))
    # the general-text mean is given for the whole site and indexed by the selected neurons
    site = torch.arange(10.0) * 0.5
    general = make_operator("mean", general_mean=site)
    assert general.label == "mean" and mean_replace().label == "mean(mu)"
    assert torch.equal(general(x, mu, sigma, 2.5, neurons=torch.tensor([7, 0, 3, 3])),
                       torch.tensor([3.5, 0.0, 1.5, 1.5]).expand_as(x))
    with pytest.raises(ValueError, match="the mean operator replaces with the general-text mean"):
        make_operator("mean")
    with pytest.raises(ValueError, match="not both"):
        mean_replace(v, site_values=site)


def test_adaptive_formula_and_sigma_zero(xs):
    x, mu, sigma = xs
    out = adaptive_dampen(0.5)(x, mu, sigma, 2.5).numpy()
    xn, mun, sn = x.numpy(), mu.numpy(), sigma.numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        a = 0.5 * np.abs(xn - mun) / (2.5 * sn)
    a = np.where(sn > 0, np.minimum(a, 0.5), 0.0)  # sigma = 0: a = 0, no division by zero
    np.testing.assert_allclose(out, a * xn, rtol=1e-6, atol=1e-7)
    assert np.isfinite(out).all()
    # at mu the activation is fully suppressed, at the range's edge it is dampened by beta
    edge = mu + 2.5 * sigma
    res = adaptive_dampen(0.5)(torch.stack([mu, edge]), mu, sigma, 2.5)
    assert torch.equal(res[0], torch.zeros(4))
    torch.testing.assert_close(res[1][:2], 0.5 * edge[:2])


def test_bad_operators():
    with pytest.raises(ValueError, match="unknown operator 'clamp'; choose one of zero, dampen, mean, mean_concept, adaptive"):
        make_operator("clamp")
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        dampen(1.5)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        adaptive_dampen(-0.1)


def test_each_operator_is_one_registered_class_with_the_same_labels_and_descriptions():
    """Labels and descriptions are what tables, reports and run JSON print: written out here, as before the
    operators became classes."""
    import dataclasses
    import pickle

    from nslens.ops import (
        OPERATOR_REGISTRY,
        OPERATORS,
        VECTOR_OPERATORS,
        Ablate,
        Adaptive,
        Dampen,
        MeanConcept,
        MeanReplace,
        Steer,
        Zero,
        ablate_direction,
        get_operator,
        steer,
    )

    v = torch.tensor([3.0, 4.0])
    cases = [
        (zero(), Zero, "zero", {"name": "zero"}),
        (dampen(0.25), Dampen, "dampen(a=0.25)", {"name": "dampen", "alpha": 0.25}),
        (mean_replace(site_values=v), MeanReplace, "mean", {"name": "mean", "values": "general-text mean"}),
        (mean_replace(v), MeanReplace, "mean", {"name": "mean", "values": "given"}),
        (mean_replace(), MeanConcept, "mean(mu)", {"name": "mean_concept", "values": "mu"}),
        (adaptive_dampen(0.5), Adaptive, "adaptive(b=0.5)", {"name": "adaptive", "beta": 0.5}),
        (steer(v, -2), Steer, "steer(a=-2)", {"name": "steer", "alpha": -2.0}),
        (ablate_direction(v), Ablate, "ablate", {"name": "ablate"}),
    ]
    for op, cls, label, described in cases:
        assert type(op) is cls and get_operator(cls.name) is cls and op.name == cls.name
        assert op.label == label and op.describe() == described
        back = pickle.loads(pickle.dumps(op))
        assert type(back) is cls and back.label == label and back.describe() == described
        params = {f.name: getattr(op, f.name) for f in dataclasses.fields(op)}
        again = cls(**params)  # rebuilt from its own fields (a bundle does this): the same operator, bit for bit
        assert all(torch.equal(getattr(again, k), v) if isinstance(v, torch.Tensor) else getattr(again, k) == v
                   for k, v in params.items())
    assert torch.equal(ablate_direction(v).site_values, torch.tensor([0.6, 0.8]))  # the unit direction
    assert list(OPERATORS) == ["zero", "dampen", "mean", "mean_concept", "adaptive", "leace"]
    assert OPERATORS == ("zero", "dampen", "mean", "mean_concept", "adaptive", "leace")
    assert tuple(VECTOR_OPERATORS) == ("steer", "ablate") and "leace" in OPERATOR_REGISTRY
    assert make_operator("dampen", alpha=0.5) == dampen(0.5) and make_operator("adaptive", beta=0.25).beta == 0.25
    with pytest.raises(ValueError, match="unknown operator 'steer'; choose one of zero, dampen"):
        make_operator("steer")  # built from a steering vector, not by name
    with pytest.raises(ValueError, match="leace is fitted per concept"):
        make_operator("leace")


BLOCKED_LOAD = """
import sys
import torch

class NoNslens:  # the server: nslens is not installed there
    def find_spec(self, name, path=None, target=None):
        if name == "nslens" or name.startswith("nslens."):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoNslens())
from nnsight.intervention import serialization

ops, args = serialization.loads(open(sys.argv[1], "rb").read())
torch.save([op(*args) for op in ops], sys.argv[2])
"""


def test_every_operator_travels_by_value_and_runs_where_nslens_cannot_be_imported(tmp_path):
    """What a remote request carries: every registered operator, serialised by nnsight with nslens shipped by value,
    loads and computes the same values in a process that cannot import nslens (a real server's situation). A class
    whose code reaches an object pickled by reference (an ``lru_cache`` wrapper, say) fails here, not only on NDIF."""
    import subprocess
    import sys

    from nnsight.intervention import serialization

    from nslens.leace import Leace
    from nslens.ops import OPERATOR_REGISTRY, ablate_direction, steer
    from nslens.remote import ship_code

    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, generator=g)
    ops = [zero(), dampen(0.25), mean_replace(site_values=v), mean_replace(torch.randn(2, generator=g)),
           mean_replace(), adaptive_dampen(0.5), steer(v, -2), ablate_direction(v),
           Leace(torch.randn(2, 1, generator=g), torch.randn(1, 2, generator=g), torch.randn(2, generator=g),
                 torch.tensor([1, 3]), "c")]
    assert {op.name for op in ops} == set(OPERATOR_REGISTRY.names())
    x = torch.randn(3, 5, 2, generator=g)
    args = (x, torch.tensor([0.1, -0.2]), torch.tensor([0.5, 0.7]), 2.5, torch.tensor([3, 1]))
    ship_code()
    (tmp_path / "ops.pkl").write_bytes(serialization.dumps((ops, args)))
    r = subprocess.run([sys.executable, "-c", BLOCKED_LOAD, str(tmp_path / "ops.pkl"), str(tmp_path / "out.pt")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-800:]
    for op, got in zip(ops, torch.load(tmp_path / "out.pt"), strict=True):
        assert torch.equal(got, op(*args)), op.name


def test_operators_are_frozen_and_check_their_own_parameters():
    import dataclasses

    from nslens.ops import Dampen, MeanReplace, Operator

    with pytest.raises(dataclasses.FrozenInstanceError):
        dampen(0.5).alpha = 0.9
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 2"):
        Dampen(2)
    with pytest.raises(ValueError, match="needs values .* or site_values"):
        MeanReplace()
    with pytest.raises(TypeError):  # a subclass must be frozen too: operators ship by value and are hashed

        @dataclasses.dataclass
        class Loose(Operator):
            name = "loose"
    with pytest.raises(ValueError, match="the steering vector has NaN/inf values"):
        from nslens.ops import steer

        steer(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("build, words", [
    (lambda: dampen("0.5"), r"dampening factor alpha must be in \[0, 1\], got '0.5'"),
    (lambda: dampen(float("nan")), r"alpha must be in \[0, 1\], got nan"),
    (lambda: dampen(True), r"alpha must be in \[0, 1\], got True"),
    (lambda: adaptive_dampen(None), r"beta must be in \[0, 1\], got None"),
    (lambda: steer(torch.ones(4), float("inf")), "steering alpha must be a finite number, got inf"),
    (lambda: steer(torch.ones(4), float("nan")), "steering alpha must be a finite number, got nan"),
    (lambda: mean_replace(site_values=torch.full((4,), float("nan"))), r"vector \(site_values\) has NaN/inf"),
    (lambda: mean_replace(values=[1.0, float("inf")]), r"vector \(values\) has NaN/inf"),
    (lambda: mean_replace(values="abc"), r"vector \(values\) must be numbers"),
])
def test_a_strength_or_vector_that_is_no_finite_number_is_refused_when_built(build, words):
    """A NaN mean-replacement vector or steering strength ran, gave NaN logits, and read as a perfect erasure."""
    with pytest.raises(ValueError, match=words):
        build()
