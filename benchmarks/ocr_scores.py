"""Real scores of the ``ocr`` reward on text rendered with PIL: font, size, rendered text, quoted text, what the
engine read and the score, as a Markdown table.

The engine is the default one (:class:`diffrl.rewards.ocr.RapidOCRRecognizer`: the PP-OCRv4 models in the
rapidocr-onnxruntime wheel), so this runs offline. Each image is black text centred on a white 512x512 canvas
(the Flow-GRPO OCR task samples 512x512 images); a font that is not installed is left out. Against the same
prompt it scores the clean render of the quoted text, a misspelt and a wrong word, then a blank image and the toy
world's images (shapes, no text).

Usage: ``python benchmarks/ocr_scores.py [--threads 1] [--size 512]`` (about 30 s on a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from diffrl.rewards import load_reward

DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
FONTS = {
    "PIL default": None,
    "DejaVu Sans": DEJAVU / "DejaVuSans.ttf",
    "DejaVu Serif": DEJAVU / "DejaVuSerif.ttf",
    "DejaVu Sans Mono": DEJAVU / "DejaVuSansMono.ttf",
    "DejaVu Sans Bold": DEJAVU / "DejaVuSans-Bold.ttf",
}
SIZES = (6, 8, 16, 32, 64)
PROMPT = 'A storefront with a sign that says "Hello World"'
RENDERS = ("Hello World", "Hello Wrold", "Goodbye")


def font_of(name: str, size: int):
    path = FONTS[name]
    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(path), size)


def render(text: str, font, canvas: int) -> torch.Tensor:
    """Black ``text`` centred on a white ``canvas`` x ``canvas`` image, as a (3, H, W) tensor in [0, 1]."""
    img = Image.new("RGB", (canvas, canvas), "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(
        ((canvas - (right - left)) / 2 - left, (canvas - (bottom - top)) / 2 - top),
        text,
        fill="black",
        font=font,
    )
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per session")
    parser.add_argument("--size", type=int, default=512, help="canvas side in pixels")
    args = parser.parse_args()

    reward = load_reward("ocr", num_threads=args.threads).load()
    quoted = PROMPT.split('"')[1]
    print(
        f"prompt: {PROMPT!r} (quoted text {quoted!r}); engine: {reward.recognizer!r}, {args.threads} thread(s)"
    )
    print("each cell: score (text read by the engine)\n")
    print("| font | size | " + " | ".join(f"renders {t!r}" for t in RENDERS) + " |")
    print("|---|---|" + "---|" * len(RENDERS))
    seconds = []

    def cell(image: torch.Tensor) -> str:
        start = time.perf_counter()
        read = reward.read_text(image[None])[0]
        seconds.append(time.perf_counter() - start)
        score = reward(image[None], [PROMPT])[0].item()
        return f"{score:.3f} ({read!r})"

    for name, path in FONTS.items():
        if path is not None and not path.is_file():
            print(f"(font {name} not installed: {path}; left out)")
            continue
        for size in SIZES:
            font = font_of(name, size)
            cells = [cell(render(text, font, args.size)) for text in RENDERS]
            print(f"| {name} | {size} | " + " | ".join(cells) + " |")

    from diffrl.toy import generate_dataset

    print(f"\n| image without text | score ({quoted!r} quoted) |\n|---|---|")
    print(f"| blank white {args.size}x{args.size} | {cell(torch.ones(3, args.size, args.size))} |")
    toy = generate_dataset(4, seed=0)
    for prompt, image in zip(toy["prompts"], toy["images"], strict=True):
        print(f"| toy world 64x64: {prompt} | {cell(image)} |")
    print(f"\n{len(seconds)} images, {sum(seconds) / len(seconds):.2f} s per image read, one at a time")


if __name__ == "__main__":
    main()
