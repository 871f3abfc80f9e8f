"""Parity of diffrl's HPSv3 reward with the reference ``hpsv3`` package (PyPI 1.0.0), on shared tiny random weights.

The ``hpsv3`` package pins ``transformers==4.45.2`` (diffrl needs transformers 5) and training tools, so it is not
a dependency of diffrl. This script (not part of the test suite):

1. builds the tiny HPSv3 of :mod:`diffrl.rewards.tiny.hpsv3` (a base-model directory laid out like
   ``Qwen/Qwen2-VL-7B-Instruct`` with its own random weights, and ``HPSv3.safetensors`` in the real key layout),
   and writes PNG images of several sizes and aspect ratios;
2. creates a throwaway virtual environment that sees this environment's packages (torch, torchvision, PIL: a
   ``.pth`` file points at them) and installs there what the reference pins that differs here:
   ``transformers==4.45.2`` with ``tokenizers==0.20.3`` and ``huggingface_hub<1.0``, and what
   ``hpsv3.inference`` imports (``trl==0.11.4``, ``peft==0.13.2``, ``omegaconf``, ``fire``, ``datasets``,
   ``pandas``), then ``hpsv3==1.0.0`` without its dependencies (deepspeed, flash-attn and the rest are not needed
   to score);
3. runs ``hpsv3.HPSv3RewardInferencer(config_path, checkpoint_path, device="cpu").reward(image_paths, prompts)``
   in that environment, on all images in one batch, with the package's ``HPSv3_7B.yaml`` changed in three keys
   only: ``model_name_or_path`` (the tiny base directory instead of ``Qwen/Qwen2-VL-7B-Instruct``), and
   ``bf16: false`` / ``torch_dtype: float32`` (on a CPU the reference cannot run its bfloat16 backbone: its
   float32 head relies on CUDA autocast); model building, checkpoint loading (``strict=True``), special token,
   chat template, image resizing, processor and scoring are the package's own;
4. scores the same images and prompts with :class:`diffrl.rewards.hpsv3.HPSv3` (float32) and prints the
   differences of ``mu`` and ``log sigma``, and checks that the token ids and the pixel patches are identical.

Usage: ``python benchmarks/parity_hpsv3.py [--venv DIR] [--keep]`` (needs PyPI access the first time).
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

REFERENCE_PINS = [
    "transformers==4.45.2",
    "tokenizers==0.20.3",
    "huggingface_hub<1.0",
    "trl==0.11.4",
    "peft==0.13.2",
    "omegaconf",
    "fire",
    "datasets",
    "pandas",
]
SIZES = [(512, 512), (320, 180), (150, 300), (64, 64), (1024, 768), (448, 448), (700, 500), (90, 1000)]
PROMPTS = [
    "a cat with two horns on its head",
    "a red car in the rain",
    "an astronaut riding a horse, {style} braces and café ☕",
    "fruit",
]

# Runs inside the throwaway environment; argv[1] is a JSON file describing the job.
CHILD = r"""
import json, sys
from pathlib import Path
import torch, transformers, yaml
import hpsv3
from hpsv3 import HPSv3RewardInferencer

job = json.load(open(sys.argv[1]))
config = yaml.safe_load((Path(hpsv3.__file__).parent / "config" / "HPSv3_7B.yaml").read_text())
config.update(model_name_or_path=job["base"], bf16=False, torch_dtype="float32", output_dir=job["work"])
Path(job["config"]).write_text(yaml.safe_dump(config))
inferencer = HPSv3RewardInferencer(config_path=job["config"], checkpoint_path=job["checkpoint"], device="cpu")
with torch.no_grad():
    outputs = inferencer.reward(job["images"], job["prompts"])
    batch = inferencer.prepare_batch(job["images"], job["prompts"])
