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
import math
from pathlib import Path

import pytest
import torch

from diffrl.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]
PRESET = {
    a: ROOT / "configs" / "tiny" / f"{a}.yaml" for a in ("flow_grpo", "diffusion_nft", "refl", "awm", "dpo")
}
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


_UPDATE_KEYS = (
    "train/nonfinite_grad",
    "train/fp16_overflow",
    "train/loss_scale",
    "train/loss",
    "train/grad_norm",
    "train/ratio_mean",
    "sample/zero_adv_frac",
)


def _brief(rows: list[dict]) -> list[dict]:
    """The metrics that say whether and why an update happened, one dict per step (short enough that pytest
    prints it whole)."""
    return [{k.split("/")[1]: r[k] for k in _UPDATE_KEYS if k in r} for r in rows]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.mark.gpu
@pytest.mark.parametrize("algo", ["flow_grpo", "diffusion_nft", "refl", "awm", "dpo"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_trains_like_float32(
    algo, precision, tmp_path, shared_cache, fresh_accelerate_state
):
    # DPO at the preset's beta = 2000 sends gradients of up to 5.8 into the transformer's output (measured on the
    # CPU in float32), 3.8e5 once scaled by the GradScaler's initial 65536: past fp16's 65504, so its first three
    # updates overflow and back the scale off to 8192 (the scaler's design), so a 3-step run never updates (on an
    # H200 its weights did not move). beta = 20 (gradients 100x smaller, 3.8e3 scaled) compares the precisions.
    extra = ["dpo.beta=20"] if algo == "dpo" else []
    ref_update, _ = _train(algo, tmp_path / "fp32", *extra)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a new mixed precision needs a fresh state
    update, rows = _train(algo, tmp_path / precision, f"mixed_precision={precision}", *extra)
    print(f"\n[{algo} {precision}] {_brief(rows)}")  # whole: pytest shortens a long assertion message
    assert [r["train/skipped"] for r in rows] == [0.0, 0.0, 0.0], rows
    assert not any(r.get("train/nonfinite_grad") or r.get("train/fp16_overflow") for r in rows), _brief(rows)
    assert torch.isfinite(update).all() and update.abs().max() > 0, _brief(rows)
    if precision == "fp16":  # accelerate's GradScaler ran: its scale is logged after every update
        assert all(r["train/loss_scale"] >= 1.0 for r in rows), rows
    cos = _cosine(update, ref_update)
    print(f"\n[{algo} {precision}] cos(update, float32 update) = {cos:.4f}")
    assert cos > 0.9


# SD3.5 Medium's transformer (stabilityai/stable-diffusion-3.5-medium, transformer/config.json): 24 MMDiT blocks of
# 24 heads x 64, the first 13 with a second image-only attention, RMS q/k norms. Only the text and latent widths at
# the edges are the tiny pipeline's, so its tiny text encoders and VAE can feed it.
SD35M_BLOCKS = {
    "num_layers": 24,
    "num_attention_heads": 24,
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
    "patch_size": 2,
    "pos_embed_max_size": 384,
    "sample_size": 128,
}


def sd35m_block_stack_model(dtype=torch.bfloat16, device="cuda", **override):
    """The tiny SD3 pipeline with a full-size random-weight SD3.5-M block stack as its transformer."""
    from diffusers import SD3Transformer2DModel

    from diffrl.models import load_model

    model = load_model("tiny:sd3", dtype=torch.float32, device="cpu")
    tiny = model.transformer.config
    torch.manual_seed(0)
    config = {**SD35M_BLOCKS, **override}
    transformer = SD3Transformer2DModel(
        in_channels=tiny.in_channels,
        out_channels=tiny.out_channels,
        joint_attention_dim=tiny.joint_attention_dim,
        pooled_projection_dim=tiny.pooled_projection_dim,
        **config,
    ).eval()
    transformer.requires_grad_(False)
    model.pipe.transformer = transformer
    model.transformer = transformer
    model.pipe.to(device=device, dtype=dtype)
    model.clear_prompt_cache()
    return model


@pytest.mark.gpu
def test_reference_preset_step_on_a_full_size_sd35m_block_stack_is_on_policy_in_bf16(
    tmp_path, shared_cache, fresh_accelerate_state
):
    # The reference preset's Flow-GRPO settings (CFG 4.5 with the unconditional branch detached, KL 0.01 in reference
    # units, 10 steps, two minibatch updates) in bf16, with rollout chunks of 8 and training micro-batches of 3: the
    # old log-probs recomputed in the training shapes make the first update exactly on-policy. The drift of the
    # rollout's own log-probs (what old_logp=rollout would train with) is printed for the record.
    model = sd35m_block_stack_model()
    overrides = [
        f"output_dir={tmp_path}",
        f"data.train={PROMPTS}",
        "data.eval_size=0",
        "max_steps=1",
        "model.dtype=bfloat16",
        "mixed_precision=bf16",
        "model.gradient_checkpointing=true",
        "sample.height=256",  # 64x64 latents with the tiny VAE: 1,024 image tokens, SD3.5-M's count at 512 px
        "sample.width=256",
        "sample.num_steps=10",
        "sample.guidance_scale=4.5",
        "sample.batch_size=8",
        "optim.train_batch_size=3",
        "flow_grpo.group_size=4",
        "flow_grpo.prompts_per_step=2",
        "flow_grpo.kl_beta=0.01",
        "flow_grpo.kl_scale=reference",
        "flow_grpo.cfg_grad=cond",
        "flow_grpo.clip_range=1e-4",
        "flow_grpo.old_logp=recompute",
        "flow_grpo.num_minibatches=1",
    ]
    trainer = build_trainer(PRESET["flow_grpo"], overrides, model=model)
    assert trainer.device.type == "cuda"
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a LoRA that is not a no-op, as after a few updates
        for name, p in zip(trainer.param_names, trainer.params, strict=True):
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 1e-3).to(p.device))
    metrics = trainer.train_step(0)
    print(
        f"\n[SD3.5-M blocks, bf16] rollout vs training-shape old log-probs: max diff "
        f"{metrics['train/old_logp_max_diff']:.3e}; clipfrac {metrics['train/clipfrac']}, "
        f"approx_kl {metrics['train/approx_kl']:.3e}, kl {metrics['train/kl']:.3e}"
    )
    assert metrics["train/skipped"] == 0.0
    assert metrics["train/clipfrac"] == 0.0 and metrics["train/ratio_mean"] == 1.0
    assert metrics["train/approx_kl"] == 0.0  # max |logp_train - logp_old| = 0 at the first inner epoch
    assert math.isfinite(metrics["train/old_logp_max_diff"]) and math.isfinite(metrics["train/kl"])


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["flux", "qwen_image", "z_image", "flux2", "flux2_klein", "wan", "wan22"])
def test_cuda_bf16_flow_grpo_steps_on_every_model_family(
    family, tmp_path, shared_cache, fresh_accelerate_state
):
    """Every family's tiny model trains on the GPU under bf16 autocast: no skipped step, finite weights that moved,
    and a first update that is on-policy up to bf16 kernel rounding (the CPU float32 suite pins the ratio at
    exactly 1)."""
    extra = ["model.expert=low"] if family == "wan22" else []
    if family == "qwen_image_edit":
        pytest.skip(
            "needs an edit prompt file with source images; tests/test_qwen_image_edit.py covers it on the CPU"
        )
    update, rows = _train(
        "flow_grpo", tmp_path / family, f"model.path=tiny:{family}", "mixed_precision=bf16", *extra
    )
    assert [r["train/skipped"] for r in rows] == [0.0, 0.0, 0.0], rows
    print(f"\n[{family} bf16] {_brief(rows)}")
    assert not any(r.get("train/nonfinite_grad") for r in rows), _brief(rows)
    assert torch.isfinite(update).all() and update.abs().max() > 0, _brief(rows)
    ratio = rows[0]["train/ratio_mean"]
    print(f"\n[{family} bf16] first step ratio_mean = {ratio:.6f}")
    assert abs(ratio - 1) < 0.05, rows[0]


@pytest.mark.gpu
def test_cuda_offloaded_text_encoders_live_on_the_cpu_and_encode_alike(shared_cache):
    from diffrl.models import load_model

    prompts = ["a red circle", "two blue squares"]
    plain = load_model("tiny:sd3", device="cuda")
    ref = plain.encode(prompts)
    model = load_model("tiny:sd3", device="cuda").offload_text_encoders()
    cond = model.encode(prompts)
    assert all(p.device.type == "cpu" for enc in model.text_encoders() for p in enc.parameters())
    assert model.transformer.device.type == "cuda" and cond.prompt_embeds.device.type == "cuda"
    torch.testing.assert_close(cond.prompt_embeds, ref.prompt_embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, ref.pooled, rtol=0, atol=0)
