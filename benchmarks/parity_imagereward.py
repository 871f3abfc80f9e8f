"""Parity of diffrl's ImageReward with the reference ``image-reward`` package (PyPI 1.5), run by hand.

It builds the tiny original-format checkpoint of the tests (or takes real files), scores the same PNG images and
prompts with the reference ``ImageReward.ImageReward`` class in a throwaway virtual environment and with
:class:`diffrl.rewards.imagereward.ImageReward`, and prints the differences:

* ``model``: diffrl's model on the reference's own preprocessed pixels (``model.preprocess(pil)``) against the
  reference's ``model.score(prompt, pil_image)``: the conversion and the network, expected ~1e-6 in float32;
* ``end-to-end``: diffrl's differentiable path on the 8-bit images as [0, 1] tensors against the same reference
  scores: adds the torch-vs-PIL resize difference;
* ``pixels``: diffrl's torch preprocessing against the reference's PIL transform (normalised units).

The environment (default ``/tmp/diffrl-imagereward-ref``) reuses this interpreter's packages (torch,
torchvision, numpy, Pillow: a ``.pth`` file points at them) and installs, without dependencies, only what the
reference pins that differs here: ``image-reward==1.5``, ``timm==0.6.13``, ``fairscale==0.4.13`` (its import of
``checkpoint_wrapper``), ``transformers==4.46.3`` (``med.py`` imports helpers that transformers 5 removed) with
``tokenizers==0.20.3`` and ``huggingface_hub==0.26.5``, plus ``wheel`` to build fairscale. Nothing large is
downloaded. The package's ``__init__`` (which imports ReFL, diffusers, datasets and OpenAI's ``clip``) is
bypassed: the harness imports ``ImageReward.ImageReward`` and the BLIP modules directly.

For the tiny checkpoint the harness adapts the reference's fixed sizes, and nothing else: ``create_vit`` builds
the reference ``VisionTransformer`` with the checkpoint's width and depth (instead of ViT-L), the reference
``MLP`` is built with the text width (instead of 768), and ``BertTokenizer.from_pretrained("bert-base-uncased")``
reads the tiny ``vocab.txt``; the reference then adds ``[DEC]`` and ``[ENC]`` itself. The checkpoint is loaded
with ``strict=True`` (the reference uses ``strict=False``), which also checks that the tiny file has exactly the
original key set.

Examples::

    python benchmarks/parity_imagereward.py                       # tiny checkpoint, CPU
    python benchmarks/parity_imagereward.py --checkpoint ~/ImageReward.pt --med-config ~/med_config.json \\
        --tokenizer ~/bert-base-uncased                           # real weights (local files)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REFERENCE_PINS = [
    "image-reward==1.5",
    "timm==0.6.13",
    "transformers==4.46.3",
    "tokenizers==0.20.3",
    "huggingface_hub==0.26.5",
    "wheel",
]

PROMPTS = [
    "a painting of an ocean with clouds and birds, day time, low depth field effect",
    "a photo of a red cat",
    "a small dog in the city at night",
    "portrait of an old man, drawing",
    "blue sky",
]
SIZES = [(512, 512), (480, 640), (768, 512), (256, 256), (96, 96)]

# Runs inside the reference environment: argv = workdir, checkpoint, med_config, tokenizer dir.
INNER = r"""
import importlib.util, json, sys, types
from pathlib import Path
import torch
from PIL import Image

work, ckpt, med_config, tok_dir = (Path(a) for a in sys.argv[1:5])

# Import ImageReward.ImageReward and ImageReward.models.BLIP.* without the package __init__ files (they import
# ReFL, diffusers, datasets and OpenAI clip, none of which scoring needs).
root = Path(importlib.util.find_spec("ImageReward").submodule_search_locations[0])
for name, folder in (("ImageReward", root), ("ImageReward.models", root / "models")):
    module = types.ModuleType(name)
    module.__path__ = [str(folder)]
    sys.modules[name] = module
import ImageReward.models.BLIP.blip as ref_blip
import ImageReward.models.BLIP.blip_pretrain as ref_pretrain
from ImageReward.ImageReward import MLP, ImageReward
from ImageReward.models.BLIP.vit import VisionTransformer
from transformers import BertTokenizer

