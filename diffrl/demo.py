"""The embedded demo: RL fine-tuning of the shipped toy-world model on a CPU, with before/after pictures.

``diffrl demo [key=value ...]`` (``./scripts/demo.sh`` wraps it) trains a toy text-to-image model with the preset
``configs/toy/demo.yaml`` on the toy prompts and evaluates the held-out prompts before, during and after training:
AWM for 348 steps on ``toy:cliptext`` (:func:`diffrl.toy.assets.toy_cliptext_model_dir`, a real diffusers SD3
pipeline whose first text encoder is the toy CLIP's text tower, so it can learn "left of" and "above"), fine-tuning
all the weights of its transformer. The demo rewards the shapes verifier's partial credit plus its strict 0/1
correctness, so the reward pays directly for the metric the demo reports; :data:`DEMO_OVERRIDES` adds that reward to
any other preset named with ``--config`` (the presets alone, which the learning benchmark uses for every trainer,
reward the partial credit only). Over ten seeds it gained +30.9 +- 1.5 points of held-out strict accuracy, measured
on 3 072 images of other seeds a run (+29.3 +- 2.8 on its own 384-image evaluations), in 7.0-7.8 CPU minutes of
training a run, two runs at a time on 2 cores (docs/benchmarks.md). It writes to the run directory (``output_dir``,
default ``runs/demo``, or ``runs/demo-<date>-<time>`` when that holds an earlier demo):

* ``metrics.jsonl`` / ``tensorboard/``: the trainer's metrics; ``eval/step_*.png``: each evaluation's images (the
  first of each prompt);
* ``curves.png``: training reward and held-out partial credit and strict accuracy against steps;
* ``before_after.png``: the same held-out prompts and seeds from the base model and from the fine-tuned one (from a
  pool of distinct prompts over all categories, those fixed without extra shapes first; the title counts the pool's
  fixed and broken prompts);
* ``pipeline/``: the fine-tuned pipeline (``StableDiffusion3Pipeline.from_pretrained`` loads it; ``lora/``, the
  trained LoRA, instead when a preset or override trains one, ``model.lora_rank`` above 0);
* ``demo_summary.json``: base and final accuracy, the gain with its standard error (:func:`accuracy_gain`), steps,
  wall time and CPU time (``time.process_time``: training, and training with evaluations and pictures; the measure
  to compare on a shared machine);

and prints the base and final strict accuracy. Overrides are the ``diffrl train`` ones (``max_steps=20``,
``output_dir=...``, ``optim.lr=...``, ``model.path=toy`` for the first toy model); ``--config`` picks another preset
(``configs/toy/diffusion_nft.yaml``, the demo before 2026-12-04); ``--threads N`` sets the torch CPU threads (one by
default, which it says in one line on a machine with more CPUs: more threads shorten the run on an idle machine).
:func:`run_demo` does it all; the command's arguments are read in :mod:`diffrl.cli.demo`.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from diffrl.utils import SHIPPED_CONFIGS, shipped_config_path

__all__ = [
    "DEFAULT_CONFIG",
    "DEMO_OVERRIDES",
    "run_demo",
    "plot_curves",
    "before_after_grid",
    "read_metrics",
    "accuracy_gain",
]

DEFAULT_CONFIG = SHIPPED_CONFIGS / "toy" / "demo.yaml"
# applied before the user's overrides: partial credit plus strict correctness as the training reward
DEMO_OVERRIDES = ["output_dir=runs/demo", "reward={shapes_verifier: 1.0, shapes_accuracy: 1.0}"]
ACCURACY_KEY = "eval/reward/shapes_accuracy/mean"
PARTIAL_KEY = "eval/reward/shapes_verifier/mean"
#: distinct held-out prompts the before/after picture chooses its columns from
PICTURE_POOL = 48


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (one dict per line, each with ``step``)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def accuracy_gain(base: float, final: float, n: int) -> tuple[float, float]:
    """``(gain, standard_error)`` in percentage points of an accuracy that moved from ``base`` to ``final``, each
    measured on ``n`` images: ``100 sqrt(p0 (1 - p0) / n + p1 (1 - p1) / n)``, the error of a difference of two
    independent binomial proportions (an upper bound here: both evaluations use the same prompts and seeds, which
    correlates them). On the demo's 96 images it is 5 to 7 points: one run's gain is a rough figure."""
    if n < 1:
        raise ValueError(f"n={n} evaluation images: need at least 1.")
    se = math.sqrt(base * (1 - base) / n + final * (1 - final) / n)
    return 100 * (final - base), 100 * se


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(records: list[dict], path: str | Path, title: str = "") -> Path:
    """``curves.png``: the training reward (left), the held-out partial credit / strict accuracy (middle) and,
    when the run logged them, the reward-hacking monitor (right): the extra objects per image that the verifier
    ignores (minus ``shapes_extra_objects``) and ``monitor/gap``, how much more the training reward rose on the
    held-out images than the gold signal since the first evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_keys = sorted({k for r in records for k in r if k.startswith("reward/") and k.endswith("/mean")})
    eval_keys = sorted(
        {k for r in records for k in r if k.startswith("eval/reward/") and k.endswith("/mean")}
    )
    if len(eval_keys) > 1:  # the weighted sum repeats its parts
        eval_keys = [k for k in eval_keys if k != "eval/reward/combined/mean"]
    extra_key = "eval/reward/shapes_extra_objects/mean"
    eval_keys = [k for k in eval_keys if k != extra_key]  # another scale: the monitor panel plots it
    monitored = any(extra_key in r or "monitor/gap" in r for r in records)
    names = {"shapes_accuracy": "strict accuracy", "shapes_verifier": "partial credit (verifier)"}
    fig, axes = plt.subplots(1, 3 if monitored else 2, figsize=(15 if monitored else 10, 3.6))
    for k in train_keys:
        axes[0].plot(*_series(records, k), label=k.split("/")[1])
    axes[0].set_title("training reward (rollout mean)")
    axes[0].set_xlabel("step")
    for k in eval_keys:
        name = k.split("/")[2]
        axes[1].plot(*_series(records, k), marker="o", label=names.get(name, name))
    axes[1].set_title("held-out evaluation")
    axes[1].set_xlabel("step")
    if monitored:
        steps, extra = _series(records, extra_key)
        axes[2].plot(steps, [-v for v in extra], marker="o", color="tab:red", label="extra objects per image")
        axes[2].plot(*_series(records, "monitor/gap"), marker="s", color="tab:purple", label="monitor/gap")
        axes[2].set_title("reward-hacking monitor (held-out)")
        axes[2].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def before_after_grid(
    before,
    after,
    prompts: list[str],
    path: str | Path,
    scores: tuple[list, list] | None = None,
    title: str = "",
) -> Path:
    """A two-row picture: ``before`` (top) and ``after`` (bottom) images ``(N, 3, H, W)`` in [0, 1] with their
    prompts (and optional per-image marks: 1 correct, 0 wrong, and a title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(prompts)
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n, 4.6), squeeze=False)
    for row, (images, name) in enumerate(((before, "base"), (after, "fine-tuned"))):
        for j in range(n):
            ax = axes[row][j]
            ax.imshow(images[j].permute(1, 2, 0).clamp(0, 1).float().cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if scores is not None:
                ok = scores[row][j] >= 0.5
                for side in ax.spines.values():
                    side.set_edgecolor("tab:green" if ok else "tab:red")
                    side.set_linewidth(2.5)
            if row == 0:
                ax.set_title(_wrap(prompts[j], 22), fontsize=7)
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(_wrap(title, int(18 * n)), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join([*lines, line])


def _pick_prompts(eval_set, k: int) -> list[int]:
    """``k`` indices of distinct held-out prompts, alternating over categories."""
    by_cat: dict[str, list[int]] = {}
    seen = set()
    for i in range(len(eval_set)):
        p = eval_set.prompts[i]
        if p in seen:
            continue
        seen.add(p)
        cat = (eval_set.metadata[i].get("scene") or {}).get("category", "")
        by_cat.setdefault(cat, []).append(i)
    out: list[int] = []
    while len(out) < k and any(by_cat.values()):
        for cat in list(by_cat):
            if by_cat[cat] and len(out) < k:
                out.append(by_cat[cat].pop(0))
    return out


def showcase_order(before_ok, after_ok, after_exact) -> list[int]:
    """Candidate positions in the order the before/after picture shows them: first the prompts the fine-tuning fixed
    without extra shapes (wrong before; right after, with nothing the prompt does not ask for), then those right
    both times without extras, then those fixed with extra shapes (the reward hacking the verifier lets through),
    then the rest; the candidates' own order within each group."""

    def group(i: int) -> int:
        if after_exact[i] and not before_ok[i]:
            return 0
        if after_exact[i]:
            return 1
        if after_ok[i] and not before_ok[i]:
            return 2
        return 3

    return sorted(range(len(before_ok)), key=lambda i: (group(i), i))


