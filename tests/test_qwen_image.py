"""The Qwen-Image adapter against diffusers' own QwenImagePipeline, on the tiny offline pipeline (``tiny:qwen_image``):
schedule, prompt encoding, a noise-free rollout with true CFG, decoding, and a LoRA saved for ``load_lora_weights``."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline  # noqa: E402
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps  # noqa: E402

from diffrl.models import ADAPTERS, QwenImageModel, load_model  # noqa: E402
from diffrl.models.flux import pack_latents  # noqa: E402
from diffrl.models.loading import tiny_model_dir  # noqa: E402
from diffrl.models.tiny import QWEN_IMAGE_SCHEDULER_CONFIG  # noqa: E402
from diffrl.samplers import rollout, sigmas_from_scheduler_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_tiny_cache", "one_thread")

PROMPTS = ["a red cat", "the blue square on the left of a tree", "two green circles"]


@pytest.fixture(scope="module")
def model():
    return load_model("tiny:qwen_image")


@pytest.fixture(scope="module")
def pipe():
    p = QwenImagePipeline.from_pretrained(tiny_model_dir("tiny:qwen_image"))
    p.set_progress_bar_config(disable=True)
    return p


def _pipeline_sigmas(scheduler, steps: int, image_seq_len: int) -> torch.Tensor:
    c = scheduler.config
    mu = calculate_shift(
        image_seq_len, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"]
    )
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas


def test_detected_and_loaded(model):
    assert ADAPTERS["QwenImagePipeline"] is QwenImageModel
    assert isinstance(model, QwenImageModel) and model.family == "qwen_image"
    assert model.vae_scale_factor == 4 and model.latent_shape(32, 48) == (4, 8, 12)
    with pytest.raises(ValueError, match="multiple of 8"):
        model.latent_shape(36, 32)


@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
@pytest.mark.parametrize("steps", [2, 4])
def test_schedule_equals_pipeline_bitwise(model, pipe, size, steps):
    h, w = size
    expected = _pipeline_sigmas(pipe.scheduler, steps, (h // 8) * (w // 8))
    got = model.schedule(steps, h, w)
    assert torch.equal(got, expected), (got, expected)
    assert got[-2].item() == pytest.approx(0.02)  # shift_terminal


@pytest.mark.parametrize("seq", [4096, 6889, 6032])  # 1024x1024, 1328x1328, 928x1664 pixels
def test_schedule_real_resolutions_bitwise(seq):
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)
    expected = _pipeline_sigmas(scheduler, 50, seq)
    got = sigmas_from_scheduler_config(
        QWEN_IMAGE_SCHEDULER_CONFIG, 50, image_seq_len=seq, flux_base_sigmas=True
    )
    assert torch.equal(got, expected)


def test_encode_equals_pipeline_and_is_cached(model, pipe):
    model.clear_prompt_cache()
    cond = model.encode(PROMPTS, negative_prompt="")
    embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu")
    assert mask is not None and torch.equal(cond.prompt_mask, mask)
    valid = mask.bool()
    # one prompt at a time here, a padded batch there: the same maths
    assert (cond.prompt_embeds - embeds).abs().max().item() < 1e-5
    assert not cond.prompt_embeds[~valid].any()
    for i, p in enumerate(PROMPTS):
        alone, alone_mask = pipe.encode_prompt(p, device="cpu")
        assert alone_mask is None  # a single prompt is never padded
        n = int(mask[i].sum())
        assert alone.shape[1] == n and torch.equal(cond.prompt_embeds[i, :n], alone[0])
    neg, _ = pipe.encode_prompt("", device="cpu")
    assert torch.equal(cond.negative_prompt_embeds, neg.expand(len(PROMPTS), -1, -1))
    assert cond.negative_prompt_mask.all()
    calls = []
    handle = model.pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = model.encode(PROMPTS[::-1])
    finally:
        handle.remove()
    assert not calls and torch.equal(
        again.prompt_embeds[0, : int(mask[2].sum())], cond.prompt_embeds[2, : int(mask[2].sum())]
    )


def _pipeline_latents(pipe, prompts, negative, cfg, steps, seed, size=(32, 32)):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(
        prompts,
        negative_prompt=negative,
        true_cfg_scale=cfg,
        height=size[0],
        width=size[1],
        num_inference_steps=steps,
        generator=gens,
        output_type="latent",
    ).images


def _ours(model, prompts, negative, cfg, steps, seed, size=(32, 32)):
    cond = model.encode(prompts, negative_prompt=negative)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    noise = model.sample_noise(len(prompts), *size, generator=gens)
    out = rollout(model, cond, model.schedule(steps, *size), noise, guidance_scale=cfg)
    return out.final


@pytest.mark.parametrize(
    "prompts,negative,cfg,steps",
    [
        (["a red cat"], "", 4.0, 2),
        (PROMPTS[:2], ["", "blurry"], 4.0, 4),  # contexts of different lengths: padded, masked
        (PROMPTS[1:], None, 1.0, 3),  # no CFG
    ],
)
def test_rollout_reproduces_pipeline(model, pipe, prompts, negative, cfg, steps):
    expected = _pipeline_latents(pipe, prompts, negative, cfg, steps, seed=7, size=(32, 48))
    got = pack_latents(_ours(model, prompts, negative, cfg, steps, seed=7, size=(32, 48)))
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff < 1e-5, diff


def test_decode_equals_pipeline_images(model, pipe):
    gens = [torch.Generator().manual_seed(3)]
    images = pipe(
        "two green circles",
        negative_prompt="",
        true_cfg_scale=3.0,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=gens,
        output_type="pt",
    ).images
    latents = _ours(model, ["two green circles"], "", 3.0, 2, seed=3)
    ours = model.decode(latents)
    assert ours.shape == images.shape == (1, 3, 32, 32)
    assert (ours - images).abs().max().item() < 1e-5


def test_lora_saved_for_load_lora_weights(tmp_path):
    model = load_model("tiny:qwen_image")
    model.add_lora(rank=4, alpha=8)
    last = len(model.transformer.transformer_blocks) - 1
    names = {n for n, p in model.transformer.named_parameters() if p.requires_grad}
    assert names and not any(f"transformer_blocks.{last}.attn.add_q_proj" in n for n in names)
    assert any(f"transformer_blocks.{last}.attn.to_k" in n for n in names)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    ours = pack_latents(_ours(model, ["a red cat"], "", 4.0, 2, seed=1))
    with model.disable_adapter():
        base = pack_latents(_ours(model, ["a red cat"], "", 4.0, 2, seed=1))
    assert (ours - base).abs().max().item() > 1e-3  # the adapter changes the samples
    model.save_lora(tmp_path / "lora")
    fresh = QwenImagePipeline.from_pretrained(tiny_model_dir("tiny:qwen_image"))
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(tmp_path / "lora")
    expected = _pipeline_latents(fresh, ["a red cat"], "", 4.0, 2, seed=1)
    assert (ours - expected).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------- the trainers on Qwen-Image

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("algo", ["flow_grpo", "diffusion_nft", "refl", "awm"])
def test_every_trainer_takes_a_step_on_qwen_image(algo, tmp_path):
    """Each trainer's tiny preset on ``tiny:qwen_image``: one step moves every trainable tensor with finite metrics;
    Flow-GRPO's first update is on-policy (ratio exactly 1, no KL) in float32."""
    from diffrl.train import build_trainer

    trainer = build_trainer(
        ROOT / "configs" / "tiny" / f"{algo}.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={ROOT / 'configs' / 'tiny' / 'prompts.txt'}",
            "model.path=tiny:qwen_image",
            "max_steps=1",
            "eval_every=0",
            "checkpointing_steps=0",
            "report_to=none",
        ],
    )
    assert isinstance(trainer.model, QwenImageModel)
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train_step(0)
    unchanged = [
        n for n, a, p in zip(trainer.param_names, before, trainer.params, strict=True) if torch.equal(a, p)
    ]
    assert not unchanged, f"{len(unchanged)} trainable tensors did not move, e.g. {unchanged[:2]}"
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
    if algo == "flow_grpo":
        assert metrics["train/ratio_mean"] == 1.0 and metrics["train/approx_kl"] == 0.0


