import numpy as np
import pytest
import torch

from nslens.ops import adaptive_dampen, dampen, make_operator, mean_replace, zero


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
