"""The Wan image-to-video adapter against diffusers' own WanImageToVideoPipeline, on the tiny offline pipelines
(``tiny:wan_i2v``: Wan 2.1 with a CLIP image encoder; ``tiny:wan22_i2v``: Wan 2.2's two experts, no image encoder):
the condition latent, noise-free rollouts with CFG, decoding, a LoRA a plain diffusers process loads, the trainers on
prompt rows that name their source image, and the error where a row has none."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import WanImageToVideoPipeline  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from diffrl.models import ADAPTERS, WanI2VModel, load_model  # noqa: E402
from diffrl.models.loading import check_image_size, tiny_model_dir  # noqa: E402
from diffrl.samplers import rollout  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_tiny_cache", "one_thread")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat walks", "the blue square on the left of a tree"]
SIZE = (32, 48)
FRAMES = 5


def _image(seed: int, size=(60, 40)) -> Image.Image:
    """A random RGB image of ``size`` (width, height): a source image of another size than the video's."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _pipe(spec):
    p = WanImageToVideoPipeline.from_pretrained(tiny_model_dir(spec))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def model():
    return load_model("tiny:wan_i2v", num_frames=FRAMES)


@pytest.fixture(scope="module")
def pipe():
    return _pipe("tiny:wan_i2v")


@pytest.fixture(scope="module")
def model22():
    return load_model("tiny:wan22_i2v", num_frames=FRAMES)


@pytest.fixture(scope="module")
def pipe22():
    return _pipe("tiny:wan22_i2v")


def test_detected_loaded_and_shapes(model, model22):
    assert ADAPTERS["WanImageToVideoPipeline"] is WanI2VModel
    assert isinstance(model, WanI2VModel) and model.family == "wan_i2v" and model.is_video
    assert model.uses_negative_prompt and model.guidance_is_cfg
    assert (model.default_num_steps, model.default_guidance_scale, model.default_num_frames) == (50, 5.0, 81)
    assert model.uses_clip and model.num_experts == 1
    assert not model22.uses_clip and model22.num_experts == 2 and model22.boundary_timestep == 900.0
    # the noisy latent has the VAE's 4 channels; the transformer takes 4 + 4 mask + 4 condition channels
    assert model.latent_shape(*SIZE) == (4, 2, 8, 12)
    assert model.transformer.config.in_channels == 12
    assert check_image_size("tiny:wan_i2v", 32, 32) is True
    with pytest.raises(ValueError, match="multiple of 8"):
        check_image_size("tiny:wan22_i2v", 36, 32)


