import math

import pytest
import torch

from diffrl.samplers import (
    cps_step,
    flow_match_sigmas,
    gaussian_log_prob,
    ode_step,
    rollout,
    sde_std,
    sde_step,
)


def _xv(seed=0, shape=(3, 4, 5, 5), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def test_ode_step_hand_computed():
    x, v = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 4.0]])
    out = ode_step(x, v, 0.75, 0.5)
    torch.testing.assert_close(out.sample, torch.tensor([[0.875, -3.0]]), rtol=0, atol=0)
    assert out.log_prob is None and torch.all(out.std == 0)


def test_sde_step_hand_computed():
    # a = 0.7, s = 0.5, s' = 0.25: sigma_t = 0.7, dt = -0.25, std = 0.7 * 0.5 = 0.35,
    # mean = 1 - 0.25 * (0.5 + 0.49 / 1.0 * (1 + 0.5 * 0.5)) = 0.721875.
    x, v = torch.tensor([[1.0]]), torch.tensor([[0.5]])
    out = sde_step(x, v, 0.5, 0.25, 0.7, noise=torch.tensor([[2.0]]))
    assert out.mean.item() == pytest.approx(0.721875, abs=1e-7)
    assert out.std.item() == pytest.approx(0.35, abs=1e-7)
    assert out.sample.item() == pytest.approx(0.721875 + 0.7, abs=1e-6)
    # log N(x; mu, 0.35^2) at z = 2: -2 - log(0.35) - log(sqrt(2 pi)).
    assert out.log_prob.item() == pytest.approx(-2 - math.log(0.35) - 0.5 * math.log(2 * math.pi), abs=1e-6)


def test_sde_first_step_at_level_one_uses_next_level():
    # At s = 1 the 1 - s in sigma_t's denominator is replaced by 1 - s_next (finite std).
    s, s_next = torch.tensor([1.0]), torch.tensor([0.8])
    sigma_t, std = sde_std(s, s_next, 0.7)
    assert sigma_t.item() == pytest.approx(0.7 * math.sqrt(1 / 0.2), rel=1e-6)
    assert std.item() == pytest.approx(0.7 * math.sqrt(1 / 0.2) * math.sqrt(0.2), rel=1e-6)
    x, v = _xv()
    assert torch.isfinite(sde_step(x, v, 1.0, 0.8, 0.7).log_prob).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sde_with_zero_noise_is_ode(dtype):
    x, v = _xv(dtype=dtype)
    for s, s_next in [(1.0, 0.9), (0.6, 0.3), (0.2, 0.0)]:
        ode = ode_step(x, v, s, s_next)
        sde = sde_step(x, v, s, s_next, 0.0)
        assert sde.sample.dtype == torch.float32
        torch.testing.assert_close(sde.sample, ode.sample, rtol=0, atol=0)
        torch.testing.assert_close(sde.mean, ode.mean, rtol=0, atol=0)
        assert sde.log_prob is None


def test_sde_log_prob_equals_torch_normal_per_sample_sigmas():
    x, v = _xv()
    sigma = torch.tensor([1.0, 0.7, 0.3])
    sigma_next = torch.tensor([0.9, 0.5, 0.0])
    out = sde_step(x, v, sigma, sigma_next, 0.7, generator=torch.Generator().manual_seed(1))
    ref = (
        torch.distributions.Normal(out.mean, out.std.expand_as(out.mean))
        .log_prob(out.sample)
        .mean(dim=(1, 2, 3))
    )
    torch.testing.assert_close(out.log_prob, ref, rtol=1e-6, atol=1e-6)
    assert out.log_prob.shape == (3,) and out.log_prob.dtype == torch.float32
    # each row equals the scalar-level step of that row
    for i in range(3):
        row = sde_step(
            x[i : i + 1],
            v[i : i + 1],
            sigma[i].item(),
            sigma_next[i].item(),
            0.7,
            noise=None,
            prev_sample=out.sample[i : i + 1],
        )
        torch.testing.assert_close(row.log_prob, out.log_prob[i : i + 1], rtol=1e-6, atol=1e-6)


def test_cps_log_prob_equals_torch_normal_and_recompute_is_bitwise():
    x, v = _xv()
    out = cps_step(x, v, 0.7, 0.5, 0.7, generator=torch.Generator().manual_seed(3))
    ref = (
        torch.distributions.Normal(out.mean, out.std.expand_as(out.mean))
        .log_prob(out.sample)
        .mean(dim=(1, 2, 3))
    )
    torch.testing.assert_close(out.log_prob, ref, rtol=1e-6, atol=1e-6)
    again = cps_step(x, v, 0.7, 0.5, 0.7, prev_sample=out.sample)
    assert torch.equal(again.log_prob, out.log_prob)
    assert out.std.flatten()[0].item() == pytest.approx(0.5 * math.sin(0.7 * math.pi / 2), rel=1e-6)


