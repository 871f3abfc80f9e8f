"""Evaluation on the held-out prompts: ODE samples from fixed seeds with the EMA weights, scored by the evaluation
reward, averaged over processes, drawn as ``eval/step_NNNNNN.png`` (:mod:`diffrl.trainers.eval_grid`), and the
reward-hacking monitor's ``monitor/*`` metrics and warnings (:mod:`diffrl.trainers.monitor`)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Protocol

import torch

from . import monitor as hacking
from .common import seeded_generator

__all__ = [
    "Evaluated",
    "evaluate",
    "eval_means",
    "eval_logged_at",
    "monitor_metrics",
    "raw_total",
    "replay_monitor",
]


class Evaluated(Protocol):
    """What :func:`evaluate` reads of the trainer."""

    cfg: object
    eval_set: object
    reward: object
    eval_reward: object
    monitor: hacking.MonitorState
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
    score them with the evaluation reward; ``eval/reward/<name>/mean`` over all processes, plus the monitor's
    ``monitor/*`` (:func:`monitor_metrics`) unless ``monitor.enabled`` is false."""
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
    if not mine:  # still takes part in the reductions the other processes wait for
        return {**eval_means({}, dist), **monitor_metrics(run, {})}
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
            cond = model.encode_rows(chunk, local.take(range(i, i + len(chunk))).batch_metadata())
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
            return {**eval_means({}, dist), **monitor_metrics(run, {})}
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
    if cfg.monitor.enabled:
        payload = _monitor_payload(run, images, local, comps, [row % n for row in mine[:real]], per)
        metrics.update(monitor_metrics(run, payload))
    if dist.is_main:
        from .eval_grid import save_eval_grid

        means = "  ".join(
            f"{k.split('/')[-2] if k.endswith('/mean') else k} {v:.3g}" for k, v in metrics.items()
        )
        # the picture shows the first image of each prompt (its seed is a one-image evaluation's), so its size
        # does not grow with eval_images_per_prompt (the demo's 384 images drew 2.4 MB pictures, 96 draw 0.6-0.75 MB)
        first = [j for j, row in enumerate(mine[:real]) if row < n]
        shown = "" if len(first) == real else f", the first of each prompt's {per} shown"
        save_eval_grid(
            images[first],
            [local.prompts[j] for j in first],
            {k: v[first] for k, v in comps.items()},
            run.output_dir / "eval" / f"step_{run.step:06d}.png",
            title=f"step {run.step}, {real} held-out images (this process's share){shown}; means: {means}",
        )
    return metrics


def raw_total(reward, comps: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """A reward's un-normalised weighted sum ``sum_i w_i r_i`` from its raw component scores ``comps`` (a
    combined reward's normalisation would z-score it over the evaluation batch); ``None`` when a component is
    missing."""
    parts = getattr(reward, "parts", None) or [(reward, 1.0)]
    if any(r.name not in comps for r, _ in parts):
        return None
    return sum(w * comps[r.name].detach().float() for r, w in parts)


def _monitor_payload(run: Evaluated, images, local, comps: dict, prompt_ids: list[int], per: int) -> dict:
    """This process's share of the monitor: sums and counts of the proxy (the training reward on the evaluation
    images, scored again only when the evaluation reward lacks one of its components) and the gold signal, and
    each image's diversity features keyed by its prompt."""
    cfg = run.cfg.monitor
    eval_reward, reward = run.eval_reward, run.reward
    gold = comps[cfg.gold] if cfg.gold else raw_total(eval_reward, comps)
    if gold is None or (cfg.gold and cfg.gold not in comps):
        raise ValueError(
            f"monitor.gold={cfg.gold!r} is not a component of the evaluation reward ({', '.join(comps)}); add it "
            "to eval_reward with weight 0, or leave monitor.gold empty."
        )
    out: dict = {}
    if cfg.gold or reward is not eval_reward:  # else proxy and gold are one signal
        proxy = raw_total(reward, comps)
        if proxy is None:
            freeze = getattr(reward, "frozen_statistics", None)
            with freeze() if freeze is not None else contextlib.nullcontext():
                scored = run.evaluate_reward(reward, images, local.prompts, **local.batch_metadata())
            train_comps = dict(scored.components)
            train_comps.setdefault(reward.name, scored.total)
            proxy = raw_total(reward, train_comps)
        out["proxy"] = (float(proxy.sum()), int(proxy.numel()))
        out["gold"] = (float(gold.detach().float().sum()), int(gold.numel()))
    if per >= 2:
        feats = run.monitor.image_features(images, cfg.features, cfg.feature_model).cpu()
        out["features"] = (prompt_ids, feats)
    return out


def monitor_metrics(run: Evaluated, payload: dict) -> dict[str, float]:
    """The ``monitor/*`` metrics of one evaluation from every process's :func:`_monitor_payload` (gathered; every
    process computes the same values and updates its ``run.monitor`` alike); the main process prints each warning
    as one ``[diffrl] warning:`` line."""
    cfg, dist = run.cfg.monitor, run.dist
    if not cfg.enabled:
        return {}
    parts = dist.gather_objects(payload)
    values: dict[str, float] = {}
    for key in ("proxy", "gold"):
        sums = [p[key] for p in parts if key in p]
        if sums and sum(c for _, c in sums):
            values[key] = sum(s for s, _ in sums) / sum(c for _, c in sums)
    feats = [p["features"] for p in parts if "features" in p]
    if feats:
        ids = [i for f in feats for i in f[0]]
        diversity = hacking.within_prompt_diversity(torch.cat([f[1] for f in feats]), ids, cfg.features)
        if diversity is not None:
            values["diversity"] = diversity
    metrics, warnings = run.monitor.update(
        run.step, values, min_change=cfg.min_change, diversity_collapse=cfg.diversity_collapse
    )
    if dist.is_main:
        for line in warnings:
            print(f"[diffrl] warning: {line}", flush=True)
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


def replay_monitor(run: Evaluated, metrics_path: Path) -> None:
    """Rebuild ``run.monitor`` on a resumed run from the ``monitor/*`` values ``metrics_path`` (metrics.jsonl)
    holds up to ``run.step`` (read by the main process, sent to all)."""
    rows = []
    if run.dist.is_main and metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and any(str(k).startswith("monitor/") for k in row):
                rows.append(row)
    rows = run.dist.gather_objects(rows)[0]
    run.monitor = hacking.MonitorState()
    run.monitor.replay(rows, run.step)