def test_sample_and_eval_commands_take_qwen_image(model, tmp_path, capsys):
    """``diffrl sample`` / ``diffrl eval`` on tiny:qwen_image write what the Python API samples (true CFG 4, the
    adapter's default), and an image does not depend on the batch it was sampled in, although prompts of different
    token counts are padded and masked differently in each batch."""
    import json
    import re

    from PIL import Image

    from diffrl.cli import main
    from diffrl.rewards import load_reward
    from diffrl.sampling import sample_images, to_uint8

    prompts = PROMPTS[:2]  # 3 and 9 words: different token counts
    opts = dict(num_steps=2, guidance_scale=4.0, height=32, width=32, seed=0)
    one = sample_images(model, prompts, batch_size=1, **opts)
    two = sample_images(model, prompts, batch_size=2, **opts)
    torch.testing.assert_close(one, two, rtol=0, atol=1e-5)
    no_cfg = sample_images(model, prompts, batch_size=2, **{**opts, "guidance_scale": 1.0})
    assert (no_cfg - two).abs().max() > 1e-3  # the default guidance is on
    cli = ["--num-steps", "2", "--height", "32", "--width", "32", "--no-progress", "--batch-size", "2"]
    out = tmp_path / "sample"
    assert main(["sample", "tiny:qwen_image", "--prompts", *prompts, "--out", str(out), *cli]) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    pngs = torch.stack([torch.from_numpy(np.array(Image.open(out / r["file"]))) for r in rows])
    assert (pngs.int() - to_uint8(two).int()).abs().max() <= 1
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "tiny:qwen_image",
                "--prompts",
                *prompts,
                "--reward",
                "saturation",
                "--out",
                str(tmp_path / "e"),
                *cli,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    mean = float(re.search(r"^saturation\s+mean (\S+)", printed, flags=re.M).group(1))
    assert mean == pytest.approx(float(load_reward("saturation")(two, prompts).mean()), rel=1e-4)
