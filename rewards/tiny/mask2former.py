"""A tiny random-weight Mask2Former COCO instance segmenter, built offline, for the tests of the ``geneval`` reward.

:func:`build_tiny_mask2former` saves a ``Mask2FormerForUniversalSegmentation`` (a Swin backbone of width 32 with one
block per stage, a one-layer deformable pixel decoder, one masked-attention decoder layer (``decoder_layers=2`` in
transformers' count) with 20 queries, about 1.3M parameters) with the 80 COCO classes under the names the hub
checkpoints use (``id2label``), and a ``Mask2FormerImageProcessor`` (ImageNet mean/std), laid out like
``facebook/mask2former-swin-small-coco-instance`` (``config.json``, ``model.safetensors``,
``preprocessor_config.json``), so the reward loads it through its real loading path: ``GenEval(detector=path,
...)``. Building takes about a second; a forward on two 64x64 images well under a tenth of a second.
transformers builds Mask2Former's loss with scipy, so scipy must be installed.

The weights are random except the class head and the scale of the mask embedding, which are calibrated
(:func:`_calibrate`): with random weights every query's class probabilities are nearly uniform over the 81 outputs
(about 0.012) and its mask score near 0.5, so no detection would ever pass GenEval's 0.3 threshold. Calibrated,
"no object" wins for most queries and the others put most of their probability on one of a few classes (``dog``,
``cat``, ``bench``, ``cup`` by default), which one depending on the query and the image, so that detection scores
spread across both thresholds (0.3, and 0.9 for counting) and the tests see images with none, one or several
objects of a class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_tiny_mask2former", "COCO_ID2LABEL", "TINY_DETECTED_CLASSES"]

# COCO's 80 thing classes in COCO order, as the hub's Mask2Former COCO configs name them (Detectron2's names).
COCO_ID2LABEL = dict(
    enumerate(
        "person|bicycle|car|motorcycle|airplane|bus|train|truck|boat|traffic light|fire hydrant|stop sign|"
        "parking meter|bench|bird|cat|dog|horse|sheep|cow|elephant|bear|zebra|giraffe|backpack|umbrella|handbag|tie|"
        "suitcase|frisbee|skis|snowboard|sports ball|kite|baseball bat|baseball glove|skateboard|surfboard|"
        "tennis racket|bottle|wine glass|cup|fork|knife|spoon|bowl|banana|apple|sandwich|orange|broccoli|carrot|"
        "hot dog|pizza|donut|cake|chair|couch|potted plant|bed|dining table|toilet|tv|laptop|mouse|remote|keyboard|"
        "cell phone|microwave|oven|toaster|sink|refrigerator|book|clock|vase|scissors|teddy bear|hair drier|"
        "toothbrush".split("|")
    )
)

#: The classes the calibrated class head predicts.
TINY_DETECTED_CLASSES = ("dog", "cat", "bench", "cup")

CLASS_LOGIT_SCALE = (
    3.0  # std of a detected class's logit across queries (the softmax is then peaked, not uniform)
)
OTHER_CLASS_LOGIT = -12.0  # every other class stays far below
NO_OBJECT_LOGIT = 5.0  # "no object" wins for most queries; a class only where its logit is well above average
MASK_LOGIT_SCALE = (
    8.0  # typical |mask logit|: the mean sigmoid inside a mask (the mask score) is then near 0.9
)


def _calibration_images():
    """Three smooth 64x64 uint8 images (gradients, a sine pattern, a disc), ``(3, 3, 64, 64)``."""
    import torch

    ys, xs = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    disc = (((xs - 0.6) ** 2 + (ys - 0.4) ** 2) < 0.06).float()
    images = torch.stack(
        [
            torch.stack([xs, ys, 1 - xs]),
            torch.stack([0.5 + 0.5 * torch.sin(9 * xs), ys * xs, 1 - ys]),
            torch.stack([disc, 0.3 * ys, 1 - disc]),
        ]
    )
    return (images * 255).round().to(torch.uint8)


def _calibrate(model, processor, classes: Sequence[str]) -> None:
    """Random weights give every query nearly uniform class probabilities (about 1/81) and mask logits near 0 (a
    mask score near 0.5), so no detection would pass GenEval's thresholds. On three calibration images: remove the
    query states' shared direction from random rows of the output layer for ``classes`` and scale them so that
    their logits vary by about :data:`CLASS_LOGIT_SCALE` across queries and images (each query then puts most of
    its probability on one of them, which one depending on the query and the image); give every other class and
    "no object" a bias of :data:`OTHER_CLASS_LOGIT`; scale the mask embedding's last layer so that mask logits are
    about :data:`MASK_LOGIT_SCALE` in size."""
    import torch

    label2id = {v: k for k, v in COCO_ID2LABEL.items()}
    head = model.class_predictor  # Linear(hidden_dim, num_labels + 1) on the decoder's query states
    last = model.model.transformer_module.decoder.mask_predictor.mask_embedder.get_submodule("2.0")
    chosen = [label2id[c] for c in classes]
    states = []
    hook = head.register_forward_hook(lambda module, args, out: states.append(args[0].detach()))
    try:
        with torch.no_grad():
            inputs = processor(
                images=list(_calibration_images()),
                size={"shortest_edge": 64, "longest_edge": 128},
                return_tensors="pt",
            )
            out = model(pixel_values=inputs["pixel_values"])
    finally:
        hook.remove()
    with torch.no_grad():
        h = states[-1].reshape(-1, states[-1].shape[-1]).float()  # (queries x images, hidden)
        mean = h.mean(0)
        mean = mean / mean.norm()
        spread = (h - h.mean(0)).norm(dim=-1).mean()
        g = torch.Generator().manual_seed(1234)
        rows = torch.randn(len(chosen), h.shape[1], generator=g)
        rows = rows - (rows @ mean)[:, None] * mean[None, :]
        rows = rows / rows.norm(dim=1, keepdim=True) * (CLASS_LOGIT_SCALE / spread * h.shape[1] ** 0.5)
        weight = torch.zeros_like(head.weight)
        weight[chosen] = rows
        bias = torch.full_like(head.bias, OTHER_CLASS_LOGIT)
        bias[chosen] = -(rows @ h.mean(0))  # centred: each class wins for some queries
        bias[-1] = NO_OBJECT_LOGIT
        head.weight.copy_(weight)
        head.bias.copy_(bias)
        scale = MASK_LOGIT_SCALE / out.masks_queries_logits.abs().mean().clamp(min=1e-6)
        last.weight.mul_(scale)
        last.bias.mul_(scale)


def build_tiny_mask2former(
    path: str | Path, *, seed: int = 0, num_queries: int = 20, classes: Sequence[str] = TINY_DETECTED_CLASSES
) -> Path:
    """Save a tiny random Mask2Former COCO instance segmenter and its image processor to the directory ``path``;
    returns it. ``classes`` are the COCO names its calibrated class head predicts (see the module docstring)."""
    import torch
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    unknown = [c for c in classes if c not in COCO_ID2LABEL.values()]
    if unknown or not classes:
        raise ValueError(f"classes={list(classes)!r} must be COCO class names such as 'dog' (got {unknown}).")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backbone = SwinConfig(
        image_size=224,
        patch_size=4,
        embed_dim=32,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=7,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,  # the pixel decoder's GroupNorm uses 32 groups
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=64,
        num_queries=num_queries,
        num_labels=len(COCO_ID2LABEL),
        id2label=COCO_ID2LABEL,
        label2id={v: k for k, v in COCO_ID2LABEL.items()},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Mask2FormerForUniversalSegmentation(config).eval()
    processor = Mask2FormerImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333}, num_labels=80)
    _calibrate(model, processor, classes)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
