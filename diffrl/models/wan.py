"""Adapter for Wan 2.1 / 2.2 text-to-video (``WanPipeline``): UMT5 prompt embeddings zero-padded to a fixed length,
video latents ``(B, C, F', h, w)``, CFG with a negative prompt, a statically shifted flow-matching schedule, the 3-D
causal VAE, Wan 2.2's second (low-noise) expert ``transformer_2`` switched in below ``boundary_ratio``, and Wan 2.2
TI2V-5B's text-to-video mode (``expand_timesteps=True``: the 48-channel, 16x-spatial Wan 2.2 VAE, and a timestep per
video token, all at the sample's timestep without an image, as ``pipeline_wan.py``'s ``expand_timesteps`` branch).

Sources: diffusers' ``pipelines/wan/pipeline_wan.py`` (prompt padding, ``prepare_latents``' frame rule
``F' = (F - 1) / 4 + 1``, the CFG combination, the expert switch ``t >= boundary_ratio * 1000``, the latent
de-normalisation ``z * std + mean`` before decoding, the per-token timesteps of ``expand_timesteps``); the Wan report
(arXiv:2503.20314, section 3) for the VAE's 4x temporal / 8x spatial compression, and Wan 2.2's release notes for the
two-expert (MoE) denoiser and the TI2V-5B model's 4x16x16 VAE. TI2V's image-conditioned mode (another pipeline class
with ``expand_timesteps``) is refused at construction.

How it departs from the pipeline:

* the released checkpoints ship ``UniPCMultistepScheduler`` with flow sigmas; diffrl samples with its own Euler /
  SDE / CPS steps on the *same levels* (:meth:`WanModel.schedule`), so a pipeline run with UniPC is not reproduced
  step by step (a pipeline with ``FlowMatchEulerDiscreteScheduler``, as the tiny one, is);
* with UniPC the pipeline feeds the transformer integer timesteps ``int(1000 s)``; the adapter feeds ``1000 s``
  (less than one timestep apart), so the velocity is a smooth function of the level, as the samplers assume;
* Wan 2.2's ``guidance_scale_2`` (the low-noise expert's CFG scale) is an attribute of the adapter, not an argument
  of ``velocity``: ``WanModel.guidance_scale_2`` (default None: ``guidance_scale`` for both experts, as the pipeline);
* a two-expert (Wan 2.2 A14B) model trains one expert per run (``expert="high"`` or ``"low"``, as the Wan 2.2 LoRA
  recipes of DiffSynth-Studio and musubi-tuner train a high-noise and a low-noise LoRA separately; the other expert
  stays frozen and its steps carry no gradient) or both (``expert="both"``, as Pref-GRPO's Wan 2.2 script
  ``scripts/lora/lora_ur_flex_prefgrpo_wan22.sh`` does): :class:`WanExperts` holds the two as one module, each expert
  trained on the levels the pipeline's switch routes to it, one optimiser over both, and the LoRA saved as two
  diffusers files (the low-noise one in ``transformer_2/``, loaded with ``load_into_transformer_2=True``). Under FSDP2
  (one expert trained or both) each expert is sharded as its own root, the frozen one too, and every velocity call
  keeps the processes' expert passes in step (:meth:`WanModel.set_shard_sync`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..samplers import sigmas_from_scheduler_config
from .base import Conditioning, FlowModel

__all__ = [
    "WanExperts",
    "WanModel",
    "WAN_EXPERT_FILE",
    "WAN_LORA_TARGETS",
    "WAN_SECOND_EXPERT_DIR",
    "check_num_frames",
    "unipc_flow_sigmas",
]

#: Written next to a LoRA of Wan 2.2's experts: ``{"expert": "high" | "low" | "both"}``.
WAN_EXPERT_FILE = "diffrl_wan_expert.json"
#: The folder, inside a LoRA of both experts, holding the low-noise expert's diffusers LoRA file.
WAN_SECOND_EXPERT_DIR = "transformer_2"
#: The values of ``expert`` (``model.expert``): one of Wan 2.2's experts, or both.
WAN_EXPERTS = ("high", "low", "both")

# The projections of both attentions of every block (self-attention ``attn1`` over the video tokens,
# cross-attention ``attn2`` to the prompt), the LoRA targets of diffusers' Wan LoRA training examples.
WAN_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def check_num_frames(num_frames, temporal_factor: int = 4) -> int:
    """``num_frames`` if the VAE can encode it (Wan's rule ``(F - 1) % 4 == 0``: a first frame, then groups of 4),
    else a one-sentence ``ValueError`` naming the nearest valid counts."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames={num_frames!r} must be a positive integer such as 81 (Wan's default).")
    if (num_frames - 1) % temporal_factor:
        lower = (num_frames - 1) // temporal_factor * temporal_factor + 1
        raise ValueError(
            f"num_frames={num_frames} must be 1 more than a multiple of {temporal_factor} for Wan's VAE; "
            f"use {lower} or {lower + temporal_factor}."
        )
    return num_frames


