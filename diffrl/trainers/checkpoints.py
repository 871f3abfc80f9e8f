"""Checkpoints: what one holds, writing, verifying, finding the newest good one, pruning, resuming.

The module-level functions work on directories on disk (the completion marker, checksums, the safe swap, pruning);
:class:`CheckpointManager` writes and reads a run's checkpoints with them (the engine's ``save_checkpoint`` and
``load_checkpoint``).

A checkpoint is a directory ``checkpoint-<step>`` holding the run's tensors and state (written by
:meth:`CheckpointManager.save`). It is first written under a hidden temporary name; the last
file written is ``checksums.json`` (the SHA-256 of every other file), which marks it complete; then it is renamed into
place. A kill at any moment therefore leaves either a complete checkpoint or a hidden directory that is never read.
Loading verifies the checksums: a checkpoint whose files changed (a flipped bit, a truncated copy) is refused, and
``latest`` falls back to the newest checkpoint that verifies. Checkpoints written before the marker existed have no
``checksums.json``; they are read as before, unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..config import ConfigError, config_to_dict, resume_mismatch
from ..utils import apply_umask
from .distributed import assign_

__all__ = [
    "CheckpointManager",
    "Checkpointed",
    "Restored",
    "CHECKPOINT_PREFIX",
    "CHECKSUMS",
    "write_checksums",
    "verify",
    "checkpoints",
    "find_latest",
    "swap_into_place",
    "prune",
]

CHECKPOINT_PREFIX = "checkpoint-"
CHECKSUMS = "checksums.json"  # written last: a checkpoint with it is complete
_REQUIRED = ("trainable.safetensors", "optim.pt", "state.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: Path) -> None:
    """Write ``checksums.json`` (SHA-256 and size of every file in ``directory``) through a temporary file and
    ``fsync``, so the marker exists only once every file it names is on disk."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != CHECKSUMS)
    for p in files:  # the data reach the disk before the marker that vouches for them
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    table = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
    tmp = directory / f".{CHECKSUMS}.tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / CHECKSUMS)


def verify(directory: Path) -> str | None:
    """``None`` when ``directory`` is a complete checkpoint whose files match their checksums, else the reason in a
    few words (a missing file, a size or checksum mismatch, no completion marker). A checkpoint from before the
    marker (no ``checksums.json`` but every required file) verifies as ``None``."""
    missing = [name for name in _REQUIRED if not (directory / name).is_file()]
    marker = directory / CHECKSUMS
    if not marker.is_file():
        return f"{missing[0]} is missing" if missing else None
    try:
        table = json.loads(marker.read_text())
    except (OSError, ValueError):
        return f"{CHECKSUMS} cannot be read"
    for name, entry in sorted(table.items()):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry.get("bytes"):
            return f"{name} has {path.stat().st_size} bytes, not the {entry.get('bytes')} it was written with"
        if _sha256(path) != entry.get("sha256"):
            return f"{name} does not match its checksum (the file changed after it was written)"
    if missing:
        return f"{missing[0]} is missing"
    return None


def checkpoints(output_dir: Path) -> list[Path]:
    """The ``checkpoint-<step>`` directories of ``output_dir``, oldest first (hidden temporary ones excluded)."""
    found = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()]
    return sorted(found, key=lambda p: _step_of(p))


def _step_of(path: Path) -> int:
    try:
        return int(path.name[len(CHECKPOINT_PREFIX) :])
    except ValueError:
        return -1


