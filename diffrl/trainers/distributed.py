"""How a run is spread over processes: DDP, FSDP2 and DeepSpeed ZeRO set-up, collectives and sharded tensors.

:class:`Distributed` wraps the accelerator with what the engine adds to it. Every process draws the same prompts for
a step and takes its share (see :mod:`diffrl.trainers.engine`); this module holds what the processes do together:

* DDP (plain ``accelerate launch``): every process keeps the whole model; the gradients of the trained weights are
  averaged over processes before each update (:meth:`Distributed.average_gradients`).
* FSDP2 (``fsdp: true``, or an accelerate config with ``distributed_type: FSDP`` and ``fsdp_version: 2``): the
  engine does not hand the model to ``accelerator.prepare``; :meth:`Distributed.shard_transformer` calls
  ``torch.distributed.fsdp.fully_shard`` on every transformer block and then on the transformer (on each of Wan
  2.2's experts when both train, each its own root), after the trained weights are cast to float32 and every adapter
  exists; the optimiser, scheduler and EMA are built on the sharded parameters. An adapter whose forwards could
  take different sharded modules on different processes keeps them in step through ``set_shard_sync`` (Wan 2.2's
  experts: see :meth:`diffrl.models.wan.WanModel.set_shard_sync`). FSDP's reduce-scatter averages the gradients, so the engine's own all-reduce is skipped. Checkpoints
  and the final LoRA or pipeline gather the full tensors one at a time (a collective; only the main process keeps
  them), so the files are those of an unsharded run.
* DeepSpeed (an accelerate config with ``distributed_type: DEEPSPEED``, or ``zero_stage`` with several processes):
  ZeRO stage 1 or 2 partitions the AdamW states (and at stage 2 the gradients); the DeepSpeed specifics are in
  :mod:`diffrl.trainers.zero`. Backward, the update and discarding a step's gradients go through DeepSpeed.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from ..config import ConfigError
from . import zero

__all__ = ["Distributed", "is_dtensor", "full_tensor", "assign_"]


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is an FSDP2 shard (a DTensor); an unsharded run never imports the DTensor module."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (FSDP's DTensor), else the tensor itself. Gathering is a collective:
    every process must call it, in the same order."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def assign_(dst: torch.Tensor, full: torch.Tensor) -> None:
    """``dst.copy_(full)`` where ``dst`` may be sharded: every process passes the whole tensor and keeps its
    shard (a collective under FSDP)."""
    full = full.to(dst.device, dst.dtype)
    if is_dtensor(dst):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full, dst.device_mesh, dst.placements)
    dst.copy_(full)


class Distributed:
    """The accelerator and the engine's FSDP2 and DeepSpeed parts.

    Made in two stages around the config's validation: the constructor reads the launch (refusing a DeepSpeed or
    FSDP config the engine does not support, before any model loads), :meth:`start` then checks that DeepSpeed
    imports and decides whether the run is sharded.
    """

    def __init__(self, accelerator, cfg):
        self.accelerator = accelerator
        kind = accelerator.distributed_type.name
        self.ds_config = None  # DeepSpeed: accelerate's config, or the run's zero_stage
        if kind == "DEEPSPEED":
            self.ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
            stage = (self.ds_config.get("zero_optimization") or {}).get("stage", 0)
            if cfg.zero_stage and cfg.zero_stage != stage:
                raise ConfigError(
                    f"zero_stage={cfg.zero_stage} but the accelerate DeepSpeed config says stage {stage}; "
                    "make them agree or drop zero_stage."
                )
        elif cfg.zero_stage and accelerator.num_processes > 1:
            self.ds_config = {"zero_optimization": {"stage": cfg.zero_stage}}
        elif cfg.zero_stage:
            accelerator.print(
                f"[diffrl] zero_stage={cfg.zero_stage} with one process: nothing to partition, training without DeepSpeed"
            )
        self.zero_stage = 0 if self.ds_config is None else zero.check_deepspeed_config(self.ds_config, cfg)
        self.ds_engine = None  # the DeepSpeed engine, made once the optimiser exists (init_deepspeed)
        if kind == "FSDP":
            version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
            if version != 2:
                raise NotImplementedError(
                    f"the accelerate config asks for FSDP version {version}; set fsdp_config.fsdp_version: 2 "
                    "(see configs/accelerate/fsdp.yaml)."
                )
        self.fsdp_requested = cfg.fsdp or kind == "FSDP"  # sharded when there are several processes
        self.sharded = False  # decided by start()
        self.root_classes = []  # (module, its class before fully_shard swapped in a subclass) of each sharded root

    def start(self, cfg) -> None:
        """After the config is validated: DeepSpeed must import (before any model is loaded); shard with FSDP2 when
        it is asked for and there are several processes."""
        if self.zero_stage:
            zero.require_deepspeed()
        self.sharded = self.fsdp_requested and self.world > 1
        if cfg.fsdp and not self.sharded:
            self.accelerator.print(
                "[diffrl] fsdp=true with one process: nothing to shard, training unsharded"
            )

    # ------------------------------------------------------------------------------------------ processes
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-process tensor over processes (in process order)."""
        return self.accelerator.gather(tensor.contiguous().to(self.device)) if self.world > 1 else tensor

    def gather_objects(self, local) -> list:
        """``[local]`` of every process, in process order (any picklable object; sizes may differ)."""
        if self.world == 1:
            return [local]
        from accelerate.utils import gather_object

        return gather_object([local])

    def any(self, flag: bool) -> bool:
        """True on every process if it is true on any."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([float(flag)], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def any_each(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise: true where ``flags`` (a bool tensor of this process) is true on any process (a collective);
        the adapter's hook that keeps FSDP2's collectives in step (:meth:`diffrl.models.FlowModel.set_shard_sync`)."""
        if self.world == 1:
            return flags.bool()
        counts = self.accelerator.reduce(flags.to(self.device, torch.float32), reduction="sum")
        return counts > 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of a per-process tensor over all processes, on this process's device."""
        tensor = tensor.to(self.device)
        return self.accelerator.reduce(tensor, reduction="sum") if self.world > 1 else tensor

    def mean(self, value: float) -> float:
        """The mean of a per-process number over all processes."""
        if self.world == 1:
            return float(value)
        t = torch.tensor([float(value)], device=self.device)
        return float(self.accelerator.reduce(t, reduction="mean").item())

    # ------------------------------------------------------------------------------------------ set-up
    def shard_transformer(self, model, param_names: list[str]) -> list[torch.nn.Parameter]:
        """FSDP2: ``fully_shard`` every transformer block, then the transformer (the adapter's ``shard_roots``: each
        of Wan 2.2's two experts when both train), and hand the adapter the collective that keeps its forwards in
        step (``set_shard_sync``); returns the trained parameters collected again (``fully_shard`` replaces them)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        transformer = model.transformer
        roots = model.shard_roots()
        # fully_shard swaps in a subclass; the final save rebuilds these
        self.root_classes = [(root, type(root)) for root in roots]
        blocks = model.shard_blocks()
        if not blocks:
            raise NotImplementedError(
                f"{type(transformer).__name__} has none of the block lists FSDP shards ({model.shard_block_lists}); "
                "launch this model with DDP."
            )
        for block in blocks:
            fully_shard(block, mesh=mesh)
        # Several roots (Wan 2.2's experts): a step's backward may reach one of them only, and FSDP2 keeps a root's
        # own weights gathered from its forward until a backward reaches it, so a root skipped by the backward would
        # keep stale copies through the update (and unregistered shards for the checkpoint's optimiser state): each
        # root gives its gathered weights back after every forward, as the blocks do.
        again = {"reshard_after_forward": True} if len(roots) > 1 else {}
        for root in roots:
            fully_shard(root, mesh=mesh, **again)
        model.set_shard_sync(self.any_each)
        params = [p for p in model.trainable_parameters()]
        names = [n for n, p in transformer.named_parameters() if p.requires_grad]
        if names != param_names:
            raise RuntimeError(
                "fully_shard changed the trained parameters' names; this torch version is not supported."
            )
        return params

    def init_deepspeed(self, transformer, optimizer, params: list, cfg) -> None:
        """Wrap the transformer and the optimiser in DeepSpeed's engine (ZeRO runs only)."""
        if self.zero_stage:
            self.ds_engine = zero.initialize(
                transformer,
                optimizer,
                params,
                zero.deepspeed_init_config(self.ds_config, cfg, self.world),
            )

    # ------------------------------------------------------------------------------------------ the update
    def autocast(self, mixed_precision: str):
        if mixed_precision == "no":
            return contextlib.nullcontext()
        # accelerate leaves precision to DeepSpeed's config; the engine autocasts
        if self.ds_engine is not None:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of ``loss`` (DeepSpeed's backward under ZeRO, which reduces as it goes)."""
        if self.ds_engine is not None:
            self.ds_engine.backward(loss)
        else:
            self.accelerator.backward(loss)

    def discard_gradients(self, optimizer, params: list) -> None:
        """Drop the gradients accumulated since the last update. Under DeepSpeed the partitioned gradients are
        cleared by DeepSpeed's own overflow path: one backward of a NaN through the trained weights, then a step,
        which finds the overflow and skips the update."""
        if self.ds_engine is None:
            optimizer.zero_grad(set_to_none=True)
            return
        poison = sum(p.sum() for p in params) * float("nan")
        self.ds_engine.backward(poison)
        self.ds_engine.step()
        if self.ds_engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied an update with NaN gradients; its overflow check is off.")

    def average_gradients(self, params: list) -> None:
        """Give every trained weight a gradient (zeros where none flowed) and average them over processes (DDP);
        FSDP's reduce-scatter has averaged them already."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.world > 1 and not self.sharded:
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    def deepspeed_step(self, max_grad_norm: float) -> dict[str, float] | None:
        """DeepSpeed's step is the update: it reduces what is left, checks for non-finite gradients (then skips and
        clears them), clips to ``max_grad_norm`` and steps the AdamW on each partition. ``None`` when it skipped the
        update, else the metrics (``train/grad_norm`` when clipping)."""
        self.ds_engine.step()
        if not self.ds_engine.was_step_applied():
            return None
        metrics = {}
        if max_grad_norm > 0:
            metrics["train/grad_norm"] = float(self.ds_engine.get_global_grad_norm())
        return metrics

    @staticmethod
    def optimizer_state_bytes(optimizer) -> int:
        """The bytes of the optimiser's state tensors this process holds (its shards under FSDP)."""
        local = 0
        for state in optimizer.state.values():
            for t in state.values():
                if torch.is_tensor(t) and t.dim() > 0:
                    t = t.to_local() if is_dtensor(t) else t
                    local += t.numel() * t.element_size()
        return local

    # ------------------------------------------------------------------------------------------ whole tensors
    def gather_to_main(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole tensors of (possibly sharded) ``tensors``, on the CPU of the main process only (others get an empty
        dict). A collective: every process gathers each tensor in turn, so at most one whole tensor at a time is on
        a GPU, and only the main process keeps a copy."""
        main = self.is_main
        out = {}
        for name, tensor in tensors.items():
            whole = full_tensor(tensor.detach())
            if main:
                out[name] = whole.cpu().contiguous()
            del whole
        return out

    def reshard_roots(self) -> None:
        """Give back the gathered weights that a sharded root keeps after a forward no backward followed (an
        evaluation): FSDP2 leaves a root's own parameters unsharded until its next backward, and while they are the
        transformer's parameters the optimiser's state, kept for the sharded ones, cannot be mapped to names (full
        fine-tuning trains the root's own weights: the checkpoint after an evaluation failed with a KeyError)."""
        for root, _ in self.root_classes:
            root.reshard()

    def full_optimizer_state(
        self, transformer, optimizer, params: list, param_names: list[str]
    ) -> dict | None:
        """The optimiser's state in the unsharded layout (``torch.optim.AdamW.state_dict()``, parameters numbered in
        ``params`` order), so DDP, FSDP and ZeRO checkpoints are the same files. Under FSDP and DeepSpeed the states
        are gathered (a collective every process runs); under FSDP the other processes get ``None``."""
        if self.ds_engine is not None:
            return zero.gather_optimizer_state(self.ds_engine, params)
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        self.reshard_roots()
        by_name = get_optimizer_state_dict(
            transformer,
            optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        if not self.is_main:
            return None
        index = {n: i for i, n in enumerate(param_names)}
        return {
            "state": {index[n]: v for n, v in by_name["state"].items()},
            "param_groups": [
                {**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]
            ],
        }

    def load_full_optimizer_state(
        self, transformer, optimizer, params: list, param_names: list[str], saved: dict
    ) -> None:
        """Load a :meth:`full_optimizer_state` (every process passes it whole and keeps its part). Under DeepSpeed the
        trained weights, just assigned, are copied into its float32 master weights first."""
        if self.ds_engine is not None:
            zero.set_master_weights(params)
            zero.scatter_optimizer_state(self.ds_engine, params, saved)
            return
        if not self.sharded:
            optimizer.load_state_dict(saved)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        by_name = {  # a new dict: set_optimizer_state_dict changes the one it is given
            "state": {param_names[i]: dict(v) for i, v in saved["state"].items()},
            "param_groups": [
                {**g, "params": [param_names[i] for i in g["params"]]} for g in saved["param_groups"]
            ],
        }
        set_optimizer_state_dict(
            transformer,
            optimizer,
            optim_state_dict=by_name,
            options=StateDictOptions(full_state_dict=True),
        )

    def save_sharded_pipeline(self, model, path: Path) -> Path | None:
        """FSDP full fine-tuning: gather each sharded root (the transformer; both of Wan 2.2's experts, the frozen one
        too) on the main process, one after the other, put unsharded copies (built on the meta device, so no second
        allocation) into the pipeline for the save, then put the sharded ones back."""
        self.reshard_roots()
        states = [self.gather_to_main(root.state_dict()) for root, _ in self.root_classes]
        if not self.is_main:
            return None
        swapped = []
        try:
            for (root, cls), state in zip(self.root_classes, states, strict=True):
                name = next(n for n, c in model.pipe.components.items() if c is root)
                with torch.device("meta"):
                    plain = cls.from_config(root.config)
                plain.load_state_dict(state, strict=True, assign=True)
                setattr(model.pipe, name, plain)
                swapped.append((name, root))
            return model.save_pretrained(path)
        finally:
            for name, root in swapped:
                setattr(model.pipe, name, root)
