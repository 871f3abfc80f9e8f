"""Parity of diffrl's HPSv2 reward with the reference ``hpsv2`` package, on shared tiny random weights.

The ``hpsv2`` package pins old dependencies and downloads weights inside ``hpsv2.score``, so it is not a
dependency of diffrl. This script (not part of the test suite):

1. builds the tiny open_clip of ``diffrl.rewards.tiny.open_clip`` and saves it as an HPS-style checkpoint
   (``{"state_dict": ...}``), and writes PNG images of several sizes (square, landscape, portrait, smaller and
   larger than 224);
2. creates a throwaway virtual environment that sees this environment's packages (torch, torchvision, PIL,
   open_clip's dependencies: nothing large is downloaded) through a ``.pth`` file, and installs ``hpsv2`` there
   without its dependencies (plus ``clint``, which it imports);
3. runs the reference ``hpsv2.img_score.score(image_path, prompt, cp=<tiny checkpoint>)`` in that environment,
   redirecting only the architecture name (``ViT-H-14`` -> the tiny one) and the LAION base weights (none) that
   ``create_model_and_transforms`` would otherwise download; the checkpoint loading, preprocessing, tokenizer and
   scoring are the package's own;
4. scores the same images and prompts with ``diffrl.rewards.hpsv2.HPSv2`` and prints the differences (scores and
   the preprocessed tensors), failing if they exceed the tolerance.

Usage: ``python benchmarks/parity_hpsv2.py [--venv DIR] [--keep]`` (needs PyPI access the first time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZES = [(256, 256), (320, 180), (150, 300), (100, 100), (1024, 768), (64, 200), (224, 224), (640, 427)]
PROMPTS = [
    "a cat with two horns on its head",
    "a red car in the rain",
    "an astronaut riding a horse",
    "fruit",
]

# Runs inside the throwaway environment; argv[1] is a JSON file describing the job.
CHILD = r"""
import json, sys
import torch, torchvision
from PIL import Image

job = json.load(open(sys.argv[1]))
import hpsv2.img_score as img_score
from hpsv2.src.open_clip import add_model_config

add_model_config(job["config"])
original = img_score.create_model_and_transforms


def tiny_instead_of_vit_h(model_name, pretrained=None, *args, **kwargs):
    # the one redirection: the tiny architecture, and no LAION base weights (the checkpoint replaces them anyway)
    return original(job["arch"], None, *args, **kwargs)


img_score.create_model_and_transforms = tiny_instead_of_vit_h
scores = [float(img_score.score(p["image"], p["prompt"], cp=job["checkpoint"])[0]) for p in job["pairs"]]
preprocess = img_score.model_dict["preprocess_val"]
pixels = [preprocess(Image.open(path)) for path in job["images"]]
torch.save(pixels, job["pixels_out"])
with torch.device("meta"):  # the real architecture's parameter names and shapes, without allocating it
    vit_h = original("ViT-H-14", None, precision="fp32", device="meta", light_augmentation=True, output_dict=True)[0]
