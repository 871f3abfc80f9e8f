"""``diffrl doctor [CONFIG.yaml] [key=value ...]``: check the environment (and a config) before a long run.

Every check prints one line, ``OK``, ``WARN`` or ``FAIL``, with what it found and, when not OK, the fix in one
sentence. The checks, by group (``--check GROUP`` runs only some):

* ``env``: python, torch, diffusers, transformers, accelerate and peft against the minimums of ``pyproject.toml``;
  CUDA, the devices and their bf16 / fp16 support (CPU-only warns that real models will be slow).
* ``config``: the config validates (:func:`diffrl.config.load_config` with the overrides), its prompts read, and
  its dtype / mixed precision suit the device.
* ``model``: the model's files are present offline: a local diffusers directory with ``model_index.json`` and every
  component it names, or a hub id whose files are in the Hugging Face cache (``tiny:*`` models always are).
* ``rewards``: every reward's weights are present offline: the exact hub files that ``diffrl download --dry-run``
  lists (the same functions of :mod:`diffrl.hub`) are looked up in the cache without any network call.
* ``memory``: an estimate (not a measurement) of the peak memory of one process, from the safetensors headers when
  the weights are present (:func:`estimate_memory`), compared with the GPU's total memory when CUDA is there.
* ``onpolicy``: when the model is available offline, it is loaded as the trainer loads it (configured dtype,
  device and LoRA; the LoRA's B matrices are made non-zero so the adapter path counts), a short SDE rollout is
  sampled with the configured sampler settings, and the log-probs of its stored transitions are recomputed with
  the same model as the Flow-GRPO trainer does for its ratio: ``max |exp(new - old) - 1|`` FAILs at
  ``flow_grpo.clip_range`` (fresh samples would already be clipped) and WARNs at a tenth of it, unless
  ``flow_grpo.old_logp=recompute`` (then the drift is reported, OK). The recomputed log-probs with batch size 1 and
  with the configured ``optim.train_batch_size`` must agree the same way. With a Flow-GRPO KL term, ``kl-scale``
  reports ``kl_beta`` in the reference code's units and in the exact ones over the schedule's trained steps (WARN
  with ``kl_scale=exact``, whose beta is about 13x a paper's on 10 SD3.5 steps).

Exit code of the command (:mod:`diffrl.cli.doctor`): 0 when no check FAILs, 1 otherwise, 2 for bad input (a config
path that does not exist, an override that is not ``key=value``), which is reported as one sentence naming the value
and the fix.

Python: ``run_doctor("configs/tiny/flow_grpo.yaml", ["optim.lr=1e-4"]) -> list[Finding]``. The checks live in one
module per group: :mod:`~diffrl.doctor.findings` (the :class:`Finding` type), :mod:`~diffrl.doctor.environment`,
:mod:`~diffrl.doctor.config_checks`, :mod:`~diffrl.doctor.model_files`, :mod:`~diffrl.doctor.rewards`,
:mod:`~diffrl.doctor.memory` and :mod:`~diffrl.doctor.onpolicy`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .config_checks import check_data, config_label, read_config
from .environment import check_deepspeed, check_env, check_precision
from .findings import STATUSES, Finding
from .memory import MemoryEstimate, UnknownModelSize, check_memory, estimate_memory
from .model_files import locate_model
from .onpolicy import check_onpolicy
from .rewards import config_rewards, reward_status

__all__ = [
    "CHECKS",
    "STATUSES",
    "Finding",
    "MemoryEstimate",
    "UnknownModelSize",
    "check_env",
    "estimate_memory",
    "run_doctor",
]

CHECKS = ("env", "config", "model", "rewards", "memory", "onpolicy")


def _resolve_device(device) -> str:
    if device is not None:
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_doctor(
    config=None,
    overrides: list[str] | None = None,
    *,
    checks: Iterable[str] | None = None,
    device: str | None = None,
    on_finding: Callable[[Finding], None] | None = None,
) -> list[Finding]:
    """Run the checks (all of :data:`CHECKS` by default; the config ones only with a config or overrides).

    Args:
        config: a YAML path, a dict or a :class:`~diffrl.config.TrainConfig`; None checks the environment only
            (unless ``overrides`` describe a whole config).
        overrides: dotted ``key=value`` overrides, as for ``diffrl train``.
        checks: groups to run, a subset of :data:`CHECKS`.
        device: where the on-policy probe runs and whose memory the estimate is compared with (default: ``cuda``
            when available, else ``cpu``).
        on_finding: called with each finding as soon as it is made (the command prints them as they come).

    Returns:
        The findings, in order. Raises :class:`~diffrl.config.ConfigError` for bad input: a config path that does
        not exist, a file that is not YAML, an override that is not ``key=value``, an unknown check.
    """
    from ..config import ConfigError

    overrides = list(overrides or [])
    wanted = list(CHECKS) if checks is None else list(checks)
    unknown = [c for c in wanted if c not in CHECKS]
    if unknown:
        raise ConfigError(f"check {unknown[0]!r} is not known; choose from {', '.join(CHECKS)}.")
    dev = _resolve_device(device)
    findings: list[Finding] = []

    def add(items: Finding | list[Finding]) -> None:
        for item in items if isinstance(items, list) else [items]:
            findings.append(item)
            if on_finding is not None:
                on_finding(item)

    with_config = (config is not None or bool(overrides)) and any(c in wanted for c in CHECKS[1:])
    if with_config:  # bad input raises here, before any check runs
        cfg, problem = read_config(config, overrides)
    if "env" in wanted:
        add(check_env(device))
    if not with_config:
        return findings
    if cfg is None:
        add(problem)
        return findings
    label = config_label(config)
    if "config" in wanted:
        rewards = ", ".join(sorted(set(cfg.reward) | set(cfg.eval_reward)))
        add(
            Finding(
                "config",
                "OK",
                f"{label} validates: {cfg.algorithm}, model {cfg.model.path} ({cfg.model.dtype}), rewards {rewards}, "
                f"{cfg.sample.height}x{cfg.sample.width}, {cfg.sample.num_steps} steps",
            )
        )
        add(check_data(cfg))
        add(check_precision(cfg, dev))
        if cfg.zero_stage:
            add(check_deepspeed(cfg))
    location = None
    if any(c in wanted for c in ("model", "memory", "onpolicy")):
        location = locate_model(cfg, label)
        if "model" in wanted:
            add(location.finding)
    reward_bytes, uncached = 0, []
    if any(c in wanted for c in ("rewards", "memory")):
        statuses = [reward_status(name, kwargs, label) for name, kwargs in config_rewards(cfg)]
        reward_bytes = sum(r.nbytes for r in statuses)
        uncached = [r.name for r in statuses if not r.cached]
        if "rewards" in wanted:
            add([r.finding for r in statuses])
    if "memory" in wanted:
        add(check_memory(cfg, location, reward_bytes, uncached, dev))
    if "onpolicy" in wanted:
        if location is not None and location.available:
            add(check_onpolicy(cfg, location, dev))
        else:
            add(
                Finding(
                    "ratio",
                    "WARN",
                    f"skipped: the model {cfg.model.path} is not available offline",
                    "Fix the model check, then run doctor again to check the on-policy ratio.",
                )
            )
    return findings
