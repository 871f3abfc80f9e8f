"""The memory estimate: a rough peak of one training process from the safetensors headers (or published sizes),
compared with the GPU's total memory."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .findings import Finding, GiB, count, gib
from .model_files import ModelLocation, supported_pipelines, weight_files

__all__ = ["MemoryEstimate", "UnknownModelSize", "estimate_memory", "check_memory"]


class UnknownModelSize(LookupError):
    """The model's weights are not present offline and it is not one of the checkpoints of known size."""


#: Published sizes of well-known checkpoints (approximate), used when their weights are not present offline:
#: transformer parameters, the other components' parameters, width, blocks, and LoRA units per rank and width.
_PUBLISHED = {
    "stabilityai/stable-diffusion-3.5-medium": ("sd3", 2.47e9, 5.66e9, 1536, 24),
    "stabilityai/stable-diffusion-3.5-large": ("sd3", 8.06e9, 5.66e9, 2432, 38),
    "stabilityai/stable-diffusion-3.5-large-turbo": ("sd3", 8.06e9, 5.66e9, 2432, 38),
    "stabilityai/stable-diffusion-3-medium-diffusers": ("sd3", 2.03e9, 5.66e9, 1536, 24),
    "black-forest-labs/FLUX.1-dev": ("flux", 11.9e9, 4.97e9, 3072, 57),
    "black-forest-labs/FLUX.1-schnell": ("flux", 11.9e9, 4.97e9, 3072, 57),
}
#: Text tokens the transformer attends to: SD3 CLIP 77 + T5 256, FLUX T5 512.
_TEXT_TOKENS = {"sd3": 77 + 256, "flux": 512}
#: Activation elements stored per token and width unit in one transformer block for backward (Korthikanti et al.
#: 2022, 34 s b h bytes at 16 bit, without the attention matrix that fused attention does not store).
_ACT_PER_BLOCK = 16
#: Activation elements per pixel and first VAE decoder channel live at once while decoding (no grad).
_VAE_PER_PIXEL = 3


@dataclass
class MemoryEstimate:
    """Bytes per process by term (see :func:`estimate_memory`); ``total`` is their sum."""

    weights: int
    trained: int
    buffers: int
    activations: int
    rewards: int
    overhead: int
    params: int
    trainable_params: int
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.trained + self.buffers + self.activations + self.rewards + self.overhead


