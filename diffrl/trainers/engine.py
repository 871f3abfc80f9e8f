"""The engine every trainer shares: set-up, the step loop, distribution, logging, evaluation and checkpoints.

A trainer subclasses :class:`Trainer` and implements ``train_step(step, prompts) -> metrics``; everything else
lives here so each algorithm file reads like its paper's algorithm box.

Distribution (``accelerate launch``): every process draws the same prompts for a step (from ``seed`` and the step)
and takes its share; it samples whole groups, so group statistics are computed on rewards gathered from all
processes. Gradients of the trained weights are averaged over processes before each update (DDP semantics on the
LoRA or full weights).

FSDP2 (``fsdp: true``, or an accelerate config with ``distributed_type: FSDP`` and ``fsdp_version: 2``): the engine
does not hand the model to ``accelerator.prepare``; it calls ``torch.distributed.fsdp.fully_shard`` itself on every
transformer block and then on the transformer, after the trained weights are cast to float32 and every adapter
(DiffusionNFT's old policy too) exists, and builds the optimiser, scheduler and EMA on the sharded parameters.
FSDP's reduce-scatter averages the gradients, so the engine's own all-reduce is skipped. FSDP communicates in
every forward and backward, so every process runs the same number of them: evaluation pads the shorter shares,
a local non-finite loss skips the step on every process, and options that make the processes differ
(``flow_grpo.dynamic_sampling``) are refused. Checkpoints and the final LoRA or pipeline gather the full tensors
one at a time (a collective; only the main process keeps them) and the main process writes them in the same files
as an unsharded run.

DeepSpeed (an accelerate config with ``distributed_type: DEEPSPEED``): ZeRO stage 1 or 2 partitions the AdamW states
(and at stage 2 the gradients) of the trained weights; see :mod:`diffrl.trainers.zero`. Trainers call
``self.backward`` and ``self.discard_gradients`` rather than the accelerator's or optimiser's own, so the same code
runs under DDP, FSDP and DeepSpeed.

Determinism: every random draw (prompts, noise, windows, levels) comes from a generator seeded by ``(seed, step,
...)``, so a resumed run replays exactly what an uninterrupted one does. A sample's noise is keyed by its global row
in the step (not by the process holding it), so N processes draw the same images as one process with the same
global batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, TrainConfig, config_to_dict, load_config, resume_mismatch, validate
from ..data import PromptSet, train_eval_prompts
from ..utils import apply_umask
from . import checkpoints as ckpt_files
from . import tracking, zero
from .common import RewardError, StepBatch, TrainingAborted, seeded_generator

__all__ = ["Trainer", "StepBatch", "seeded_generator", "TrainingAborted", "RewardError"]

CHECKPOINT_PREFIX = ckpt_files.CHECKPOINT_PREFIX
_ROW_KEY = 2**31 - 1  # keeps per-row generators apart from the per-process ones of Trainer.generator


def _is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is an FSDP2 shard (a DTensor); an unsharded run never imports the DTensor module."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


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
        from accelerate import Accelerator

        given = {
            k
            for k, v in (("model", model), ("reward", reward), ("train_prompts", train_prompts))
            if v is not None
        }
        cfg = config if isinstance(config, TrainConfig) else load_config(config, given=given)
        if cfg.algorithm != self.algorithm:
            raise ValueError(
                f"config.algorithm={cfg.algorithm!r} but this is the {self.algorithm} trainer; build it with diffrl.train.build_trainer."
            )
        self.cfg = cfg
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
        acc = self.accelerator
        kind = acc.distributed_type.name
        self._ds_config = None  # DeepSpeed: accelerate's config, or the run's zero_stage
        if kind == "DEEPSPEED":
            self._ds_config = acc.state.deepspeed_plugin.deepspeed_config
            stage = (self._ds_config.get("zero_optimization") or {}).get("stage", 0)
            if cfg.zero_stage and cfg.zero_stage != stage:
                raise ConfigError(
                    f"zero_stage={cfg.zero_stage} but the accelerate DeepSpeed config says stage {stage}; "
                    "make them agree or drop zero_stage."
                )
        elif cfg.zero_stage and acc.num_processes > 1:
            self._ds_config = {"zero_optimization": {"stage": cfg.zero_stage}}
        elif cfg.zero_stage:
            acc.print(
                f"[diffrl] zero_stage={cfg.zero_stage} with one process: nothing to partition, training without DeepSpeed"
            )
        self.zero_stage = 0 if self._ds_config is None else zero.check_deepspeed_config(self._ds_config, cfg)
        self.ds_engine = None  # the DeepSpeed engine, made once the optimiser exists
        if kind == "FSDP":
            version = getattr(acc.state.fsdp_plugin, "fsdp_version", 1)
            if version != 2:
                raise NotImplementedError(
                    f"the accelerate config asks for FSDP version {version}; set fsdp_config.fsdp_version: 2 "
                    "(see configs/accelerate/fsdp.yaml)."
                )
        validate(
            cfg,
            acc.num_processes,
            given=given,
            sharded=cfg.fsdp or kind == "FSDP",
            zero_stage=self.zero_stage,
        )
        if self.zero_stage:
            zero.require_deepspeed()  # after the config checks, before any model is loaded
        self.sharded = (cfg.fsdp or kind == "FSDP") and acc.num_processes > 1
        if cfg.fsdp and not self.sharded:
            acc.print("[diffrl] fsdp=true with one process: nothing to shard, training unsharded")
        self.output_dir = Path(cfg.output_dir)
        self._found: dict[str, Path | None] = {}  # resume_from_checkpoint -> the verified checkpoint it names
        self._check_output_dir()
        if cfg.resume_from_checkpoint:  # before anything is loaded: a mismatching config fails at once
            resume_path = self._find_checkpoint(cfg.resume_from_checkpoint)
            if resume_path is not None:
                self._check_resume_config(resume_path)
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
        self.train_set, self.eval_set = self._build_prompts(train_prompts, eval_prompts)
        self._check_metadata()
        if acc.is_main_process:
            tracking.check_report_to(cfg.report_to)  # before the model loads, not at the first log line
        if (
            model is None
        ):  # a size the model cannot make fails now, from its config files, before the weights load
            from diffrl.models.loading import check_image_size

            check_image_size(cfg.model.path, cfg.sample.height, cfg.sample.width)
        self.model = model if model is not None else self._load_model()
        self.model.latent_shape(cfg.sample.height, cfg.sample.width)  # a size the model cannot make fails now
        self._setup_training_mode()
        self.params = [p for p in self.model.trainable_parameters()]
        self.param_names = [n for n, p in self.model.transformer.named_parameters() if p.requires_grad]
        self.step = 0
        self.bad_steps = 0
        self._saved_step = -1  # the step of the last checkpoint written or loaded (not written again)
        self._state_size_logged = False  # memory/optimizer_state_mib: logged once, after the first update
        if self.sharded:
            # every adapter exists before sharding, and the optimiser, scheduler and EMA hold the sharded parameters
            self.setup()
            self._shard_transformer()
            self.optimizer = self._build_optimizer()
            self.scheduler = self._build_scheduler()
            self.ema = [p.detach().clone() for p in self.params] if cfg.ema_decay > 0 else None
        else:
            self.optimizer = self._build_optimizer()
            self.scheduler = self._build_scheduler()
            self.ema = [p.detach().clone() for p in self.params] if cfg.ema_decay > 0 else None
            self.setup()
        if self.zero_stage:
            self.ds_engine = zero.initialize(
                self.model.transformer,
                self.optimizer,
                self.params,
                zero.deepspeed_init_config(self._ds_config, cfg, acc.num_processes),
            )
        self.tracker = tracking.Tracker(self.output_dir, cfg, acc.is_main_process)

    # ------------------------------------------------------------------------------------------ set-up
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def setup(self) -> None:
        """Algorithm-specific set-up (after model and optimiser; under FSDP after the model, before sharding)."""

    def after_sharding(self) -> None:
        """Collect again the parameters a trainer holds besides ``self.params``: ``fully_shard`` replaces them."""

    def _shard_transformer(self) -> None:
        """FSDP2: ``fully_shard`` every transformer block, then the transformer; ``self.params`` is collected again."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        transformer = self.model.transformer
        # fully_shard swaps in a subclass; the final save rebuilds this one
        self._transformer_cls = type(transformer)
        blocks = [
            block
            for name in ("transformer_blocks", "single_transformer_blocks")
            for block in (getattr(transformer, name, None) or [])
        ]
        if not blocks:
            raise NotImplementedError(
                f"{type(transformer).__name__} has no transformer_blocks to shard; FSDP supports the SD3 and FLUX "
                "transformers, launch this model with DDP."
            )
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(transformer, mesh=mesh)
        self.params = [p for p in self.model.trainable_parameters()]
        names = [n for n, p in transformer.named_parameters() if p.requires_grad]
        if names != self.param_names:
            raise RuntimeError(
                "fully_shard changed the trained parameters' names; this torch version is not supported."
            )
        self.after_sharding()

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

    def _check_resume_config(self, path: Path) -> None:
        """Refuse to continue a run under another config: its replay would no longer be what the checkpoint's run
        did. Fields in :data:`diffrl.config.RESUME_FREE_KEYS` may change. A checkpoint from another directory
        starts a new run from its weights, so there a difference is only reported."""
        try:
            saved = json.loads((path / "state.json").read_text()).get("config")
        except (OSError, ValueError, AttributeError) as err:
            raise ValueError(
                f"checkpoint {path} cannot be read (state.json: {err.__class__.__name__}); resume from another one."
            ) from None
        diff = resume_mismatch(saved, self.cfg) if saved is not None else None
        if diff is None:
            return
        key, then, now = diff
        if path.resolve().parent != self.output_dir.resolve():
            self.accelerator.print(
                f"[diffrl] starting a new run in {self.output_dir} from {path}, whose config differs "
                f"(first: {key}={then}, now {now})"
            )
            return
        raise ConfigError(
            f"cannot resume from {path}: it was written with {key}={then} but the current config has {key}={now}; "
            f"resume with the same config, or start a new output_dir (resume_from_checkpoint={path} there starts "
            "from these weights with the new config)."
        )

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
            for key in getattr(reward, "required_metadata", ()):
                rows = [i for i, row in enumerate(prompts.metadata) if key not in row]
                if rows:
                    raise ValueError(
                        f"reward {reward.name!r} needs the metadata field {key!r} on every prompt, and {source} has "
                        f"none on {len(rows)} of {len(prompts)} prompts (e.g. row {rows[0] + 1}); use a .jsonl prompt "
                        f"file with a {key!r} field per line (such as configs/toy/train.jsonl) or another reward."
                    )

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

    def _setup_training_mode(self) -> None:
        from diffrl.models.loading import set_vae_dtype

        m = self.cfg.model
        set_vae_dtype(self.model, m.vae_dtype)  # also for a model passed in
        if m.lora_rank == 0:
            self.model.set_full_finetuning()
        elif not self.model.has_lora:
            with torch.random.fork_rng(devices=[]):  # the LoRA's random init depends on the seed only
                torch.manual_seed(self.cfg.seed)
                self.model.add_lora(
                    rank=None if m.lora_rank < 0 else m.lora_rank,
                    alpha=None if m.lora_alpha < 0 else m.lora_alpha,
                    target_modules=m.lora_targets or None,
                    init_lora_weights=True if m.lora_init == "default" else m.lora_init,
                )
        for p in self.model.trainable_parameters():
            p.data = p.data.float()  # trained weights in float32 whatever the frozen dtype
        if m.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()

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
        return metrics

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-process tensor over processes (in process order)."""
        return self.accelerator.gather(tensor.contiguous().to(self.device)) if self.world > 1 else tensor

    def any_over_processes(self, flag: bool) -> bool:
        """True on every process if it is true on any: a step skipped for a local non-finite loss is skipped by all
        (one process stepping alone would desynchronise the weights and the collectives)."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([float(flag)], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of a per-process tensor over all processes, on this process's device."""
        tensor = tensor.to(self.device)
        return self.accelerator.reduce(tensor, reduction="sum") if self.world > 1 else tensor

    def mean_over_processes(self, value: float) -> float:
        if self.world == 1:
            return float(value)
        t = torch.tensor([float(value)], device=self.device)
        return float(self.accelerator.reduce(t, reduction="mean").item())

    def autocast(self):
        if self.cfg.mixed_precision == "no":
            return contextlib.nullcontext()
        if (
            self.ds_engine is not None
        ):  # accelerate leaves precision to DeepSpeed's config; the engine autocasts
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of ``loss`` (DeepSpeed's backward under ZeRO, which reduces as it goes)."""
        if self.ds_engine is not None:
            self.ds_engine.backward(loss)
        else:
            self.accelerator.backward(loss)

    def discard_gradients(self) -> None:
        """Drop the gradients accumulated since the last update (a skipped step). Every process calls it. Under
        DeepSpeed the partitioned gradients are cleared by DeepSpeed's own overflow path: one backward of a NaN
        through the trained weights, then a step, which finds the overflow and skips the update."""
        if self.ds_engine is None:
            self.optimizer.zero_grad(set_to_none=True)
            return
        poison = sum(p.sum() for p in self.params) * float("nan")
        self.ds_engine.backward(poison)
        self.ds_engine.step()
        if self.ds_engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied an update with NaN gradients; its overflow check is off.")

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
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.world > 1 and not self.sharded:  # FSDP's reduce-scatter has averaged them already
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")
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
        """DeepSpeed's step is the update: it reduces what is left, checks for non-finite gradients (then skips and
        clears them), clips to ``optim.max_grad_norm`` and steps the AdamW on each partition."""
        self.ds_engine.step()
        if not self.ds_engine.was_step_applied():
            return {"train/nonfinite_grad": 1.0}
        metrics = {}
        if self.cfg.optim.max_grad_norm > 0:
            metrics["train/grad_norm"] = float(self.ds_engine.get_global_grad_norm())
        self.scheduler.step()
        self._update_ema()
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        return self._with_state_size(metrics)

    def _with_state_size(self, metrics: dict[str, float]) -> dict[str, float]:
        """Add ``memory/optimizer_state_mib`` after the first update (when AdamW's states exist): what this process
        holds, so the partitioning of FSDP or ZeRO shows (about 1/N of an unsharded run's)."""
        if not self._state_size_logged:
            self._state_size_logged = True
            local = 0
            for state in self.optimizer.state.values():
                for t in state.values():
                    if torch.is_tensor(t) and t.dim() > 0:
                        t = t.to_local() if _is_dtensor(t) else t
                        local += t.numel() * t.element_size()
            metrics["memory/optimizer_state_mib"] = local / 2**20
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
        stopped = False
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
            reward_key = next((k for k in metrics if k.startswith("reward/") and k.endswith("/mean")), None)
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
        # the final evaluation, unless this step's is logged already (every eval_every steps, or by the run this one
        # resumed when it had finished)
        if len(self.eval_set) and not self._eval_logged_at(self.step):
            self.tracker.log(self.step, self.evaluate())
        self.save_final()
        self.tracker.write_status("finished", self.step)
        self.tracker.close()
        return metrics

    def _eval_logged_at(self, step: int) -> bool:
        """Whether metrics.jsonl holds an evaluation row for ``step`` (read by the main process, agreed by all)."""
        found = False
        path = self.tracker.path
        if self.accelerator.is_main_process and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if (
                    isinstance(row, dict)
                    and row.get("step") == step
                    and any(str(k).startswith("eval/") for k in row)
                ):
                    found = True
                    break
        return self.any_over_processes(found)

    def _announce(self) -> None:
        if self.accelerator.is_main_process:
            info = {**self.derived_sizes(), "fsdp": self.sharded, "deepspeed_zero_stage": self.zero_stage}
            self.tracker.announce(self.cfg, self.algorithm, info, self.step)

    def derived_sizes(self) -> dict[str, Any]:
        return {"num_processes": self.world}

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Sample the held-out prompts (ODE, ``sample.eval_images_per_prompt`` fixed seeds each, EMA weights) and
        score them with the evaluation reward."""
        from diffrl.samplers import rollout

        cfg = self.cfg
        s = cfg.sample
        prompts = self.eval_set
        per = s.eval_images_per_prompt
        # evaluation row = (prompt, image): row r * n + p is image r of prompt p, spread over the processes
        n = len(prompts)
        mine = list(range(self.rank, n * per, self.world))
        real = len(mine)
        if (
            self.sharded
        ):  # FSDP gathers weights in every forward: the shorter shares run a repeated row, dropped
            mine += [mine[-1] if mine else 0] * (-(-n * per // self.world) - real)
        if not mine:
            return self._eval_means({})  # still takes part in the reduction the other processes wait for
        local = prompts.take([row % n for row in mine])

        def eval_seed(row: int) -> torch.Generator:
            p, r = row % n, row // n  # image 0 keeps the seed of a one-image evaluation
            keys = (cfg.seed, 10**6 + p) if r == 0 else (cfg.seed, 10**6 + p, r)
            return seeded_generator(*keys)

        guidance = s.eval_guidance_scale
        images = []
        with self.ema_weights():
            for i in range(0, len(mine), s.batch_size):
                chunk = local.prompts[i : i + s.batch_size]
                cond = self.model.encode(chunk)
                noise = torch.cat(
                    [
                        self.model.sample_noise(1, s.height, s.width, eval_seed(mine[i + j]))
                        for j in range(len(chunk))
                    ]
                )
                with self.autocast():
                    out = rollout(
                        self.model,
                        cond,
                        self.model.schedule(s.eval_num_steps, s.height, s.width),
                        noise,
                        guidance_scale=guidance,
                    )
                images.append(self.model.decode(out.final))
        images = torch.cat(images)
        if real < len(mine):
            if not real:
                return self._eval_means({})
            images, local = images[:real], prompts.take([row % n for row in mine[:real]])
        # evaluation must not move running stats
        freeze = getattr(self.eval_reward, "frozen_statistics", None)
        with freeze() if freeze is not None else contextlib.nullcontext():
            result = self.evaluate_reward(self.eval_reward, images, local.prompts, **local.batch_metadata())
        comps = dict(result.components)
        comps.setdefault(self.eval_reward.name, result.total)
        metrics = self._eval_means(
            {name: (float(v.detach().float().sum()), int(v.numel())) for name, v in comps.items()}
        )
        if self.accelerator.is_main_process:
            from .eval_grid import save_eval_grid

            means = "  ".join(f"{k.split('/')[-2]} {v:.3g}" for k, v in metrics.items())
            save_eval_grid(
                images,
                local.prompts,
                comps,
                self.output_dir / "eval" / f"step_{self.step:06d}.png",
                title=f"step {self.step}, {len(images)} held-out images (this process's share); means: {means}",
            )
        return metrics

    def _eval_means(self, local: dict[str, tuple[float, int]]) -> dict[str, float]:
        """Means over all processes of per-process ``{name: (sum, count)}``; the eval prompts rarely split evenly
        over processes (a tensor all-gather needs equal sizes), so the sums and counts are gathered as objects."""
        if self.world > 1:
            from accelerate.utils import gather_object

            parts = gather_object([local])
        else:
            parts = [local]
        names = list(dict.fromkeys(name for part in parts for name in part))
        return {
            f"eval/reward/{name}/mean": sum(p[name][0] for p in parts if name in p)
            / sum(p[name][1] for p in parts if name in p)
            for name in names
        }

    # ------------------------------------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict[str, torch.Tensor]:
        """Algorithm tensors to checkpoint (e.g. DiffusionNFT's old policy)."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    @staticmethod
    def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
        """The whole tensor of a sharded one (FSDP's DTensor), else the tensor itself. Gathering is a collective:
        every process must call it, in the same order."""
        return tensor.full_tensor() if _is_dtensor(tensor) else tensor

    @staticmethod
    def assign_(dst: torch.Tensor, full: torch.Tensor) -> None:
        """``dst.copy_(full)`` where ``dst`` may be sharded: every process passes the whole tensor and keeps its
        shard (a collective under FSDP)."""
        full = full.to(dst.device, dst.dtype)
        if _is_dtensor(dst):
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(full, dst.device_mesh, dst.placements)
        dst.copy_(full)

    def _checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint holds, as whole tensors on the CPU of the main process. Under FSDP and DeepSpeed the
        tensors and AdamW states are gathered (a collective every process runs) and the optimiser state is written
        in the unsharded layout (parameters numbered in ``self.params`` order), so DDP, FSDP and ZeRO checkpoints
        are the same files."""
        gather = self._gather_to_main
        state: dict[str, Any] = {"trainable": gather(dict(zip(self.param_names, self.params, strict=True)))}
        if self.ema is not None:
            state["ema"] = gather(dict(zip(self.param_names, self.ema, strict=True)))
        extra = self.extra_state()
        if extra:
            state["extra"] = gather(extra)
        if self.ds_engine is not None:
            state["optimizer"] = zero.gather_optimizer_state(self.ds_engine, self.params)
            return state
        if not self.sharded:
            state["optimizer"] = self.optimizer.state_dict()
            return state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        by_name = get_optimizer_state_dict(
            self.model.transformer,
            self.optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        if self.accelerator.is_main_process:  # the others get an empty state
            index = {n: i for i, n in enumerate(self.param_names)}
            state["optimizer"] = {
                "state": {index[n]: v for n, v in by_name["state"].items()},
                "param_groups": [
                    {**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]
                ],
            }
        return state

    def _load_optimizer_state(self, saved: dict) -> None:
        if self.ds_engine is not None:
            # the weights were just assigned: DeepSpeed's float32 copy too
            zero.set_master_weights(self.params)
            zero.scatter_optimizer_state(self.ds_engine, self.params, saved)
            return
        if not self.sharded:
            self.optimizer.load_state_dict(saved)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = self.param_names
        by_name = {  # a new dict: set_optimizer_state_dict changes the one it is given
            "state": {names[i]: dict(v) for i, v in saved["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]],
        }
        set_optimizer_state_dict(
            self.model.transformer,
            self.optimizer,
            optim_state_dict=by_name,
            options=StateDictOptions(full_state_dict=True),
        )

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-<step>``: every file into a hidden temporary directory, ``checksums.json`` last (the
        completion marker), then a rename into place (see :mod:`diffrl.trainers.checkpoints`); then keep the newest
        ``checkpoints_total_limit``. A step already saved (the end of a run whose last step was a checkpointing step,
        or a resumed finished run) is not written again."""
        self.accelerator.wait_for_everyone()
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        if self._saved_step == self.step:
            return final
        collective = self.sharded or self.ds_engine is not None
        state = self._checkpoint_state() if collective else None  # gathering: every process takes part
        if not self.accelerator.is_main_process:
            self._saved_step = self.step
            self.accelerator.wait_for_everyone()
            return final
        from safetensors.torch import save_file

        if state is None:
            state = self._checkpoint_state()
        tmp = self.output_dir / f".tmp-{final.name}"
        try:
            self._write_checkpoint(state, tmp, final, save_file)
        except Exception as err:  # noqa: BLE001 - e.g. the disk filled up (torch.save reports it as a RuntimeError)
            shutil.rmtree(tmp, ignore_errors=True)
            kept = [p.name for p in ckpt_files.checkpoints(self.output_dir)]
            what = (
                err.strerror
                if isinstance(err, OSError) and err.strerror
                else (str(err).splitlines() or [""])[0]
            )
            raise OSError(
                getattr(err, "errno", None) or 5,
                f"writing {final} failed ({err.__class__.__name__}: {what}); the checkpoints already on disk are intact "
                f"({', '.join(kept) if kept else 'none yet'}): free some space and resume with "
                "resume_from_checkpoint=latest",
            ) from err
        self._saved_step = self.step
        self.accelerator.wait_for_everyone()
        return final

    def _write_checkpoint(self, state, tmp: Path, final: Path, save_file) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(state["trainable"], tmp / "trainable.safetensors")
        if "ema" in state:
            save_file(state["ema"], tmp / "ema.safetensors")
        if "extra" in state:
            save_file(state["extra"], tmp / "extra.safetensors")
        optim_state = {
            "optimizer": state["optimizer"],
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.accelerator.scaler is not None:
            optim_state["scaler"] = self.accelerator.scaler.state_dict()
        torch.save(optim_state, tmp / "optim.pt")
        (tmp / "state.json").write_text(
            json.dumps(
                {
                    "step": self.step,
                    "bad_steps": self.bad_steps,
                    "config": config_to_dict(self.cfg),
                    "reward_state": self._reward_state(),
                },
                indent=2,
            )
        )
        ckpt_files.write_checksums(tmp)
        apply_umask(tmp)
        ckpt_files.swap_into_place(tmp, final)
        ckpt_files.prune(self.output_dir, self.cfg.checkpoints_total_limit, known_good=final)

    def _reward_state(self) -> dict[str, dict]:
        """The rewards' checkpointed state (e.g. running normalisation statistics), JSON-serialisable."""
        state = {"reward": self.reward.training_state()}
        if self.eval_reward is not self.reward:
            state["eval_reward"] = self.eval_reward.training_state()
        return state

    def _find_checkpoint(self, which: str) -> Path | None:
        """The checkpoint ``resume_from_checkpoint`` names, verified against its checksums: for ``latest`` the newest
        complete one in ``output_dir`` that verifies (``None`` if there is none; each newer one skipped is reported
        in one line), else the given directory, which must verify."""
        if which in self._found:
            return self._found[which]
        if which == "latest":
            path, skipped = ckpt_files.find_latest(self.output_dir)
            for bad, reason in skipped:
                self.accelerator.print(
                    f"[diffrl] warning: skipping {bad.name}: {reason}; "
                    + (f"resuming from {path.name}" if path is not None else "no older checkpoint verifies")
                )
            if path is None and skipped:
                raise ValueError(
                    f"no checkpoint in {self.output_dir} verifies (the newest, {skipped[0][0].name}: {skipped[0][1]}); "
                    "start a new output_dir, or set resume_from_checkpoint to a good copy."
                )
        else:
            path = Path(which)
            if not (path / "state.json").is_file():
                raise FileNotFoundError(
                    f"resume_from_checkpoint={which} is not a checkpoint directory; pass latest or a checkpoint-N path."
                )
            reason = ckpt_files.verify(path)
            if reason is not None:
                raise ValueError(
                    f"checkpoint {which} is damaged ({reason}); resume from another one (resume_from_checkpoint=latest "
                    "takes the newest that verifies)."
                )
        self._found[which] = path
        return path

    def load_checkpoint(self, which: str) -> None:
        """Restore a checkpoint (``latest`` or a path): weights, optimiser, scheduler, gradient scaler, EMA,
        reward state (running normalisation statistics), step."""
        from safetensors.torch import load_file

        path = self._find_checkpoint(which)
        if path is None:
            self.accelerator.print(f"[diffrl] no checkpoint in {self.output_dir}; starting fresh")
            return
        # every file is read before anything is changed: a checkpoint that cannot be read leaves the trainer as it was
        # torch.load knows "cpu", not gloo's "cpu:0"
        where = "cpu" if self.device.type == "cpu" else self.device
        try:
            weights = load_file(str(path / "trainable.safetensors"))
            ema = load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None
            extra = (
                load_file(str(path / "extra.safetensors")) if (path / "extra.safetensors").is_file() else None
            )
            state = torch.load(path / "optim.pt", map_location=where, weights_only=False)
            info = json.loads((path / "state.json").read_text())
            step = int(info["step"])
        except Exception as err:  # noqa: BLE001 - any unreadable file: one line naming the checkpoint
            first = (str(err).splitlines() or [""])[0][:200]
            raise ValueError(
                f"checkpoint {path} cannot be read ({err.__class__.__name__}: {first}); resume from another one "
                "(resume_from_checkpoint=latest skips checkpoints that fail their checksums)."
            ) from None
        missing = [n for n in self.param_names if n not in weights]
        if missing:
            raise ValueError(
                f"checkpoint {path} does not match this model ({len(missing)} trained tensors missing, e.g. {missing[0]})."
            )
        with torch.no_grad():
            for n, p in zip(self.param_names, self.params, strict=True):
                self.assign_(p, weights[n])
            if self.ema is not None and ema is not None:
                for n, e in zip(self.param_names, self.ema, strict=True):
                    self.assign_(e, ema[n])
        if extra is not None:
            self.load_extra_state({k: v.to(self.device) for k, v in extra.items()})
        self._load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if self.accelerator.scaler is not None and "scaler" in state:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        rewards = info.get("reward_state", {})
        if "reward" in rewards:
            self.reward.load_training_state(rewards["reward"])
        if "eval_reward" in rewards and self.eval_reward is not self.reward:
            self.eval_reward.load_training_state(rewards["eval_reward"])
        self.step = step
        self._saved_step = step
        self.bad_steps = int(info.get("bad_steps", 0))
        self._state_size_logged = True  # the run logged it at its first update, before the checkpoint
        self.accelerator.print(f"[diffrl] resumed from {path} at step {self.step}")

    def _gather_to_main(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole tensors of (possibly sharded) ``tensors``, on the CPU of the main process only (others get an empty
        dict). A collective: every process gathers each tensor in turn, so at most one whole tensor at a time is on
        a GPU, and only the main process keeps a copy."""
        main = self.accelerator.is_main_process
        out = {}
        for name, tensor in tensors.items():
            whole = self.full_tensor(tensor.detach())
            if main:
                out[name] = whole.cpu().contiguous()
            del whole
        return out

    def _save_sharded_pipeline(self, path: Path) -> Path | None:
        """FSDP full fine-tuning: gather the transformer on the main process, put an unsharded copy (built on the meta
        device, so no second allocation) into the pipeline for the save, then put the sharded one back."""
        state = self._gather_to_main(self.model.transformer.state_dict())
        if not self.accelerator.is_main_process:
            return None
        sharded = self.model.pipe.transformer
        with torch.device("meta"):
            plain = self._transformer_cls.from_config(sharded.config)
        plain.load_state_dict(state, strict=True, assign=True)
        self.model.pipe.transformer = plain
        try:
            return self.model.save_pretrained(path)
        finally:
            self.model.pipe.transformer = sharded

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
                    state = self._gather_to_main(self.model.lora_state_dict())
                    main = self.accelerator.is_main_process
                    path = self.model.save_lora(self.output_dir / "lora", state=state) if main else None
                else:
                    path = self._save_sharded_pipeline(self.output_dir / "pipeline")
            self.accelerator.wait_for_everyone()
            return path
        if not self.accelerator.is_main_process:
            return None
        with self.ema_weights():
            if self.model.has_lora:
                return self.model.save_lora(self.output_dir / "lora")
            return self.model.save_pretrained(self.output_dir / "pipeline")
