"""SA-Solver (diffrl.samplers.sa_solver_rollout) against the maths: its weights against quadrature, its first order
against the Euler rollout, its convergence order on an exact Gaussian flow, exact marginals with a point-mass data
distribution (whatever the step sizes), per-sample noise, the reference's grid, and early errors. Side-by-side parity
with the AWM reference's own sa_solver.py is benchmarks/parity_sa_solver.py (it needs the reference's clone)."""

import math

import numpy as np
import pytest
import torch

from diffrl.samplers import flow_match_sigmas, rollout, sa_solver_levels, sa_solver_rollout, sa_solver_weights

pytestmark = pytest.mark.usefixtures("one_thread")


class PointMass:
    """The exact velocity of a data distribution that is the single point ``mu``: ``v(x, t) = (x - mu) / t``, so the
    data prediction ``x - t v`` is ``mu`` everywhere and ``x_t ~ N((1 - t) mu, t^2)`` at every level."""

    def __init__(self, mu: float):
        self.mu = mu

    def velocity(self, x, sigma, cond=None, guidance_scale=1.0):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (x - self.mu) / s


class Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def velocity(self, x, sigma, cond=None, guidance_scale=1.0):
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return torch.tanh(self.conv(x)) * (1 + s) - 0.5 * x


def _quadrature_weights(lambdas, lam_s, lam_t, tau, n=200_001):
    """``c int_{lam_s}^{lam_t} e^{c (lam - lam_t)} l_j(lam) dlam`` by the trapezoidal rule."""
    c = 1 + tau**2
    lam = np.linspace(lam_s, lam_t, n)
    out = []
    for j, lj in enumerate(lambdas):
        basis = np.ones_like(lam)
        for i, li in enumerate(lambdas):
            if i != j:
                basis *= (lam - li) / (lj - li)
        out.append(c * np.trapezoid(np.exp(c * (lam - lam_t)) * basis, lam))
    return out


