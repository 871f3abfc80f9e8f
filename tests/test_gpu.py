"""Training on CUDA with mixed precision (``gpu`` marker: skipped without a CUDA device).

What the CPU suite cannot show: accelerate's real ``GradScaler`` under ``mixed_precision: fp16`` (on the CPU the
scaler path is exercised with a stand-in scaler, see test_trainers.py), bf16 autocast kernels, and float32
log-prob maths on the GPU. Each test trains the tiny SD3 model for a few steps on the GPU with low precision and with
float32 from the same seed, then checks that the low-precision run trained (no skipped step, finite weights that
moved) in the same direction as the float32 one: the cosine between the two weight updates is close to 1, a
comparison that does not depend on how large the rounding of one kernel is. The same comparison with bf16 autocast
on the CPU measured 0.991 (Flow-GRPO), 0.999 (DiffusionNFT) and 0.993 (ReFL); the bound is 0.9.
"""

import json
from pathlib import Path

import pytest
import torch

from diffrl.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]
PRESET = {a: ROOT / "configs" / "tiny" / f"{a}.yaml" for a in ("flow_grpo", "diffusion_nft", "refl")}
PROMPTS = str(ROOT / "configs" / "tiny" / "prompts.txt")


def _train(algo: str, out: Path, *overrides: str):
    trainer = build_trainer(
        PRESET[algo],
        [f"output_dir={out}", f"data.train={PROMPTS}", "max_steps=3", "data.eval_size=2", *overrides],
    )
    assert trainer.device.type == "cuda"
    before = torch.cat([p.detach().flatten().float().cpu() for p in trainer.params])
    trainer.train()
    after = torch.cat([p.detach().flatten().float().cpu() for p in trainer.params])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return after - before, [r for r in rows if "train/skipped" in r]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.mark.gpu
@pytest.mark.parametrize("algo", ["flow_grpo", "diffusion_nft", "refl"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_trains_like_float32(
    algo, precision, tmp_path, shared_cache, fresh_accelerate_state
):
    ref_update, _ = _train(algo, tmp_path / "fp32")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a new mixed precision needs a fresh state
    update, rows = _train(algo, tmp_path / precision, f"mixed_precision={precision}")
    assert [r["train/skipped"] for r in rows] == [0.0, 0.0, 0.0], rows
    assert torch.isfinite(update).all() and update.abs().max() > 0
    if precision == "fp16":  # accelerate's GradScaler ran: its scale is logged after every update
        assert all(r["train/loss_scale"] >= 1.0 for r in rows), rows
        assert not any(r.get("train/nonfinite_grad") for r in rows), rows
    cos = _cosine(update, ref_update)
    print(f"\n[{algo} {precision}] cos(update, float32 update) = {cos:.4f}")
    assert cos > 0.9