shapes = {k: list(v.shape) for k, v in vit_h.state_dict().items()}
json.dump(
    {"scores": scores, "vit_h_shapes": shapes, "device": str(img_score.device), "torch": torch.__version__, "torchvision": torchvision.__version__},
    open(job["out"], "w"),
)
"""


def make_images(directory: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        fx, fy = rng.uniform(3, 15, size=2)
        arr = np.stack([xx / w * 255, yy / h * 255, 128 + 110 * np.sin(xx / fx + yy / fy)], axis=-1)
        arr += rng.normal(0, 12, size=arr.shape)  # some texture
        cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, 0.2 * min(w, h)
        arr[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = (230, 40, 60)
        path = directory / f"img{i}_{w}x{h}.png"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def make_venv(venv: Path) -> Path:
    """A virtual environment that sees this environment's packages and has ``hpsv2`` (no dependencies) on top."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # Appended after the venv's own site-packages: what is installed there (hpsv2, clint) comes first.
    (site / "_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "hpsv2==1.2.0",
            "clint==0.5.1",
            "args==0.1.0",
        ],
        check=True,
    )
    # The 1.2.0 wheel lacks the BPE vocabulary its tokenizer opens at import; the GitHub repository's file is
    # byte-identical to the one open_clip ships (same git blob 7b5088a5), so put that one in place.
    vocab = site / "hpsv2" / "src" / "open_clip" / "bpe_simple_vocab_16e6.txt.gz"
    if not vocab.exists():
        import open_clip

        shutil.copyfile(Path(open_clip.__file__).parent / vocab.name, vocab)
    return python


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--venv", type=Path, default=None, help="where to build (or reuse) the reference venv"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    from diffrl.rewards.hpsv2 import HPSv2, hps_preprocess
    from diffrl.rewards.tiny.open_clip import (
        TINY_OPEN_CLIP_ARCH,
        TINY_OPEN_CLIP_CONFIG,
        save_tiny_hps_checkpoint,
    )

    work = Path(tempfile.mkdtemp(prefix="diffrl_parity_hpsv2_"))
    try:
        checkpoint = save_tiny_hps_checkpoint(work, seed=0)
        config = work / f"{TINY_OPEN_CLIP_ARCH}.json"
        config.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
        images = make_images(work)
        pairs = [{"image": str(p), "prompt": PROMPTS[i % len(PROMPTS)]} for i, p in enumerate(images)]
        job = {
            "arch": TINY_OPEN_CLIP_ARCH,
            "config": str(config),
            "checkpoint": str(checkpoint),
            "images": [str(p) for p in images],
            "pairs": pairs,
            "out": str(work / "reference.json"),
            "pixels_out": str(work / "reference_pixels.pt"),
        }
        (work / "job.json").write_text(json.dumps(job))
        (work / "child.py").write_text(CHILD)

        python = make_venv(args.venv or work / "venv")
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
        subprocess.run([str(python), str(work / "child.py"), str(work / "job.json")], check=True, env=env)
        reference = json.loads((work / "reference.json").read_text())
        ref_pixels = torch.load(work / "reference_pixels.pt", weights_only=True)

        reward = HPSv2(checkpoint=checkpoint, arch=TINY_OPEN_CLIP_ARCH)
        print(f"reference: hpsv2 1.2.0 on {reference['device']}, torch {reference['torch']}, ", end="")
        print(f"torchvision {reference['torchvision']}")
        print(
            f"{'image':>22} {'prompt':>34} {'hpsv2':>10} {'diffrl':>10} {'|diff|':>9} {'pixels |diff|':>14}"
        )
        worst_score = worst_pixels = 0.0
        for pair, path, ref_px, ref_score in zip(pairs, images, ref_pixels, reference["scores"], strict=True):
            x = (
                torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float()
                / 255
            )
            with torch.no_grad():
                ours = reward(x, [pair["prompt"]]).item()
            px = (hps_preprocess(x)[0] - ref_px).abs().max().item()
            diff = abs(ours - ref_score)
            worst_score, worst_pixels = max(worst_score, diff), max(worst_pixels, px)
            print(
                f"{path.name:>22} {pair['prompt'][:34]:>34} {ref_score:10.6f} {ours:10.6f} {diff:9.2e} {px:14.2e}"
            )
        import open_clip

        with torch.device("meta"):
            vit_h = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
        ours_shapes = {k: list(v.shape) for k, v in vit_h.state_dict().items()}
        same = ours_shapes == reference["vit_h_shapes"]
        print(
            f"ViT-H-14 state dict: {len(ours_shapes)} tensors in open_clip {open_clip.__version__}, "
            f"{len(reference['vit_h_shapes'])} in hpsv2's open_clip; names and shapes identical: {same}"
        )
        # on a GPU the reference runs under float16 autocast
        tol = 1e-5 if reference["device"] == "cpu" else 5e-3
        print(
            f"max |score diff| = {worst_score:.2e} (tolerance {tol:g}); max |pixel diff| = {worst_pixels:.2e}"
        )
        return 0 if worst_score <= tol and same else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