state = torch.load(ckpt, map_location="cpu", weights_only=True)
width = state["blip.visual_encoder.cls_token"].shape[-1]
depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("blip.visual_encoder.blocks."))
patch = state["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
text_width = state["mlp.layers.0.weight"].shape[1]
if (width, depth) != (1024, 24):  # tiny checkpoint: the reference's ViT with the checkpoint's sizes
    def create_vit(vit, image_size, *args, **kwargs):
        return VisionTransformer(img_size=image_size, patch_size=patch, embed_dim=width, depth=depth,
                                 num_heads=max(1, width // 64)), width
    ref_pretrain.create_vit = create_vit

class LocalBertTokenizer:  # init_tokenizer() asks for "bert-base-uncased": read the given folder's vocab.txt
    @classmethod
    def from_pretrained(cls, name, **kwargs):
        return BertTokenizer(vocab_file=str(tok_dir / "vocab.txt"), do_lower_case=True)
ref_blip.BertTokenizer = LocalBertTokenizer

model = ImageReward(med_config=str(med_config), device="cpu")
if text_width != 768:
    model.mlp = MLP(text_width)
model.load_state_dict(state, strict=True)
model.eval()

inputs = json.loads((work / "inputs.json").read_text())
scores, pixels, ids = [], [], []
with torch.no_grad():
    for path, prompt in zip(inputs["images"], inputs["prompts"]):
        image = Image.open(path)
        scores.append(model.score(prompt, image))
        pixels.append(model.preprocess(image))
        ids.append(model.blip.tokenizer(prompt, padding="max_length", truncation=True, max_length=35,
                                        return_tensors="pt").input_ids[0])
torch.save({"scores": torch.tensor(scores), "pixels": torch.stack(pixels), "input_ids": torch.stack(ids),
            "enc_token_id": model.blip.tokenizer.enc_token_id}, work / "reference.pt")
print("reference scored", len(scores), "images")
"""


def ensure_env(venv: Path) -> Path:
    """The reference environment's python (created on first use)."""
    python = venv / "bin" / "python"
    marker = venv / "diffrl-ready"
    if marker.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # this interpreter's packages (torch, torchvision, numpy, Pillow, ...) come after the pinned ones
    Path(site, "zz_diffrl_host.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [str(python), "-m", "pip", "install", "--quiet", "--no-deps"]
    subprocess.run([*pip, *REFERENCE_PINS], check=True)
    subprocess.run([*pip, "--no-build-isolation", "fairscale==0.4.13"], check=True)
    marker.write_text("ok\n")
    return python


def make_inputs(work: Path) -> tuple[list[Path], list[str]]:
    g = torch.Generator().manual_seed(0)
    paths = []
    for i, (h, w) in enumerate(SIZES):
        low = torch.rand(1, 3, 6, 8, generator=g)
        img = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
        ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        img = img + 0.4 * (((xs - 0.3 - 0.1 * i) ** 2 + (ys - 0.5) ** 2) < 0.04).float()  # a hard-edged disc
        u8 = (img[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        path = work / f"image{i}.png"
        Image.fromarray(u8).save(path)
        paths.append(path)
    return paths, PROMPTS[: len(paths)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "diffrl-imagereward-ref")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where inputs and outputs go (default: a temp dir)"
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="ImageReward.pt (default: the tiny one)"
    )
    parser.add_argument("--med-config", type=Path, default=None)
    parser.add_argument("--tokenizer", type=Path, default=None, help="folder with the BERT vocab.txt")
    args = parser.parse_args()

    from diffrl.rewards.imagereward import ImageReward
    from diffrl.rewards.tiny.blip import build_tiny_imagereward

    work = args.workdir or Path(tempfile.mkdtemp(prefix="imagereward-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.checkpoint is None:
        tiny = build_tiny_imagereward(work / "tiny", seed=0)
        ckpt, med, tok = tiny / "ImageReward.pt", tiny / "med_config.json", tiny / "tokenizer"
    else:
        if args.med_config is None or args.tokenizer is None:
            parser.error("--checkpoint needs --med-config and --tokenizer (a folder with vocab.txt)")
        ckpt, med, tok = args.checkpoint, args.med_config, args.tokenizer
    paths, prompts = make_inputs(work)
    (work / "inputs.json").write_text(json.dumps({"images": [str(p) for p in paths], "prompts": prompts}))
    (work / "inner.py").write_text(INNER)

    python = ensure_env(args.venv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    subprocess.run(
        [str(python), str(work / "inner.py"), str(work), str(ckpt), str(med), str(tok)], check=True, env=env
    )
    ref = torch.load(work / "reference.pt", weights_only=True)

    reward = ImageReward(checkpoint=ckpt, med_config=med, tokenizer=tok).load("cpu")
    with torch.no_grad():
        ids, _ = reward.tokenize(prompts)
        model_scores = torch.cat(
            [reward.score_pixel_values(ref["pixels"][i : i + 1], [p]) for i, p in enumerate(prompts)]
        )
        tensors = [
            torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
            for p in paths
        ]
        e2e_scores = torch.cat([reward(t, [p]) for t, p in zip(tensors, prompts, strict=True)])
        pixel_diff = torch.cat(
            [(reward.preprocess(t) - ref["pixels"][i : i + 1]).abs() for i, t in enumerate(tensors)]
        )

    print(
        f"token ids identical: {torch.equal(ids.cpu(), ref['input_ids'])} (position 0 = [CLS] "
        f"{ids[0, 0].item()}, reference enc_token_id {ref['enc_token_id']} unused when scoring)"
    )
    print(f"{'image':>8} {'size':>9} {'reference':>11} {'model':>11} {'end-to-end':>11}")
    for i, (h, w) in enumerate(SIZES[: len(paths)]):
        print(
            f"{i:>8} {f'{h}x{w}':>9} {ref['scores'][i]:>11.6f} {model_scores[i]:>11.6f} {e2e_scores[i]:>11.6f}"
        )
    print(f"model      max |diff| = {(model_scores - ref['scores']).abs().max():.3e}")
    print(f"end-to-end max |diff| = {(e2e_scores - ref['scores']).abs().max():.3e}")
    print(f"pixels     max |diff| = {pixel_diff.max():.3e}, mean {pixel_diff.mean():.3e} (normalised units)")


if __name__ == "__main__":
    main()