torch.save({"pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}, job["pixels_out"])
json.dump(
    {
        "outputs": outputs.float().tolist(),
        "input_ids": batch["input_ids"].tolist(),
        "attention_mask": batch["attention_mask"].tolist(),
        "dtype": str(next(inferencer.model.parameters()).dtype),
        "attn": inferencer.model.config._attn_implementation,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    },
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
        arr += rng.normal(0, 12, size=arr.shape)
        cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, 0.2 * min(w, h)
        arr[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = (230, 40, 60)
        path = directory / f"img{i}_{w}x{h}.png"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def make_venv(venv: Path) -> Path:
    """A virtual environment that sees this environment's packages, with the reference's pins on top."""
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
    # Appended after the venv's own site-packages: what is installed there (transformers 4.45.2, ...) comes first.
    parents = dict.fromkeys(
        [sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith("site-packages"))]
    )
    (site / "_parent_env.pth").write_text("".join(p + "\n" for p in parents))
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, *REFERENCE_PINS], check=True)
    subprocess.run([*pip, "--no-deps", "hpsv3==1.0.0"], check=True)
    return python


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--venv", type=Path, default=None, help="where to build (or reuse) the reference venv"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    from diffrl.rewards.hpsv3 import HPSV3_FILE, HPSv3
    from diffrl.rewards.tiny.hpsv3 import build_tiny_hpsv3

    work = Path(tempfile.mkdtemp(prefix="diffrl_parity_hpsv3_"))
    try:
        tiny = build_tiny_hpsv3(work / "tiny", seed=0)
        images = make_images(work)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(images))]
        job = {
            "base": str(tiny),
            "checkpoint": str(tiny / HPSV3_FILE),
            "images": [str(p) for p in images],
            "prompts": prompts,
            "config": str(work / "HPSv3_tiny.yaml"),
            "work": str(work / "out"),
            "out": str(work / "reference.json"),
            "pixels_out": str(work / "reference_pixels.pt"),
        }
        (work / "job.json").write_text(json.dumps(job))
        (work / "child.py").write_text(CHILD)

        python = make_venv(args.venv or work / "venv")
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
        subprocess.run([str(python), str(work / "child.py"), str(work / "job.json")], check=True, env=env)
        reference = json.loads((work / "reference.json").read_text())
        ref_pixels = torch.load(work / "reference_pixels.pt", weights_only=True)
        ref_out = torch.tensor(reference["outputs"])
        ref_ids = torch.tensor(reference["input_ids"])
        ref_mask = torch.tensor(reference["attention_mask"])
        grids = ref_pixels["image_grid_thw"]
        ref_patches = torch.split(ref_pixels["pixel_values"], grids.prod(dim=1).tolist())

        reward = HPSv3(checkpoint=tiny, base_model=tiny).load()
        print(
            f"reference: hpsv3 1.0.0, transformers {reference['transformers']}, torch {reference['torch']}, "
            f"{reference['dtype']}, attention {reference['attn']}; batch of {len(images)} images, right padded"
        )
        print(
            f"{'image':>20} {'grid':>10} {'ref mu':>10} {'diffrl mu':>10} {'|d mu|':>9} {'|d log s|':>9} {'ids':>4} {'|d px|':>8}"
        )
        worst = 0.0
        same_ids = True
        worst_px = 0.0
        tensors = []
        for i, (path, prompt) in enumerate(zip(images, prompts, strict=True)):
            x = (
                torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float()
                / 255
            )
            tensors.append(x)
            ours = reward.outputs(x, [prompt])[0]
            inputs = reward.model_inputs(x, [prompt])
            n = int(ref_mask[i].sum())
            ids_equal = torch.equal(inputs["input_ids"][0], ref_ids[i, :n]) and bool(ref_mask[i, :n].all())
            same_ids &= ids_equal and torch.equal(inputs["image_grid_thw"][0], grids[i])
            px = (inputs["pixel_values"].float() - ref_patches[i].float()).abs().max().item()
            worst_px = max(worst_px, px)
            d_mu, d_ls = (ours - ref_out[i]).abs().tolist()
            worst = max(worst, d_mu, d_ls)
            grid = "x".join(str(v) for v in grids[i].tolist())
            print(
                f"{path.name:>20} {grid:>10} {ref_out[i, 0].item():10.6f} {ours[0].item():10.6f} {d_mu:9.2e} "
                f"{d_ls:9.2e} {'=' if ids_equal else 'DIFF':>4} {px:8.1e}"
            )
        # the same-size images scored as one batch by diffrl too (right padding, prompts of different lengths)
        same = [i for i, s in enumerate(SIZES) if s == (512, 512)] + [
            i for i, s in enumerate(SIZES) if s == (448, 448)
        ]
        batch = torch.cat([torch.nn.functional.interpolate(tensors[i], size=(448, 448)) for i in same])
        batched = reward(batch, [prompts[i] for i in same])
        alone = torch.cat([reward(batch[j : j + 1], [prompts[i]]) for j, i in enumerate(same)])
        print(f"diffrl batched vs one by one: max |diff| = {(batched - alone).abs().max().item():.2e}")
        tol = 1e-4
        print(
            f"max |output diff| (mu and log sigma) = {worst:.2e} (tolerance {tol:g}); token ids and grids identical: "
            f"{same_ids}; max |pixel patch diff| = {worst_px:.2e}"
        )
        return 0 if worst <= tol and same_ids else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
