"""Learning benchmark on the toy world: every trainer, several seeds, the same budget of sampled training images.

Each trainer starts from the shipped toy model with its preset (``configs/toy/<preset>.yaml``, plus the variant's
overrides where it has any), trains until it has sampled ``--samples`` training images (``max_steps = samples //
images_per_step``) and evaluates the held-out prompts (``configs/toy/eval.jsonl``, strict accuracy of the shapes
verifier) about ``--evals`` times, once per seed of ``--seeds`` (each seed also draws its own evaluation noise). The
trainers (:data:`VARIANTS`):

* ``diffusion_nft``, ``flow_grpo``, ``refl``, ``awm``: their presets as they are;
* ``pref_grpo``: ``configs/toy/pref_grpo.yaml`` (Flow-GRPO with ``flow_grpo.advantage: winrate``, Pref-GRPO);
* ``grpo_guard``: ``configs/toy/grpo_guard.yaml`` (Flow-GRPO with ``ratio_norm`` and ``grad_reweight``);
* ``dpo``: ``configs/toy/dpo.yaml`` (online Diffusion-DPO: pairs from each step's groups, labelled by the verifier);
* ``mixgrpo``: ``configs/toy/mixgrpo.yaml``, MixGRPO's sliding window (arXiv 2507.21802, Sec. 3.2): 2 stochastic and
  trained steps of the 8, the window moving one step every 5 training steps and wrapping, Euler elsewhere.

Evaluation precision: strict accuracy p measured on m images has a standard error sqrt(p (1 - p) / m); for p in
0.2-0.4 that is under 2 points from m = 600, so ``--eval-images-per-prompt`` defaults to 7 (7 x 96 = 672 images,
each prompt with 7 fixed seeds). Time is CPU seconds of this process spent training (``time.process_time``; the
evaluations' own CPU time is left out), one torch thread by default: wall-clock time on a shared machine is noise.

Written to ``--out``: ``learning.json`` (every curve: step, training images, training CPU and wall seconds,
accuracy, partial credit; and the summary), ``learning.png`` (mean held-out strict accuracy over the seeds with a
band from the lowest to the highest seed, against training images and against training CPU seconds) and
``learning.md`` (the table); printed: per trainer, the mean and spread (sample standard deviation over seeds, and
the range) of base, final and best accuracy, and the training images and CPU seconds to a gain of ``--gain``
(default 0.10) over the run's own base, averaged over the seeds that reached it ("k/n seeds" says how many did), and
``z``, the final accuracy's rise over the base in standard errors of all seeds' evaluation images pooled
(:func:`gain_z`; 2 or more: a significant rise).

    python benchmarks/bench_learning.py --algorithms diffusion_nft flow_grpo --seeds 0 1 2 --samples 6400 \
        --evals 8 --out runs/bench-learning       # the NFT vs Flow-GRPO comparison
    python benchmarks/bench_learning.py --algorithms refl awm pref_grpo mixgrpo --seeds 0 1 2 --samples 6400 \
        --keep runs/bench-learning/learning.json --out runs/bench-learning-2   # more trainers, keep the others
    python benchmarks/bench_learning.py --algorithms flow_grpo --seeds 0 1 2 --samples 13056 \
        --extend runs/bench-learning/learning.json --out runs/bench-learning-long   # Flow-GRPO on to 13 056 images
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
ACC = "eval/reward/shapes_accuracy/mean"
PARTIAL = "eval/reward/shapes_verifier/mean"

#: name: (preset in configs/toy/, overrides over it)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "diffusion_nft": ("diffusion_nft", []),
    "flow_grpo": ("flow_grpo", []),
    "refl": ("refl", []),
    "awm": ("awm", []),
    "pref_grpo": ("pref_grpo", []),
    "grpo_guard": ("grpo_guard", []),
    "dpo": ("dpo", []),
    "mixgrpo": ("mixgrpo", []),
}


def images_per_step(cfg) -> int:
    """Training images sampled per step by the run's algorithm."""
    algo = cfg.algorithm
    if algo in ("flow_grpo", "diffusion_nft", "awm", "dpo"):
        sub = getattr(cfg, algo)
        return sub.group_size * sub.prompts_per_step
    if algo == "refl":
        return cfg.refl.prompts_per_step
    raise ValueError(
        f"bench_learning does not know how many images a {algo} step samples; add it to images_per_step."
    )


