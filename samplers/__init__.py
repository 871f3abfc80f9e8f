"""diffrl.samplers: schedules, ODE/SDE/CPS steps with log-probabilities, and rollouts (pure functions, float32)."""

from .rollout import SAMPLERS, SOLVERS, RolloutOutput, VelocityModel, resolve_window, rollout
from .sa_solver import sa_solver_levels, sa_solver_rollout, sa_solver_weights
from .schedules import (
    calculate_shift,
    flow_match_sigmas,
    sigmas_from_scheduler_config,
    static_shift,
    time_shift,
)
from .steps import StepOutput, cps_step, dpm2_step, gaussian_log_prob, ode_step, sde_std, sde_step

__all__ = [
    "SAMPLERS",
    "SOLVERS",
    "RolloutOutput",
    "StepOutput",
    "VelocityModel",
    "calculate_shift",
    "cps_step",
    "dpm2_step",
    "flow_match_sigmas",
    "gaussian_log_prob",
    "ode_step",
    "resolve_window",
    "rollout",
    "sa_solver_levels",
    "sa_solver_rollout",
    "sa_solver_weights",
    "sde_std",
    "sde_step",
    "sigmas_from_scheduler_config",
    "static_shift",
    "time_shift",
]
