"""Sweep of the embedded demo's training settings (issues 15 and 17): which change to how the demo trains raises the
held-out strict accuracy most within a budget of CPU seconds.

Each named setting is the demo's own configuration (``configs/toy/demo.yaml`` + ``DEMO_OVERRIDES`` of
:mod:`diffrl.demo`; the sweeps in docs/benchmarks.md before 2026-12-04 ran ``--config configs/toy/diffusion_nft.yaml``,
the demo then, or another preset with ``--config``) plus ``key=value`` overrides; it trains in this process
(one torch thread by default) and records, per evaluation, the step, the CPU seconds of the process since training
began (``time.process_time``; the machine is shared, so wall-clock time is noisy) and the wall seconds, the held-out
strict accuracy and partial credit, and the training rollouts' strict accuracy (when the training reward includes
``shapes_accuracy``). After training it samples the held-out prompts once more from the base model and from the
fine-tuned one with the same seeds and splits the strict accuracy by the prompt's category (``scene.category`` in
``configs/toy/eval.jsonl``). The held-out set, the verifier and the base model are never changed: only training.

    python benchmarks/demo_sweep.py --out runs/sweep base:  lr2e3:optim.lr=2e-3  'bigger:diffusion_nft.prompts_per_step=8;diffusion_nft.group_size=4'

A setting is ``name:override;override;...`` (an empty override list is the demo as shipped). Results append to
``<out>/sweep.jsonl``, one line per setting, and a table is printed.
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
TRAIN_ACC = "reward/shapes_accuracy/mean"


def per_category(model, eval_set, s, seed: int) -> dict[str, list[float]]:
    """Strict accuracy per category of the held-out prompts, ``{category: [base, fine-tuned]}`` (and ``all``), from
    one image per prompt sampled with the same seed by the base model (adapter off) and by the fine-tuned one."""
    import torch

    from diffrl.sampling import sample_images
    from diffrl.toy.rewards import verify

    kw = dict(
        num_steps=s.eval_num_steps,
        guidance_scale=s.eval_guidance_scale,
        height=s.height,
        width=s.width,
        seed=seed,
        batch_size=s.batch_size,
    )
    scenes = [m["scene"] for m in eval_set.metadata]
    with torch.no_grad():
        with model.disable_adapter():
            before = verify(sample_images(model, eval_set.prompts, **kw), scenes)[1].tolist()
        after = verify(sample_images(model, eval_set.prompts, **kw), scenes)[1].tolist()
    cats: dict[str, list[int]] = {}
    for i, sc in enumerate(scenes):
        cats.setdefault(sc.get("category", ""), []).append(i)
    cats["all"] = list(range(len(scenes)))
    return {
        c: [sum(before[i] for i in idx) / len(idx), sum(after[i] for i in idx) / len(idx)]
        for c, idx in cats.items()
    }


def run_setting(name: str, overrides: list[str], config: Path, out: Path, extra: list[str]) -> dict:
    from diffrl.config import load_config
    from diffrl.demo import DEMO_OVERRIDES, read_metrics
    from diffrl.train import build_trainer

    run_dir = out / name
    cfg = load_config(
        str(config),
        [
            *DEMO_OVERRIDES,
            *extra,
            *overrides,
            f"output_dir={run_dir}",
            "report_to=none",
            "checkpointing_steps=100000",
        ],
    )
    trainer = build_trainer(cfg)
    # CPU and wall seconds when each evaluation starts (training and earlier evaluations), and the evaluations' own
    clock: dict[int, tuple[float, float, float]] = {}
    spent = [0.0]
    c0, w0 = time.process_time(), time.time()
    evaluate = trainer.evaluate

    def timed():
        e0 = time.process_time()
        clock[trainer.step] = (e0 - c0, time.time() - w0, spent[0])
        out = evaluate()
        spent[0] += time.process_time() - e0
        return out

    trainer.evaluate = timed
    trainer.train()
    cpu, wall = time.process_time() - c0, time.time() - w0
    records = read_metrics(run_dir / "metrics.jsonl")
    curve = []
    for r in records:
        if ACC in r:
            curve.append(
                {
                    "step": r["step"],
                    "cpu_s": clock[r["step"]][0],
                    "train_cpu_s": clock[r["step"]][0] - clock[r["step"]][2],
                    "wall_s": clock[r["step"]][1],
                    "accuracy": r[ACC],
                    "partial": r.get(PARTIAL),
                    "extra_objects": r.get("eval/reward/shapes_extra_objects/mean"),
                }
            )
    train_acc = [(r["step"], r[TRAIN_ACC]) for r in records if TRAIN_ACC in r]
    cats = per_category(trainer.model, trainer.eval_set, cfg.sample, cfg.seed + 777)
    return {
        "name": name,
        "overrides": overrides,
        "config": str(config),
        "seed": cfg.seed,
        "max_steps": cfg.max_steps,
        "cpu_s": cpu,
        "eval_cpu_s": spent[0],
        "wall_s": wall,
        "curve": curve,
        "train_accuracy": train_acc,
        "per_category": cats,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("settings", nargs="+", help="name:override;override;...")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "toy" / "demo.yaml")
    p.add_argument("--out", type=Path, default=Path("runs/demo-sweep"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], help="overrides applied to every setting")
    p.add_argument(
        "--train-categories",
        nargs="*",
        default=[],
        help="write <out>/train_<categories>.jsonl, the training prompts of these categories only (e.g. the held-out "
        "set's: color_attr two_object position counting), and name it in the setting as data.train=TRAIN_SUBSET",
    )
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    subset = None
    if a.train_categories:
        subset = a.out / f"train_{'_'.join(a.train_categories)}.jsonl"
        lines = (REPO / "configs" / "toy" / "train.jsonl").read_text().splitlines()
        kept = [
            ln for ln in lines if ln.strip() and json.loads(ln)["scene"]["category"] in a.train_categories
        ]
        if not kept:
            raise SystemExit(f"error: --train-categories {a.train_categories} match no training prompt.")
        subset.write_text("\n".join(kept) + "\n")
        print(f"{subset}: {len(kept)} of {len(lines)} training prompts")
    for spec in a.settings:
        name, _, ov = spec.partition(":")
        overrides = [o for o in ov.split(";") if o]
        if subset is not None:
            overrides = [o.replace("TRAIN_SUBSET", str(subset)) for o in overrides]
        print(f"== {name}: {overrides}", flush=True)
        r = run_setting(name, overrides, a.config, a.out, a.set)
        with open(a.out / "sweep.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        c = r["curve"]
        tr = r["train_accuracy"]
        print(
            f"{name}: held-out {c[0]['accuracy']:.3f} -> {c[-1]['accuracy']:.3f} (best {max(x['accuracy'] for x in c):.3f})"
            f"; train acc first/last 10 steps {sum(v for _, v in tr[:10]) / max(1, len(tr[:10])):.3f}/"
            f"{sum(v for _, v in tr[-10:]) / max(1, len(tr[-10:])):.3f}; cpu {r['cpu_s']:.0f}s wall {r['wall_s']:.0f}s",
            flush=True,
        )
        print("  curve " + " ".join(f"{x['step']}:{x['accuracy']:.3f}@{(x['cpu_s'] or 0):.0f}s" for x in c))
        print(
            "  per category (base->tuned) "
            + " ".join(f"{k} {v[0]:.2f}->{v[1]:.2f}" for k, v in r["per_category"].items())
        )


if __name__ == "__main__":
    sys.exit(main())