def unipc_flow_sigmas(
    num_steps: int,
    *,
    flow_shift: float,
    num_train_timesteps: int = 1000,
    final_sigmas_type: str = "zero",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``T + 1`` float32 levels of ``UniPCMultistepScheduler(use_flow_sigmas=True)`` (Wan's released scheduler):
    ``linspace(1, 1/N, T + 1)[:-1]`` in float64, shifted statically ``shift * s / (1 + (shift - 1) * s)``, the first
    level nudged to ``1 - 1e-6`` when it is 1, then the final level (0, or the last one for ``sigma_min``)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(
            f"num_steps={num_steps!r} must be a positive integer; pass the number of sampling steps."
        )
    sig = np.linspace(1, 1 / num_train_timesteps, num_steps + 1)[:-1]
    sig = flow_shift * sig / (1 + (flow_shift - 1) * sig)
    if np.fabs(sig[0] - 1) < 1e-6:
        sig[0] -= 1e-6
    if final_sigmas_type == "zero":
        last = 0.0
    elif final_sigmas_type == "sigma_min":
        last = sig[-1]
    else:
        raise ValueError(f"final_sigmas_type={final_sigmas_type!r} must be 'zero' or 'sigma_min'.")
    sig = np.concatenate([sig, [last]]).astype(np.float32)
    return torch.from_numpy(sig).to(device)


class _IdleExpertLink(torch.autograd.Function):
    """``out`` unchanged (a copy); in backward ``out``'s gradient passes through and each idle expert's output gets an
    exact zero gradient, so the backward traverses the idle experts' graphs (FSDP2's per-module all-gathers and
    reduce-scatters run on every process alike) while adding exactly 0 to their weights' gradients."""

    @staticmethod
    def forward(ctx, out, *idle):
        ctx.idle = [(x.shape, x.dtype, x.device) for x in idle]
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.idle))


