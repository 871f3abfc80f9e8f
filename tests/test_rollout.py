import math

import pytest
import torch

from diffrl.samplers import flow_match_sigmas, resolve_window, rollout, sde_step


class LinearVelocity(torch.nn.Module):
    """A small trainable velocity model: v = W x * (1 + s) + b (enough to test graphs and windows)."""

    def __init__(self, channels=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, channels, 1)
        self.calls = 0

    def velocity(self, x, sigma, cond=None, guidance_scale=1.0):
        self.calls += 1
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return self.conv(x) * (1 + s)


def _noise(b=4, shape=(3, 4, 4), seed=0):
    return torch.randn((b, *shape), generator=torch.Generator().manual_seed(seed))


def test_resolve_window():
    assert resolve_window(None, 10, "w") == (0, 0)
    assert resolve_window("all", 10, "w") == (0, 10)
    assert resolve_window((2, 5), 10, "w") == (2, 5)
    assert resolve_window((-1, None), 10, "w") == (9, 10)
    with pytest.raises(ValueError, match="w="):
        resolve_window(3, 10, "w")


def test_ode_rollout_shapes_and_values():
    model = LinearVelocity()
    sig = flow_match_sigmas(5, shift=3.0)
    out = rollout(model, None, sig, _noise())
    assert out.latents.shape == (4, 6, 3, 4, 4)
    assert out.log_probs.shape == (4, 5) and torch.isnan(out.log_probs).all()
    assert not out.stochastic.any()
    assert torch.equal(out.latents[:, -1], out.final)
    # manual Euler loop
    x = _noise()
    with torch.no_grad():
        for k in range(5):
            x = x + (sig[k + 1] - sig[k]) * model.velocity(x, sig[k].expand(4))
    torch.testing.assert_close(out.final, x, rtol=0, atol=0)
    assert not out.final.requires_grad


def test_sde_rollout_at_noise_level_zero_is_the_ode_rollout():
    model = LinearVelocity()
    sig = flow_match_sigmas(5, shift=3.0)
    ode = rollout(model, None, sig, _noise())
    sde = rollout(model, None, sig, _noise(), sampler="sde", noise_level=0.0, generator=torch.Generator())
    assert torch.equal(sde.final, ode.final)
    assert not sde.stochastic.any() and torch.isnan(sde.log_probs).all()


def test_sde_window_log_probs_and_recompute_bitwise():
    model = LinearVelocity()
    sig = flow_match_sigmas(6, shift=3.0)
    out = rollout(
        model,
        None,
        sig,
        _noise(),
        sampler="sde",
        sde_window=(1, 4),
        generator=torch.Generator().manual_seed(1),
    )
    assert out.stochastic.tolist() == [False, True, True, True, False, False]
    assert torch.isfinite(out.log_probs[:, 1:4]).all() and torch.isnan(out.log_probs[:, [0, 4, 5]]).all()
    assert out.stochastic_steps().tolist() == [1, 2, 3]
    # recompute each stored transition's log-prob from the trajectory: bitwise equal in fp32
    for k in out.stochastic_steps().tolist():
        x_k, x_next = out.latents[:, k], out.latents[:, k + 1]
        with torch.no_grad():
            v = model.velocity(x_k, sig[k].expand(4))
        again = sde_step(x_k, v, sig[k], sig[k + 1], 0.7, prev_sample=x_next)
        assert torch.equal(again.log_prob, out.log_probs[:, k])
    # deterministic steps are exact Euler steps
    with torch.no_grad():
        v0 = model.velocity(out.latents[:, 0], sig[0].expand(4))
    torch.testing.assert_close(out.latents[:, 1], out.latents[:, 0] + (sig[1] - sig[0]) * v0, rtol=0, atol=0)


def test_rollout_is_reproducible_with_a_generator():
    model = LinearVelocity()
    sig = flow_match_sigmas(4)
    a = rollout(model, None, sig, _noise(), sampler="sde", generator=torch.Generator().manual_seed(7))
    b = rollout(model, None, sig, _noise(), sampler="sde", generator=torch.Generator().manual_seed(7))
    c = rollout(model, None, sig, _noise(), sampler="sde", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.latents, c.latents)


def test_cps_window_may_not_include_the_last_step():
    with pytest.raises(ValueError, match="CPS"):
        rollout(LinearVelocity(), None, flow_match_sigmas(4), _noise(), sampler="cps", sde_window="all")
    out = rollout(LinearVelocity(), None, flow_match_sigmas(4), _noise(), sampler="cps", sde_window=(0, 3))
    assert torch.isfinite(out.log_probs[:, :3]).all()


def _grad_of_last_steps(model, k_last, checkpointing):
    model.zero_grad()
    sig = flow_match_sigmas(5)
    out = rollout(
        model, None, sig, _noise(), grad_window=(-k_last, None), gradient_checkpointing=checkpointing
    )
    out.final.square().mean().backward()
    return out, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("k_last", [1, 2])
