"""The demo over several seeds, each run's base and final accuracy re-measured on images of other seeds (issues 15
and 17: the demo's +30 points; docs/benchmarks.md, "The demo's gain").

The first demo evaluated 96 held-out images, so its gain carried a standard error of 6 to 7 points, and a run whose
base evaluation happened to be low reported a gain it did not make; the demo now evaluates 384 (about 3.4 points),
and two 384-image evaluations of one LoRA still differed by up to 6 points. This script runs ``diffrl demo`` once
per seed (the same config and overrides), then samples the base model and each run's final model (its LoRA, or
with full fine-tuning its ``pipeline/``) again with
``benchmarks/toy_failures.py`` (``--images-per-prompt`` images per held-out prompt, seeds 1000, 1001, ..., which no
demo evaluation uses) and prints, per seed and as mean +- sample standard deviation over the seeds: the demo's own
base, final and gain, the re-measured ones, and the demo's CPU seconds. It reproduces the README's figures with

    python benchmarks/demo_seeds.py --out runs/demo-seeds --seeds 0 1 2 3 4 5 6 7 8 9

and each final model then sampled on 3 072 more images by ``toy_failures.py --model toy:cliptext --finetuned
runs/demo-seeds/seed-S/pipeline --images-per-prompt 16 --seed 5000`` and again with ``--seed 9000`` (``--lora
runs/demo-seeds/seed-S/lora`` for the LoRA demo before it). The README's runs were ``diffrl train
configs/toy/demo.yaml seed=S``: the demo's training without its pictures, the same evaluations to the digit.

Overrides after ``--`` change the demo (``-- optim.lr=5e-5``; ``--config`` another preset).

A seed whose run directory already holds ``demo_summary.json`` is not run again (re-measured only), so an
interrupted sweep continues where it stopped. Writes ``OUT/seed-S/`` (the demo's run directory, with
``remeasured.json``) and ``OUT/summary.json``. Run it alone on the machine if the CPU seconds matter: a job on the
other core changed the same run's CPU time by up to 20 % here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))


def spread(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, sample standard deviation)`` of ``values`` (the deviation is 0 for a single value), from
    ``bench_learning.spread``."""
    from bench_learning import spread as stats

    s = stats(list(values))
    return s["mean"], s["std"]


def seed_row(seed: int, summary: dict, remeasured: dict) -> dict:
    """One seed's figures in percent: the demo's base/final/gain from its ``demo_summary.json`` and the re-measured
    ones from ``toy_failures.py``'s JSON (``results.base.all.strict`` and ``results.fine-tuned.all.strict``)."""
    r = remeasured["results"]
    base, final = r["base"]["all"], r["fine-tuned"]["all"]
    return {
        "seed": seed,
        "demo_base": 100 * summary["base_strict_accuracy"],
        "demo_final": 100 * summary["final_strict_accuracy"],
        "demo_gain": 100 * (summary["final_strict_accuracy"] - summary["base_strict_accuracy"]),
        "base": 100 * base["strict"],
        "final": 100 * final["strict"],
        "gain": 100 * (final["strict"] - base["strict"]),
        "images": final["n"],
        "demo_images": summary["eval_images"],
        "objects_per_image": final["objects"],
        "cpu_seconds": summary["total_cpu_seconds"],
    }


def table(rows: Sequence[dict]) -> list[str]:
    """A markdown table of the rows and their mean +- standard deviation."""
    keys = ("demo_base", "demo_final", "demo_gain", "base", "final", "gain", "cpu_seconds")
    head = (
        "| seed | demo: base / final / gain (its own evaluation) | re-measured: base / final / gain "
        "| images (demo / re-measured) | CPU s |"
    )
    lines = [head, "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['demo_base']:.1f} / {r['demo_final']:.1f} / {r['demo_gain']:+.1f} | "
            f"{r['base']:.1f} / {r['final']:.1f} / {r['gain']:+.1f} | {r['demo_images']} / {r['images']} | "
            f"{r['cpu_seconds']:.0f} |"
        )
    if rows:
        m = {k: spread([r[k] for r in rows]) for k in keys}
        lines.append(
            f"| mean +- sd | {m['demo_base'][0]:.1f} / {m['demo_final'][0]:.1f} / "
            f"{m['demo_gain'][0]:+.1f} +- {m['demo_gain'][1]:.1f} | {m['base'][0]:.1f} / {m['final'][0]:.1f} / "
            f"{m['gain'][0]:+.1f} +- {m['gain'][1]:.1f} | {rows[0]['demo_images']} / {rows[0]['images']} | "
            f"{m['cpu_seconds'][0]:.0f} +- {m['cpu_seconds'][1]:.0f} |"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", type=Path, required=True, help="a directory for the runs (OUT/seed-S) and summary.json"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", default=None, help="toy preset (default: the demo's)")
    p.add_argument(
        "--images-per-prompt", type=int, default=4, help="re-measurement images per held-out prompt"
    )
    p.add_argument(
        "--max-prompts", type=int, default=0, help="re-measure on the first N held-out prompts (0: all)"
    )
    p.add_argument("overrides", nargs="*", help="the demo's overrides, after --")
    a = p.parse_args(argv)
    if a.images_per_prompt < 1:
        p.error(f"--images-per-prompt {a.images_per_prompt}: give at least 1.")
    if any(o.split("=", 1)[0] in ("seed", "output_dir") for o in a.overrides):
        p.error("seed and output_dir are set per run by --seeds and --out; drop them from the overrides.")

    import toy_failures

    from diffrl.demo import DEFAULT_CONFIG, run_demo

    rows = []
    for seed in a.seeds:
        run_dir = a.out / f"seed-{seed}"
        if not (run_dir / "demo_summary.json").is_file():
            run_demo(
                [*a.overrides, f"seed={seed}", f"output_dir={run_dir}"],
                config=a.config or DEFAULT_CONFIG,
                log=print,
            )
        summary = json.loads((run_dir / "demo_summary.json").read_text())
        model = json.loads((run_dir / "config.json").read_text())["config"]["model"]["path"]
        remeasured = run_dir / "remeasured.json"
        # a LoRA run writes lora/, a full fine-tuning (model.lora_rank=0) the whole pipeline/
        tuned = ["--lora", str(run_dir / "lora")]
        if not (run_dir / "lora").exists() and (run_dir / "pipeline").is_dir():
            tuned = ["--finetuned", str(run_dir / "pipeline")]
        args = ["--model", model, *tuned, "--json", str(remeasured)]
        args += ["--images-per-prompt", str(a.images_per_prompt), "--max-prompts", str(a.max_prompts)]
        toy_failures.main(args)
        rows.append(seed_row(seed, summary, json.loads(remeasured.read_text())))
        print("\n".join(table(rows)), flush=True)
    (a.out / "summary.json").write_text(
        json.dumps({"args": {**vars(a), "out": str(a.out)}, "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