def run_one(
    name: str,
    seed: int,
    samples: int,
    evals: int,
    per_prompt: int,
    out: Path,
    overrides: list[str],
    earlier: dict | None = None,
) -> dict:
    """One trainer and seed for ``samples`` training images. With ``earlier`` (a run of an earlier
    ``learning.json``, its directory copied to this run's), the run resumes from its last checkpoint and continues
    to ``samples`` at the earlier run's evaluation cadence; the curve is the earlier one followed by the new points,
    whose CPU and wall seconds continue from the earlier run's last evaluation."""
    from diffrl.config import load_config
    from diffrl.demo import read_metrics
    from diffrl.train import build_trainer

    preset_name, variant = VARIANTS[name]
    preset = REPO / "configs" / "toy" / f"{preset_name}.yaml"
    run_dir = out / name / f"seed{seed}"
    if earlier is not None:  # its overrides and evaluation size, from the copied run's resolved config
        overrides = [o for o in earlier["overrides"] if o not in variant]
        saved = json.loads((run_dir / "config.json").read_text())["config"]
        per_prompt = saved["sample"]["eval_images_per_prompt"]
    base = [*variant, *overrides, f"seed={seed}", f"sample.eval_images_per_prompt={per_prompt}"]
    cfg = load_config(str(preset), base)
    per_step = images_per_step(cfg)
    steps = max(1, samples // per_step)
    every = max(1, steps // max(1, evals))
    resume = []
    if earlier is not None:
        steps = max(steps, earlier["max_steps"])
        every = earlier["curve"][1]["step"] if len(earlier["curve"]) > 1 else every
        resume = ["resume_from_checkpoint=latest"]
    cfg = load_config(
        str(preset),
        [
            *base,
            f"output_dir={run_dir}",
            f"max_steps={steps}",
            f"eval_every={every}",
            f"checkpointing_steps={steps}",
            "report_to=none",
            *resume,
        ],
    )
    for key in ("train", "eval"):  # the presets name the prompt files from the repository root
        value = getattr(cfg.data, key)
        if value and not Path(value).exists() and (REPO / value).exists():
            setattr(cfg.data, key, str(REPO / value))
    trainer = build_trainer(cfg)
    # training CPU / wall seconds when each evaluation starts (the evaluations' own time subtracted)
    clock: dict[int, tuple[float, float]] = {}
    spent = [0.0, 0.0]
    c0, w0 = time.process_time(), time.time()
    evaluate = trainer.evaluate

    def timed():
        e0, f0 = time.process_time(), time.time()
        clock[trainer.step] = (e0 - c0 - spent[0], f0 - w0 - spent[1])
        result = evaluate()
        spent[0] += time.process_time() - e0
        spent[1] += time.time() - f0
        return result

    trainer.evaluate = timed
    trainer.train()
    records = read_metrics(run_dir / "metrics.jsonl")
    before = earlier["curve"] if earlier is not None else []
    last = before[-1]["step"] if before else -1
    c_off = before[-1]["train_cpu_seconds"] if before else 0.0
    w_off = before[-1]["train_wall_seconds"] if before else 0.0
    curve = [*before] + [
        {
            "step": r["step"],
            "images": r["step"] * per_step,
            "train_cpu_seconds": c_off + clock[r["step"]][0],
            "train_wall_seconds": w_off + clock[r["step"]][1],
            "accuracy": r[ACC],
            "partial": r.get(PARTIAL),
        }
        for r in records
        if ACC in r and r["step"] > last
    ]
    prior = earlier or {}  # an extended run's totals include the part it continues
    return {
        "algorithm": name,
        "seed": seed,
        "preset": str(preset.relative_to(REPO)),
        "overrides": [*variant, *overrides],
        "images_per_step": per_step,
        "max_steps": steps,
        "eval_images": len(trainer.eval_set) * cfg.sample.eval_images_per_prompt,
        "eval_guidance_scale": cfg.sample.eval_guidance_scale,
        "cpu_seconds": prior.get("cpu_seconds", 0.0) + time.process_time() - c0,
        "eval_cpu_seconds": prior.get("eval_cpu_seconds", 0.0) + spent[0],
        "wall_seconds": prior.get("wall_seconds", 0.0) + time.time() - w0,
        "curve": curve,
        **({"extended_from": earlier["max_steps"]} if earlier is not None else {}),
    }


def first_reaching(curve: list[dict], target: float, key: str) -> float | None:
    """Linear interpolation of ``key`` (images or seconds) where the accuracy first reaches ``target`` after the
    start; None when it never does."""
    prev = curve[0]
    for pt in curve[1:]:
        if pt["accuracy"] >= target:
            if prev["accuracy"] >= target or pt["accuracy"] == prev["accuracy"]:
                return float(pt[key])
            f = (target - prev["accuracy"]) / (pt["accuracy"] - prev["accuracy"])
            return float(prev[key] + f * (pt[key] - prev[key]))
        prev = pt
    return None


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), lowest and highest of ``values``."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def gain_z(runs: list[dict]) -> float | None:
    """How many standard errors the final accuracy lies above the base, over all seeds' evaluation images pooled.

    With ``n`` images per evaluation and seed, the base and final accuracies over the ``N = n x seeds`` images are
    ``p_b`` and ``p_f`` and ``z = (p_f - p_b) / sqrt((p_b (1 - p_b) + p_f (1 - p_f)) / N)``, the two-proportion
    statistic treating the two evaluations as independent. They are not (each seed evaluates both from the same
    noise, which correlates them positively), so this overstates the standard error of the difference and ``z`` is
    conservative; ``z >= 2`` is read as a significant rise (about 97.7% one-sided). None when the runs lack
    ``eval_images``."""
    counts = [r.get("eval_images") for r in runs]
    if not all(counts):
        return None
    total = sum(counts)
    base = sum(n * r["curve"][0]["accuracy"] for n, r in zip(counts, runs, strict=True)) / total
    final = sum(n * r["curve"][-1]["accuracy"] for n, r in zip(counts, runs, strict=True)) / total
    from diffrl.demo import accuracy_gain

    gain, se = accuracy_gain(base, final, total)
    return gain / se if se > 0 else None


def summarise(results: list[dict], gain: float) -> dict:
    """Per trainer, over its seeds: base, final, best and final-minus-base accuracy (:func:`spread`), and the training
    images / CPU seconds it needed to gain ``gain`` over the run's own base, averaged over the seeds that reached
    it, with the ratio of those means to the trainer that needed the fewest."""
    by_algo: dict[str, list[dict]] = {}
    for r in results:
        by_algo.setdefault(r["algorithm"], []).append(r)
    rows = {}
    for name, runs in by_algo.items():
        row = {"seeds": sorted(r.get("seed", 0) for r in runs), "eval_images": runs[0].get("eval_images")}
        for key, pick in (
            ("base", lambda c: c[0]["accuracy"]),
            ("final", lambda c: c[-1]["accuracy"]),
            ("best", lambda c: max(p["accuracy"] for p in c)),
            ("gain", lambda c: c[-1]["accuracy"] - c[0]["accuracy"]),
        ):
            row[key] = spread([pick(r["curve"]) for r in runs])
        row["z"] = gain_z(runs)
        for key, field in (("images", "images"), ("seconds", "train_cpu_seconds")):
            hits = [first_reaching(r["curve"], r["curve"][0]["accuracy"] + gain, field) for r in runs]
            reached = [h for h in hits if h is not None]
            row[f"{key}_to_gain"] = statistics.fmean(reached) if reached else None
            row[f"{key}_reached"] = f"{len(reached)}/{len(hits)}"
        rows[name] = row
    for key in ("images", "seconds"):
        reached = [v[f"{key}_to_gain"] for v in rows.values() if v[f"{key}_to_gain"] is not None]
        fewest = min(reached) if reached else None
        for v in rows.values():
            x = v[f"{key}_to_gain"]
            v[f"{key}_ratio"] = x / fewest if (x is not None and fewest) else None
    return {"gain": gain, "per_algorithm": rows}


def mean_curve(runs: list[dict], key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """x (mean of ``key`` over the seeds at each evaluation), mean, lowest and highest accuracy; the runs of one
    trainer share their evaluation steps, so the curves are aligned point by point (cut to the shortest)."""
    n = min(len(r["curve"]) for r in runs)
    xs, mean, lo, hi = [], [], [], []
    for i in range(n):
        pts = [r["curve"][i] for r in runs]
        xs.append(statistics.fmean(p[key] for p in pts))
        acc = [p["accuracy"] for p in pts]
        mean.append(statistics.fmean(acc))
        lo.append(min(acc))
        hi.append(max(acc))
    return xs, mean, lo, hi


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_algo: dict[str, list[dict]] = {}
    for r in results:
        by_algo.setdefault(r["algorithm"], []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in by_algo.items():
        label = f"{name} ({len(runs)} seed{'s' * (len(runs) != 1)})" + (
            " (kept)" if "kept_from" in runs[0] else ""
        )
        for ax, key in ((axes[0], "images"), (axes[1], "train_cpu_seconds")):
            if not all(key in p for r in runs for p in r["curve"]):
                continue
            xs, mean, lo, hi = mean_curve(runs, key)
            (line,) = ax.plot(xs, mean, marker="o", ms=3, label=label)
            if len(runs) > 1:
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
    axes[0].set_xlabel("training images sampled")
    axes[1].set_xlabel("training CPU seconds, one thread (evaluation excluded)")
    for ax in axes:
        ax.set_ylabel("held-out strict accuracy")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(
        "toy world: held-out strict accuracy, mean over seeds (band: lowest to highest seed)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary: dict) -> str:
    """The summary as a Markdown table (accuracies in points, mean +- standard deviation over seeds, [range])."""

    def pts(s: dict) -> str:
        return f"{100 * s['mean']:.1f} +- {100 * s['std']:.1f} [{100 * s['min']:.1f}, {100 * s['max']:.1f}]"

    def to_gain(v: dict, key: str, spec: str) -> str:
        x = v[f"{key}_to_gain"]
        if x is None:
            return f"not reached (0/{len(v['seeds'])})"
        ratio = v[f"{key}_ratio"]
        return f"{format(x, spec)} ({v[f'{key}_reached']} seeds, {ratio:.1f}x)"

    g = summary["gain"]
    lines = [
        f"| trainer | seeds | eval images | base | final | best | gain | z | images to +{100 * g:.0f} | CPU s to +{100 * g:.0f} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in summary["per_algorithm"].items():
        lines.append(
            f"| {name} | {' '.join(map(str, v['seeds']))} | {v['eval_images']} | {pts(v['base'])} | {pts(v['final'])} "
            f"| {pts(v['best'])} | {pts(v['gain'])} | {'-' if v.get('z') is None else format(v['z'], '.1f')} "
            f"| {to_gain(v, 'images', '.0f')} | {to_gain(v, 'seconds', '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--algorithms", nargs="+", default=["diffusion_nft", "flow_grpo"], choices=sorted(VARIANTS)
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--samples", type=int, default=1920, help="training images sampled per run")
    p.add_argument("--evals", type=int, default=6, help="evaluations per run (besides step 0)")
    p.add_argument(
        "--eval-images-per-prompt",
        type=int,
        default=7,
        help="held-out images per prompt (96 prompts; 7: 672 images, standard error under 2 points for p <= 0.4)",
    )
    p.add_argument("--gain", type=float, default=0.1, help="accuracy gain over the base to count samples to")
    p.add_argument("--out", type=Path, default=Path("runs/bench-learning"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="an earlier learning.json: its runs of trainers not run now join the table and the plot, marked "
        "'(kept)' (images are comparable across runs; CPU seconds only on the same machine)",
    )
    p.add_argument(
        "--extend",
        type=Path,
        default=None,
        help="an earlier learning.json: each of its runs of --algorithms and --seeds (its directory next to that "
        "file, copied into --out) resumes from its last checkpoint and trains on to --samples images, keeping its "
        "overrides and evaluation cadence; the curves join (a longer budget without re-running the first part)",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every preset")
    a = p.parse_args(argv)
    if a.extend is not None and not a.extend.is_file():
        raise SystemExit(
            f"error: --extend {a.extend} is not a file; pass the learning.json of an earlier run."
        )
    if a.eval_images_per_prompt < 1:
        raise SystemExit(f"error: --eval-images-per-prompt {a.eval_images_per_prompt} must be at least 1.")
    if a.keep is not None and not a.keep.is_file():
        raise SystemExit(f"error: --keep {a.keep} is not a file; pass the learning.json of an earlier run.")
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    earlier_runs = {}
    if a.extend is not None:
        earlier_runs = {(r["algorithm"], r["seed"]): r for r in json.loads(a.extend.read_text())["runs"]}
        missing = [(x, s) for x in a.algorithms for s in a.seeds if (x, s) not in earlier_runs]
        if missing:
            raise SystemExit(
                f"error: --extend {a.extend} has no run of {missing}; name only its trainers and seeds."
            )
    results = []
    for algo in a.algorithms:
        for seed in a.seeds:
            earlier = earlier_runs.get((algo, seed))
            if earlier is not None:
                src = a.extend.parent / algo / f"seed{seed}"
                dst = a.out / algo / f"seed{seed}"
                if not src.is_dir():
                    raise SystemExit(f"error: --extend: {src} (the run to continue) is missing.")
                if dst.exists():
                    raise SystemExit(f"error: --extend: {dst} exists already; choose a new --out.")
                shutil.copytree(src, dst)
                print(
                    f"== {algo} seed {seed}: from step {earlier['max_steps']} on to {a.samples} images",
                    flush=True,
                )
            else:
                print(f"== {algo} seed {seed}: {a.samples} training images", flush=True)
            results.append(
                run_one(algo, seed, a.samples, a.evals, a.eval_images_per_prompt, a.out, a.overrides, earlier)
            )
            (a.out / "learning.json").write_text(json.dumps({"runs": results}, indent=2))
    if a.keep is not None:
        for r in json.loads(a.keep.read_text())["runs"]:
            if r["algorithm"] not in a.algorithms:
                results.append({**r, "kept_from": str(a.keep)})
    summary = summarise(results, a.gain)
    (a.out / "learning.json").write_text(json.dumps({"runs": results, "summary": summary}, indent=2))
    plot(results, a.out / "learning.png")
    md = table(summary)
    (a.out / "learning.md").write_text(md)
    print(
        f"\nheld-out strict accuracy (points, mean +- std over seeds [range]); training to +{a.gain:.2f}:\n{md}"
    )
    print(f"wrote {a.out / 'learning.json'}, {a.out / 'learning.png'} and {a.out / 'learning.md'}")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
