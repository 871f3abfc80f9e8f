"""Learning benchmark on the toy world: ReFL, Flow-GRPO and DiffusionNFT with the same budget of sampled images.

Each trainer starts from the shipped toy model with its preset (``configs/toy/<algorithm>.yaml``), trains until it
has sampled ``--samples`` training images (``max_steps = samples // images_per_step``) and evaluates the held-out
prompts (``configs/toy/eval.jsonl``, strict accuracy of the shapes verifier) about ``--evals`` times. Written to
``--out``: ``learning.json`` (every curve: step, training images, training seconds, accuracy, partial credit) and
``learning.png`` (held-out strict accuracy against training images and against training wall-clock seconds; the
evaluation time itself is not counted), and printed: the base and final accuracy of each trainer and, for a gain
of ``--gain`` (default 0.10) strict accuracy over its own base, how many training images and seconds each needed
and the ratio to the fewest ("-" where a trainer did not reach it).

Each trainer is evaluated at its preset's settings. The three toy presets are CFG-free (guidance 1), so they start
from the same base accuracy and the gain is a common target; samples are still counted to a gain over each
trainer's own base, which stays meaningful when an override gives one trainer other evaluation settings.

    python benchmarks/bench_learning.py --algorithms flow_grpo diffusion_nft refl --samples 12800 --evals 20 \
        --threads 1 --out runs/bench-learning          # about an hour on one CPU core (Flow-GRPO alone ~25 min)
    python benchmarks/bench_learning.py --algorithms diffusion_nft flow_grpo --samples 640 optim.lr=5e-4
    python benchmarks/bench_learning.py --algorithms refl --samples 12800 --evals 20 --threads 1 \
        --keep runs/bench-learning/learning.json --out runs/bench-refl   # re-run one trainer, keep the others
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
ACC = "eval/reward/shapes_accuracy/mean"
PARTIAL = "eval/reward/shapes_verifier/mean"


def images_per_step(cfg) -> int:
    if cfg.algorithm == "flow_grpo":
        return cfg.flow_grpo.group_size * cfg.flow_grpo.prompts_per_step
    if cfg.algorithm == "diffusion_nft":
        return cfg.diffusion_nft.group_size * cfg.diffusion_nft.prompts_per_step
    return cfg.refl.prompts_per_step


def run_one(algorithm: str, samples: int, evals: int, out: Path, overrides: list[str]) -> dict:
    from diffrl.config import load_config
    from diffrl.demo import read_metrics
    from diffrl.train import build_trainer

    preset = REPO / "configs" / "toy" / f"{algorithm}.yaml"
    cfg = load_config(str(preset), overrides)
    per_step = images_per_step(cfg)
    steps = max(1, samples // per_step)
    every = max(1, steps // max(1, evals))
    run_dir = out / algorithm
    cfg = load_config(
        str(preset),
        [
            *overrides,
            f"output_dir={run_dir}",
            f"max_steps={steps}",
            f"eval_every={every}",
            f"checkpointing_steps={steps}",
            "report_to=none",
        ],
    )
    t0 = time.time()
    build_trainer(cfg).train()
    wall = time.time() - t0
    records = read_metrics(run_dir / "metrics.jsonl")
    seconds, elapsed = {0: 0.0}, 0.0
    for r in records:
        if "time/step_seconds" in r:
            elapsed += r["time/step_seconds"]
            seconds[r["step"]] = elapsed
    curve = [
        {
            "step": r["step"],
            "images": r["step"] * per_step,
            "train_seconds": seconds.get(r["step"], elapsed),
            "accuracy": r[ACC],
            "partial": r.get(PARTIAL),
        }
        for r in records
        if ACC in r
    ]
    return {
        "algorithm": algorithm,
        "preset": str(preset.relative_to(REPO)),
        "images_per_step": per_step,
        "max_steps": steps,
        "eval_guidance_scale": cfg.sample.eval_guidance_scale,
        "wall_seconds": wall,
        "curve": curve,
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


def summarise(results: list[dict], gain: float) -> dict:
    """Per trainer: base, final and best accuracy, and the training images / seconds it needed to gain ``gain``
    over its own base (the trainers start from different base accuracies when their evaluation settings differ),
    with the ratio to the trainer that needed the fewest."""
    rows = {}
    for r in results:
        c = r["curve"]
        base = c[0]["accuracy"]
        rows[r["algorithm"]] = {
            "base": base,
            "final": c[-1]["accuracy"],
            "best": max(pt["accuracy"] for pt in c),
            "images_to_gain": first_reaching(c, base + gain, "images"),
            "seconds_to_gain": first_reaching(c, base + gain, "train_seconds"),
        }
    for key in ("images", "seconds"):
        reached = [v[f"{key}_to_gain"] for v in rows.values() if v[f"{key}_to_gain"] is not None]
        fewest = min(reached) if reached else None
        for v in rows.values():
            x = v[f"{key}_to_gain"]
            v[f"{key}_ratio"] = x / fewest if (x is not None and fewest) else None
    return {"gain": gain, "per_algorithm": rows}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results:
        c = r["curve"]
        label = f"{r['algorithm']} (eval CFG {r['eval_guidance_scale']:g})" + (
            " (kept)" if "kept_from" in r else ""
        )
        axes[0].plot([p["images"] for p in c], [p["accuracy"] for p in c], marker="o", label=label)
        axes[1].plot([p["train_seconds"] for p in c], [p["accuracy"] for p in c], marker="o", label=label)
    axes[0].set_xlabel("training images sampled")
    axes[1].set_xlabel("training wall-clock seconds (evaluation excluded)")
    for ax in axes:
        ax.set_ylabel("held-out strict accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("toy world: held-out strict accuracy (shapes verifier)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algorithms", nargs="+", default=["diffusion_nft", "flow_grpo", "refl"])
    p.add_argument("--samples", type=int, default=1920, help="training images sampled per trainer")
    p.add_argument("--evals", type=int, default=6, help="evaluations per run (besides step 0)")
    p.add_argument("--gain", type=float, default=0.1, help="accuracy gain over the base to count samples to")
    p.add_argument("--out", type=Path, default=Path("runs/bench-learning"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="an earlier learning.json: its curves of trainers not run now join the table and the plot, marked "
        "'(kept)' (images are comparable across runs; seconds only on the same machine under the same load)",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every preset")
    a = p.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    for algo in a.algorithms:
        print(f"== {algo}: {a.samples} training images", flush=True)
        results.append(run_one(algo, a.samples, a.evals, a.out, a.overrides))
        (a.out / "learning.json").write_text(json.dumps({"runs": results}, indent=2))
    if a.keep is not None:
        if not a.keep.is_file():
            raise SystemExit(
                f"error: --keep {a.keep} is not a file; pass the learning.json of an earlier run."
            )
        for r in json.loads(a.keep.read_text())["runs"]:
            if r["algorithm"] not in a.algorithms:
                results.append({**r, "kept_from": str(a.keep)})
    summary = summarise(results, a.gain)
    (a.out / "learning.json").write_text(json.dumps({"runs": results, "summary": summary}, indent=2))
    plot(results, a.out / "learning.png")

    def fmt(x, spec):
        return "-".rjust(int(spec.split(".")[0])) if x is None else format(x, spec)

    print(
        f"\ntraining images and seconds to gain {a.gain:.2f} strict accuracy over the base ('-': not reached)"
    )
    print(
        f"{'trainer':15s} {'base':>6s} {'final':>6s} {'best':>6s} {'images':>8s} {'ratio':>6s} {'seconds':>8s} {'ratio':>6s}"
    )
    kept = {r["algorithm"] for r in results if "kept_from" in r}
    for name, v in summary["per_algorithm"].items():
        label = f"{name} (kept)" if name in kept else name
        print(
            f"{label:15s} {v['base']:6.3f} {v['final']:6.3f} {v['best']:6.3f} {fmt(v['images_to_gain'], '8.0f')} "
            f"{fmt(v['images_ratio'], '6.2f')} {fmt(v['seconds_to_gain'], '8.0f')} {fmt(v['seconds_ratio'], '6.2f')}"
        )
    print(f"wrote {a.out / 'learning.json'} and {a.out / 'learning.png'}")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
