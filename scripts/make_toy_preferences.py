"""Write a toy-world preference dataset for offline DPO: images the toy model makes, the shapes verifier as the judge.

    python scripts/make_toy_preferences.py --out runs/toy-prefs --prompts 64 --images 8
    diffrl train configs/toy/dpo.yaml dpo.mode=offline dpo.dataset=runs/toy-prefs/prefs.jsonl dpo.pairs_per_step=16

For each of the first ``--prompts`` prompts of ``configs/toy/train.jsonl``, ``--images`` images are sampled from the
shipped toy model (Euler ODE, 8 steps, no CFG, 64 x 64 pixels, as ``configs/toy/dpo.yaml`` samples). Each image is
scored with ``shapes_accuracy`` (1: the verifier finds exactly what the prompt asks). A prompt with at least one
correct and one wrong image gives one pair: the first correct image is chosen, the first wrong one rejected.
The PNGs and ``prefs.jsonl`` (``{"prompt", "chosen", "rejected"}``, paths relative to it) go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def make_toy_preferences(
    out: Path, prompts: int = 64, images: int = 8, seed: int = 0, size: int = 64, num_steps: int = 8
) -> int:
    """Write the dataset into ``out``; returns the number of pairs."""
    from PIL import Image

    from diffrl.data import load_prompts
    from diffrl.models import load_model
    from diffrl.rewards import load_reward
    from diffrl.sampling import sample_images, to_uint8

    rows = load_prompts(str(ROOT / "configs" / "toy" / "train.jsonl"))
    rows = rows.take(range(min(prompts, len(rows))))
    model = load_model("toy")
    accuracy = load_reward("shapes_accuracy")
    pixels = sample_images(
        model,
        rows.prompts,
        num_steps=num_steps,
        guidance_scale=1.0,
        height=size,
        width=size,
        seed=seed,
        images_per_prompt=images,
        batch_size=64,
    )
    scenes = [row["scene"] for row in rows.metadata for _ in range(images)]
    prompt_of = [p for p in rows.prompts for _ in range(images)]
    with torch.no_grad():
        scores = accuracy(pixels, prompt_of, scene=scenes).float()
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, prompt in enumerate(rows.prompts):
        group = scores[i * images : (i + 1) * images]
        right = [j for j in range(images) if group[j] >= 1]
        wrong = [j for j in range(images) if group[j] <= 0]
        if not right or not wrong:
            continue
        names = []
        for j, kind in ((right[0], "chosen"), (wrong[0], "rejected")):
            name = f"{i:04d}-{kind}.png"
            array = to_uint8(pixels[i * images + j : i * images + j + 1])[0].numpy()  # (H, W, 3)
            Image.fromarray(array).save(out / name)
            names.append(name)
        lines.append(json.dumps({"prompt": prompt, "chosen": names[0], "rejected": names[1]}))
    (out / "prefs.jsonl").write_text("".join(line + "\n" for line in lines))
    return len(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n = make_toy_preferences(args.out, args.prompts, args.images, args.seed)
    print(f"{n} pairs written to {args.out / 'prefs.jsonl'}")


if __name__ == "__main__":
    main()