def _tensor_shapes(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], int]:
    """``({name: shape}, approx_numel)``: shapes read from safetensors headers (no tensor is loaded); ``.bin``
    files, which have no header, count as float32 by size."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    approx = 0
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        elif path.is_file():
            approx += path.stat().st_size // 4
    return shapes, approx


def _peft_match(module: str, targets) -> bool:
    import re

    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _model_facts(cfg, model_dir: Path | None) -> dict[str, Any]:
    """Family, parameter counts, architecture and LoRA size, from the pipeline directory or published sizes."""
    from ..models.loading import ADAPTERS

    m = cfg.model
    if model_dir is not None:
        index = json.loads((Path(model_dir) / "model_index.json").read_text())
        family = supported_pipelines().get(index.get("_class_name"), "sd3")
        adapter = next(c for c in ADAPTERS.values() if c.family == family)
        params: dict[str, int] = {}
        transformer_shapes: dict[str, tuple[int, ...]] = {}
        approx = False
        for name, value in index.items():
            if name.startswith("_") or not isinstance(value, list) or value[0] is None:
                continue
            shapes, extra = _tensor_shapes(weight_files(Path(model_dir) / name))
            approx = approx or extra > 0
            params[name] = sum(math.prod(s) for s in shapes.values()) + extra
            if name == "transformer":
                transformer_shapes = shapes
        tcfg = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())
        vcfg = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
        width = int(tcfg["num_attention_heads"]) * int(tcfg["attention_head_dim"])
        blocks = int(tcfg.get("num_layers", 0)) + int(tcfg.get("num_single_layers", 0))
        rank = m.lora_rank if m.lora_rank > 0 else adapter.default_lora_rank
        targets = m.lora_targets or adapter.default_lora_targets
        exclude = set()
        if family == "sd3" and not m.lora_targets:  # the context-pre-only last block (see SD3Model)
            exclude.add(f"transformer_blocks.{int(tcfg['num_layers']) - 1}.attn.add_q_proj")
        lora = 0
        for key, shape in transformer_shapes.items():
            module = key.removesuffix(".weight")
            if (
                key.endswith(".weight")
                and len(shape) == 2
                and module not in exclude
                and _peft_match(module, targets)
            ):
                lora += rank * (shape[0] + shape[1])
        source = "safetensors headers" + (" and .bin sizes" if approx else "")
        return {
            "family": family,
            "params": sum(params.values()),
            "transformer": params.get("transformer", 0),
            "width": width,
            "blocks": blocks,
            "patch": int(tcfg.get("patch_size", 1)) if family == "sd3" else 2,
            "vae_factor": 2 ** (len(vcfg["block_out_channels"]) - 1),
            "vae_channels": int(vcfg["block_out_channels"][0]),
            "latent_channels": int(vcfg.get("latent_channels", 16)),
            "text_width": int(tcfg.get("joint_attention_dim", width)),
            "lora": lora,
            "source": source,
        }
    if m.path not in _PUBLISHED:
        raise UnknownModelSize(f"{m.path} is not present offline and its size is not known")
    family, transformer, others, width, blocks = _PUBLISHED[m.path]
    adapter = next(c for c in ADAPTERS.values() if c.family == family)
    rank = m.lora_rank if m.lora_rank > 0 else adapter.default_lora_rank
    # LoRA r (in + out) per adapted linear: SD3 8 width x width projections a block; FLUX 19 double blocks
    # (8 projections + 2 feed-forwards of 5 units each for image and text) and 38 single blocks (17 units).
    units = 16 * blocks if family == "sd3" else 36 * 19 + 17 * 38
    return {
        "family": family,
        "params": int(transformer + others),
        "transformer": int(transformer),
        "width": width,
        "blocks": blocks,
        "patch": 2,
        "vae_factor": 8,
        "vae_channels": 128,
        "latent_channels": 16,
        "text_width": 4096,
        "lora": int(rank * width * units),
        "source": "published sizes (the weights are not present offline)",
    }


def estimate_memory(
    cfg,
    model_dir: str | Path | None = None,
    *,
    reward_bytes: int = 0,
    cuda: bool = False,
    num_processes: int = 1,
) -> MemoryEstimate:
    """A rough *estimate* of the peak memory of one training process: nothing is measured, and the constants below
    have not been calibrated against measured peaks, so read it as an order of magnitude with its breakdown.

    ``model_dir`` is the pipeline directory: parameter counts are read from its safetensors headers without
    loading any tensor; without it, the published sizes of a few well-known checkpoints are used
    (:class:`UnknownModelSize` for others). With ``b_w`` the bytes of ``model.dtype``, ``a`` the bytes of an
    activation (2 when the weights are 16-bit or ``mixed_precision`` is set, else 4)::

        total       = weights + trained + buffers + activations + rewards + overhead
        weights     = P_all * b_w              (every pipeline component stays on the device; a full fine-tune
                                                keeps the transformer in float32: + P_transformer * (4 - b_w))
        trained     = P_train * (4 [LoRA weights, float32; 0 for full fine-tuning] + 4 [grads] + 8 [AdamW m, v;
                      2 for 8-bit Adam] + 4 [EMA, when ema_decay > 0] + 4 [DiffusionNFT's old-policy adapter])
        sharding    (several processes) ``zero_stage: 1`` divides the AdamW term by their number, ``2`` the grads
                    too; ``fsdp: true`` divides the transformer's weights and the whole trained term
        buffers     = n_local * (L_txt * D_txt * b_w * g + stored latents * 4)   (the step's text embeddings,
                      g = 2 with CFG negatives, and Flow-GRPO's (T + 1) trajectory latents / the final latents)
        activations = max(train, sample)
        train       = k * c * B_t * N * d * a * (16 * blocks)     without gradient checkpointing
                    = k * c * B_t * N * d * a * (blocks + 16)     with it (block inputs + one recomputed block)
        sample      = c * B_s * N * d * a * 16 + B_s * H * W * C_vae * a * 3   (a block without grad + VAE decode)
        overhead    = 1 GiB on CUDA (context, allocator), 0 on the CPU

    where ``P_all`` / ``P_transformer`` / ``P_train`` are all / transformer / trained parameters (LoRA:
    ``r (in + out)`` per adapted linear), ``N = H W / (f p)^2 + L_txt`` tokens (VAE factor f, patch p, text tokens
    ``L_txt``: SD3 333, FLUX 512), ``d`` the transformer width, ``c = 2`` for SD3 with CFG (a doubled batch),
    ``B_t = optim.train_batch_size``, ``B_s = sample.batch_size``, ``k`` = ReFL's ``grad_steps`` (else 1),
    ``n_local`` the samples of one step on one of ``num_processes`` processes, ``D_txt`` the text embedding width,
    and ``rewards`` the size of the rewards' cached weight files (``reward_bytes``).
    """
    import torch

    from ..utils import resolve_dtype

    facts = _model_facts(cfg, Path(model_dir) if model_dir is not None else None)
    m, s, o = cfg.model, cfg.sample, cfg.optim
    b_w = torch.empty((), dtype=resolve_dtype(m.dtype)).element_size()
    a = 2 if (b_w == 2 or cfg.mixed_precision != "no") else 4
    full = m.lora_rank == 0
    p_train = facts["transformer"] if full else facts["lora"]

    world = max(1, int(num_processes))
    fsdp = world if cfg.fsdp and world > 1 else 1
    zero = cfg.zero_stage if world > 1 else 0
    transformer = facts["transformer"] * (4 if full else b_w)
    weights = facts["params"] * b_w - facts["transformer"] * b_w + transformer / fsdp
    adam = (2 if o.use_8bit_adam else 8) / (world if zero >= 1 else 1)
    grads = 4 / (world if zero >= 2 else 1)
    per_param = (0 if full else 4) + grads + adam
    per_param += 4 if cfg.ema_decay > 0 else 0
    per_param += 4 if cfg.algorithm == "diffusion_nft" else 0
    per_param += 4 if cfg.algorithm == "awm" and cfg.awm.ema_kl_weight > 0 else 0  # the ema_ref adapter
    trained = p_train * per_param / fsdp

    f, p = facts["vae_factor"], facts["patch"]
    n_img = (s.height // (f * p)) * (s.width // (f * p))
    l_txt = _TEXT_TOKENS[facts["family"]]
    tokens = n_img + l_txt
    d = facts["width"]
    cfg_sd3 = facts["family"] == "sd3" and cfg.algorithm not in ("diffusion_nft", "awm") and s.guidance_scale > 1
    c = 2 if cfg_sd3 else 1
    k = cfg.refl.grad_steps if cfg.algorithm == "refl" else 1
    k = 2 if cfg.algorithm == "dpo" else k  # a DPO pass holds the chosen and the rejected rows of each pair
    per_sample = c * tokens * d * a
    if m.gradient_checkpointing:
        train_act = k * o.train_batch_size * per_sample * (facts["blocks"] + _ACT_PER_BLOCK)
    else:
        train_act = k * o.train_batch_size * per_sample * _ACT_PER_BLOCK * facts["blocks"]
    sample_act = s.batch_size * per_sample * _ACT_PER_BLOCK
    sample_act += s.batch_size * s.height * s.width * facts["vae_channels"] * a * _VAE_PER_PIXEL

    latent = facts["latent_channels"] * (s.height // f) * (s.width // f) * 4
    if cfg.algorithm == "flow_grpo":
        g = cfg.flow_grpo
        n_local, stored = g.prompts_per_step // world * g.group_size, (s.num_steps + 1) * latent
    elif cfg.algorithm == "diffusion_nft":
        n = cfg.diffusion_nft
        n_local, stored = n.prompts_per_step // world * n.group_size, latent
    elif cfg.algorithm == "awm":
        n_local, stored = cfg.awm.prompts_per_step // world * cfg.awm.group_size, latent
    elif cfg.algorithm == "dpo":
        d = cfg.dpo
        online = d.mode == "online"
        n_local = d.prompts_per_step // world * d.group_size if online else 2 * (d.pairs_per_step // world)
        stored = latent
    else:
        n_local, stored = cfg.refl.prompts_per_step // world, latent
    buffers = n_local * (l_txt * facts["text_width"] * b_w * (2 if cfg_sd3 else 1) + stored)

    notes = [f"{n_local} samples a step on each of {world} process(es)"]
    if fsdp > 1:
        notes.append(f"FSDP: transformer and trained tensors / {world}")
    elif zero:
        notes.append(f"ZeRO-{zero}: AdamW states{' and grads' if zero == 2 else ''} / {world}")
    return MemoryEstimate(
        weights=int(weights),
        trained=int(trained),
        buffers=int(buffers),
        activations=int(max(train_act, sample_act)),
        rewards=int(reward_bytes),
        overhead=GiB if cuda else 0,
        params=int(facts["params"]),
        trainable_params=int(p_train),
        source=facts["source"],
        notes=notes,
    )


def _device_capacity(device: str) -> tuple[int, str] | None:
    """``(bytes, name)`` of the GPU's total memory, or None on the CPU (nothing to compare with)."""
    import torch

    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return None
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return int(props.total_memory), f"{props.name} (cuda:{index})"


def _memory_fix(cfg) -> str:
    m, o = cfg.model, cfg.optim
    steps = []
    if not m.gradient_checkpointing:
        steps.append("set model.gradient_checkpointing=true")
    if m.dtype == "float32":
        steps.append("use model.dtype=bfloat16")
    if m.lora_rank == 0:
        steps.append("train a LoRA (model.lora_rank=32)")
        if cfg.zero_stage < 2 and not cfg.fsdp:
            steps.append(
                "shard it over several GPUs (fsdp=true, or zero_stage=2 for the gradients and AdamW states)"
            )
    if o.train_batch_size > 1 or cfg.sample.batch_size > 1:
        steps.append("lower optim.train_batch_size and sample.batch_size")
    steps.append("or use a GPU with more memory")
    return ", ".join(steps[:-1]).capitalize() + (", " if len(steps) > 1 else "") + steps[-1] + "."


def check_memory(
    cfg, location: ModelLocation | None, reward_bytes: int, uncached: list[str], device: str
) -> Finding:
    try:
        root = location.directory() if location is not None and location.available else None
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        est = estimate_memory(
            cfg, root, reward_bytes=reward_bytes, cuda=device.startswith("cuda"), num_processes=world
        )
    except UnknownModelSize:
        return Finding(
            "memory",
            "WARN",
            f"cannot estimate: the weights of {cfg.model.path} are not present offline and its size is not known",
            "Download the model first (see the model check), then run doctor again.",
        )
    except (OSError, ValueError, KeyError) as err:
        return Finding(
            "memory",
            "WARN",
            f"cannot estimate: {err.__class__.__name__}: {err}",
            "Check that the model directory holds complete config.json and safetensors files.",
        )
    train_kind = "full fine-tuning" if cfg.model.lora_rank == 0 else "LoRA"
    parts = [
        f"weights {gib(est.weights)} ({count(est.params)} params at {cfg.model.dtype})",
        f"trained {gib(est.trained)} ({count(est.trainable_params)} {train_kind} params, grads, AdamW)",
        f"buffers {gib(est.buffers)}",
        f"activations {gib(est.activations)}",
    ]
    if est.rewards:
        parts.append(f"rewards {gib(est.rewards)}")
    if est.overhead:
        parts.append(f"CUDA overhead {gib(est.overhead)}")
    notes = list(est.notes)
    if uncached:
        notes.append(f"not counted: the weights of {', '.join(uncached)} (not cached)")
    msg = (
        f"estimated peak ~{gib(est.total)} a process = {' + '.join(parts)}; {'; '.join(notes)}; "
        f"from {est.source}; an estimate, not a measurement"
    )
    capacity = _device_capacity(device)
    if capacity is None:
        return Finding("memory", "OK", msg + f"; no GPU on {device} to compare with")
    total, what = capacity
    share = est.total / total
    msg += f"; {share:.0%} of {gib(total)} on {what}"
    if share > 1.0:
        return Finding("memory", "FAIL", msg, _memory_fix(cfg))
    if share > 0.85:
        return Finding("memory", "WARN", msg + " (little headroom)", _memory_fix(cfg))
    return Finding("memory", "OK", msg)
