import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffrl.samplers import calculate_shift, flow_match_sigmas, sigmas_from_scheduler_config, static_shift

STEPS = [1, 2, 4, 10, 28, 40]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_static_shift_equals_diffusers(steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ours = sigmas_from_scheduler_config(sched.config, steps)
    assert torch.equal(ours, sched.sigmas)
    assert torch.equal(ours[:-1] * 1000, sched.timesteps)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("image_seq_len", [16, 256, 1024, 4096])
def test_flux_dynamic_shift_equals_diffusers(steps, image_seq_len):
    sched = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        shift=3.0,
    )
    mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = sigmas_from_scheduler_config(
        sched.config, steps, image_seq_len=image_seq_len, flux_base_sigmas=True
    )
    assert torch.equal(ours, sched.sigmas)


def test_sd3_with_dynamic_shift_config_equals_diffusers():
    # SD3-style spacing with a resolution-dependent shift (the pipeline passes only mu).
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    mu = calculate_shift(1024)
    sched.set_timesteps(10, mu=mu)
    assert torch.equal(sigmas_from_scheduler_config(sched.config, 10, image_seq_len=1024), sched.sigmas)


def test_hand_computed_values():
    # shift 3 at s = 0.5: 1.5 / 2 = 0.75; the schedule starts at 1 and ends at 0.
    assert static_shift(3.0, 0.5) == pytest.approx(0.75)
    sig = flow_match_sigmas(4, shift=1.0)
    assert sig[0].item() == 1.0 and sig[-1].item() == 0.0 and sig.dtype == torch.float32
    assert torch.all(sig[1:] < sig[:-1])
    # calculate_shift is linear: 0.5 at 256 tokens, 1.15 at 4096.
    assert calculate_shift(256) == pytest.approx(0.5)
    assert calculate_shift(4096) == pytest.approx(1.15)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="num_steps"):
        flow_match_sigmas(0)
    with pytest.raises(ValueError, match="image_seq_len"):
        sigmas_from_scheduler_config({"use_dynamic_shifting": True}, 4)
    with pytest.raises(NotImplementedError, match="use_karras_sigmas"):
        sigmas_from_scheduler_config({"use_karras_sigmas": True}, 4)
