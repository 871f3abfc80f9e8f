"""DeepSpeed ZeRO stages 1 and 2 for the engine (an accelerate config with ``distributed_type: DEEPSPEED``).

ZeRO-1 partitions the AdamW states of the trained weights over the processes, ZeRO-2 the gradients too; every
process keeps the whole model, so the trainers call the transformer as usual. The engine keeps what it owns
without DeepSpeed: the optimiser (``torch.optim.AdamW`` from ``optim.*``), the learning-rate schedule, gradient
accumulation (DeepSpeed's unmanaged mode: the engine's ``finish_update`` is the accumulation boundary, however
many backward passes a trainer runs), clipping (``optim.max_grad_norm``, applied by DeepSpeed), autocast
(``mixed_precision``; trained weights stay float32) and checkpoints. Checkpoints gather the partitioned AdamW
states into the same files an unsharded run writes, so a run can resume with or without DeepSpeed, on any number
of processes.

What the DeepSpeed config may set: the ``zero_optimization`` section (stage 1 or 2, bucket sizes, overlap,
contiguous gradients). Refused with one sentence: stage 0 (use DDP) and 3 (parameter sharding: use FSDP2),
optimiser or parameter offload, an ``optimizer`` or ``scheduler`` section, fp16. Batch sizes, accumulation and
clipping in the file are replaced by the run's own values.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from ..config import ConfigError

__all__ = [
    "require_deepspeed",
    "check_deepspeed_config",
    "deepspeed_init_config",
    "initialize",
    "gather_optimizer_state",
    "scatter_optimizer_state",
    "set_master_weights",
]

SUPPORTED_STAGES = (1, 2)
TESTED_VERSION = "0.19.8"


def _offload_device(section: Any) -> str:
    if isinstance(section, dict):
        return str(section.get("device") or "none").lower()
    return "none" if section in (None, False, "none") else str(section)


def check_deepspeed_config(ds_config: dict, cfg) -> int:
    """The ZeRO stage of ``ds_config`` (accelerate's resolved DeepSpeed dict), after refusing, with one sentence
    each, what the engine does not support. Needs no DeepSpeed import: it runs before any model is loaded."""
    zero = ds_config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    if stage == 0:
        raise ConfigError(
            "the DeepSpeed config has zero_optimization.stage=0 (plain data parallel); launch with DDP instead "
            "(configs/accelerate/multi_gpu.yaml) or set stage 1 or 2."
        )
    if stage == 3:
        raise ConfigError(
            "DeepSpeed ZeRO stage 3 is not supported; set zero_optimization.stage to 1 or 2 "
            "(configs/accelerate/deepspeed_zero2.yaml), or shard the parameters with FSDP2 (configs/accelerate/fsdp.yaml)."
        )
    if stage not in SUPPORTED_STAGES:
        raise ConfigError(f"zero_optimization.stage={stage} is not a ZeRO stage; use 1 or 2.")
    for key in ("offload_optimizer", "offload_param"):
        device = _offload_device(zero.get(key))
        if device != "none":
            raise ConfigError(
                f"the DeepSpeed config sets zero_optimization.{key}.device={device}, but offloading is not supported; "
                "set it to none."
            )
    for key in ("optimizer", "scheduler"):
        if ds_config.get(key):
            raise ConfigError(
                f"the DeepSpeed config has an {key!r} section, but diffrl builds AdamW and its schedule from optim.*; "
                "remove the section."
            )
    fp16 = ds_config.get("fp16") or {}
    if cfg.mixed_precision == "fp16" or fp16.get("enabled") is True:
        raise ConfigError(
            "fp16 is not supported with DeepSpeed (the engine keeps trained weights in float32 and autocasts); "
            "use mixed_precision=bf16 or no."
        )
    return stage


def deepspeed_init_config(ds_config: dict, cfg, num_processes: int) -> dict:
    """The dict passed to ``deepspeed.initialize``: the file's ZeRO section, the run's clipping, and unmanaged
    gradient accumulation (the engine decides when an update happens)."""
    zero = {
        k: v for k, v in (ds_config.get("zero_optimization") or {}).items() if not k.startswith("offload_")
    }
    zero = {k: v for k, v in zero.items() if v != "auto" and k != "stage3_gather_16bit_weights_on_model_save"}
    if int(zero["stage"]) == 1:
        zero["overlap_comm"] = (
            False  # DeepSpeed's unmanaged accumulation overlaps communication only at stage 2
        )
    return {
        "train_micro_batch_size_per_gpu": 1,  # unused: the engine batches; DeepSpeed only checks consistency
        "train_batch_size": num_processes,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(cfg.optim.max_grad_norm),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def require_deepspeed():
    """Import DeepSpeed, or fail with the install command (called before any model is loaded)."""
    try:
        import deepspeed
        from deepspeed.runtime import constants
    except ImportError as err:
        raise ImportError(
            f"ZeRO needs deepspeed (pip install 'diffrl[deepspeed]'), which failed to import: {err}."
        ) from err
    if not hasattr(constants, "MANAGED_GRADIENT_ACCUMULATION"):
        raise ImportError(
            f"deepspeed {deepspeed.__version__} has no unmanaged gradient accumulation; "
            f"install deepspeed>={TESTED_VERSION}."
        )
    return deepspeed


def initialize(transformer: torch.nn.Module, optimizer: torch.optim.Optimizer, params: list, config: dict):
    """Wrap the transformer and the AdamW optimiser in a DeepSpeed engine; returns the engine."""
    deepspeed = require_deepspeed()
    # deepspeed 0.19 gathers partitions with a torch function that torch 2.14 marks deprecated, on every update
    warnings.filterwarnings(
        "ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning
    )
    quiet = logging.getLogger("DeepSpeed")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # its INFO lines print the whole config on every process
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=transformer, optimizer=optimizer, model_parameters=params, config=config
        )
    finally:
        quiet.setLevel(level)
    return engine


def _inner(engine):
    """The ZeRO optimiser and the AdamW inside it (the one the engine built; it holds the flat partitions)."""
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", None)
    if inner is None or not hasattr(zero, "single_partition_of_fp32_groups"):
        raise RuntimeError(
            f"unexpected DeepSpeed optimiser {type(zero).__name__}; diffrl was tested with deepspeed {TESTED_VERSION}."
        )
    return zero, inner


def gather_optimizer_state(engine, params: list) -> dict:
    """AdamW's state in ``torch.optim.AdamW.state_dict()`` layout (parameters numbered in ``params`` order), the
    partitions gathered from every process: a collective every process must call."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero, inner = _inner(engine)
    flat_states = [inner.state.get(flat, {}) for g in inner.param_groups for flat in g["params"]]
    started = any("exp_avg" in s for s in flat_states)
    state: dict[int, dict] = {}
    if started:
        step = next(s["step"] for s in flat_states if "step" in s)
        for i, p in enumerate(params):
            state[i] = {
                "step": step.detach().clone().cpu() if torch.is_tensor(step) else torch.tensor(float(step)),
                "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().cpu(),
                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().cpu(),
            }
    if len(inner.param_groups) != 1:
        raise RuntimeError("the engine builds one AdamW parameter group; DeepSpeed made several.")
    group = {k: v for k, v in inner.param_groups[0].items() if k != "params"}
    return {"state": state, "param_groups": [{**group, "params": list(range(len(params)))}]}


def scatter_optimizer_state(engine, params: list, saved: dict) -> None:
    """Load a ``gather_optimizer_state`` (or unsharded AdamW) state: every process keeps its partition."""
    from deepspeed.utils import safe_set_full_optimizer_state

    zero, inner = _inner(engine)
    if len(saved["param_groups"]) != 1 or len(inner.param_groups) != 1:
        raise ValueError(
            "the checkpoint's optimiser has several parameter groups; it was not written by diffrl."
        )
    for k, v in saved["param_groups"][0].items():
        if k != "params":
            inner.param_groups[0][k] = v
    if not saved["state"]:
        return
    first = saved["state"][0] if 0 in saved["state"] else next(iter(saved["state"].values()))
    step = first["step"]
    for flat in inner.param_groups[0]["params"]:
        inner.state[flat] = {
            "step": step.detach().clone().to(flat.device)
            if torch.is_tensor(step)
            else torch.tensor(float(step)),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    zero._hp_optimizer_states_linked = False  # link the parameters' fragments to the new state tensors
    zero._lazy_init_hp_params_optimizer_state()
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, saved["state"][i][key].to(p.device, torch.float32), key)


def set_master_weights(params: list) -> None:
    """After the trained weights were assigned (resume), copy them into DeepSpeed's float32 master partitions,
    which the next update starts from."""
    from deepspeed.utils import safe_set_full_fp32_param

    for p in params:
        safe_set_full_fp32_param(p, p.detach().float())
