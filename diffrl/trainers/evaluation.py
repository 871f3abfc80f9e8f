"""Evaluation on the held-out prompts: ODE samples from fixed seeds with the EMA weights, scored by the evaluation
reward, averaged over processes, drawn as ``eval/step_NNNNNN.png`` (:mod:`diffrl.trainers.eval_grid`)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Protocol

import torch

from .common import seeded_generator

__all__ = ["Evaluated", "evaluate", "eval_means", "eval_logged_at"]


class Evaluated(Protocol):
    """What :func:`evaluate` reads of the trainer."""

    cfg: object
    eval_set: object
    eval_reward: object
    model: object
    dist: object
    output_dir: Path
    step: int

    def ema_weights(self) -> contextlib.AbstractContextManager: ...

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def evaluate_reward(self, reward, images: torch.Tensor, prompts: list[str], **metadata): ...


@torch.no_grad()
def evaluate(run: Evaluated) -> dict[str, float]:
    """Sample the held-out prompts (ODE, ``sample.eval_images_per_prompt`` fixed seeds each, EMA weights) and
    score them with the evaluation reward; ``eval/reward/<name>/mean`` over all processes."""
    from diffrl.samplers import rollout

    cfg = run.cfg
    dist = run.dist
    model = run.model
    s = cfg.sample
    prompts = run.eval_set
    per = s.eval_images_per_prompt
    # evaluation row = (prompt, image): row r * n + p is image r of prompt p, spread over the processes
    n = len(prompts)
    mine = list(range(dist.rank, n * per, dist.world))
    real = len(mine)
    if dist.sharded:  # FSDP gathers weights in every forward: the shorter shares run a repeated row, dropped
        mine += [mine[-1] if mine else 0] * (-(-n * per // dist.world) - real)
    if not mine:
        return eval_means({}, dist)  # still takes part in the reduction the other processes wait for
    local = prompts.take([row % n for row in mine])

    def eval_seed(row: int) -> torch.Generator:
        p, r = row % n, row // n  # image 0 keeps the seed of a one-image evaluation
        keys = (cfg.seed, 10**6 + p) if r == 0 else (cfg.seed, 10**6 + p, r)
        return seeded_generator(*keys)

    guidance = s.eval_guidance_scale
    images = []
    with run.ema_weights():
        for i in range(0, len(mine), s.batch_size):
            chunk = local.prompts[i : i + s.batch_size]
            cond = model.encode(chunk)
            noise = torch.cat(
                [model.sample_noise(1, s.height, s.width, eval_seed(mine[i + j])) for j in range(len(chunk))]
            )
            with run.autocast():
                out = rollout(
                    model,
                    cond,
                    model.schedule(s.eval_num_steps, s.height, s.width),
                    noise,
                    guidance_scale=guidance,
                )
            images.append(model.decode(out.final))
    images = torch.cat(images)
    if real < len(mine):
        if not real:
            return eval_means({}, dist)
        images, local = images[:real], prompts.take([row % n for row in mine[:real]])
    # evaluation must not move running stats
    reward = run.eval_reward
    freeze = getattr(reward, "frozen_statistics", None)
    with freeze() if freeze is not None else contextlib.nullcontext():
        result = run.evaluate_reward(reward, images, local.prompts, **local.batch_metadata())
    comps = dict(result.components)
    comps.setdefault(reward.name, result.total)
    metrics = eval_means(
        {name: (float(v.detach().float().sum()), int(v.numel())) for name, v in comps.items()}, dist
    )
    if dist.is_main:
        from .eval_grid import save_eval_grid

        means = "  ".join(f"{k.split('/')[-2]} {v:.3g}" for k, v in metrics.items())
        save_eval_grid(
            images,
            local.prompts,
            comps,
            run.output_dir / "eval" / f"step_{run.step:06d}.png",
            title=f"step {run.step}, {len(images)} held-out images (this process's share); means: {means}",
        )
    return metrics


def eval_means(local: dict[str, tuple[float, int]], dist) -> dict[str, float]:
    """Means over all processes of per-process ``{name: (sum, count)}``; the eval prompts rarely split evenly
    over processes (a tensor all-gather needs equal sizes), so the sums and counts are gathered as objects."""
    parts = dist.gather_objects(local)
    names = list(dict.fromkeys(name for part in parts for name in part))
    return {
        f"eval/reward/{name}/mean": sum(p[name][0] for p in parts if name in p)
        / sum(p[name][1] for p in parts if name in p)
        for name in names
    }


def eval_logged_at(metrics_path: Path, step: int, dist) -> bool:
    """Whether ``metrics_path`` (metrics.jsonl) holds an evaluation row for ``step`` (read by the main process,
    agreed by all)."""
    found = False
    if dist.is_main and metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
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
    return dist.any(found)
