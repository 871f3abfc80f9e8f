"""Why toy-world prompts fail: which requirement of each prompt the images miss, for the base model and a trained one.

The strict accuracy says only that an image is wrong. This script samples the prompts of ``configs/toy/eval.jsonl``
(or ``train.jsonl``) from the base toy model and, with ``--lora`` (a trained LoRA) or ``--finetuned`` (a fully
fine-tuned run's ``pipeline/``), from the fine-tuned one with the same seeds,
detects the objects with the verifier (:meth:`diffrl.toy.rewards.ShapesVerifier.detect`) and splits the failures by
category:

* ``present``: every group of the prompt has its objects (shape and colour right), extras allowed;
* ``objects``: objects detected per image (the prompts ask for 1 to 4);
* ``counting``: ``count_exact`` among the images whose group is present (extra objects of the same kind break it);
* ``position``: among the images with both groups present, ``relation`` (the asked relation holds for some pair),
  ``reversed_only`` (only the opposite one holds) and ``neither``. A model that places the two objects without
  regard to the words has ``relation`` about equal to ``reversed_only``.

    python benchmarks/toy_failures.py --model toy:cliptext --finetuned runs/demo/pipeline --images-per-prompt 4

One torch thread on a CPU machine unless ``OMP_NUM_THREADS`` is set (as ``diffrl sample``); about a minute per 400
images on one core.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
CATEGORY_ORDER = ("single_object", "colors", "two_object", "color_attr", "counting", "position")


def _matching(objects: Sequence[dict], group: dict) -> list[dict]:
    return [
        o
        for o in objects
        if (group["shape"] is None or o["shape"] == group["shape"])
        and (group["color"] is None or o["color"] == group["color"])
    ]


def image_failures(objects: Sequence[dict], desc: dict, margin: float) -> dict:
    """What one image (its detected ``objects``: dicts with shape, color, cx, cy) gets right of ``desc``."""
    from diffrl.toy.scenes import normalize_description, relation_holds, score_objects

    desc = normalize_description(desc)
    groups = desc["objects"]
    found = [_matching(objects, g) for g in groups]
    row = {
        "strict": bool(score_objects(objects, desc, False, margin)[1]),
        "present": all(len(f) >= g["count"] for f, g in zip(found, groups, strict=True)),
        "objects": len(objects),
    }
    if any(g["exact"] for g in groups):
        row["count_exact"] = all(
            len(f) == g["count"] for f, g in zip(found, groups, strict=True) if g["exact"]
        )
    rel = desc["relation"]
    if rel is not None:
        a_s, b_s = found[rel["a"]], found[rel["b"]]

        def holds(first: Sequence[dict], second: Sequence[dict]) -> bool:
            return any(
                x is not y and relation_holds(x, y, rel["type"], margin) for x in first for y in second
            )

        ok = holds(a_s, b_s)
        row["relation"] = ok
        row["reversed_only"] = not ok and holds(b_s, a_s)
    return row


def summarise(rows: Sequence[dict], categories: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per category (and ``all``): the fractions described in the module docstring."""
    by: dict[str, list[dict]] = {}
    for r, c in zip(rows, categories, strict=True):
        by.setdefault(c, []).append(r)
        by.setdefault("all", []).append(r)
    out = {}
    for c, rs in by.items():
        n = len(rs)
        s = {
            "n": n,
            "strict": sum(r["strict"] for r in rs) / n,
            "present": sum(r["present"] for r in rs) / n,
            "objects": sum(r["objects"] for r in rs) / n,
        }
        counted = [r for r in rs if "count_exact" in r and r["present"]]
        if counted and c != "all":
            s["n_present"] = len(counted)
            s["count_exact"] = sum(r["count_exact"] for r in counted) / len(counted)
        related = [r for r in rs if "relation" in r and r["present"]]
        if related and c != "all":
            m = len(related)
            s["n_present"] = m
            s["relation"] = sum(r["relation"] for r in related) / m
            s["reversed_only"] = sum(r["reversed_only"] for r in related) / m
            s["neither"] = 1.0 - s["relation"] - s["reversed_only"]
        out[c] = s
    return out