def test_condition_latent_equals_pipeline_prepare_latents(model, pipe):
    """The condition of each (image, size): the pipeline's ``prepare_latents`` condition (mask channels, then the
    normalised VAE latents of the resized image followed by zero frames), bit for bit; computed once and cached."""
    image = _image(0)
    first = None
    for (h, w), frames in (((32, 48), 5), ((48, 32), 9)):
        pixels = pipe.video_processor.preprocess(image, height=h, width=w).to(torch.float32)
        _, expected = pipe.prepare_latents(
            pixels, 1, 4, h, w, frames, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0)
        )
        got = model.image_condition(image, h, w, frames)
        assert got.shape == expected.shape == (1, 8, (frames - 1) // 4 + 1, h // 4, w // 4)
        assert torch.equal(got, expected)
        # by hand: the mask is 1 on the first latent frame only, in its 4 channels
        assert torch.equal(got[0, :4, 0], torch.ones(4, h // 4, w // 4)) and not got[0, :4, 1:].any()
        first = got if first is None else first
    calls = []
    handle = model.vae.register_forward_hook(lambda *a: calls.append(1))
    encoder = model.vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = model.image_condition(_image(0), 32, 48, 5)
    finally:
        handle.remove()
        encoder.remove()
    assert not calls and torch.equal(again, first)  # the same image (a new PIL object) at a size seen: cached
    # Wan 2.1's CLIP embeddings: the pipeline's encode_image, on both CFG branches
    cond = model.encode(PROMPTS, images=[image, _image(1)])
    with torch.no_grad():
        assert torch.equal(cond.image_embeds[0], pipe.encode_image(image, "cpu")[0])
    assert cond.image_embeds.shape == (2, 5, 16) and cond.source_keys.dtype == torch.long
    assert cond.source_keys[0] != cond.source_keys[1]
    assert torch.equal(cond.repeat_interleave(2).source_keys, cond.source_keys.repeat_interleave(2))


def test_condition_cache_is_bounded_and_recomputes_the_same(model22):
    """With room for one condition, alternating two images evicts and recomputes each: the same tensor bit for bit;
    a bad cache size is refused when loading."""
    small = WanI2VModel(model22.pipe, num_frames=FRAMES, condition_cache_size=1)
    first = small.image_condition(_image(10), *SIZE)
    other = small.image_condition(_image(11), *SIZE)
    assert len(small._conditions) == 1 and not torch.equal(first, other)
    assert torch.equal(small.image_condition(_image(10), *SIZE), first)
    with pytest.raises(ValueError, match="condition_cache_size=0 must be a positive integer"):
        WanI2VModel(model22.pipe, condition_cache_size=0)


def _pipeline_latents(pipe, image, prompts, negative, cfg, steps, seed, output_type="latent", **kw):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(
        image=image,
        prompt=prompts,
        negative_prompt=negative,
        guidance_scale=cfg,
        height=SIZE[0],
        width=SIZE[1],
        num_frames=FRAMES,
        num_inference_steps=steps,
        generator=gens,
        output_type=output_type,
        **kw,
    ).frames


def _ours(model, image, prompts, negative, cfg, steps, seed):
    cond = model.encode(prompts, negative_prompt=negative, images=[image] * len(prompts))
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    noise = model.sample_noise(len(prompts), *SIZE, generator=gens)
    with torch.no_grad():
        return rollout(model, cond, model.schedule(steps, *SIZE), noise, guidance_scale=cfg).final


@pytest.mark.parametrize(
    "variant,negative,cfg,steps",
    [("wan_i2v", "", 5.0, 3), ("wan_i2v", None, 1.0, 2), ("wan22_i2v", "blurry", 4.0, 4)],
)
def test_rollout_reproduces_pipeline(variant, negative, cfg, steps, request):
    """A noise-free rollout: ``pipe(image=..., output_type="latent")`` to 1e-5, with and without CFG; Wan 2.2's
    rollout crosses the experts' boundary (timestep 900)."""
    model = request.getfixturevalue("model" if variant == "wan_i2v" else "model22")
    pipe = request.getfixturevalue("pipe" if variant == "wan_i2v" else "pipe22")
    if variant == "wan22_i2v":
        high = (model.schedule(steps, *SIZE)[:-1] * 1000 >= 900).tolist()
        assert True in high and False in high
    image = _image(3)
    expected = _pipeline_latents(pipe, image, PROMPTS, negative, cfg, steps, seed=7)
    got = _ours(model, image, PROMPTS, negative, cfg, steps, seed=7)
    assert got.shape == expected.shape == (2, 4, 2, 8, 12)
    diff = (got - expected).abs().max().item()
    assert diff < 1e-5, diff
    # the source image matters: another one moves the samples far beyond rounding
    other = _ours(model, _image(4), PROMPTS, negative, cfg, steps, seed=7)
    assert (other - got).abs().max().item() > 1e-3


def test_wan22_mixed_levels_and_experts(model22):
    """A batch of levels on both sides of the boundary is split between the experts, each row as if alone (with
    its own source image), and the two experts differ."""
    x = torch.randn(2, *model22.latent_shape(*SIZE), generator=torch.Generator().manual_seed(0))
    cond = model22.encode(PROMPTS, images=[_image(5), _image(6)])
    sig = torch.tensor([0.95, 0.3])
    with torch.no_grad():
        mixed = model22.velocity(x, sig, cond, 5.0)
        rows = [model22.velocity(x[i : i + 1], sig[i : i + 1], cond.select(i), 5.0) for i in range(2)]
        swapped = model22.velocity(x, sig.flip(0), cond, 5.0)
    assert mixed.shape == x.shape
    assert (mixed - torch.cat(rows)).abs().max().item() < 1e-5
    assert (mixed - swapped).abs().max().item() > 1e-3


def test_decode_equals_pipeline_video(model, pipe):
    image = _image(8)
    video = _pipeline_latents(pipe, image, PROMPTS[:1], "", 3.0, 2, seed=3, output_type="pt")
    ours = model.decode(_ours(model, image, PROMPTS[:1], "", 3.0, 2, seed=3))
    assert ours.shape == video.shape == (1, FRAMES, 3, *SIZE)
    assert (ours - video).abs().max().item() < 1e-5


def test_missing_source_image_is_one_sentence_before_sampling(model):
    with pytest.raises(ValueError, match=r"source image: call encode\(prompts, images="):
        model.encode(PROMPTS)
    with pytest.raises(ValueError, match="one source image per prompt; got 2 prompts and 1"):
        model.encode(PROMPTS, images=[_image(0)])
    with pytest.raises(
        ValueError,
        match=r"the row of prompt 'the blue square on the left of a tree' \(1 of 2 rows of this batch\) has none; "
        r'give each row of a \.jsonl prompt file an "image" field',
    ):
        model.encode_rows(PROMPTS, {"image": [str(ROOT / "x.png"), None]})
    with pytest.raises(ValueError, match="needs a source image for every prompt"):
        model.encode_rows(PROMPTS, None)
    with pytest.raises(ValueError, match="no source images"):
        x = torch.zeros(1, *model.latent_shape(*SIZE))
        model.velocity(x, 0.5, load_model("tiny:wan", num_frames=FRAMES).encode(PROMPTS[:1]))


# ------------------------------------------------------------------------------------------------ LoRA

_LOAD_LORA = """
import json, sys, torch
import numpy as np
from PIL import Image
from diffusers import WanImageToVideoPipeline
assert "diffrl" not in sys.modules
pipe = WanImageToVideoPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
pipe.load_lora_weights(sys.argv[2])
image = Image.open(sys.argv[3]).convert("RGB")
gens = [torch.Generator().manual_seed(1)]
out = pipe(image=image, prompt="a red cat walks", negative_prompt="", guidance_scale=5.0, height=32, width=48,
           num_frames=5, num_inference_steps=2, generator=gens, output_type="latent").frames
print(json.dumps(out.flatten().tolist()))
"""


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    """tiny:wan_i2v with a rank-4 LoRA whose B matrices are random (so it changes the samples), saved to disk with
    the source image as a PNG."""
    model = load_model("tiny:wan_i2v", num_frames=FRAMES)
    model.add_lora(rank=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    root = tmp_path_factory.mktemp("wan-i2v-lora")
    _image(9).save(root / "source.png")
    return model, model.save_lora(root / "lora"), root / "source.png"


def test_lora_saved_for_load_lora_weights(lora_model):
    """The saved LoRA loads into a fresh WanImageToVideoPipeline and gives the in-memory samples back."""
    model, path, source = lora_model
    names = {n for n, p in model.transformer.named_parameters() if p.requires_grad}
    assert any("blocks.1.attn2.to_k.lora_A" in n for n in names) and not any("add_k_proj" in n for n in names)
    image = Image.open(source).convert("RGB")
    ours = _ours(model, image, PROMPTS[:1], "", 5.0, 2, seed=1)
    with model.disable_adapter():
        base = _ours(model, image, PROMPTS[:1], "", 5.0, 2, seed=1)
    assert (ours - base).abs().max().item() > 1e-3
    # the file is a complete image-to-video LoRA: zero LoRA weights on the image cross-attention projections, which
    # diffusers' loader would otherwise add itself (and PEFT then warned about modules missing from the config)
    saved = load_file(str(Path(path) / "pytorch_lora_weights.safetensors"))
    image_kv = {k: v for k, v in saved.items() if ".attn2.add_k_proj." in k or ".attn2.add_v_proj." in k}
    assert image_kv and all(not v.any() for v in image_kv.values())
    fresh = _pipe("tiny:wan_i2v")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fresh.load_lora_weights(path)
    expected = _pipeline_latents(fresh, image, PROMPTS[:1], "", 5.0, 2, seed=1)
    assert (ours - expected).abs().max().item() < 1e-5


@pytest.mark.slow
def test_lora_loads_in_a_process_without_diffrl(lora_model):
    """The saved LoRA in a fresh Python process that imports diffusers only (about 20 s here: slow)."""
    model, path, source = lora_model
    ours = _ours(model, Image.open(source).convert("RGB"), PROMPTS[:1], "", 5.0, 2, seed=1)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_LORA, str(tiny_model_dir("tiny:wan_i2v")), str(path), str(source)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1])).view_as(ours)
    assert (ours - expected).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------- the trainers and sampling


def _prompt_file(tmp_path) -> tuple[Path, dict[str, str]]:
    """A .jsonl prompt file whose rows name a tiny PNG each (relative to the file)."""
    (tmp_path / "images").mkdir()
    rows = []
    for i, prompt in enumerate(["a red circle", "a blue square", "two green triangles", "a yellow star"]):
        _image(20 + i, (24, 20)).save(tmp_path / "images" / f"{i}.png")
        rows.append({"prompt": prompt, "image": f"images/{i}.png"})
    path = tmp_path / "i2v.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, {r["prompt"]: str(tmp_path / r["image"]) for r in rows}


@pytest.mark.parametrize(
    "algo",
    ["flow_grpo"]
    + [pytest.param(a, marks=pytest.mark.slow) for a in ("diffusion_nft", "refl", "awm", "dpo")],
)  # Flow-GRPO by default, the others with --run-slow
def test_every_trainer_takes_a_step_on_wan_i2v(algo, tmp_path):
    """Each tiny preset on ``tiny:wan_i2v`` with prompt rows that name their source image: one step moves every
    trainable tensor with finite metrics, each prompt is encoded with its own image, the reward receives the image
    paths; Flow-GRPO's first update is on-policy (ratio exactly 1) in float32."""
    from diffrl.rewards import as_reward
    from diffrl.train import build_trainer

    prompts, by_prompt = _prompt_file(tmp_path)
    seen = []

    def saturation_with_source(images, prompts, image=None, **metadata):
        seen.extend(image)
        return images.std(dim=1).mean(dim=(1, 2))

    trainer = build_trainer(
        ROOT / "configs" / "tiny" / f"{algo}.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={prompts}",
            "data.eval_size=1",
            "model.path=tiny:wan_i2v",
            f"sample.num_frames={FRAMES}",
            "video.frames=[0,-1]",
            "max_steps=1",
            "eval_every=0",
            "checkpointing_steps=0",
            "report_to=none",
        ],
        reward=as_reward(
            saturation_with_source, differentiable=algo == "refl"
        ),  # torch maths: ReFL's gradient
    )
    model = trainer.model
    assert isinstance(model, WanI2VModel) and model.dtype == torch.float32
    encoded = []
    original = model.encode

    def spy(prompts, negative_prompt="", *, images=None):
        encoded.extend(zip(prompts, images, strict=True))
        return original(prompts, negative_prompt, images=images)

    model.encode = spy
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train_step(0)
    unchanged = [
        n for n, a, p in zip(trainer.param_names, before, trainer.params, strict=True) if torch.equal(a, p)
    ]
    assert not unchanged, f"{len(unchanged)} trainable tensors did not move, e.g. {unchanged[:2]}"
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
    assert encoded and all(by_prompt[p] == str(img) for p, img in encoded)
    assert seen and set(seen) <= set(by_prompt.values())
    if algo == "flow_grpo":
        assert metrics["train/ratio_mean"] == 1.0 and metrics["train/approx_kl"] == 0.0