@pytest.mark.parametrize("tau", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("lambdas", [[-0.4], [-0.4, -1.1, -1.9], [0.3, -0.4, -1.1, -1.9]])
def test_weights_are_the_integrals_of_the_lagrange_basis(lambdas, tau):
    lam_s, lam_t = -0.4, 0.35
    expected = _quadrature_weights(lambdas, lam_s, lam_t, tau)
    assert sa_solver_weights(lambdas, lam_s, lam_t, tau) == pytest.approx(expected, rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("tau", [0.0, 0.7])
def test_order_two_adds_the_few_step_term_to_the_divided_difference(tau):
    """Order 2 is the Lagrange integral plus ``c (h^2/2 - (c h - 1 + e^{-c h}) / c^2)`` on the divided difference of
    the two predictions (appendix D of the SA-Solver paper, as the reference samples)."""
    lam_s, lam_t, lam_prev = -0.4, 0.35, -1.1
    c, h = 1 + tau**2, lam_t - lam_s
    extra = c * (h * h / 2 - (c * h - 1 + math.exp(-c * h)) / c**2)
    for nodes in ([lam_s, lam_prev], [lam_t, lam_s]):  # the predictor's and the corrector's
        exact = _quadrature_weights(nodes, lam_s, lam_t, tau)
        d = nodes[0] - nodes[1]
        expected = [exact[0] + extra / d, exact[1] - extra / d]
        assert sa_solver_weights(nodes, lam_s, lam_t, tau) == pytest.approx(expected, rel=1e-8)
    # for the predictor the divided difference's whole weight is then h^2 / 2 times c
    w = sa_solver_weights([lam_s, lam_prev], lam_s, lam_t, tau)
    assert w[0] + w[1] == pytest.approx(-math.expm1(-c * h), rel=1e-12)  # the weights still sum to c I_0
    assert -w[1] * (lam_s - lam_prev) == pytest.approx(c * h * h / 2, rel=1e-10)


def test_first_order_without_noise_is_the_euler_rollout():
    model, x = Conv(), torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    sigmas = flow_match_sigmas(6, shift=3.0).clone()
    sigmas[0] = 0.999
    sa = sa_solver_rollout(model, None, sigmas, x, predictor_order=1, corrector_order=0)
    euler = rollout(model, None, sigmas, x)
    torch.testing.assert_close(sa.latents, euler.latents, rtol=1e-5, atol=1e-5)
    assert not sa.stochastic.any() and torch.isnan(sa.log_probs).all() and sa.log_probs.shape == (4, 6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_order_two_converges_at_second_order_on_the_exact_gaussian_flow(gaussian_flow, shift):
    """The probability-flow ODE of Gaussian data ``N(m, c^2)`` maps ``x`` at level ``t0`` to ``m + c (x - (1 - t0)
    m) / sqrt((1 - t0)^2 c^2 + t0^2)`` at 0; the first order halves its error with twice the steps, the
    reference's orders (2, 2) divide it by more than 3.5."""
    z = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).reshape(11, 1)
    errors = {}
    for orders in ((1, 0), (2, 2)):
        for n in (80, 160):
            sigmas = flow_match_sigmas(n, shift=shift).clone()
            sigmas[0] = 1 - 1e-3
            t0 = float(sigmas[0])
            f = gaussian_flow
            exact = f.m + f.c * (z - (1 - t0) * f.m) / math.sqrt((1 - t0) ** 2 * f.c**2 + t0**2)
            out = sa_solver_rollout(f, None, sigmas, z, predictor_order=orders[0], corrector_order=orders[1])
            errors[orders, n] = float((out.final - exact).abs().max())
    assert 1.8 < errors[(1, 0), 80] / errors[(1, 0), 160] < 2.2
    assert errors[(2, 2), 80] / errors[(2, 2), 160] > 3.5
    assert errors[(2, 2), 160] < errors[(1, 0), 160] / 2


@pytest.mark.parametrize("tau", [0.4, 1.0])
def test_stochastic_steps_keep_the_exact_marginals_of_a_point_mass(tau):
    """With the exact data prediction of a point mass, every SA-Solver step maps ``N((1 - s) mu, s^2)`` to ``N((1 -
    t) mu, t^2)`` however large the step: the mean and the spread of 40 000 samples match at every level."""
    mu, n = 0.8, 40_000
    sigmas = sa_solver_levels(flow_match_sigmas(6, shift=3.0))
    t = [float(v) for v in sigmas]
    x = t[0] * torch.randn(n, 1, generator=torch.Generator().manual_seed(0)) + (1 - t[0]) * mu
    out = sa_solver_rollout(
        PointMass(mu), None, sigmas, x, tau=tau, generator=torch.Generator().manual_seed(1)
    )
    assert out.stochastic[:-1].all() and not out.stochastic[-1]
    for k in range(1, len(t) - 1):
        xk = out.latents[:, k, 0].double()
        assert float(xk.mean()) == pytest.approx((1 - t[k]) * mu, abs=4 * t[k] / math.sqrt(n))
        assert float(xk.std()) == pytest.approx(t[k], rel=0.015)
    torch.testing.assert_close(out.final, torch.full_like(out.final, mu))
    # and the noise is really there: the same rollout without it has no spread beyond the start's, scaled down
    ode = sa_solver_rollout(PointMass(mu), None, sigmas, x)
    assert float(ode.latents[:, 1, 0].std()) == pytest.approx(t[1] / t[0] * float(x.std()), rel=1e-4)


def test_stochastic_sampling_of_gaussian_data_converges_to_its_distribution(gaussian_flow):
    """With ``tau = 1`` (the reverse-time SDE) everywhere, the final samples' mean and spread approach the data's
    ``N(m, c^2)`` as the steps grow (few large stochastic steps of order 2 overshoot the spread: 0.76 at 24 steps)."""
    f, n = gaussian_flow, 40_000
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(0))
    spread_error = {}
    for steps in (96, 192):
        sigmas = sa_solver_levels(flow_match_sigmas(steps, shift=3.0))
        out = sa_solver_rollout(f, None, sigmas, x, tau=1.0, generator=torch.Generator().manual_seed(1))
        final = out.final.double()
        assert float(final.mean()) == pytest.approx(f.m, abs=0.02)
        spread_error[steps] = abs(float(final.std()) - f.c)
    assert spread_error[192] < 0.04 * f.c
    assert spread_error[192] < spread_error[96] / 2


def test_tau_is_taken_at_the_target_level_and_each_sample_has_its_own_noise():
    model = Conv()
    sigmas = sa_solver_levels(flow_match_sigmas(8, shift=1.0))
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))

    def tau(t):
        return 0.7 if 0.3 <= t <= 0.9 else 0.0

    def gens():
        return [torch.Generator().manual_seed(10 + i) for i in range(4)]

    out = sa_solver_rollout(model, None, sigmas, x, tau=tau, generator=gens())
    targets = [float(v) for v in sigmas[1:-1]]
    assert out.stochastic.tolist() == [0.3 <= v <= 0.9 for v in targets] + [False]
    one_by_one = torch.cat(
        [
            sa_solver_rollout(model, None, sigmas, x[i : i + 1], tau=tau, generator=[gens()[i]]).final
            for i in range(4)
        ]
    )
    torch.testing.assert_close(out.final, one_by_one, rtol=1e-6, atol=1e-6)
    again = sa_solver_rollout(model, None, sigmas, x, tau=tau, generator=gens())
    assert torch.equal(out.final, again.final)
    ode = sa_solver_rollout(model, None, sigmas, x, tau=0.0, generator=gens())
    assert not ode.stochastic.any() and not torch.allclose(ode.final, out.final, atol=1e-3)
    # without noise the generators are not drawn from
    g = gens()
    sa_solver_rollout(model, None, sigmas, x, tau=0.0, generator=g)
    assert torch.equal(torch.randn(3, generator=g[0]), torch.randn(3, generator=gens()[0]))