def _fmt(name: str, stats: dict[str, dict[str, float]]) -> list[str]:
    lines = [f"== {name}"]
    order = [c for c in CATEGORY_ORDER if c in stats] + ["all"]
    for c in order:
        s = stats[c]
        line = f"{c:13s} n {s['n']:4d}  strict {s['strict']:.3f}  present {s['present']:.3f}  objects {s['objects']:.2f}"
        if "count_exact" in s:
            line += f"  | of {s['n_present']} present: count exact {s['count_exact']:.3f}"
        if "relation" in s:
            line += (
                f"  | of {s['n_present']} present: relation {s['relation']:.3f}, reversed only "
                f"{s['reversed_only']:.3f}, neither {s['neither']:.3f}"
            )
        lines.append(line)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lora", default=None, help="a trained LoRA (a run's lora/ or checkpoint-N/) to compare")
    p.add_argument(
        "--finetuned",
        default=None,
        help="a fully fine-tuned pipeline of the same base (a run's pipeline/, model.lora_rank=0) to compare",
    )
    p.add_argument("--model", default="toy", help="base model (default: the shipped toy model)")
    p.add_argument("--split", choices=("eval", "train"), default="eval")
    p.add_argument("--max-prompts", type=int, default=0, help="first N prompts of the split (0: all)")
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--seed", type=int, default=1000, help="seed of the first image of every prompt")
    p.add_argument("--num-steps", type=int, default=8)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = p.parse_args(argv)
    if a.images_per_prompt < 1:
        p.error(f"--images-per-prompt {a.images_per_prompt}: give at least 1.")

    import torch

    from diffrl.models import load_model
    from diffrl.models.lora_files import load_lora, resolve_lora
    from diffrl.sampling import sample_images
    from diffrl.toy.rewards import ShapesVerifier
    from diffrl.utils import set_cpu_threads

    set_cpu_threads()  # one thread on a CPU machine unless OMP_NUM_THREADS says otherwise, as the diffrl commands

    path = REPO / "configs" / "toy" / f"{a.split}.jsonl"
    with open(path) as f:
        items = [json.loads(line) for line in f if line.strip()]
    if a.max_prompts:
        items = items[: a.max_prompts]
    if a.lora is not None and a.finetuned is not None:
        p.error("--lora and --finetuned both name a fine-tuned model; give one of them.")
    if a.lora is not None:
        try:
            resolve_lora(a.lora)  # a bad path fails here, before the model loads
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
    if a.finetuned is not None and not (Path(a.finetuned) / "model_index.json").is_file():
        p.error(
            f"--finetuned {a.finetuned}: no model_index.json there; give a run's pipeline/ folder (written by a "
            "run with model.lora_rank=0)."
        )
    prompts = [it["prompt"] for it in items]
    descs = [it["scene"] for it in items]
    cats = [d.get("category", "") for d in descs]
    model = load_model(a.model)
    if a.lora is not None:
        print(load_lora(model, a.lora))
    tuned = load_model(a.finetuned) if a.finetuned is not None else model
    verifier = ShapesVerifier()

    def run(adapter: bool) -> list[dict]:
        rows = []
        for k in range(a.images_per_prompt):
            kw = dict(num_steps=a.num_steps, guidance_scale=a.guidance_scale, height=64, width=64)
            with torch.no_grad():
                if adapter:
                    images = sample_images(tuned, prompts, seed=a.seed + k, batch_size=64, **kw)
                else:
                    with model.disable_adapter() if a.lora is not None else contextlib.nullcontext():
                        images = sample_images(model, prompts, seed=a.seed + k, batch_size=64, **kw)
            margin = verifier.relation_margin * images.shape[-1] / 64
            rows += [
                image_failures(o, d, margin) for o, d in zip(verifier.detect(images), descs, strict=True)
            ]
        return rows

    results = {"base": summarise(run(False), cats * a.images_per_prompt)}
    if a.lora is not None or a.finetuned is not None:
        results["fine-tuned"] = summarise(run(True), cats * a.images_per_prompt)
    for name, stats in results.items():
        print("\n".join(_fmt(name, stats)))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(
            json.dumps({"args": {**vars(a), "json": str(a.json)}, "results": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