class WanExperts(torch.nn.Module):
    """Wan 2.2's two experts as one module, the adapter's :attr:`WanModel.transformer` when both train
    (``expert="both"``): its parameters are ``high.*`` (the pipeline's ``transformer``) then ``low.*``
    (``transformer_2``), so the optimiser, gradient clipping, EMA and checkpoints cover both; LoRA, gradient
    checkpointing and the adapter switches (reference policy, old-policy copies) apply to both. It is not called
    itself: :meth:`WanModel.velocity` sends each sample to the expert its timestep routes to."""

    def __init__(self, high: torch.nn.Module, low: torch.nn.Module):
        super().__init__()
        self.high = high
        self.low = low

    def forward(self, *args, **kwargs):
        raise TypeError(
            "WanExperts holds Wan 2.2's two experts and is not called itself; use WanModel.velocity, which routes "
            "each sample to its expert."
        )

    @property
    def experts(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        return (self.high, self.low)

    @property
    def config(self):
        """The high-noise expert's config (both experts share their geometry)."""
        return self.high.config

    @property
    def device(self) -> torch.device:
        return self.high.device

    @property
    def dtype(self) -> torch.dtype:
        return self.high.dtype

    @property
    def peft_config(self) -> dict:
        """The adapters' configs (the same on both experts: they are added to both at once)."""
        return getattr(self.high, "peft_config", None) or {}

    def enable_gradient_checkpointing(self) -> None:
        for expert in self.experts:
            expert.enable_gradient_checkpointing()

    def add_adapter(self, config, adapter_name: str = "default") -> None:
        for expert in self.experts:
            expert.add_adapter(config, adapter_name=adapter_name)

    def set_adapter(self, adapter_name) -> None:
        for expert in self.experts:
            expert.set_adapter(adapter_name)

    def disable_adapters(self) -> None:
        for expert in self.experts:
            expert.disable_adapters()

    def enable_adapters(self) -> None:
        for expert in self.experts:
            expert.enable_adapters()


class WanModel(FlowModel):
    """Wan text-to-video: latents ``(B, C, F', h, w)`` with ``F' = (num_frames - 1) / 4 + 1``, decoded to videos
    ``(B, num_frames, 3, H, W)`` in [0, 1].

    ``num_frames`` is a setting of the adapter (default :attr:`default_num_frames`, 81 as the pipeline), read by
    :meth:`latent_shape` and so by :meth:`sample_noise`; a run sets it from ``sample.num_frames``. Prompts are encoded
    one at a time, cached without their padding, and zero-padded to ``max_sequence_length`` tokens as the pipeline
    pads them (the transformer sees the padding, with no mask). CFG is ``v = v_u + w (v_c - v_u)`` when
    ``guidance_scale > 1`` and the conditioning holds a negative prompt; both passes run as one batch.

    With two experts (Wan 2.2 A14B), a sample whose timestep ``1000 s`` is at least ``boundary_ratio * 1000`` goes
    through the pipeline's ``transformer`` (high noise), the others through ``transformer_2``; a batch of mixed levels
    is split. :attr:`transformer` is what trains (:meth:`set_training_expert`): one expert, or both as one
    :class:`WanExperts` module (the high-noise expert until an expert is chosen).
    """

    family = "wan"
    pipeline_class_name = "WanPipeline"
    is_video = True
    uses_negative_prompt = True
    guidance_is_cfg = True
    default_num_steps = 50  # WanPipeline's defaults
    default_guidance_scale = 5.0
    default_num_frames = 81
    default_lora_rank = 32
    default_lora_alpha = 32
    default_lora_targets = WAN_LORA_TARGETS
    shard_block_lists = ("blocks",)  # WanTransformer3DModel's blocks, sharded one by one under FSDP2
    _num_frames = default_num_frames  # also for the size check on config files alone (check_image_size)
    # Every prompt is padded to max_sequence_length (512) UMT5 tokens, attended to by cross-attention; the estimate
    # counts them with the video tokens (an upper bound: they are keys and values only).
    memory_text_tokens = 512

    # ------------------------------------------------------------------ sizes for the memory estimate
    @classmethod
    def token_patch_size(cls, transformer_config: dict) -> int:
        """The spatial patch of ``patch_size = (frames, height, width)`` (2 in the released checkpoints; the frame
        patch is 1, so each latent frame gives its own tokens)."""
        return int(transformer_config["patch_size"][1])

    @classmethod
    def vae_geometry(cls, vae_config: dict) -> tuple[int, int, int]:
        """AutoencoderKLWan: ``scale_factor_spatial`` (else one halving per ``temperal_downsample`` entry),
        full-resolution decoder blocks of ``base_dim * dim_mult[0]`` channels, ``z_dim`` latent channels. The Wan 2.2
        VAE (``patch_size`` 2) decodes ``decoder_base_dim * dim_mult[0]`` channels at half the resolution and unfolds
        2x2 patches into pixels: that many channels / 4 per output pixel."""
        factor = vae_config.get("scale_factor_spatial") or 2 ** len(vae_config["temperal_downsample"])
        base = vae_config.get("decoder_base_dim") or vae_config["base_dim"]
        patch = int(vae_config.get("patch_size") or 1)
        channels = int(base) * int(vae_config["dim_mult"][0]) // (patch * patch)
        return int(factor), channels, int(vae_config["z_dim"])

    @classmethod
    def transformer_geometry(cls, transformer_config: dict) -> tuple[int, int, int]:
        """``(num_attention_heads * attention_head_dim, num_layers, text_dim)`` (UMT5's width, 4096)."""
        c = transformer_config
        return (
            int(c["num_attention_heads"]) * int(c["attention_head_dim"]),
            int(c["num_layers"]),
            int(c["text_dim"]),
        )

    @classmethod
    def memory_frames(cls, num_frames: int, vae_config: dict) -> tuple[int, int]:
        """``(F', t)``: ``F' = (F - 1) / t + 1`` latent frames of ``F = num_frames`` (0: :attr:`default_num_frames`)
        and the VAE's temporal factor ``t`` (``scale_factor_temporal``, else one halving per ``True`` in
        ``temperal_downsample``): AutoencoderKLWan decodes one latent frame, ``t`` video frames, at a time."""
        t = vae_config.get("scale_factor_temporal") or 2 ** sum(
            bool(x) for x in vae_config["temperal_downsample"]
        )
        f = check_num_frames(num_frames or cls.default_num_frames, int(t))
        return (f - 1) // int(t) + 1, int(t)

    def __init__(
        self,
        pipe,
        *,
        max_sequence_length: int = 512,
        num_frames: int | None = None,
        expert: str | None = None,
        guidance_scale_2: float | None = None,
        prompt_cache_size: int = 4096,
    ):
        #: Wan 2.2 TI2V-5B (``expand_timesteps=True``): the transformer gets one timestep per video token
        self.expand_timesteps = bool(getattr(pipe.config, "expand_timesteps", False))
        if self.expand_timesteps and type(pipe).__name__ != "WanPipeline":
            raise NotImplementedError(
                f"Wan 2.2 TI2V's image-conditioned mode ({type(pipe).__name__} with expand_timesteps=True: the first "
                "frame's latent kept clean, its tokens at timestep 0) is not implemented in diffrl; load the checkpoint "
                "with WanPipeline for text-to-video."
            )
        if pipe.transformer is None:
            raise NotImplementedError(
                "a Wan pipeline without its high-noise transformer is not supported; load one with `transformer`."
            )
        super().__init__(pipe, prompt_cache_size=prompt_cache_size)
        if not 0 < max_sequence_length <= 1024:
            raise ValueError(f"max_sequence_length={max_sequence_length!r} must be in 1..1024 for Wan.")
        self.max_sequence_length = max_sequence_length
        self.transformer_2 = getattr(pipe, "transformer_2", None)
        self.high_noise_expert = pipe.transformer
        self.expert: str | None = None
        ratio = pipe.config.boundary_ratio
        if (ratio is None) != (self.transformer_2 is None):
            raise ValueError(
                f"this Wan pipeline has boundary_ratio={ratio!r} but {'no' if self.transformer_2 is None else 'a'} "
                "transformer_2; a two-expert (Wan 2.2) pipeline needs both."
            )
        self.boundary_timestep = (
            None if ratio is None else ratio * self.scheduler_config["num_train_timesteps"]
        )
        self.scheduler_kind = type(pipe.scheduler).__name__
        self._num_frames = self.default_num_frames
        if num_frames is not None:
            self.num_frames = num_frames
        if expert is not None:
            self.set_training_expert(expert)
        if guidance_scale_2 is not None and self.transformer_2 is None:
            raise ValueError(
                f"guidance_scale_2={guidance_scale_2!r} is the CFG scale of Wan 2.2's low-noise expert, but this model "
                "has one transformer; leave it unset."
            )
        #: Wan 2.2: the CFG scale of the low-noise expert's steps (None: the ``guidance_scale`` of the call)
        self.guidance_scale_2 = guidance_scale_2
        #: FSDP2 (:meth:`set_shard_sync`): "true on any process" of a bool tensor, and the sharded experts
        self._shard_sync = None
        self._sharded_experts: tuple[torch.nn.Module, ...] = ()

    def set_training_expert(self, expert: str) -> None:
        """Wan 2.2 (two experts): train the ``"high"``-noise expert (``transformer``, timesteps at least
        ``boundary_ratio * 1000``), the ``"low"``-noise one (``transformer_2``) or ``"both"``. :attr:`transformer`
        becomes that expert (both: a :class:`WanExperts` holding the two): LoRA, full fine-tuning, gradient
        checkpointing, saving and the reference policy all apply to it; with one expert the other stays frozen. A
        saved low-noise LoRA loads with ``pipe.load_lora_weights(path, load_into_transformer_2=True)``; a LoRA of
        both is two files, see :meth:`save_lora`."""
        if self.transformer_2 is None:
            raise ValueError(
                f"expert={expert!r} chooses one of Wan 2.2's two experts, but this model has one transformer; "
                "leave it unset."
            )
        if expert not in WAN_EXPERTS:
            raise ValueError(
                f"expert={expert!r} must be 'high' (transformer), 'low' (transformer_2) or 'both'."
            )
        if self._mode != "frozen":
            raise ValueError("choose the expert before add_lora() or set_full_finetuning().")
        self.expert = expert
        if expert == "both":
            self.transformer = WanExperts(self.high_noise_expert, self.transformer_2)
        else:
            self.transformer = self.high_noise_expert if expert == "high" else self.transformer_2

    # ------------------------------------------------------------------ FSDP2
    def _experts_to_shard(self) -> list[torch.nn.Module]:
        """Both experts once one (or both) trains: the frozen one is sharded too (its weights are as large as the
        trained one's), else the trained transformer alone."""
        if self.transformer_2 is None or self.expert is None:
            return [self.transformer]
        return [self.high_noise_expert, self.transformer_2]

    def shard_blocks(self) -> list[torch.nn.Module]:
        """The blocks FSDP2 shards one by one: every ``blocks`` list of the experts :meth:`shard_roots` names."""
        return [
            block
            for expert in self._experts_to_shard()
            for name in self.shard_block_lists
            for block in (getattr(expert, name, None) or [])
        ]

    def shard_roots(self) -> list[torch.nn.Module]:
        """The transformer; with Wan 2.2's experts (one or both trained) each expert, its own FSDP2 root (the
        :class:`WanExperts` module holding both is never called), the frozen one too: its blocks' all-gathers then
        run only while it denoises, so a process holds 1/N of both experts' weights."""
        return self._experts_to_shard()

    def set_shard_sync(self, any_over_processes) -> None:
        """FSDP2 with two experts: from now on every velocity call runs each sharded expert on every process
        whenever the call routes rows to it on *any* process (found with ``any_over_processes``, one small
        all-reduce a call), a process without such rows running it on an idle input of one token whose output is
        joined to the velocity with an exact zero gradient. So the processes issue the same all-gathers (forward)
        and reduce-scatters (backward, which reaches the idle experts through the zero link) in the same order, even
        when levels drawn per sample or per process route their rows differently, and the gradients stay those of
        an unsharded run: the idle passes add exactly 0, as DDP's all-reduce adds a zero gradient for an expert a
        process did not use. Every process must make the same number of velocity calls (what FSDP requires of
        every family). A model with one transformer needs nothing."""
        if self.transformer_2 is None:
            return
        self._shard_sync = any_over_processes
        self._sharded_experts = tuple(self.shard_roots())

    # ------------------------------------------------------------------ geometry
    @property
    def num_frames(self) -> int:
        """Frames of the videos this adapter samples and decodes."""
        return self._num_frames

    @num_frames.setter
    def num_frames(self, value: int) -> None:
        self._num_frames = check_num_frames(value, self.temporal_factor)

    @property
    def temporal_factor(self) -> int:
        return int(getattr(self.vae.config, "scale_factor_temporal", None) or 4)

    @property
    def vae_scale_factor(self) -> int:
        return int(getattr(self.vae.config, "scale_factor_spatial", None) or 8)

    @property
    def native_size(self) -> int:
        """The pipeline's default height (480 pixels; its default width is 832)."""
        return 480

    @property
    def trains_some_levels_only(self) -> bool:
        """True when one of two experts trains: the other expert's levels give losses without a graph."""
        return self.expert in ("high", "low") and self._mode != "frozen"

    @property
    def trains_several_experts(self) -> bool:
        """True when both of Wan 2.2's experts train (``expert="both"``): a step's backward reaches only the experts of
        the levels it trains, so some trained weights get no gradient from it."""
        return self.expert == "both" and self._mode != "frozen"

    @property
    def num_experts(self) -> int:
        return 1 if self.transformer_2 is None else 2

    def latent_frames(self, num_frames: int | None = None) -> int:
        """Latent frames ``(F - 1) / 4 + 1`` of a ``F``-frame video (default: :attr:`num_frames`)."""
        f = self.num_frames if num_frames is None else check_num_frames(num_frames, self.temporal_factor)
        return (f - 1) // self.temporal_factor + 1

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.vae_scale_factor
        patch = self.transformer.config.patch_size
        self._check_size(height, width, f * patch[1])
        return (self.transformer.config.in_channels, self.latent_frames(), height // f, width // f)

    def schedule(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The pipeline scheduler's levels: ``FlowMatchEulerDiscreteScheduler``'s static shift, or, for the released
        ``UniPCMultistepScheduler`` with flow sigmas, :func:`unipc_flow_sigmas` with its ``flow_shift``."""
        self.latent_shape(height, width)
        cfg = self.scheduler_config
        if self.scheduler_kind == "FlowMatchEulerDiscreteScheduler":
            return sigmas_from_scheduler_config(cfg, num_steps, device=self.device)
        if self.scheduler_kind == "UniPCMultistepScheduler" and cfg.get("use_flow_sigmas"):
            for opt in ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas"):
                if cfg.get(opt):
                    raise NotImplementedError(
                        f"the Wan scheduler option {opt}={cfg.get(opt)!r} is not supported by diffrl's samplers; "
                        "use Wan's released scheduler config."
                    )
            return unipc_flow_sigmas(
                num_steps,
                flow_shift=float(cfg.get("flow_shift", 1.0)),
                num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
                final_sigmas_type=cfg.get("final_sigmas_type", "zero"),
                device=self.device,
            )
        raise NotImplementedError(
            f"a Wan pipeline with {self.scheduler_kind} is not supported; use FlowMatchEulerDiscreteScheduler or "
            "UniPCMultistepScheduler(use_flow_sigmas=True)."
        )

    # ------------------------------------------------------------------ text
    def _encode_uncached(self, prompts):
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        rows = []
        for prompt in prompts:
            embeds, _ = self.pipe.encode_prompt(
                prompt=[prompt],
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
                device=self.device,
            )
            tokens = self.pipe.tokenizer(
                [prompt_clean(prompt)],
                padding="max_length",
                max_length=self.max_sequence_length,
                truncation=True,
                add_special_tokens=True,
                return_attention_mask=True,
            )
            n = int(sum(tokens["attention_mask"][0]))
            rows.append((embeds[0, :n].to(self.dtype),))  # the pipeline's padding is zeros: cached without it
        return rows

    def _pad(self, rows) -> torch.Tensor:
        length = self.max_sequence_length
        return torch.stack(
            [torch.cat([r[0], r[0].new_zeros(length - r[0].shape[0], r[0].shape[1])]) for r in rows]
        )

    def _assemble(self, rows, negative_rows):
        embeds = self._pad(rows)
        cond = Conditioning(prompt_embeds=embeds, pooled=embeds.new_zeros(len(rows), 0))
        if negative_rows is not None:
            neg = self._pad(negative_rows)
            cond.negative_prompt_embeds = neg
            cond.negative_pooled = neg.new_zeros(len(rows), 0)
        return cond

    # ------------------------------------------------------------------ video
    def set_vae_tiling(self, enabled: bool = True, *, tile_size: int = 0, tile_stride: int = 0) -> None:
        """Decode in overlapping spatial tiles of ``tile_size`` pixels (0: diffusers' 256), ``tile_stride`` pixels apart
        (0: 192), blended where they overlap: diffusers' ``AutoencoderKLWan.enable_tiling`` (each tile runs through the
        causal decoder frame by frame, so the decoder's activations scale with the tile). The video differs from the
        untiled decode near the seams; ``enabled=False`` decodes whole frames again."""
        if not enabled:
            self.vae.disable_tiling()
            return
        size, stride = tile_size or 256, tile_stride or 192
        for name, value in (("tile_size", size), ("tile_stride", stride)):
            if not isinstance(value, int) or value <= 0 or value % self.vae_scale_factor:
                raise ValueError(
                    f"{name}={value!r} must be a positive multiple of the VAE's {self.vae_scale_factor}x compression."
                )
        if stride >= size:
            raise ValueError(
                f"tile_stride={stride} must be less than tile_size={size}; the overlap is blended."
            )
        self.vae.enable_tiling(
            tile_sample_min_height=size,
            tile_sample_min_width=size,
            tile_sample_stride_height=stride,
            tile_sample_stride_width=stride,
        )

    def set_vae_slicing(self, enabled: bool = True) -> None:
        """Decode the videos of a batch one at a time (diffusers' ``enable_slicing``): the same videos, the decoder's
        activations of one video at once."""
        if enabled:
            self.vae.enable_slicing()
        else:
            self.vae.disable_slicing()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, F', h, w)`` -> videos ``(B, F, 3, H, W)`` in [0, 1], float32, differentiable (the
        pipeline's de-normalisation ``z * std + mean`` per channel, then the causal 3-D VAE)."""
        if latents.ndim != 5:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)}; Wan decodes video latents (B, C, frames, h, w)."
            )
        cfg = self.vae.config
        z = latents.to(self.vae.dtype)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        video = self.vae.decode(z / inv_std + mean, return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    # ------------------------------------------------------------------ velocity
    def _expert_mask(self, t: torch.Tensor) -> torch.Tensor | None:
        """``(B,)`` True where the high-noise expert denoises; None with one expert."""
        if self.boundary_timestep is None:
            return None
        return t.float() >= self.boundary_timestep

    def _run(self, transformer, hidden, t, embeds, image=None):
        # image: Wan 2.1 image-to-video's CLIP embeddings of the source image (None for text-to-video)
        if self.expand_timesteps:
            # Wan 2.2 TI2V text-to-video, as the pipeline: every token of a sample at the sample's timestep, (B, L)
            # with L = F' * (h / 2) * (w / 2) tokens of the (1, 2, 2) patches
            p_t, p_h, p_w = transformer.config.patch_size
            f, h, w = hidden.shape[2:]
            t = t.float().view(-1, 1).expand(-1, (f // p_t) * (h // p_h) * (w // p_w))
        return transformer(
            hidden_states=hidden,
            timestep=t,
            encoder_hidden_states=embeds,
            encoder_hidden_states_image=image,
            return_dict=False,
        )[0]

    def _predict(self, hidden, t, embeds, image=None):
        high = self._expert_mask(t)
        if high is not None and self._shard_sync is not None:
            return self._predict_in_step(hidden, t, embeds, image, high)
        if high is None or bool(high.all()):
            return self._run(self.high_noise_expert, hidden, t, embeds, image)
        if not bool(high.any()):
            return self._run(self.transformer_2, hidden, t, embeds, image)
        # the transformer's output channels: fewer than its input's in image-to-video (the condition channels)
        out = hidden.new_empty(
            (hidden.shape[0], self.high_noise_expert.config.out_channels, *hidden.shape[2:])
        )
        for mask, transformer in ((high, self.high_noise_expert), (~high, self.transformer_2)):
            part = None if image is None else image[mask]
            out[mask] = self._run(transformer, hidden[mask], t[mask], embeds[mask], part).to(out.dtype)
        return out

    def _predict_in_step(self, hidden, t, embeds, image, high):
        """:meth:`_predict` under FSDP2 (:meth:`set_shard_sync`): the experts in a fixed order (high, then low), each
        on its rows, and a sharded expert that has none here but some on another process on an idle input. Both
        experts' forwards come before the outputs are merged, so the backward reaches the low-noise expert's
        modules before the high-noise one's on every process (autograd runs later-recorded nodes first)."""
        experts = ((high, self.high_noise_expert), (~high, self.transformer_2))
        wanted = self._shard_sync(torch.stack([mask.any() for mask, _ in experts]))
        results, idle = [], []
        for (mask, transformer), anywhere in zip(experts, wanted.tolist(), strict=True):
            if bool(mask.any()):
                part = None if image is None else image[mask]
                results.append((mask, self._run(transformer, hidden[mask], t[mask], embeds[mask], part)))
            elif anywhere and any(transformer is e for e in self._sharded_experts):
                idle.append(self._run_idle(transformer, hidden, embeds, image))
        if len(results) == 1:
            out = results[0][1]
        else:
            out = hidden.new_empty(
                (hidden.shape[0], self.high_noise_expert.config.out_channels, *hidden.shape[2:])
            )
            for mask, result in results:
                out[mask] = result.to(out.dtype)
        if idle and torch.is_grad_enabled():
            out = _IdleExpertLink.apply(out, *idle)
        return out

    def _run_idle(self, transformer, hidden, embeds, image):
        """``transformer`` on one zero latent patch (a single token) with one zero text token: the cheapest
        forward that still runs every module (and so every FSDP2 all-gather) of the expert."""
        p_t, p_h, p_w = transformer.config.patch_size
        x = hidden.new_zeros((1, transformer.config.in_channels, p_t, p_h, p_w))
        # as the real passes: a latent with a graph (ReFL's chain) makes FSDP2 hook the first block's backward too
        x.requires_grad_(hidden.requires_grad and torch.is_grad_enabled())
        t = torch.full((1,), float(self.boundary_timestep), dtype=torch.float32, device=hidden.device)
        text = embeds.new_zeros((1, 1, embeds.shape[-1]))
        return self._run(transformer, x, t, text, None if image is None else image[:1])

    def velocity(
        self,
        x: torch.Tensor,
        sigma,
        cond: Conditioning,
        guidance_scale: float = 5.0,
        *,
        detach_uncond: bool = False,
    ) -> torch.Tensor:
        """Velocity ``(B, C, F', h, w)`` in the model's dtype at level(s) ``sigma`` (a float or ``(B,)``), with CFG
        when ``guidance_scale > 1`` and ``cond`` holds negative embeddings (Wan 2.2: the low-noise expert's samples
        guided by :attr:`guidance_scale_2` when it is set); ``detach_uncond=True`` stops the gradient through the
        unconditional prediction."""
        batch = x.shape[0]
        if x.ndim != 5:
            raise ValueError(f"x has shape {tuple(x.shape)}; Wan takes video latents (B, C, frames, h, w).")
        if len(cond) != batch:
            raise ValueError(
                f"cond holds {len(cond)} prompts but x has batch {batch}; encode one prompt per sample."
            )
        hidden = x.to(self.dtype)
        # As the pipeline with its Euler scheduler: the timestep 1000 * s in float32.
        t = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(batch) * 1000
        embeds, image = cond.prompt_embeds, cond.image_embeds
        if not (guidance_scale > 1 and cond.negative_prompt_embeds is not None):
            return self._predict(hidden, t, embeds, image)
        out = self._predict(
            torch.cat([hidden, hidden]),
            torch.cat([t, t]),
            torch.cat([cond.negative_prompt_embeds, embeds]),
            None if image is None else torch.cat([image, image]),  # the image condition on both branches
        )
        uncond, text = out.chunk(2)
        if detach_uncond:
            uncond = uncond.detach()
        guided = uncond + guidance_scale * (text - uncond)
        low = None if self.guidance_scale_2 is None else ~self._expert_mask(t)
        if low is None or not bool(low.any()):
            return guided
        # as the pipeline: the low-noise expert's steps use guidance_scale_2
        low_guided = uncond + self.guidance_scale_2 * (text - uncond)
        return torch.where(low.view(-1, 1, 1, 1, 1), low_guided, guided)

    # ------------------------------------------------------------------ training
    def _refuse_two_experts(self, what: str) -> None:
        if self.transformer_2 is not None and self.expert is None:
            raise ValueError(
                f"{what} of a Wan 2.2 model needs the expert(s) to train: set model.expert to high, low or both "
                "(load_model(..., expert=...))."
            )

    def add_lora(self, *args, **kwargs) -> None:
        """A PEFT LoRA on the transformer (default: r=32, alpha=32 on both attentions' q/k/v/out projections);
        pass ``target_modules=WAN_LORA_TARGETS + ["ffn.net.0.proj", "ffn.net.2"]`` to adapt the feed-forward too.
        Wan 2.2: on the expert chosen with :meth:`set_training_expert`."""
        self._refuse_two_experts("LoRA training")
        super().add_lora(*args, **kwargs)

    def lora_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The adapter's weights (:meth:`FlowModel.lora_state_dict`); with both experts, each expert's weights under
        its :class:`WanExperts` prefix, ``high.`` or ``low.``."""
        if not isinstance(self.transformer, WanExperts):
            return super().lora_state_dict(adapter_name)
        from peft.utils import get_peft_model_state_dict

        if not self.has_lora:
            raise ValueError("this model has no LoRA adapter; call add_lora() first.")
        out = {}
        for prefix, expert in (("high", self.transformer.high), ("low", self.transformer.low)):
            for k, v in get_peft_model_state_dict(expert, adapter_name=adapter_name).items():
                out[f"{prefix}.{k}"] = v
        return out

    def save_lora(self, save_directory, adapter_name: str = "default", state=None):
        """The diffusers LoRA file (:meth:`FlowModel.save_lora`); for Wan 2.2's experts also ``diffrl_wan_expert.json``
        naming the trained one(s), so diffrl's loader puts the LoRA back on them (a plain pipeline needs
        ``load_into_transformer_2=True`` for the low-noise one).

        Both experts (``expert="both"``): the high-noise expert's LoRA in ``save_directory`` and the low-noise one's in
        ``save_directory/transformer_2``, two diffusers LoRA files, as diffusers' Wan loader takes one transformer per
        file: ``pipe.load_lora_weights(d)`` then ``pipe.load_lora_weights(d / "transformer_2",
        load_into_transformer_2=True)``."""
        import json
        from pathlib import Path

        if isinstance(self.transformer, WanExperts):
            state = state if state is not None else self.lora_state_dict(adapter_name)
            parts = {
                p: {k[len(p) + 1 :]: v for k, v in state.items() if k.startswith(p + ".")}
                for p in ("high", "low")
            }
            if sum(map(len, parts.values())) != len(state) or not all(parts.values()):
                raise ValueError(
                    "a LoRA state of both Wan 2.2 experts must hold 'high.' and 'low.' weights only; pass "
                    "lora_state_dict()'s."
                )
            out = Path(save_directory)
            super().save_lora(out, adapter_name=adapter_name, state=parts["high"])
            super().save_lora(out / WAN_SECOND_EXPERT_DIR, adapter_name=adapter_name, state=parts["low"])
        else:
            out = super().save_lora(save_directory, adapter_name=adapter_name, state=state)
        if self.expert is not None:
            (out / WAN_EXPERT_FILE).write_text(json.dumps({"expert": self.expert}) + "\n")
        return out

    def set_full_finetuning(self) -> None:
        self._refuse_two_experts("full fine-tuning")
        super().set_full_finetuning()