@pytest.mark.slow  # about 4 s on 2 busy cores
@pytest.mark.parametrize("algo", ["flow_grpo", "diffusion_nft"])
def test_wan22_i2v_trains_the_low_noise_expert(algo, tmp_path):
    """model.expert=low on tiny:wan22_i2v with image rows: one step moves every LoRA tensor of transformer_2 and
    leaves the high-noise expert untouched (DiffusionNFT's batches mix levels of both experts)."""
    from diffrl.train import build_trainer

    prompts, _ = _prompt_file(tmp_path)
    trainer = build_trainer(
        ROOT / "configs" / "tiny" / f"{algo}.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={prompts}",
            "data.eval_size=1",
            "model.path=tiny:wan22_i2v",
            "model.expert=low",
            f"sample.num_frames={FRAMES}",
            "max_steps=1",
            "eval_every=0",
            "checkpointing_steps=0",
            "report_to=none",
        ],
    )
    model = trainer.model
    assert model.transformer is model.pipe.transformer_2
    high = [p.detach().clone() for p in model.pipe.transformer.parameters()]
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train_step(0)
    assert all(not torch.equal(a, p) for a, p in zip(before, trainer.params, strict=True))
    assert all(torch.equal(a, p) for a, p in zip(high, model.pipe.transformer.parameters(), strict=True))
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))