def find_latest(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of ``output_dir`` that verifies (``None`` if none does), and the newer ones skipped
    with their reasons."""
    skipped = []
    for path in reversed(checkpoints(output_dir)):
        reason = verify(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the complete checkpoint ``tmp`` to ``final``. An existing ``final`` (the same step written again) is
    first moved aside and only removed once the new one is in place, so no moment leaves the step without a complete
    copy on disk (a kill between the renames leaves it under ``.old-<name>`` and the new one under ``tmp``)."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def prune(output_dir: Path, limit: int, known_good: Path | None = None) -> list[Path]:
    """Delete all but the newest ``limit`` checkpoints (0: keep all), but never the newest one that verifies;
    ``known_good`` is one just written (not hashed again). Returns what was deleted."""
    if limit <= 0:
        return []
    found = checkpoints(output_dir)
    doomed = found[: max(0, len(found) - limit)]
    kept = found[len(doomed) :]
    if doomed and known_good not in kept and all(verify(p) is not None for p in reversed(kept)):
        good, _ = find_latest(output_dir)  # every kept one is bad: keep the newest good one as well
        doomed = [p for p in doomed if p != good]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# ---------------------------------------------------------------------------------------------- a run's checkpoints
class Checkpointed(Protocol):
    """What :class:`CheckpointManager` reads and restores of the trainer."""

    cfg: Any
    accelerator: Any  # its gradient scaler
    dist: Any  # a diffrl.trainers.distributed.Distributed
    device: torch.device
    model: Any
    step: int
    bad_steps: int
    params: list[torch.nn.Parameter]
    param_names: list[str]
    ema: list[torch.Tensor] | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    reward: Any
    eval_reward: Any

    def extra_state(self) -> dict[str, torch.Tensor]: ...

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None: ...


@dataclass
class Restored:
    """Where :meth:`CheckpointManager.load` resumed: the checkpoint, its step and its count of bad steps in a row."""

    path: Path
    step: int
    bad_steps: int


class CheckpointManager:
    """Writes, finds and restores the checkpoints of the run in ``output_dir``; the methods that write or restore
    are given the trainer (``run``), which the manager does not keep.

    ``saved_step`` is the step of the last checkpoint written or loaded; that step is not written again.
    """

    def __init__(self, output_dir: Path, accelerator):
        self.output_dir = output_dir
        self.accelerator = accelerator
        self.saved_step = -1
        self._found: dict[str, Path | None] = {}  # resume_from_checkpoint -> the verified checkpoint it names

    # ------------------------------------------------------------------------------------------ finding
    def find(self, which: str) -> Path | None:
        """The checkpoint ``resume_from_checkpoint`` names, verified against its checksums: for ``latest`` the newest
        complete one in ``output_dir`` that verifies (``None`` if there is none; each newer one skipped is reported
        in one line), else the given directory, which must verify."""
        if which in self._found:
            return self._found[which]
        output_dir = self.output_dir
        if which == "latest":
            path, skipped = find_latest(output_dir)
            for bad, reason in skipped:
                self.accelerator.print(
                    f"[diffrl] warning: skipping {bad.name}: {reason}; "
                    + (f"resuming from {path.name}" if path is not None else "no older checkpoint verifies")
                )
            if path is None and skipped:
                raise ValueError(
                    f"no checkpoint in {output_dir} verifies (the newest, {skipped[0][0].name}: {skipped[0][1]}); "
                    "start a new output_dir, or set resume_from_checkpoint to a good copy."
                )
        else:
            path = Path(which)
            if not (path / "state.json").is_file():
                raise FileNotFoundError(
                    f"resume_from_checkpoint={which} is not a checkpoint directory; pass latest or a checkpoint-N path."
                )
            reason = verify(path)
            if reason is not None:
                raise ValueError(
                    f"checkpoint {which} is damaged ({reason}); resume from another one (resume_from_checkpoint=latest "
                    "takes the newest that verifies)."
                )
        self._found[which] = path
        return path

    def check_resume_config(self, path: Path, cfg) -> None:
        """Refuse to continue a run under another config: its replay would no longer be what the checkpoint's run
        did. Fields in :data:`diffrl.config.RESUME_FREE_KEYS` may change. A checkpoint from another directory
        starts a new run from its weights, so there a difference is only reported."""
        try:
            saved = json.loads((path / "state.json").read_text()).get("config")
        except (OSError, ValueError, AttributeError) as err:
            raise ValueError(
                f"checkpoint {path} cannot be read (state.json: {err.__class__.__name__}); resume from another one."
            ) from None
        diff = resume_mismatch(saved, cfg) if saved is not None else None
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

    # ------------------------------------------------------------------------------------------ writing
    def state(self, run: Checkpointed) -> dict[str, Any]:
        """What a checkpoint holds, as whole tensors on the CPU of the main process. Under FSDP and DeepSpeed the
        tensors and AdamW states are gathered (a collective every process runs) and the optimiser state is written
        in the unsharded layout (parameters numbered in ``run.params`` order), so DDP, FSDP and ZeRO checkpoints
        are the same files."""
        gather = run.dist.gather_to_main
        state: dict[str, Any] = {"trainable": gather(dict(zip(run.param_names, run.params, strict=True)))}
        if run.ema is not None:
            state["ema"] = gather(dict(zip(run.param_names, run.ema, strict=True)))
        extra = run.extra_state()
        if extra:
            state["extra"] = gather(extra)
        optimizer = run.dist.full_optimizer_state(
            run.model.transformer, run.optimizer, run.params, run.param_names
        )
        if optimizer is not None:  # None: an FSDP process other than the main one
            state["optimizer"] = optimizer
        return state

    @staticmethod
    def reward_state(run: Checkpointed) -> dict[str, dict]:
        """The rewards' checkpointed state (e.g. running normalisation statistics), JSON-serialisable."""
        state = {"reward": run.reward.training_state()}
        if run.eval_reward is not run.reward:
            state["eval_reward"] = run.eval_reward.training_state()
        return state

    def save(self, run: Checkpointed) -> Path | None:
        """Write ``checkpoint-<step>``: every file into a hidden temporary directory, ``checksums.json`` last (the
        completion marker), then a rename into place; then keep the newest ``checkpoints_total_limit``. A step
        already saved (the end of a run whose last step was a checkpointing step, or a resumed finished run) is not
        written again."""
        dist = run.dist
        dist.wait()
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{run.step:06d}"
        if self.saved_step == run.step:
            return final
        collective = dist.sharded or dist.ds_engine is not None
        state = self.state(run) if collective else None  # gathering: every process takes part
        if not dist.is_main:
            self.saved_step = run.step
            dist.wait()
            return final
        from safetensors.torch import save_file

        if state is None:
            state = self.state(run)
        tmp = self.output_dir / f".tmp-{final.name}"
        try:
            self.write(run, state, tmp, final, save_file)
        except Exception as err:  # noqa: BLE001 - e.g. the disk filled up (torch.save reports it as a RuntimeError)
            shutil.rmtree(tmp, ignore_errors=True)
            kept = [p.name for p in checkpoints(self.output_dir)]
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
        self.saved_step = run.step
        dist.wait()
        return final

    def write(self, run: Checkpointed, state: dict[str, Any], tmp: Path, final: Path, save_file) -> None:
        """Write ``state`` (from :meth:`state`) and the run's counters into ``tmp``, mark it complete, swap it into
        place as ``final`` and prune."""
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(state["trainable"], tmp / "trainable.safetensors")
        if "ema" in state:
            save_file(state["ema"], tmp / "ema.safetensors")
        if "extra" in state:
            save_file(state["extra"], tmp / "extra.safetensors")
        optim_state = {
            "optimizer": state["optimizer"],
            "scheduler": run.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        scaler = run.accelerator.scaler
        if scaler is not None:
            optim_state["scaler"] = scaler.state_dict()
        torch.save(optim_state, tmp / "optim.pt")
        (tmp / "state.json").write_text(
            json.dumps(
                {
                    "step": run.step,
                    "bad_steps": run.bad_steps,
                    "config": config_to_dict(run.cfg),
                    "reward_state": self.reward_state(run),
                },
                indent=2,
            )
        )
        write_checksums(tmp)
        apply_umask(tmp)
        swap_into_place(tmp, final)
        prune(self.output_dir, run.cfg.checkpoints_total_limit, known_good=final)

    # ------------------------------------------------------------------------------------------ resuming
    def load(self, run: Checkpointed, which: str) -> Restored | None:
        """Restore a checkpoint (``latest`` or a path) into the run: weights, optimiser, scheduler, gradient scaler,
        EMA, the algorithm's extra tensors, reward state (running normalisation statistics), torch's RNG. Returns
        where it resumed (the caller sets its step and counters), or ``None`` when ``latest`` finds no checkpoint."""
        from safetensors.torch import load_file

        path = self.find(which)
        if path is None:
            self.accelerator.print(f"[diffrl] no checkpoint in {self.output_dir}; starting fresh")
            return None
        # every file is read before anything is changed: a checkpoint that cannot be read leaves the trainer as it was
        # torch.load knows "cpu", not gloo's "cpu:0"
        where = "cpu" if run.device.type == "cpu" else run.device
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
        missing = [n for n in run.param_names if n not in weights]
        if missing:
            raise ValueError(
                f"checkpoint {path} does not match this model ({len(missing)} trained tensors missing, e.g. {missing[0]})."
            )
        with torch.no_grad():
            for n, p in zip(run.param_names, run.params, strict=True):
                assign_(p, weights[n])
            if run.ema is not None and ema is not None:
                for n, e in zip(run.param_names, run.ema, strict=True):
                    assign_(e, ema[n])
        if extra is not None:
            run.load_extra_state({k: v.to(run.device) for k, v in extra.items()})
        run.dist.load_full_optimizer_state(
            run.model.transformer, run.optimizer, run.params, run.param_names, state["optimizer"]
        )
        run.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        scaler = run.accelerator.scaler
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        rewards = info.get("reward_state", {})
        if "reward" in rewards:
            run.reward.load_training_state(rewards["reward"])
        if "eval_reward" in rewards and run.eval_reward is not run.reward:
            run.eval_reward.load_training_state(rewards["eval_reward"])
        self.saved_step = step
        return Restored(path, step, int(info.get("bad_steps", 0)))
