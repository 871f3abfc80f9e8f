"""The engine every trainer shares: set-up, the step loop, and the methods a trainer's step calls.

A trainer subclasses :class:`Trainer` and implements ``train_step(step) -> metrics``; everything else lives in the
engine so each algorithm file reads like its paper's algorithm box. The engine keeps the set-up (one ``_setup_*``
method per part, in the order the checks must run: a bad config, launch, prompt file or reward fails before any
model loads), the loop, and the update (gradient averaging, clipping, optimiser, scheduler, EMA); it hands the rest
to one collaborator each:

* :mod:`diffrl.trainers.distributed`: DDP, FSDP2 and DeepSpeed ZeRO (sharding, collectives, whole tensors);
* :mod:`diffrl.trainers.checkpoints`: writing, verifying, finding, pruning and resuming checkpoints;
* :mod:`diffrl.trainers.tracking`: ``metrics.jsonl``, TensorBoard or W&B, ``status.json``, ``config.json``;
* :mod:`diffrl.trainers.evaluation`: the held-out evaluation and its picture.

Distribution (``accelerate launch``): every process draws the same prompts for a step (from ``seed`` and the step)
and takes its share; it samples whole groups, so group statistics are computed on rewards gathered from all
processes. Under FSDP every process runs the same number of forwards and backwards: evaluation pads the shorter
shares, a local non-finite loss skips the step on every process, and options that make the processes differ
(``flow_grpo.dynamic_sampling``) are refused. Trainers call ``self.backward`` and ``self.discard_gradients`` rather
than the accelerator's or optimiser's own, so the same code runs under DDP, FSDP and DeepSpeed.

Determinism: every random draw (prompts, noise, windows, levels) comes from a generator seeded by ``(seed, step,
...)``, so a resumed run replays exactly what an uninterrupted one does. A sample's noise is keyed by its global row
in the step (not by the process holding it), so N processes draw the same images as one process with the same
global batch.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig, load_config, validate
from ..data import PromptSet, check_reward_metadata, train_eval_prompts
from . import evaluation, tracking
from .checkpoints import CHECKPOINT_PREFIX, CheckpointManager
from .common import RewardError, StepBatch, TrainingAborted, TrainingStopped, seeded_generator
from .distributed import Distributed, assign_, full_tensor
from .monitor import MonitorState
from .objectives import max_variance_subset, text_group_ids
from .stopping import StopSignals

__all__ = [
    "Trainer",
    "StepBatch",
    "seeded_generator",
    "TrainingAborted",
    "TrainingStopped",
    "RewardError",
    "setup_training_mode",
]

_ROW_KEY = 2**31 - 1  # keeps per-row generators apart from the per-process ones of Trainer.generator


def setup_training_mode(model, cfg: TrainConfig) -> str | None:
    """Make ``model`` trainable as ``cfg.model`` says: the VAE dtype, a LoRA (its random init from ``cfg.seed`` only,
    or the weights of ``model.lora_from``) or full fine-tuning, the trained weights in float32 whatever the frozen
    dtype, gradient checkpointing. Returns a line describing the ``model.lora_from`` start, else None."""
    from diffrl.models.loading import set_vae_dtype

    m = cfg.model
    started = None
    set_vae_dtype(model, m.vae_dtype)  # also for a model passed in
    if m.lora_rank == 0:
        model.set_full_finetuning()
    elif m.lora_from:
        from diffrl.models.lora_files import start_lora_from

        if model.has_lora:
            raise ValueError(
                f"model.lora_from={m.lora_from} starts the trained LoRA, but the model passed in already has one; "
                "pass the base model or drop model.lora_from."
            )

        started = start_lora_from(model, m.lora_from, rank=m.lora_rank, alpha=m.lora_alpha)
    elif not model.has_lora:
        with torch.random.fork_rng(devices=[]):  # the LoRA's random init depends on the seed only
            torch.manual_seed(cfg.seed)
            model.add_lora(
                rank=None if m.lora_rank < 0 else m.lora_rank,
                alpha=None if m.lora_alpha < 0 else m.lora_alpha,
                target_modules=m.lora_targets or None,
                init_lora_weights=True if m.lora_init == "default" else m.lora_init,
            )
    for p in model.trainable_parameters():
        p.data = p.data.float()  # trained weights in float32 whatever the frozen dtype
    if m.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return started


class Trainer:
    """Base of the ReFL, Flow-GRPO and DiffusionNFT trainers.

    Args:
        config: a :class:`TrainConfig`, a YAML path or a dict (validated).
        model: an already loaded :class:`diffrl.models.FlowModel` (default: ``load_model(config.model.path)``).
        reward: a reward or a plain function (default: built from ``config.reward``).
        eval_reward: the evaluation reward (default: ``config.eval_reward``, else the training reward).
        train_prompts / eval_prompts: :class:`PromptSet` or lists of prompts (default: from ``config.data``).
    """

    algorithm = ""
    needs_differentiable_reward = False

    def __init__(
        self, config, *, model=None, reward=None, eval_reward=None, train_prompts=None, eval_prompts=None
    ):
        given = {
            k
            for k, v in (("model", model), ("reward", reward), ("train_prompts", train_prompts))
            if v is not None
        }
        self.cfg = self._setup_config(config, given)
        self._setup_distribution(given)
        self._setup_output_dir()
        self._setup_rewards(reward, eval_reward)
        self._setup_prompts(train_prompts, eval_prompts)
        if self.accelerator.is_main_process:
            tracking.check_report_to(self.cfg.report_to)  # before the model loads, not at the first log line
        self._setup_model(model)
        self._setup_optimization()
        self.tracker = tracking.Tracker(self.output_dir, self.cfg, self.accelerator.is_main_process)
        self.monitor = MonitorState()  # the reward-hacking monitor's memory between evaluations

    # ------------------------------------------------------------------------------------------ set-up
    def _setup_config(self, config, given: set[str]) -> TrainConfig:
        cfg = config if isinstance(config, TrainConfig) else load_config(config, given=given)
        if cfg.algorithm != self.algorithm:
            raise ValueError(
                f"config.algorithm={cfg.algorithm!r} but this is the {self.algorithm} trainer; build it with diffrl.train.build_trainer."
            )
        return cfg

    def _setup_distribution(self, given: set[str]) -> None:
        """The accelerator and the launch's FSDP or DeepSpeed settings, checked with the config against the number
        of processes."""
        from accelerate import Accelerator

        cfg = self.cfg
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
        self.dist = Distributed(self.accelerator, cfg)
        validate(
            cfg,
            self.accelerator.num_processes,
            given=given,
            sharded=self.dist.fsdp_requested,
            zero_stage=self.dist.zero_stage,
        )
        self.dist.start(cfg)

    def _setup_output_dir(self) -> None:
        """A writable run directory (a new one, unless resuming) and, when resuming, the checkpoint, verified and
        written with the same config: before anything is loaded, so a mismatch fails at once."""
        cfg = self.cfg
        self.output_dir = Path(cfg.output_dir)
        self.checkpoints = CheckpointManager(self.output_dir, self.accelerator)
        self._check_output_dir()
        if cfg.resume_from_checkpoint:
            resume_path = self.checkpoints.find(cfg.resume_from_checkpoint)
            if resume_path is not None:
                self.checkpoints.check_resume_config(resume_path, cfg)

    def _setup_rewards(self, reward, eval_reward) -> None:
        cfg = self.cfg
        self.reward = self._build_reward(reward, cfg.reward)
        self.eval_reward = (
            self._build_reward(eval_reward, cfg.eval_reward)
            if (eval_reward or cfg.eval_reward)
            else self.reward
        )
        if self.needs_differentiable_reward and not self.reward.differentiable:
            custom = [n for n in cfg.reward if ":" in n]
            hint = (
                f"; a function written in torch is marked with reward_kwargs={{'{custom[0]}': {{differentiable: true}}}}"
                if custom and reward is None
                else ""
            )
            raise ValueError(
                f"the {self.algorithm} trainer backpropagates through the reward, but {self.reward.name!r} is score-only; "
                "use a differentiable reward (hpsv2, pickscore, imagereward, aesthetic, clipscore or a torch function)"
                f"{hint}."
            )

    def _setup_prompts(self, train_prompts, eval_prompts) -> None:
        self.train_set, self.eval_set = self._build_prompts(train_prompts, eval_prompts)
        self._check_metadata()

    def _setup_model(self, model) -> None:
        """The model (loaded unless given) with its LoRA or full fine-tuning set up; ``params`` and
        ``param_names`` are the trained weights."""
        cfg = self.cfg
        if cfg.model.lora_from:  # the LoRA to start from exists and fits the config, before the model loads
            from diffrl.models.lora_files import check_lora_from, resolve_lora

            check_lora_from(resolve_lora(cfg.model.lora_from), cfg.model.lora_rank, cfg.model.lora_alpha)
        # a size the model cannot make fails now, from its config files, before the weights load
        if model is None:
            from diffrl.models.loading import check_image_size

            check_image_size(cfg.model.path, cfg.sample.height, cfg.sample.width)
        self.model = model if model is not None else self._load_model()
        self._check_model_metadata()
        if cfg.group_by == "tokens" and getattr(self.model, "first_tokenizer", lambda: None)() is None:
            raise ValueError(
                f"group_by=tokens reads the prompts back through the model's first tokenizer, and {cfg.model.path} "
                f"({type(self.model).__name__}) has none; use group_by=text."
            )
        self._setup_video()
        self.model.latent_shape(cfg.sample.height, cfg.sample.width)  # a size the model cannot make fails now
        started = setup_training_mode(self.model, cfg)
        if started:
            self.accelerator.print(f"[diffrl] LoRA: {started}")
        # after the training mode is set, which the two flags depend on (the config's check refuses the same before
        # the model loads; these catch a model passed in with its expert chosen)
        if getattr(self.model, "trains_some_levels_only", False) and self.zero_stage:
            raise NotImplementedError(
                "training one of Wan 2.2's experts under DeepSpeed is not implemented (the other expert's steps skip "
                "their backward, which ZeRO's gradient reduction cannot); launch with FSDP (fsdp=true), DDP or one "
                "process."
            )
        if getattr(self.model, "trains_several_experts", False) and self.zero_stage:
            raise NotImplementedError(
                "training both of Wan 2.2's experts under DeepSpeed is not implemented (each backward reaches one "
                "expert's weights only); launch with FSDP (fsdp=true), DDP or one process."
            )
        self.params = [p for p in self.model.trainable_parameters()]
        self.param_names = [n for n, p in self.model.transformer.named_parameters() if p.requires_grad]

    def _check_model_metadata(self) -> None:
        """Every prompt carries the metadata fields the model needs (``required_metadata``: an image-to-video model's
        source image), checked before any sampling, with the file row that lacks one."""
        for key in getattr(self.model, "required_metadata", ()):
            for prompts, source in (
                (self.train_set, self.cfg.data.train or "the training prompts"),
                (self.eval_set, self.cfg.data.eval or self.cfg.data.train or "the evaluation prompts"),
            ):
                rows = [i for i, row in enumerate(prompts.metadata) if row.get(key) is None]
                if rows:
                    raise ValueError(
                        f"{self.cfg.model.path} ({type(self.model).__name__}) needs the metadata field {key!r} on every "
                        f"prompt, and {source} has none on {len(rows)} of {len(prompts)} prompts (e.g. "
                        f"{prompts.prompts[rows[0]]!r}); use a .jsonl prompt file with an {key!r} field per line (an "
                        "image path, relative to the file)."
                    )

    def _setup_video(self) -> None:
        """A video model (an adapter with ``is_video``): ``sample.num_frames`` set on it, and the rewards made video
        rewards (image rewards score the frames ``video`` chooses; a clip reward sees whole videos), said in one line."""
        from ..config import ConfigError

        cfg = self.cfg
        if not getattr(self.model, "is_video", False):
            if cfg.sample.num_frames:
                raise ConfigError(
                    f"sample.num_frames={cfg.sample.num_frames} is for video models, but {cfg.model.path} makes "
                    "images; set it to 0."
                )
            for name in ("vae_tiling", "vae_slicing"):
                if getattr(cfg.video, name):
                    raise ConfigError(
                        f"video.{name}=true is for video models, but {cfg.model.path} makes images; set it to false."
                    )
            return
        from diffrl.rewards import for_video

        if cfg.sample.num_frames:
            self.model.num_frames = cfg.sample.num_frames
        v = cfg.video
        if v.vae_tiling:
            self.model.set_vae_tiling(tile_size=v.vae_tile_size, tile_stride=v.vae_tile_stride)
        if v.vae_slicing:
            self.model.set_vae_slicing()
        options = dict(frames=v.frames or None, every=v.every, num=v.num, combine=v.combine)
        same = self.eval_reward is self.reward
        self.reward = for_video(self.reward, **options)
        self.eval_reward = self.reward if same else for_video(self.eval_reward, **options)
        describe = getattr(self.reward, "describe", None)
        line = (
            describe(self.model.num_frames)
            if describe is not None
            else f"reward {self.reward.name!r} scores whole clips of {self.model.num_frames} frames"
        )
        self.accelerator.print(f"[diffrl] video: {line}")

    def _setup_optimization(self) -> None:
        """The trainer's own set-up, FSDP sharding, the optimiser, scheduler and EMA, DeepSpeed's engine."""
        self.step = 0
        self.bad_steps = 0
        self._state_size_logged = False  # memory/optimizer_state_mib: logged once, after the first update
        if self.sharded:
            # every adapter exists before sharding, and the optimiser, scheduler and EMA hold the sharded parameters
            self.setup()
            self.params = self.dist.shard_transformer(self.model, self.param_names)
            self.after_sharding()
            self._build_optimization()
        else:
            self._build_optimization()
            self.setup()
        self.dist.init_deepspeed(self.model.transformer, self.optimizer, self.params, self.cfg)

    def _build_optimization(self) -> None:
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        self.ema = [p.detach().clone() for p in self.params] if self.cfg.ema_decay > 0 else None

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world(self) -> int:
        return self.dist.world

    @property
    def sharded(self) -> bool:
        """Whether the transformer is sharded with FSDP2 (asked for, with several processes)."""
        return self.dist.sharded

    @property
    def zero_stage(self) -> int:
        """The DeepSpeed ZeRO stage (0: no DeepSpeed)."""
        return self.dist.zero_stage

    @property
    def ds_engine(self):
        """DeepSpeed's engine under ZeRO, else ``None``."""
        return self.dist.ds_engine

    def setup(self) -> None:
        """Algorithm-specific set-up (after model and optimiser; under FSDP after the model, before sharding)."""

    def after_sharding(self) -> None:
        """Collect again the parameters a trainer holds besides ``self.params``: ``fully_shard`` replaces them."""

    def _check_output_dir(self) -> None:
        if not self.cfg.resume_from_checkpoint and (self.output_dir / "metrics.jsonl").exists():
            raise FileExistsError(
                f"output_dir={self.cfg.output_dir} already holds a run (metrics.jsonl); continue it with "
                "resume_from_checkpoint=latest or choose a new output_dir."
            )
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            probe = self.output_dir / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise PermissionError(
                f"output_dir={self.cfg.output_dir} is not writable ({err.strerror}); choose another directory."
            ) from None

    def _check_metadata(self) -> None:
        """Every prompt carries the metadata fields the rewards need (e.g. ``scene`` for ``shapes_verifier``), checked
        before the model loads: a missing field would otherwise fail at the first scoring, minutes later."""
        for reward, prompts, source in (
            (self.reward, self.train_set, self.cfg.data.train or "the training prompts"),
            (
                self.eval_reward,
                self.eval_set,
                self.cfg.data.eval or self.cfg.data.train or "the evaluation prompts",
            ),
        ):
            check_reward_metadata(reward, prompts, source)

    def _build_reward(self, given, spec: dict[str, float]):
        from diffrl.rewards import CombinedReward, load_reward

        if given is not None:
            return load_reward(given)
        kwargs = self.cfg.reward_kwargs
        if len(spec) == 1 and not self.cfg.reward_normalize:
            ((name, weight),) = spec.items()
            reward = load_reward(name, **kwargs.get(name, {}))
            if weight == 1.0:
                return reward
            # logged as reward/combined/* (the weighted score) next to reward/<name>/mean (the raw one)
            return CombinedReward([(reward, weight)])
        parts = [(load_reward(name, **kwargs.get(name, {})), w) for name, w in spec.items()]
        return CombinedReward(parts, normalize=self.cfg.reward_normalize or None)

    def _build_prompts(self, train, eval_):
        def as_set(x):
            if x is None or isinstance(x, PromptSet):
                return x
            rows = list(x)
            if rows and all(isinstance(r, dict) for r in rows):  # [{"prompt": ..., other metadata}, ...]
                key = self.cfg.data.prompt_key
                missing = [i for i, r in enumerate(rows) if key not in r]
                if missing:
                    raise ValueError(
                        f"prompt row {missing[0]} has no {key!r} field; give dicts with data.prompt_key={key!r}."
                    )
                return PromptSet(
                    [str(r[key]) for r in rows], [{k: v for k, v in r.items() if k != key} for r in rows]
                )
            return PromptSet([str(r) for r in rows])

        train, eval_ = as_set(train), as_set(eval_)
        if train is None:
            d = self.cfg.data
            t, e = train_eval_prompts(d.train, d.eval, d.eval_size, self.cfg.seed, d.prompt_key)
            train, eval_ = t, (eval_ if eval_ is not None else e)
        if not len(train):
            raise ValueError("the training prompt set is empty; give at least one prompt.")
        return train, eval_ if eval_ is not None else PromptSet([])

    def _load_model(self):
        from diffrl.models import load_model_from_config

        return load_model_from_config(self.cfg.model, device=self.device)

    def _build_optimizer(self):
        o = self.cfg.optim
        if o.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise ImportError(
                    "optim.use_8bit_adam needs bitsandbytes: pip install bitsandbytes."
                ) from err
            cls = bnb.optim.AdamW8bit
        else:
            cls = torch.optim.AdamW
        return cls(self.params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, eps=o.eps)

    def _build_scheduler(self):
        from diffusers.optimization import get_scheduler

        o = self.cfg.optim
        k = self.updates_per_step()  # the schedule counts optimiser updates; steps are what the config counts
        return get_scheduler(
            o.lr_scheduler,
            self.optimizer,
            num_warmup_steps=o.warmup_steps * k,
            num_training_steps=self.cfg.max_steps * k,
        )

    def updates_per_step(self) -> int:
        """Optimiser updates in one training step (Flow-GRPO: ``num_inner_epochs``)."""
        return 1

    def derived_sizes(self) -> dict[str, Any]:
        return {"num_processes": self.world}

    def cfg_free_guidance(self) -> float:
        """The guidance of CFG-free sampling and training (DiffusionNFT, AWM, DPO, ReFL): 1, no CFG pass, for models
        whose guidance is CFG; ``sample.guidance_scale`` where it is a distilled guidance embedding (FLUX.1-dev)."""
        return 1.0 if self.model.guidance_is_cfg else self.cfg.sample.guidance_scale

    def group_sizes(self, prompts_per_step: int, group_size: int) -> dict[str, Any]:
        """:meth:`derived_sizes` of a trainer that samples ``group_size`` images per prompt."""
        per = prompts_per_step // self.world
        return {
            "num_processes": self.world,
            "prompts_per_process": per,
            "images_per_process": per * group_size,
            "images_per_step": prompts_per_step * group_size,
        }

    def add_adapter_copy(self, adapter: str) -> list[torch.nn.Parameter]:
        """A second LoRA adapter named ``adapter`` (an old-policy, EMA or reference copy), a float32 copy of the
        trained one without gradients; the trained ``default`` adapter stays the active one. Returns its weights in
        the order of :attr:`params`."""
        transformer = self.model.transformer
        with warnings.catch_warnings():  # peft warns that a second adapter is added: that is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            transformer.add_adapter(transformer.peft_config["default"], adapter_name=adapter)
        transformer.set_adapter("default")
        copy = self.adapter_params(adapter)
        with torch.no_grad():
            for c, p in zip(copy, self.params, strict=True):
                c.data = c.data.float()  # PEFT made it in the base layer's dtype; soft updates need float32
                c.copy_(p)
        for c in copy:
            c.requires_grad_(False)
        return copy

    def adapter_params(self, adapter: str) -> list[torch.nn.Parameter]:
        """The weights of the LoRA adapter named ``adapter`` (e.g. an old-policy or EMA copy) in the order of the
        trained ``default`` adapter's :attr:`params`."""
        named = dict(self.model.transformer.named_parameters())
        out = []
        for name in self.param_names:
            other = name.replace(".default.", f".{adapter}.")
            if other == name or other not in named:
                raise RuntimeError(f"no {adapter!r} counterpart for trained weight {name}")
            out.append(named[other])
        return out

    # ------------------------------------------------------------------------------------------ helpers
    def generator(self, *keys: int) -> torch.Generator:
        """A generator for this step and process: ``(seed, step, rank, *keys)``."""
        return seeded_generator(self.cfg.seed, self.step, self.rank, *keys)

    def row_generators(self, purpose: int, rows, offset: int) -> list[torch.Generator]:
        """One generator per sample row, keyed by ``(seed, step, purpose, offset + row)`` and not by the process:
        ``offset`` is this process's first global row of the step, so neither chunking nor the number of processes
        changes a sample's noise."""
        return [seeded_generator(self.cfg.seed, self.step, _ROW_KEY, purpose, offset + int(r)) for r in rows]

    def step_batch(self, prompts_per_step: int) -> StepBatch:
        """The step's prompts (the same global draw on every process), this process's share."""
        rng = np.random.default_rng([self.cfg.seed, self.step, 7919])
        n = len(self.train_set)
        idx = rng.choice(n, size=prompts_per_step, replace=prompts_per_step > n)
        per = prompts_per_step // self.world
        mine = list(range(self.rank * per, (self.rank + 1) * per))
        local = self.train_set.take([int(idx[i]) for i in mine])
        return StepBatch(local.prompts, local.batch_metadata(), torch.tensor(mine, dtype=torch.long))

    @staticmethod
    def expand_groups(batch: StepBatch, group_size: int) -> tuple[list[str], dict[str, list], torch.Tensor]:
        """Each prompt of the batch ``group_size`` times in a row: ``(prompts, metadata, group ids)``."""
        prompts = [p for p in batch.prompts for _ in range(group_size)]
        metadata = {k: [v for v in vals for _ in range(group_size)] for k, vals in batch.metadata.items()}
        return prompts, metadata, batch.group_ids.repeat_interleave(group_size)

    @staticmethod
    def pods_rows(rewards: torch.Tensor, group_size: int, m: int) -> list[int]:
        """The rows of this process that the update trains on: all of them (``m`` 0 or ``group_size``), or the ``m``
        of each group of ``group_size`` consecutive rows whose rewards vary most (PODS's max-variance
        down-sampling, :func:`~diffrl.trainers.objectives.max_variance_subset`). A process holds whole groups, so
        every process keeps as many rows."""
        n = rewards.numel()
        if m in (0, group_size):
            return list(range(n))
        return [
            start + int(i)
            for start in range(0, n, group_size)
            for i in max_variance_subset(rewards[start : start + group_size], m)
        ]

    def advantage_groups(self, prompts: list[str], group_ids: torch.Tensor) -> torch.Tensor:
        """The group id of each of this process's rows for the advantages: its drawn prompt's slot
        (``group_by=slot``), or with ``group_by=text`` a 63-bit hash of its prompt text, the same on every process,
        so that every image of one text in the step forms one group once gathered; ``group_by=tokens`` hashes the
        text as the model's first tokenizer reads it back (:meth:`~diffrl.models.base.FlowModel.tokenizer_texts`)."""
        if self.cfg.group_by == "slot":
            return group_ids
        if self.cfg.group_by == "tokens":
            return text_group_ids(self.model.tokenizer_texts(prompts))
        return text_group_ids(prompts)

    def reward_metrics(
        self, components: dict[str, torch.Tensor], all_rewards: torch.Tensor
    ) -> dict[str, float]:
        """``reward/<name>/mean`` of every component (over all processes) and the total's mean and std."""
        metrics = {
            f"reward/{name}/mean": float(self.gather(v.float().to(self.device)).mean())
            for name, v in components.items()
        }
        metrics[f"reward/{self.reward.name}/mean"] = float(all_rewards.mean())
        metrics[f"reward/{self.reward.name}/std"] = (
            float(all_rewards.std(unbiased=False)) if all_rewards.numel() > 1 else 0.0
        )
        # a video run's image reward: how many frames of each video it scored
        frames = getattr(self.reward, "indices", None)
        if frames is not None and getattr(self.model, "is_video", False):
            metrics["reward/frames_scored"] = float(len(frames(self.model.num_frames)))
        return metrics

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-process tensor over processes (in process order)."""
        return self.dist.gather(tensor)

    def any_over_processes(self, flag: bool) -> bool:
        """True on every process if it is true on any: a step skipped for a local non-finite loss is skipped by all
        (one process stepping alone would desynchronise the weights and the collectives)."""
        return self.dist.any(flag)

    def sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of a per-process tensor over all processes, on this process's device."""
        return self.dist.sum(tensor)

    def mean_over_processes(self, value: float) -> float:
        return self.dist.mean(value)

    full_tensor = staticmethod(full_tensor)
    assign_ = staticmethod(assign_)

    def autocast(self):
        return self.dist.autocast(self.cfg.mixed_precision)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of ``loss`` (DeepSpeed's backward under ZeRO, which reduces as it goes).

        A model that trains only some noise levels (``model.trains_some_levels_only``: one of Wan 2.2's two experts)
        gives losses without a graph at the other levels; they add no gradient and their backward is skipped. Under
        FSDP the adapter's idle passes (:meth:`diffrl.models.wan.WanModel.set_shard_sync`) give every process's loss a
        graph whenever any process's has one, so every process skips, or runs, the same backwards."""
        if not loss.requires_grad and getattr(self.model, "trains_some_levels_only", False):
            return
        self.dist.backward(loss)

    def discard_gradients(self) -> None:
        """Drop the gradients accumulated since the last update (a skipped step). Every process calls it (under
        DeepSpeed it runs DeepSpeed's overflow path, a collective)."""
        self.dist.discard_gradients(self.optimizer, self.params)

    def score(self, images: torch.Tensor, prompts: list[str], metadata: dict[str, list], reward=None):
        """Reward of decoded images, with components; non-finite rewards are reported, not hidden."""
        return self.evaluate_reward(reward or self.reward, images, prompts, **metadata)

    def evaluate_reward(self, reward, images: torch.Tensor, prompts: list[str], **metadata):
        """``reward.evaluate(...)``, any exception it raises turned into a :class:`RewardError` that names the reward
        and the step (a user's reward is code the engine cannot vouch for)."""
        try:
            return reward.evaluate(images, prompts, **metadata)
        except Exception as err:  # noqa: BLE001 - re-raised with the reward and the step
            first = (str(err).splitlines() or [""])[0][:300]
            raise RewardError(
                f"reward {reward.name!r} failed at step {self.step}: {err.__class__.__name__}: {first}"
            ) from err

    def sample_and_score(self, n: int, sample_chunk, prompts: list[str], metadata: dict[str, list]):
        """Sample ``n`` images chunk by chunk (``sample_chunk(rows) -> final latents``) and score them.

        When the reward is per-sample (the contract; not a batch-normalised combination), each chunk is decoded
        and scored in a background thread while the next chunk is sampled. Returns ``(final latents, RewardOutput)``.
        """
        from concurrent.futures import ThreadPoolExecutor

        from diffrl.rewards import RewardOutput

        bs = self.cfg.sample.batch_size
        chunks = [list(range(i, min(n, i + bs))) for i in range(0, n, bs)]

        def decode_and_score(latents, rows):
            with torch.no_grad():
                with self.model.vae_lock:  # the next chunk's sampling may VAE-encode a source image meanwhile
                    images = self.model.decode(latents)
                meta = {k: [v[r] for r in rows] for k, v in metadata.items()}
                return self.evaluate_reward(self.reward, images, [prompts[r] for r in rows], **meta)

        finals, results = [], []
        overlap = getattr(self.reward, "per_sample", True) and len(chunks) > 1
        with ThreadPoolExecutor(max_workers=1) as pool:
            for rows in chunks:
                final = sample_chunk(rows)
                finals.append(final)
                if overlap:
                    results.append(pool.submit(decode_and_score, final, rows))
            results = [r.result() for r in results]
        latents = torch.cat(finals)
        if not overlap:
            scored = decode_and_score(latents, list(range(n)))
            if getattr(self.reward, "normalize", None) == "batch" and self.world > 1:
                # z-score with the statistics of the whole batch over all processes, as one process would
                gathered = {k: self.gather(v.float()) for k, v in scored.components.items()}
                total = self.reward.total_from(scored.components, self.reward.batch_statistics(gathered))
                scored = RewardOutput(total=total, components=scored.components)
            return latents, scored
        total = torch.cat([r.total for r in results])
        components = {k: torch.cat([r.components[k] for r in results]) for k in results[0].components}
        return latents, RewardOutput(total=total, components=components)

    def decode_chunks(self, latents: torch.Tensor, chunk: int) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [self.model.decode(latents[i : i + chunk]) for i in range(0, latents.shape[0], chunk)]
            )

    # ------------------------------------------------------------------------------------------ the update
    def finish_update(self) -> dict[str, float]:
        """Average gradients over processes, unscale them (fp16 loss scaling), clip, step the optimiser and
        scheduler, update the EMA.

        With fp16 on CUDA, ``accelerator.backward`` multiplies the loss by the gradient scaler's scale. The gradients
        are unscaled here before the finite check and the clipping. A non-finite gradient is then an overflow of
        the scaled loss: the update is skipped, the scale backs off (``train/fp16_overflow``) and the step does not
        count as bad, unless the scale is already 1 or less (nothing left to blame on scaling).
        """
        if self.ds_engine is not None:
            return self._finish_deepspeed_update()
        scaler = self.accelerator.scaler
        self.dist.average_gradients(self.params)
        scale = 1.0
        if scaler is not None:
            scale = float(scaler.get_scale())
            scaler.unscale_(self.optimizer)
        grads_ok = all(bool(torch.isfinite(p.grad).all()) for p in self.params)
        metrics = {}
        if not grads_ok:
            self.optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                return {"train/nonfinite_grad": 1.0}
            scaler.update()  # the unscale recorded the overflow: the scale backs off
            metrics = {"train/fp16_overflow": 1.0, "train/loss_scale": float(scaler.get_scale())}
            if scale <= 1.0:
                metrics["train/nonfinite_grad"] = 1.0
            return metrics
        if self.cfg.optim.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
            metrics["train/grad_norm"] = float(norm)
        if scaler is not None:
            scaler.step(self.optimizer)  # gradients already unscaled and finite: a plain optimiser step
            scaler.update()
            metrics["train/loss_scale"] = float(scaler.get_scale())
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_ema()
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        return self._with_state_size(metrics)

    def _finish_deepspeed_update(self) -> dict[str, float]:
        """DeepSpeed's step is the update (see :meth:`Distributed.deepspeed_step`); then the scheduler and EMA."""
        metrics = self.dist.deepspeed_step(self.cfg.optim.max_grad_norm)
        if metrics is None:
            return {"train/nonfinite_grad": 1.0}
        self.scheduler.step()
        self._update_ema()
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        return self._with_state_size(metrics)

    def _with_state_size(self, metrics: dict[str, float]) -> dict[str, float]:
        """Add ``memory/optimizer_state_mib`` after the first update (when AdamW's states exist): what this process
        holds, so the partitioning of FSDP or ZeRO shows (about 1/N of an unsharded run's)."""
        if not self._state_size_logged:
            self._state_size_logged = True
            metrics["memory/optimizer_state_mib"] = self.dist.optimizer_state_bytes(self.optimizer) / 2**20
        return metrics

    def _update_ema(self) -> None:
        """After an optimiser update: ``ema <- d ema + (1 - d) theta`` when ``(u + 1) % ema_every == 0``, with ``d =
        min(ema_decay, (1 + u) / (10 + u))`` under ``ema_warmup``; ``u`` counts the optimiser updates so far, this one
        included (the ``optimization_step`` both reference codes pass to their EMA)."""
        if self.ema is not None:
            u = self.scheduler.last_epoch  # the scheduler steps once per update and is checkpointed
            if (u + 1) % self.cfg.ema_every:
                return
            d = self.cfg.ema_decay
            if self.cfg.ema_warmup:
                d = min(d, (1 + u) / (10 + u))
            with torch.no_grad():
                for e, p in zip(self.ema, self.params, strict=True):
                    e.mul_(d).add_(p.detach(), alpha=1 - d)

    @contextlib.contextmanager
    def ema_weights(self):
        """Evaluate with the EMA weights when enabled."""
        if self.ema is None:
            yield
            return
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.ema, strict=True):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)

    # ------------------------------------------------------------------------------------------ the loop
    def train_step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def train(self) -> dict[str, float]:
        """Run from the current step (0, or the resumed one) to ``max_steps``; returns the last metrics."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        if cfg.resume_from_checkpoint:
            self.load_checkpoint(cfg.resume_from_checkpoint)
            # from step N the rows after N are logged again; from no checkpoint everything is, step 0 included
            self.tracker.drop_replayed_metrics(self.step if self.step > 0 else -1)
            evaluation.replay_monitor(self, self.tracker.path)
        self._announce()
        shown: dict[str, str] = {}  # progress-bar postfix: last reward and last evaluation

        def show_eval(metrics: dict[str, float]) -> None:
            key = next((k for k in metrics if "accuracy" in k), None) or next(iter(metrics), None)
            if key:
                shown["eval"] = f"{metrics[key]:.4g}"

        if self.step == 0 and len(self.eval_set):
            first = self.evaluate()
            self.tracker.log(0, first)
            show_eval(first)
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not self.accelerator.is_main_process,
            desc=self.algorithm,
        )
        metrics: dict[str, float] = {}
        stopped = signalled = False
        with StopSignals() as stop:  # SIGTERM or SIGUSR1: stop after the current step, with a checkpoint
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                metrics = self.train_step(self.step)
                metrics["time/step_seconds"] = time.perf_counter() - t0
                bad = metrics.get("train/skipped", 0.0) > 0 or metrics.get("train/nonfinite_grad", 0.0) > 0
                self.bad_steps = self.bad_steps + 1 if bad else 0
                metrics["train/bad_steps_in_a_row"] = float(self.bad_steps)
                self.step += 1
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self.tracker.log(self.step, metrics)
                reward_key = next(
                    (k for k in metrics if k.startswith("reward/") and k.endswith("/mean")), None
                )
                if reward_key:
                    shown["reward"] = f"{metrics[reward_key]:.4g}"
                if cfg.eval_every and self.step % cfg.eval_every == 0 and len(self.eval_set):
                    evaluated = self.evaluate()
                    self.tracker.log(self.step, evaluated)
                    show_eval(evaluated)
                bar.set_postfix(shown)
                bar.update(1)
                if cfg.checkpointing_steps and self.step % cfg.checkpointing_steps == 0:
                    self.save_checkpoint()
                if self.bad_steps >= cfg.max_bad_steps:
                    stopped = True
                    break
                # every process stops after the same step when any was signalled
                if self.step < cfg.max_steps and self.any_over_processes(stop.signum is not None):
                    signalled = True
                    break
        bar.close()
        self.save_checkpoint()
        if stopped:
            reason = (
                f"{self.bad_steps} steps in a row had a non-finite reward, loss or gradient (max_bad_steps="
                f"{cfg.max_bad_steps}); stopped at step {self.step} of {cfg.max_steps}"
            )
            self.tracker.write_status("aborted", self.step, reason)
            self.tracker.close()
            raise TrainingAborted(
                f"{reason}. The last checkpoint is {self.output_dir / f'{CHECKPOINT_PREFIX}{self.step:06d}'} and no "
                "final LoRA was written; see docs/troubleshooting.md#nans-and-skipped-steps."
            )
        if signalled:
            reason = f"stopped by {stop.name or 'a signal to another process'} at step {self.step} of {cfg.max_steps}"
            self.tracker.write_status("stopped", self.step, reason)
            self.tracker.close()
            raise TrainingStopped(
                f"{reason}; checkpoint written to {self.output_dir / f'{CHECKPOINT_PREFIX}{self.step:06d}'}. "
                "Continue with the same command and resume_from_checkpoint=latest.",
                stop.signum,
            )
        # the final evaluation, unless this step's is logged already (every eval_every steps, or by the run this one
        # resumed when it had finished)
        if len(self.eval_set) and not evaluation.eval_logged_at(self.tracker.path, self.step, self.dist):
            self.tracker.log(self.step, self.evaluate())
        self.save_final()
        self.tracker.write_status("finished", self.step)
        self.tracker.close()
        return metrics

    def _announce(self) -> None:
        if self.accelerator.is_main_process:
            info = {**self.derived_sizes(), "fsdp": self.sharded, "deepspeed_zero_stage": self.zero_stage}
            self.tracker.announce(self.cfg, self.algorithm, info, self.step)

    def evaluate(self) -> dict[str, float]:
        """Sample the held-out prompts (ODE, ``sample.eval_images_per_prompt`` fixed seeds each, EMA weights) and
        score them with the evaluation reward (:func:`diffrl.trainers.evaluation.evaluate`)."""
        return evaluation.evaluate(self)

    # ------------------------------------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict[str, torch.Tensor]:
        """Algorithm tensors to checkpoint (e.g. DiffusionNFT's old policy)."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-<step>`` and prune (:meth:`diffrl.trainers.checkpoints.CheckpointManager.save`)."""
        return self.checkpoints.save(self)

    def load_checkpoint(self, which: str) -> None:
        """Restore a checkpoint (``latest`` or a path): weights, optimiser, scheduler, gradient scaler, EMA,
        reward state (running normalisation statistics), step."""
        restored = self.checkpoints.load(self, which)
        if restored is None:
            return
        self.step = restored.step
        self.bad_steps = restored.bad_steps
        self._state_size_logged = True  # the run logged it at its first update, before the checkpoint
        self.accelerator.print(f"[diffrl] resumed from {restored.path} at step {self.step}")

    def save_final(self) -> Path | None:
        """The trained LoRA in the diffusers format (``output_dir/lora``), or the full pipeline."""
        path = self._save_final()
        if path is not None:
            self.accelerator.print(
                f"[diffrl] final {'LoRA' if self.model.has_lora else 'pipeline'} written to {path}"
            )
        return path

    def _save_final(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        if self.sharded:  # gathered by every process, written by the main process
            with self.ema_weights():
                if self.model.has_lora:
                    state = self.dist.gather_to_main(self.model.lora_state_dict())
                    main = self.accelerator.is_main_process
                    path = self.model.save_lora(self.output_dir / "lora", state=state) if main else None
                else:
                    path = self.dist.save_sharded_pipeline(self.model, self.output_dir / "pipeline")
            self.accelerator.wait_for_everyone()
            return path
        if not self.accelerator.is_main_process:
            return None
        with self.ema_weights():
            if self.model.has_lora:
                return self.model.save_lora(self.output_dir / "lora")
            return self.model.save_pretrained(self.output_dir / "pipeline")
