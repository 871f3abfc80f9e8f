"""The run's records in its output directory: ``metrics.jsonl`` (always), TensorBoard or W&B (``report_to``),
``status.json`` (running, finished, aborted or stopped) and the resolved ``config.json``.

Only the main process writes; a :class:`Tracker` made on another process does nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import config_to_dict

__all__ = ["Tracker", "check_report_to"]


def check_report_to(report_to: str) -> None:
    """The metric sink's package is there (checked before the model loads, not at the first log line)."""
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if package is None:
        return
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ImportError(
            f"report_to={report_to} needs the {package} package: pip install {package} (or set "
            "report_to=none; metrics.jsonl is written either way)."
        )


class Tracker:
    """Metrics to ``metrics.jsonl`` and the ``report_to`` sink, and the run's status, on the main process.

    Args:
        output_dir: the run directory.
        cfg: the run's :class:`~diffrl.config.TrainConfig` (``report_to``, ``max_steps``; W&B gets all of it).
        enabled: whether this process writes (the main process).
    """

    def __init__(self, output_dir: Path, cfg, enabled: bool):
        self.enabled = enabled
        self.output_dir = output_dir
        self.path = output_dir / "metrics.jsonl"
        self.max_steps = cfg.max_steps
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(
                    "report_to=tensorboard needs the tensorboard package: pip install tensorboard (or set report_to=none)."
                ) from err
            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))
        elif cfg.report_to == "wandb":
            import wandb

            self.wandb = wandb.init(project="diffrl", dir=str(self.path.parent), config=config_to_dict(cfg))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

    def write_status(self, status: str, step: int, reason: str = "") -> None:
        """``status.json`` in the run directory (atomic): ``running``, ``finished``, ``aborted`` (the NaN guard) or
        ``stopped`` (a signal), with the step and the reason, so a stopped run cannot pass for a finished one."""
        if not self.enabled:
            return
        info = {"status": status, "step": step, "max_steps": self.max_steps}
        if reason:
            info["reason"] = reason
        tmp = self.output_dir / f".status.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, self.output_dir / "status.json")

    def drop_replayed_metrics(self, last_kept: int) -> None:
        """Rewrite metrics.jsonl without its rows after step ``last_kept`` (and any line a kill cut short): a run
        resumed from checkpoint-N logs steps N+1... again. Atomic (temporary file, then rename)."""
        path = self.path
        if not self.enabled or not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_kept:
                kept.append(line)
        dropped = len(lines) - len(kept)
        if not dropped:
            return
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        since = f"after step {last_kept}" if last_kept >= 0 else "before the first checkpoint"
        print(f"[diffrl] metrics.jsonl: dropped {dropped} rows logged {since}, which this run logs again")

    def announce(self, cfg, algorithm: str, info: dict[str, Any], step: int) -> None:
        """Write the resolved config and its derived sizes (``config.json``), mark the run ``running`` and say so."""
        if not self.enabled:
            return
        resolved = {"config": config_to_dict(cfg), "derived": info}
        (self.output_dir / "config.json").write_text(json.dumps(resolved, indent=2))
        self.write_status("running", step)
        verbose = os.environ.get("DIFFRL_VERBOSE") == "1"
        if verbose:
            import yaml

            print(
                f"[diffrl] resolved config:\n{yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip()}"
            )
        print(f"[diffrl] {algorithm}: {json.dumps(info)}")
        print(
            f"[diffrl] resolved config saved to {self.output_dir / 'config.json'}"
            + ("" if verbose else " (DIFFRL_VERBOSE=1 prints it)")
        )