def test_trainer_refuses_rows_without_an_image_before_sampling(tmp_path):
    """Prompt text without source images: the run's set-up fails with one sentence naming the prompt file, a prompt
    that lacks an image and the fix, right after the model loads and before any sampling; a .jsonl file where one row
    lacks it names that row's prompt."""
    from diffrl.train import build_trainer

    common = [
        f"output_dir={tmp_path / 'run'}",
        "model.path=tiny:wan_i2v",
        f"sample.num_frames={FRAMES}",
        "max_steps=1",
        "eval_every=0",
        "checkpointing_steps=0",
        "report_to=none",
    ]
    text = ROOT / "configs" / "tiny" / "prompts.txt"
    with pytest.raises(
        ValueError,
        match=r"tiny:wan_i2v \(WanI2VModel\) needs the metadata field 'image' on every prompt, and .*prompts\.txt has "
        r"none on \d+ of \d+ prompts \(e\.g\. '.+'\); use a \.jsonl prompt file with an 'image' field per line",
    ):
        build_trainer(ROOT / "configs" / "tiny" / "flow_grpo.yaml", [*common, f"data.train={text}"])
    prompts, _ = _prompt_file(tmp_path)
    rows = prompts.read_text().splitlines()
    rows[2] = json.dumps({"prompt": "no image here"})
    prompts.write_text("\n".join(rows) + "\n")
    with pytest.raises(
        ValueError, match=r"i2v\.jsonl has none on 1 of \d prompts \(e\.g\. 'no image here'\)"
    ):
        build_trainer(
            ROOT / "configs" / "tiny" / "flow_grpo.yaml",
            [*common, f"data.train={prompts}", f"data.eval={prompts}"],
        )