def test_grad_window_matches_manual_graph_and_checkpointing(k_last):
    model = LinearVelocity()
    out, grads = _grad_of_last_steps(model, k_last, checkpointing=False)
    assert out.final.requires_grad
    # manual: steps before the window without grad, the window with grad
    sig = flow_match_sigmas(5)
    model.zero_grad()
    x = _noise()
    for k in range(5):
        with torch.set_grad_enabled(k >= 5 - k_last):
            x = x + (sig[k + 1] - sig[k]) * model.velocity(x, sig[k].expand(4))
    x.square().mean().backward()
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)
    # checkpointing recomputes the window's model calls in backward and gives the same gradients
    calls_before = model.calls
    _, grads_ckpt = _grad_of_last_steps(model, k_last, checkpointing=True)
    assert model.calls - calls_before == 5 + k_last
    for g, gc in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(g, gc)


def test_no_grad_outside_window():
    model = LinearVelocity()
    out = rollout(model, None, flow_match_sigmas(4), _noise(), grad_window=(0, 2))
    # the window ended before the last step, so nothing downstream of it carries a graph
    assert not out.final.requires_grad


def test_bad_arguments_raise():
    model = LinearVelocity()
    with pytest.raises(ValueError, match="sampler"):
        rollout(model, None, flow_match_sigmas(4), _noise(), sampler="ddim")
    with pytest.raises(ValueError, match="sigmas"):
        rollout(model, None, torch.tensor([1.0]), _noise())
    with pytest.raises(ValueError, match="grad_window"):
        rollout(model, None, flow_match_sigmas(4), _noise(), grad_window=(3, 1))


def _exact_final(flow, z: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE of 1-D Gaussian data maps the noise z (at s = 1) to m + c z (at s = 0)."""
    return flow.m + flow.c * z


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dpm2_solver_is_second_order_on_the_exact_gaussian_flow(gaussian_flow, shift):
    from diffrl.samplers import flow_match_sigmas

    z = torch.linspace(-2.5, 2.5, 11).reshape(11, 1)
    errors = {}
    for solver in ("euler", "dpm2"):
        for n in (20, 40, 80):
            sigmas = flow_match_sigmas(n, shift=shift)
            out = rollout(gaussian_flow, None, sigmas, z, solver=solver)
            errors[solver, n] = float((out.final - _exact_final(gaussian_flow, z)).abs().max())
    # Euler halves its error with twice the steps (first order); DPM-Solver++(2M) quarters it (second order), so it
    # overtakes Euler as the steps grow (at 10 steps on this flow it is still behind: 0.44 against 0.19)
    assert 1.7 < errors["euler", 40] / errors["euler", 80] < 2.3
    assert errors["dpm2", 40] / errors["dpm2", 80] > 3.5
    assert errors["dpm2", 80] < errors["euler", 80]


def test_dpm2_middle_step_by_hand():
    from diffrl.samplers import dpm2_step

    x, d0, d_prev = torch.tensor([[0.3]]), torch.tensor([[0.5]]), torch.tensor([[0.2]])
    sp, s, sn = 0.9, 0.6, 0.3
    lam = [math.log((1 - v) / v) for v in (sp, s, sn)]
    h = lam[2] - lam[1]
    r = (lam[1] - lam[0]) / h
    d1 = (0.5 - 0.2) / r
    expected = sn / s * 0.3 - (1 - sn) * (math.exp(-h) - 1) * (0.5 + d1 / 2)
    out = dpm2_step(x, d0, d_prev, sp, s, sn)
    assert out.sample.item() == pytest.approx(expected, rel=1e-6)
    assert out.log_prob is None and float(out.std.abs().max()) == 0.0
    assert torch.equal(
        dpm2_step(x, d0, d_prev, sp, s, 0.0).sample, d0
    )  # the step to 0 lands on the prediction


def test_dpm2_with_an_sde_sampler_solves_only_the_steps_after_the_window(gaussian_flow):
    """With ``sampler="sde"`` the solver applies to the deterministic steps after the SDE window (MixGRPO-Flash);
    a window that reaches the last step leaves none, so dpm2 and euler give the same bits."""
    sigmas, x = (
        torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]),
        torch.randn(3, 2, generator=torch.Generator().manual_seed(0)),
    )
    runs = {
        solver: rollout(
            gaussian_flow,
            None,
            sigmas,
            x,
            sampler="sde",
            solver=solver,
            generator=torch.Generator().manual_seed(1),
        )
        for solver in ("euler", "dpm2")
    }
    assert torch.equal(runs["euler"].final, runs["dpm2"].final)
    windowed = {
        solver: rollout(
            gaussian_flow,
            None,
            sigmas,
            x,
            sampler="sde",
            sde_window=(0, 1),
            solver=solver,
            generator=torch.Generator().manual_seed(1),
        )
        for solver in ("euler", "dpm2")
    }
    assert torch.equal(windowed["euler"].latents[:, :2], windowed["dpm2"].latents[:, :2])
    assert not torch.equal(windowed["euler"].final, windowed["dpm2"].final)
    with pytest.raises(ValueError, match="solver='rk4' is not known"):
        rollout(gaussian_flow, None, torch.tensor([1.0, 0.5, 0.0]), torch.zeros(2, 1), solver="rk4")