def fresh_output_dir(cfg, overrides: list[str] | None) -> str:
    """The demo's run directory: ``cfg.output_dir``, unless it is the default one, it already holds a run and the run
    is not being resumed; then a new one beside it, ``runs/demo-<date>-<time>``, so running the demo again works and
    keeps the earlier results (an ``output_dir`` given explicitly is never changed: it then fails as ``diffrl
    train`` does)."""
    given = any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides or [])
    if given or cfg.resume_from_checkpoint or not (Path(cfg.output_dir) / "metrics.jsonl").exists():
        return cfg.output_dir
    base, n = f"{cfg.output_dir}-{time.strftime('%Y%m%d-%H%M%S')}", 1
    candidate = base
    while Path(candidate).exists():
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def threads_hint(chosen: int | None, requested: int | None, cores: int) -> str | None:
    """The line the demo prints when it runs on one torch thread by default on a machine with more cores
    (``chosen``: what :func:`~diffrl.utils.set_cpu_threads` set, ``requested``: ``--threads``); else None."""
    if requested is not None or chosen != 1 or cores < 2:
        return None
    option = "--threads 2" if cores == 2 else f"--threads N (N from 2 to {cores})"
    return (
        f"diffrl demo: one torch thread (the CPU default, steady on a busy machine); this machine has {cores} CPUs, "
        f"and on an otherwise idle machine {option} shortens the run"
    )