def test_diffrl_sample_reads_source_images_from_the_prompt_file(model, tmp_path):
    """``diffrl sample tiny:wan_i2v --prompts rows.jsonl``: each row sampled with its own source image, the videos
    what the Python API samples."""
    from diffrl.cli import main
    from diffrl.data import load_prompts
    from diffrl.sampling import sample_images, to_uint8

    prompts, _ = _prompt_file(tmp_path)
    out = tmp_path / "out"
    cli = [
        "--num-steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--num-frames",
        str(FRAMES),
        "--no-progress",
    ]
    assert main(["sample", "tiny:wan_i2v", "--prompts", str(prompts), "--out", str(out), *cli]) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["file"].endswith(".webp") for r in rows)
    videos = sample_images(
        model, load_prompts(str(prompts)), num_steps=2, guidance_scale=5.0, height=32, width=32
    )
    for r, video in zip(rows, videos, strict=True):
        with Image.open(out / r["file"]) as im:
            im.seek(0)
            first = torch.from_numpy(np.array(im.convert("RGB")))
        assert torch.equal(first, to_uint8(video[:1])[0])


def test_flow_factory_preset_maps_the_recipe_and_runs_on_the_tiny_model(tmp_path):
    """configs/wan21_i2v_14b_flow_grpo_pickscore.yaml against Flow-Factory's examples/grpo/lora/wan21/i2v.yaml (at
    a0b2bc5): the recipe's values, written out by hand here, and one step of the preset, shrunk, on tiny:wan_i2v with
    its window of one SDE step among steps 1..3 of 10."""
    from diffrl.config import load_config
    from diffrl.rewards import as_reward
    from diffrl.train import build_trainer

    preset = ROOT / "configs" / "wan21_i2v_14b_flow_grpo_pickscore.yaml"
    cfg = load_config(preset)
    g, s = cfg.flow_grpo, cfg.sample
    assert cfg.model.path == "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
    assert (cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_init) == (64, 128, "gaussian")
    assert (g.group_size, g.prompts_per_step, g.num_minibatches) == (
        16,
        48,
        2,
    )  # 48 prompts, 2 updates an epoch
    assert (g.sampler, g.noise_level, g.sde_window, list(g.sde_window_range)) == ("sde", 0.9, 1, [1, 4])
    assert (g.clip_range, g.kl_beta, g.adv_clip, g.adv_std, cfg.reward_normalize) == (
        1e-4,
        0.0,
        5.0,
        "global",
        "group",
    )
    assert (s.height, s.width, s.num_frames, s.num_steps, s.guidance_scale, s.eval_num_steps) == (
        240,
        240,
        5,
        10,
        5.0,
        28,
    )
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.max_grad_norm) == (1e-4, 1e-4, 1.0)
    assert (cfg.ema_decay, cfg.ema_every, cfg.zero_stage, cfg.video.every) == (0.9, 8, 2, 1)
    prompts, _ = _prompt_file(tmp_path)
    trainer = build_trainer(
        preset,
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={prompts}",
            f"data.eval={prompts}",
            "model.path=tiny:wan_i2v",
            "model.dtype=float32",
            "mixed_precision=no",
            "model.lora_rank=4",
            "sample.height=32",
            "sample.width=32",
            "flow_grpo.group_size=2",
            "flow_grpo.prompts_per_step=2",
            "max_steps=1",
            "eval_every=0",
            "checkpointing_steps=0",
            "report_to=none",
        ],
        reward=as_reward(lambda images, prompts, **kw: images.std(dim=1).mean(dim=(1, 2)), name="pickscore"),
    )
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train_step(0)
    assert all(not torch.equal(a, p) for a, p in zip(before, trainer.params, strict=True))
    # the second of the two updates is off-policy by one tiny update: the mean ratio is near 1, not exactly
    assert abs(metrics["train/ratio_mean"] - 1.0) < 1e-3