def test_the_reference_grid():
    sigmas = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.3, 0.0])
    torch.testing.assert_close(sa_solver_levels(sigmas), torch.tensor([0.999, 0.9, 0.75, 0.5, 0.25, 0.0]))
    torch.testing.assert_close(sa_solver_levels(torch.tensor([0.6, 0.2, 0.0])), torch.tensor([0.6, 0.3, 0.0]))
    assert torch.equal(sigmas, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.3, 0.0]))  # not changed in place


def test_bad_arguments_are_refused_before_any_model_call():
    class Counting(Conv):
        calls = 0

        def velocity(self, *a, **k):
            Counting.calls += 1
            return super().velocity(*a, **k)

    model, x = Counting(), torch.zeros(1, 3, 2, 2)
    good = torch.tensor([0.999, 0.5, 0.2, 0.0])
    with pytest.raises(ValueError, match="lambda is infinite at 1"):
        sa_solver_rollout(model, None, torch.tensor([1.0, 0.5, 0.0]), x)
    with pytest.raises(ValueError, match="must decrease"):
        sa_solver_rollout(model, None, torch.tensor([0.9, 0.5, 0.1]), x)
    with pytest.raises(ValueError, match="must decrease"):
        sa_solver_rollout(model, None, torch.tensor([0.9, 0.95, 0.0]), x)
    with pytest.raises(ValueError, match="predictor_order=5"):
        sa_solver_rollout(model, None, good, x, predictor_order=5)
    with pytest.raises(ValueError, match="corrector order from 0"):
        sa_solver_rollout(model, None, good, x, corrector_order=-1)
    with pytest.raises(ValueError, match="3 steps are too few"):
        sa_solver_rollout(model, None, good, x, predictor_order=4)
    with pytest.raises(ValueError, match="T >= 2"):
        sa_solver_rollout(model, None, torch.tensor([0.5, 0.0]), x)
    assert Counting.calls == 0
    with pytest.raises(ValueError, match="negative"):
        sa_solver_rollout(model, None, good, x, tau=-0.1)