def run_demo(
    overrides: list[str] | None = None,
    *,
    config: str | Path = DEFAULT_CONFIG,
    n_pictures: int = 8,
    threads: int | None = None,
    log=print,
) -> dict:
    """Train, evaluate and draw (see the module docstring); returns the summary dict. ``threads``: torch CPU
    threads (default: 1 on a machine without CUDA unless ``OMP_NUM_THREADS`` is set; on a 2-core machine shared
    with any other process, two threads were measured 20x slower than one)."""
    import torch

    from diffrl.utils import set_cpu_threads

    hint = threads_hint(set_cpu_threads(threads), threads, os.cpu_count() or 1)

    from diffrl.config import load_config
    from diffrl.sampling import sample_images
    from diffrl.train import build_trainer

    config = Path(shipped_config_path(config))  # a preset named from the repository root: from anywhere
    if not config.is_file():
        raise FileNotFoundError(
            f"demo config {config} does not exist; pass --config with an existing YAML file, e.g. "
            f"{SHIPPED_CONFIGS / 'toy' / 'awm.yaml'}."
        )
    cfg = load_config(str(config), [*DEMO_OVERRIDES, *(overrides or [])])
    fresh = fresh_output_dir(cfg, overrides)
    if fresh != cfg.output_dir:
        log(f"diffrl demo: {cfg.output_dir} holds an earlier demo, kept as it is; this one writes to {fresh}")
        cfg.output_dir = fresh
    out = Path(cfg.output_dir)
    every = min(cfg.eval_every or cfg.max_steps, cfg.max_steps)
    log(
        f"diffrl demo: {cfg.algorithm} on the toy-world model, {cfg.max_steps} step{'s' * (cfg.max_steps != 1)}, "
        f"evaluation of held-out prompts every {every} step{'s' * (every != 1)}; run directory {out}"
    )
    if hint:
        log(hint)
    t0, c0 = time.time(), time.process_time()
    trainer = build_trainer(cfg)
    trainer.train()
    train_s, train_cpu = time.time() - t0, time.process_time() - c0

    records = read_metrics(out / "metrics.jsonl")
    steps, acc = _series(records, ACCURACY_KEY)
    _, partial = _series(records, PARTIAL_KEY)
    plot_curves(records, out / "curves.png", f"{cfg.algorithm} on the toy world ({Path(config).name})")

    # the same held-out prompts and seeds, base model (adapter off) vs fine-tuned (EMA weights when kept): sample a
    # pool of distinct prompts over all categories, and show first those the fine-tuning fixed without extra shapes
    s = cfg.sample
    pool = trainer.eval_set.take(_pick_prompts(trainer.eval_set, max(n_pictures, PICTURE_POOL)))
    kw = dict(
        num_steps=s.eval_num_steps,
        guidance_scale=s.eval_guidance_scale,
        height=s.height,
        width=s.width,
        seed=cfg.seed + 12345,
        batch_size=s.batch_size,
    )
    model = trainer.model
    with torch.no_grad():
        if model.has_lora:
            with model.disable_adapter():
                before = sample_images(model, pool.prompts, **kw)
        else:  # full fine-tuning keeps no base weights: load the base model again
            from diffrl.models import load_model_from_config

            before = sample_images(load_model_from_config(cfg.model, device=model.device), pool.prompts, **kw)
        with trainer.ema_weights():
            after = sample_images(model, pool.prompts, **kw)
    scenes = [m.get("scene") for m in pool.metadata]
    shown, scores, title, counts = list(range(min(n_pictures, len(pool)))), None, "", {}
    if all(scenes):  # toy prompts: mark each picture correct (green) or not (red) by the verifier
        from diffrl.toy.rewards import verify

        before_ok, after_ok = (
            verify(before, scenes)[1].bool().tolist(),
            verify(after, scenes)[1].bool().tolist(),
        )
        after_exact = verify(after, scenes, exact_scene=True)[1].bool().tolist()
        shown = showcase_order(before_ok, after_ok, after_exact)[:n_pictures]
        scores = ([float(before_ok[i]) for i in shown], [float(after_ok[i]) for i in shown])
        counts = {
            "prompts": len(pool),
            "fixed": sum(a and not b for a, b in zip(after_ok, before_ok, strict=True)),
            "fixed_without_extra_shapes": sum(
                e and not b for e, b in zip(after_exact, before_ok, strict=True)
            ),
            "broken": sum(b and not a for a, b in zip(after_ok, before_ok, strict=True)),
        }
        title = (
            f"{counts['prompts']} held-out prompts: {counts['fixed']} fixed "
            f"({counts['fixed_without_extra_shapes']} without extra shapes), {counts['broken']} broken; "
            "shown: fixed without extra shapes first"
        )
    before_after_grid(
        before[shown], after[shown], [pool.prompts[i] for i in shown], out / "before_after.png", scores, title
    )

    n_eval = len(trainer.eval_set) * s.eval_images_per_prompt
    gain, gain_se = accuracy_gain(acc[0], acc[-1], n_eval) if acc else (math.nan, math.nan)
    summary = {
        "algorithm": cfg.algorithm,
        "config": str(config),
        "max_steps": cfg.max_steps,
        "eval_prompts": len(trainer.eval_set),
        "eval_steps": steps,
        "strict_accuracy": acc,
        "partial_credit": partial,
        "eval_images": n_eval,
        "base_strict_accuracy": acc[0] if acc else math.nan,
        "final_strict_accuracy": acc[-1] if acc else math.nan,
        # percentage points, with the standard error of the difference (accuracy_gain)
        "gain_points": gain,
        "gain_standard_error_points": gain_se,
        "train_seconds": train_s,
        "total_seconds": time.time() - t0,
        # CPU time of this process (all its threads): on a shared machine wall-clock time is noisy
        "train_cpu_seconds": train_cpu,
        "total_cpu_seconds": time.process_time() - c0,
        "torch_threads": torch.get_num_threads(),
        "run_dir": str(out),
        "before_after": counts,
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    if acc:
        log(
            f"held-out strict accuracy: base {100 * acc[0]:.1f}% -> fine-tuned {100 * acc[-1]:.1f}%, "
            f"{gain:+.1f} +- {gain_se:.1f} points (standard error over {n_eval} images; "
            f"partial credit {partial[0]:.3f} -> {partial[-1]:.3f}) "
            f"in {summary['total_seconds'] / 60:.1f} min ({summary['total_cpu_seconds'] / 60:.1f} CPU min, "
            f"{summary['torch_threads']} torch thread{'s' * (summary['torch_threads'] != 1)})"
        )
    weights = out / ("lora" if model.has_lora else "pipeline")
    log(f"wrote {out / 'curves.png'}, {out / 'before_after.png'}, {weights} and {out / 'metrics.jsonl'}")
    return summary