def test_cps_preserves_noise_coefficient():
    # With the true velocity of a single point x0 (v = eps - x0), x_next = (1 - s') x0 + s' * (unit noise).
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 0.3)
    eps = torch.randn(n, 1, generator=g)
    s, s_next = 0.8, 0.5
    x = (1 - s) * x0 + s * eps
    out = cps_step(x, eps - x0, s, s_next, 0.7, generator=g)
    resid = (out.sample - (1 - s_next) * x0) / s_next
    assert abs(resid.mean().item()) < 4 / math.sqrt(n)
    assert abs(resid.var().item() - 1) < 4 * math.sqrt(2 / n)


def test_stored_transition_log_prob_is_bitwise():
    x, v = _xv()
    out = sde_step(x, v, 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(5))
    again = sde_step(x, v, 0.8, 0.6, 0.7, prev_sample=out.sample)
    assert torch.equal(again.log_prob, out.log_prob)
    assert torch.equal(again.sample, out.sample)
    # a different velocity gives a different log-prob of the same transition
    assert not torch.equal(
        sde_step(x, v * 1.01, 0.8, 0.6, 0.7, prev_sample=out.sample).log_prob, out.log_prob
    )


def test_log_prob_is_float32_from_low_precision_inputs():
    x, v = _xv(dtype=torch.bfloat16)
    out = sde_step(x, v, 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(0))
    ref = sde_step(x.float(), v.float(), 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(0))
    assert out.log_prob.dtype == torch.float32
    assert torch.equal(out.log_prob, ref.log_prob)


def test_log_prob_is_mean_over_dims():
    # Doubling the number of elements with identical content keeps the mean-reduced log-prob unchanged.
    x, v = _xv(shape=(2, 3, 4, 4))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    one = sde_step(x, v, 0.5, 0.4, 0.7, noise=z)
    two = sde_step(torch.cat([x, x], 1), torch.cat([v, v], 1), 0.5, 0.4, 0.7, noise=torch.cat([z, z], 1))
    torch.testing.assert_close(one.log_prob, two.log_prob)
    torch.testing.assert_close(gaussian_log_prob(one.sample, one.mean, one.std), one.log_prob)


def test_bad_shapes_raise():
    x, v = _xv()
    with pytest.raises(ValueError, match="sigma"):
        sde_step(x, v, torch.tensor([0.5, 0.4]), 0.3)
    with pytest.raises(ValueError, match="noise"):
        sde_step(x, v, 0.5, 0.3, noise=torch.zeros(1))
    with pytest.raises(ValueError, match="prev_sample"):
        sde_step(x, v, 0.5, 0.3, prev_sample=torch.zeros(1))


def _naive_sde(x, v, s, s_next, a, g):
    # Euler plus noise without the score correction: does NOT keep the marginals (the negative control).
    sigma_t = a * math.sqrt(s / (1 - s)) if s < 1 else a * math.sqrt(1 / (1 - s_next))
    return x + (s_next - s) * v + sigma_t * math.sqrt(s - s_next) * torch.randn(x.shape, generator=g)


def test_sde_keeps_ode_marginals(gaussian_flow):
    # x0 ~ N(1.5, 0.5^2): the exact velocity is known, so ODE and SDE samples must both end with mean 1.5 and
    # variance 0.25 (up to Monte-Carlo error and the Euler error of 500 steps, ~1e-3 on the variance).
    n, steps = 100_000, 500
    m, var = gaussian_flow.m, gaussian_flow.c**2
    sig = flow_match_sigmas(steps, shift=1.0)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 1, generator=g)
    ode = rollout(gaussian_flow, None, sig, noise, sampler="ode").final
    sde = rollout(gaussian_flow, None, sig, noise, sampler="sde", noise_level=0.7, generator=g).final
    se_mean, se_var = math.sqrt(var / n), var * math.sqrt(2 / n)
    tol_var = 4 * se_var + 2e-3
    for final in (ode, sde):
        assert abs(final.mean().item() - m) < 4 * se_mean + 1e-3
        assert abs(final.var().item() - var) < tol_var
    assert abs(ode.var().item() - sde.var().item()) < tol_var
    # the SDE really is stochastic: its samples are not the ODE's
    assert torch.corrcoef(torch.stack([ode.flatten(), sde.flatten()]))[0, 1] < 0.99
    # negative control: dropping the score correction inflates the variance far beyond the tolerance
    x = noise.clone()
    for k in range(steps):
        s, s_next = sig[k].item(), sig[k + 1].item()
        x = _naive_sde(x, gaussian_flow.velocity(x, torch.tensor([s])), s, s_next, 0.7, g)
    assert abs(x.var().item() - var) > 10 * tol_var


def test_per_sample_generators_make_noise_independent_of_the_batch():
    x, v = _xv()
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    whole = sde_step(x, v, 0.8, 0.6, 0.7, generator=gens)
    alone = sde_step(x[1:2], v[1:2], 0.8, 0.6, 0.7, generator=[torch.Generator().manual_seed(1)])
    assert torch.equal(whole.sample[1:2], alone.sample)
    with pytest.raises(ValueError, match="one per sample"):
        sde_step(x, v, 0.8, 0.6, 0.7, generator=gens[:2])