def test_memory_estimate_counts_the_image_encoder_and_the_noisy_latent(model):
    """``diffrl doctor``'s estimate of tiny:wan_i2v through the adapter's hooks: every component's weights (the CLIP
    image encoder included) as the loaded pipeline holds them, the trainer's LoRA, and the stored latent of the VAE's
    channels (not the transformer's input channels); the published Wan I2V checkpoints get an estimate."""
    import math

    from diffrl.config import load_config
    from diffrl.doctor.memory import estimate_memory
    from diffrl.models import load_model_from_config
    from diffrl.trainers.engine import setup_training_mode

    overrides = ["model.path=tiny:wan_i2v", f"data.train={ROOT / 'configs' / 'tiny' / 'prompts.txt'}"]
    cfg = load_config(ROOT / "configs" / "tiny" / "flow_grpo.yaml", [*overrides, "sample.num_frames=5"])
    est = estimate_memory(cfg, tiny_model_dir("tiny:wan_i2v"))
    held = sum(
        p.numel()
        for c in model.pipe.components.values()
        if isinstance(c, torch.nn.Module)
        for p in c.parameters()
    )
    assert est.params == held and sum(p.numel() for p in model.pipe.image_encoder.parameters()) > 0
    trained = load_model_from_config(cfg.model)
    setup_training_mode(trained, cfg)
    assert est.trainable_params == sum(p.numel() for p in trained.trainable_parameters())
    _, _, c_lat = WanI2VModel.vae_geometry(dict(model.vae.config))
    frames, _ = WanI2VModel.memory_frames(5, dict(model.vae.config))
    assert math.prod(model.latent_shape(32, 32)) == c_lat * frames * 8 * 8
    for path in ("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "Wan-AI/Wan2.2-I2V-A14B-Diffusers"):
        e = estimate_memory(
            load_config(ROOT / "configs" / "tiny" / "flow_grpo.yaml", [*overrides, f"model.path={path}"])
        )
        assert e.total > 0 and "published sizes" in e.source


def test_source_image_encodes_never_overlap_the_background_decode(tmp_path):
    """The trainers decode and score a rollout chunk in a background thread while the next chunk samples, and the
    next chunk's velocity VAE-encodes its source image: the Wan VAE keeps a causal feature cache on the module, so
    the two must not run at once (they did, and a condition came out with the wrong number of latent frames now and
    then). A decode made slow on purpose would overlap an unguarded encode; ``model.vae_lock`` keeps them apart."""
    import threading
    import time

    from diffrl.rewards import as_reward
    from diffrl.train import build_trainer

    prompts, _ = _prompt_file(tmp_path)
    trainer = build_trainer(
        ROOT / "configs" / "tiny" / "flow_grpo.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={prompts}",
            f"data.eval={prompts}",
            "model.path=tiny:wan_i2v",
            "sample.num_frames=5",
            "sample.height=32",
            "sample.width=32",
            "sample.num_steps=2",
            "sample.batch_size=1",  # one chunk per video: decodes overlap the next videos' sampling
            "flow_grpo.group_size=2",
            "flow_grpo.prompts_per_step=2",
            "max_steps=1",
            "eval_every=0",
            "checkpointing_steps=0",
            "report_to=none",
        ],
        reward=as_reward(lambda images, prompts, **kw: images.mean(dim=(1, 2, 3)), name="brightness"),
    )
    vae = trainer.model.vae
    spans: list[tuple[str, int, float, float]] = []
    encode, decode = vae.encode, vae.decode

    def timed(kind, fn, slow):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            if slow:
                time.sleep(0.05)
            out = fn(*args, **kwargs)
            spans.append((kind, threading.get_ident(), t0, time.perf_counter()))
            return out

        return run

    vae.encode, vae.decode = timed("encode", encode, False), timed("decode", decode, True)
    trainer.model.clear_prompt_cache()  # the source images' conditions are encoded again during the step
    trainer.train_step(0)
    encodes = [s for s in spans if s[0] == "encode"]
    decodes = [s for s in spans if s[0] == "decode"]
    # decodes in another thread
    assert encodes and decodes and {s[1] for s in decodes} - {s[1] for s in encodes}
    for _, _, a0, a1 in encodes:
        for _, _, b0, b1 in decodes:
            assert a1 <= b0 or b1 <= a0, "a source-image encode ran during a background decode"
