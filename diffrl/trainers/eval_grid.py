"""The picture of an evaluation (``eval/step_NNNNNN.png``): every evaluation image with its prompt and scores.

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
    a strip of their first, middle and last frames."""
    if images.ndim == 5:  # videos (N, F, 3, H, W): a strip of the first, middle and last frames
        f = images.shape[1]
        images = torch.cat([images[:, i] for i in sorted({0, f // 2, f - 1})], dim=-1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    cols = max(1, min(12, math.ceil(math.sqrt(n * 1.5))))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.7 * rows), squeeze=False)
    verdict = _pass_fail(components)
    scores = {k: v.detach().float().cpu() for k, v in components.items()}
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).float().cpu().numpy(), interpolation="nearest")
        caption = "\n".join(textwrap.wrap(prompts[i], 26)[:3])
        values = "\n".join(
            f"{k[:18]} {float(v[i]):.3g}" for k, v in list(scores.items())[:3] if v.numel() > i
        )
        ax.set_title(f"{caption}\n{values}", fontsize=6)
        if verdict is not None:
            ok = bool(verdict[1][i] >= 0.5)
            for side in ax.spines.values():
                side.set_edgecolor("tab:green" if ok else "tab:red")
                side.set_linewidth(2.5)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (2.7 * rows)) if title else None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
