"""The picture of an evaluation (``eval/step_NNNNNN.png``): its images (the first of each held-out prompt, see
:func:`diffrl.trainers.evaluation.evaluate`), each with its prompt and scores.

Each image gets its prompt (wrapped) and the evaluation reward's scores above it; when one of the reward's components
is a pass/fail score (every value 0 or 1, e.g. ``shapes_accuracy``), its frame is green where it passed and red
where it failed, as in the demo's before/after picture.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import torch

__all__ = ["save_eval_grid"]

#: the width in pixels at which the grid shows each image
CELL = 128


def _pass_fail(components: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor] | None:
    """The first component whose values are all 0 or 1, as ``(name, values)``."""
    for name, values in components.items():
        v = values.detach().float().cpu()
        if v.numel() and bool(((v == 0) | (v == 1)).all()):
            return name, v
    return None


def save_eval_grid(
    images: torch.Tensor,
    prompts: list[str],
    components: dict[str, torch.Tensor],
    path: str | Path,
    title: str = "",
) -> Path:
    """Save ``images`` ``(N, 3, H, W)`` in [0, 1] as a captioned grid: each with its prompt and the scores of the first
    three components, framed green/red by a pass/fail component when there is one. Videos ``(N, F, 3, H, W)`` are drawn as
    a strip of their first, middle and last frames. Each image is shown :data:`CELL` pixels wide (a wide one, such as
    a video strip, a whole multiple of that; small images are enlarged without smoothing); drawn with PIL, 0.5 CPU s
    for the demo's 96 images where a matplotlib figure took 5.7."""
    from PIL import Image, ImageDraw

    if images.ndim == 5:  # videos (N, F, 3, H, W): a strip of the first, middle and last frames
        f = images.shape[1]
        images = torch.cat([images[:, i] for i in sorted({0, f // 2, f - 1})], dim=-1)
    n, _, h, w = images.shape
    pixels = (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    thumb_w = CELL * round(w / h) if w > h else CELL  # a whole multiple of CELL
    thumb_h = max(1, round(thumb_w * h / w))
    font = _font(10)
    line = 12
    verdict = _pass_fail(components)
    scores = {k: v.detach().float().cpu() for k, v in components.items()}
    captions = []
    for i in range(n):
        lines = textwrap.wrap(prompts[i], max(8, thumb_w // 6))[:3]
        lines += [
            f"{_short(k)} {float(v[i]) + 0.0:.3g}" for k, v in list(scores.items())[:3] if v.numel() > i
        ]
        captions.append(lines)
    text_h = line * max((len(c) for c in captions), default=0) + 4
    pad = 6
    cell_w, cell_h = thumb_w + 2 * pad, thumb_h + text_h + 2 * pad
    cols = max(1, min(math.ceil(math.sqrt(n * 1.5)), 1700 // cell_w))  # at most about 1700 pixels wide
    rows = max(1, math.ceil(n / cols))
    title_lines = textwrap.wrap(title, max(20, cols * cell_w // 6)) if title else []
    top = line * len(title_lines) + (6 if title_lines else 0)
    grid = Image.new("RGB", (cols * cell_w, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for k, text in enumerate(title_lines):
        draw.text((pad, 3 + k * line), text, fill="black", font=font)
    resample = Image.Resampling.NEAREST if thumb_w >= w else Image.Resampling.BILINEAR
    for i in range(n):
        x0, y0 = (i % cols) * cell_w + pad, top + (i // cols) * cell_h + pad
        for k, text in enumerate(captions[i]):
            draw.text((x0, y0 + k * line), text, fill="black", font=font)
        y_img = y0 + text_h
        grid.paste(Image.fromarray(pixels[i]).resize((thumb_w, thumb_h), resample), (x0, y_img))
        if verdict is not None:
            colour = (44, 160, 44) if bool(verdict[1][i] >= 0.5) else (214, 39, 40)  # matplotlib's green/red
            draw.rectangle(
                (x0 - 3, y_img - 3, x0 + thumb_w + 2, y_img + thumb_h + 2), outline=colour, width=3
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _short(name: str, most: int = 16) -> str:
    """``name`` cut to ``most`` characters, with an ellipsis where it was cut."""
    return name if len(name) <= most else name[: most - 1] + "\u2026"


def _font(size: int):
    """PIL's built-in scalable font at ``size`` pixels (its small bitmap font where PIL lacks FreeType)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or without FreeType
        return ImageFont.load_default()
