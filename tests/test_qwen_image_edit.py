"""The Qwen-Image-Edit adapter against diffusers' own QwenImageEditPipeline, on the tiny offline pipeline
(``tiny:qwen_image_edit``): the source image's condition (VL prompt embeddings with the image, VAE latent tokens),
noise-free rollouts with and without true CFG, the clear error where a source image is missing, a trainer step and
``diffrl sample`` on a prompt file whose rows name their source images.

The pipeline resizes a source image to about 1024 x 1024 pixels; here both it and the adapter use 64 x 64
(``condition_area``, and the pipeline module's ``calculate_dimensions`` patched to the same area) to stay small."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import QwenImageEditPipeline  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit  # noqa: E402
from PIL import Image  # noqa: E402

from diffrl.models import ADAPTERS, QwenImageEditModel, load_model  # noqa: E402
from diffrl.models.flux import pack_latents  # noqa: E402
from diffrl.models.loading import tiny_model_dir  # noqa: E402
from diffrl.models.qwen_image_edit import edit_condition_size  # noqa: E402
from diffrl.samplers import rollout  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_tiny_cache", "one_thread")

AREA = 64 * 64
PROMPTS = ["make the cat red", "put a blue square on the left of the tree"]


def _image(seed: int, size=(60, 40)) -> Image.Image:
    pixels = np.random.RandomState(seed).rand(size[1], size[0], 3)
    return Image.fromarray((pixels * 255).astype("uint8"))


@pytest.fixture(scope="module")
def model():
    return load_model("tiny:qwen_image_edit", condition_area=AREA)


@pytest.fixture(scope="module")
def pipe():
    p = QwenImageEditPipeline.from_pretrained(tiny_model_dir("tiny:qwen_image_edit"))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def small_condition(monkeypatch):
    """The pipeline's condition size at AREA pixels instead of 1024 x 1024."""
    original = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(
        pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: original(AREA, ratio)
    )


def test_condition_size_is_the_pipelines():
    for w, h in [(60, 40), (1024, 1024), (1920, 1080), (300, 700)]:
        cw, ch, _ = pipeline_qwenimage_edit.calculate_dimensions(1024 * 1024, w / h)
        assert edit_condition_size(w, h) == (cw, ch)
    assert edit_condition_size(60, 40, AREA) == (64, 64)  # 78 x 52 rounded to multiples of 32


def test_detected_loaded_and_refuses_prompts_without_images(model):
    assert ADAPTERS["QwenImageEditPipeline"] is QwenImageEditModel
    assert isinstance(model, QwenImageEditModel) and model.family == "qwen_image_edit"
    with pytest.raises(ValueError, match="source image: call encode.*images="):
        model.encode(PROMPTS)
    with pytest.raises(ValueError, match='source image for every prompt.*"image" field'):
        model.encode_rows(PROMPTS, {"scene": [1, 2]})
    with pytest.raises(ValueError, match="one image per prompt"):
        model.encode(PROMPTS, images=[_image(0)])


def test_encode_equals_pipeline_and_is_cached(model, pipe, small_condition):
    model.clear_prompt_cache()
    images = [_image(0), _image(1)]
    cond = model.encode(PROMPTS, images=images)
    for i, (prompt, image) in enumerate(zip(PROMPTS, images, strict=True)):
        w, h = edit_condition_size(*image.size, AREA)
        resized = pipe.image_processor.resize(image, h, w)
        embeds, mask = pipe.encode_prompt(prompt, image=resized, device="cpu")
        assert mask is None  # one prompt alone is not padded
        n = embeds.shape[1]
        assert torch.equal(cond.prompt_embeds[i, :n], embeds[0]) and int(cond.prompt_mask[i].sum()) == n
        neg, _ = pipe.encode_prompt("", image=resized, device="cpu")
        m = neg.shape[1]
        assert torch.equal(cond.negative_prompt_embeds[i, :m], neg[0])
        # the source image's latent tokens are the pipeline's
        pixels = pipe.image_processor.preprocess(resized, h, w).unsqueeze(2)
        _, expected = pipe.prepare_latents(pixels, 1, 4, 32, 32, torch.float32, "cpu", None)
        assert torch.equal(cond.image_latents[i], expected[0])
        assert cond.image_grid[i].tolist() == [h // 8, w // 8]
    calls = []
    handle = model.pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = model.encode(PROMPTS[::-1], images=images[::-1])
    finally:
        handle.remove()
    assert not calls and torch.equal(again.image_latents[1], cond.image_latents[0])


def _pipeline_latents(pipe, image, prompts, negative, cfg, steps, seed, size):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(
        image=image,
        prompt=prompts,
        negative_prompt=negative,
        true_cfg_scale=cfg,
        height=size[0],
        width=size[1],
        num_inference_steps=steps,
        generator=gens,
        output_type="latent",
    ).images


@pytest.mark.parametrize(
    "prompts,negative,cfg,steps",
    [
        (PROMPTS[:1], "", 4.0, 2),
        (PROMPTS, ["", "blurry"], 4.0, 3),  # contexts of different lengths: padded, masked
        (PROMPTS[1:], None, 1.0, 3),  # no CFG
    ],
)
def test_rollout_reproduces_pipeline(model, pipe, small_condition, prompts, negative, cfg, steps):
    size = (32, 48)
    images = [_image(2 + i) for i in range(len(prompts))]  # one source image per prompt, of one size
    # the pipeline one prompt at a time: given a list of images it passes them to the VL encoder unresized
    # (VaeImageProcessor.resize leaves lists alone), which a single image avoids
    negatives = negative if isinstance(negative, list) else [negative] * len(prompts)
    expected = torch.cat(
        [
            _pipeline_latents(pipe, image, [p], n, cfg, steps, seed=7 + i, size=size)
            for i, (image, p, n) in enumerate(zip(images, prompts, negatives, strict=True))
        ]
    )
    cond = model.encode(prompts, negative_prompt=negative, images=images)
    gens = [torch.Generator().manual_seed(7 + i) for i in range(len(prompts))]
    noise = model.sample_noise(len(prompts), *size, generator=gens)
    got = pack_latents(rollout(model, cond, model.schedule(steps, *size), noise, guidance_scale=cfg).final)
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff < 1e-5, diff
    # the source image matters: another one gives another edit
    other = model.encode(prompts, negative_prompt=negative, images=[_image(9)] * len(prompts))
    moved = rollout(model, other, model.schedule(steps, *size), noise, guidance_scale=cfg).final
    assert (pack_latents(moved) - expected).abs().max().item() > 1e-3


def test_one_batch_needs_one_condition_size(model):
    with pytest.raises(ValueError, match="different condition sizes"):
        model.encode(PROMPTS, images=[_image(0, (60, 40)), _image(1, (40, 120))])


@pytest.mark.parametrize("algo", ["flow_grpo", "diffusion_nft"])
def test_a_trainer_step_on_an_edit_prompt_file(algo, tmp_path):
    """A .jsonl prompt file whose rows name their source image (relative to the file): one training step and an
    evaluation on tiny:qwen_image_edit move every trainable tensor, each prompt is encoded with its own image, and
    the reward receives the image paths as metadata."""
    import json

    from diffrl.rewards import as_reward
    from diffrl.train import build_trainer

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "images").mkdir()
    rows = []
    for i, prompt in enumerate(["make the cat red", "add a blue square", "turn it green", "remove the tree"]):
        _image(20 + i).save(tmp_path / "images" / f"{i}.png")
        rows.append({"prompt": prompt, "image": f"images/{i}.png"})
    prompts = tmp_path / "edits.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []

    def saturation_with_source(images, prompts, image=None, **metadata):
        seen.extend(image)
        return images.std(dim=1).mean(dim=(1, 2))

    trainer = build_trainer(
        root / "configs" / "tiny" / f"{algo}.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={prompts}",
            "data.eval_size=2",
            "model.path=tiny:qwen_image_edit",
            "max_steps=1",
            "checkpointing_steps=0",
            "report_to=none",
        ],
        reward=as_reward(saturation_with_source),
    )
    assert isinstance(trainer.model, QwenImageEditModel)
    trainer.model.condition_area = AREA
    encoded = []
    original = trainer.model.encode

    def spy(prompts, negative_prompt="", *, images=None):
        encoded.extend(zip(prompts, images, strict=True))
        return original(prompts, negative_prompt, images=images)

    trainer.model.encode = spy
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train_step(0)
    unchanged = [
        n for n, a, p in zip(trainer.param_names, before, trainer.params, strict=True) if torch.equal(a, p)
    ]
    assert not unchanged, f"{len(unchanged)} trainable tensors did not move, e.g. {unchanged[:2]}"
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
    by_prompt = {r["prompt"]: str(tmp_path / r["image"]) for r in rows}
    assert encoded and all(by_prompt[p] == str(img) for p, img in encoded)
    assert seen and set(seen) <= set(by_prompt.values())
    encoded.clear()
    evaluated = trainer.evaluate()  # the held-out rows are encoded with their images too
    assert encoded and all(by_prompt[p] == str(img) for p, img in encoded)
    assert np.isfinite(evaluated["eval/reward/saturation_with_source/mean"])


def test_sample_command_reads_source_images_from_the_prompt_file(model, tmp_path, monkeypatch):
    """``diffrl sample tiny:qwen_image_edit --prompts edits.jsonl`` encodes each row with its ``image`` (relative to
    the file) and writes what the Python API samples; prompt text without a source image fails with one sentence."""
    import json

    from diffrl.cli import main
    from diffrl.data import load_prompts
    from diffrl.sampling import sample_images, to_uint8

    monkeypatch.setattr(
        QwenImageEditModel, "default_condition_area", AREA
    )  # the CLI's model, small condition
    (tmp_path / "src").mkdir()
    for i in range(2):
        _image(30 + i).save(tmp_path / "src" / f"{i}.png")
    edits = tmp_path / "edits.jsonl"
    edits.write_text(
        "".join(json.dumps({"prompt": p, "image": f"src/{i}.png"}) + "\n" for i, p in enumerate(PROMPTS))
    )
    cli = ["--num-steps", "2", "--height", "32", "--width", "32", "--no-progress", "--batch-size", "2"]
    out = tmp_path / "out"
    assert main(["sample", "tiny:qwen_image_edit", "--prompts", str(edits), "--out", str(out), *cli]) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    pngs = torch.stack([torch.from_numpy(np.array(Image.open(out / r["file"]))) for r in rows])
    expected = sample_images(
        model, load_prompts(str(edits)), num_steps=2, guidance_scale=4.0, height=32, width=32
    )
    assert (pngs.int() - to_uint8(expected).int()).abs().max() <= 1
    swapped = edits.read_text().replace("src/0.png", "src/9.png").replace("src/1.png", "src/0.png")
    swapped = swapped.replace("src/9.png", "src/1.png")
    edits.write_text(swapped)
    other = sample_images(
        model, load_prompts(str(edits)), num_steps=2, guidance_scale=4.0, height=32, width=32
    )
    # the images follow their source images: far beyond float rounding (the random tiny decoder damps it: ~7e-4)
    assert (other - expected).abs().max() > 1e-4
    assert (
        main(
            ["sample", "tiny:qwen_image_edit", "--prompts", "make it red", "--out", str(tmp_path / "x"), *cli]
        )
        == 2
    )


# ------------------------------------------------------------------- Qwen-Image-Edit-2509 (QwenImageEditPlusPipeline)


@pytest.mark.parametrize("negative,cfg", [("", 4.0), (None, 1.0)])
def test_plus_rollout_with_two_source_images_reproduces_pipeline(negative, cfg, monkeypatch, tmp_path):
    """Two source images of different shapes (two img_shapes entries after the noisy latents, "Picture 1/2" in the
    prompt): a noise-free rollout equals ``QwenImageEditPlusPipeline(image=[a, b], output_type="latent")`` within
    1e-5, with the pipeline's VL and VAE image areas (384^2, 1024^2) scaled down to 32^2 and 64^2 on both sides;
    a prompt file row's list of image paths is resolved against the file."""
    import json

    from diffusers import QwenImageEditPlusPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    from diffrl.data import load_prompts
    from diffrl.models import QwenImageEditPlusModel

    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", 32 * 32)
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", 64 * 64)
    model = load_model("tiny:qwen_image_edit_plus", condition_area=32 * 32, vae_area=64 * 64)
    assert isinstance(model, QwenImageEditPlusModel) and ADAPTERS["QwenImageEditPlusPipeline"] is type(model)
    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_model_dir("tiny:qwen_image_edit_plus"))
    pipe.set_progress_bar_config(disable=True)
    images = [_image(0, (60, 40)), _image(1, (120, 40))]
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    rows = tmp_path / "edits.jsonl"
    rows.write_text(json.dumps({"prompt": "put the cat on the sofa", "image": ["0.png", "1.png"]}) + "\n")
    prompt_set = load_prompts(str(rows))
    assert prompt_set.metadata[0]["image"] == [str(tmp_path / "0.png"), str(tmp_path / "1.png")]
    size, steps = (32, 48), 3
    expected = pipe(
        image=images,
        prompt=prompt_set.prompts[0],
        negative_prompt=negative,
        true_cfg_scale=cfg,
        height=size[0],
        width=size[1],
        num_inference_steps=steps,
        generator=[torch.Generator().manual_seed(7)],
        output_type="latent",
    ).images
    cond = model.encode_rows(prompt_set.prompts, prompt_set.batch_metadata()) if negative == "" else None
    if cond is None:
        cond = model.encode(prompt_set.prompts, negative_prompt=None, images=[images])
    # 64x64 and 96x32 pixels through the tiny VAE (factor 4) in 2x2 tokens: 8x8 and 4x12 tokens
    assert cond.image_grid.tolist() == [[8, 8, 4, 12]]
    noise = model.sample_noise(1, *size, generator=[torch.Generator().manual_seed(7)])
    got = pack_latents(rollout(model, cond, model.schedule(steps, *size), noise, guidance_scale=cfg).final)
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff < 1e-5, diff


def test_doctor_probes_an_edit_model_with_the_prompt_files_source_images(tmp_path, monkeypatch):
    """``diffrl doctor``'s on-policy probe encodes the training rows with their source images (a ratio of exactly 1
    in float32), and its memory estimate reads the tiny edit pipeline's headers."""
    import json

    from diffrl.doctor import run_doctor

    monkeypatch.setattr(QwenImageEditModel, "default_condition_area", AREA)
    _image(40).save(tmp_path / "a.png")
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"prompt": "make the cat red", "image": "a.png"}) + "\n")
    root = Path(__file__).resolve().parents[1]
    findings = run_doctor(
        str(root / "configs" / "tiny" / "flow_grpo.yaml"),
        ["model.path=tiny:qwen_image_edit", f"data.train={edits}"],
        checks=["memory", "onpolicy"],
        device="cpu",
    )
    status = {f.name: (f.status, f.message) for f in findings}
    assert status["ratio"][0] == "OK", status["ratio"]
    assert status["memory"][0] == "OK" and "safetensors headers" in status["memory"][1]


# ------------------------------------------- Flow-Factory's Qwen-Image-Edit-2509 recipe (preset) and condition size


def test_condition_image_size_sets_the_vae_size_of_source_images(model):
    """``model.condition_image_size`` (Flow-Factory's ``condition_image_size``): Qwen-Image-Edit-2509 VAE-encodes its
    source images at about that side squared (``calculate_dimensions``: aspect ratio kept, multiples of 32) while its
    VL encoder keeps 384 x 384; Qwen-Image-Edit, whose pipeline has one condition size, resizes for both; the
    doctor's estimate counts the smaller condition."""
    from diffrl.config import load_config
    from diffrl.doctor.memory import _model_facts
    from diffrl.models import QwenImageEditPlusModel, load_model_from_config

    root = Path(__file__).resolve().parents[1]
    base = [f"data.train={root / 'configs' / 'tiny' / 'prompts.txt'}", "model.condition_image_size=64"]
    cfg = load_config(
        root / "configs" / "tiny" / "flow_grpo.yaml", [*base, "model.path=tiny:qwen_image_edit_plus"]
    )
    plus = load_model_from_config(cfg.model)
    assert isinstance(plus, QwenImageEditPlusModel)
    assert (plus.vae_area, plus.condition_area) == (64 * 64, 384 * 384)
    # 120 x 40 at 64^2 pixels: height sqrt(4096 / 3) = 37.0 -> 32, width 110.9 -> 96; tiny VAE factor 4, 2x2 tokens
    cond = plus.encode(["make the cat red"], images=[[_image(3, (120, 40))]])
    assert cond.image_grid.tolist() == [[4, 12]] and cond.image_latents.shape[1] == 4 * 12
    shown, _, _ = plus._condition([_image(3, (120, 40))])
    assert shown[0].size == (
        672,
        224,
    )  # the VL encoder's 384^2: width sqrt(147456 * 3) = 665.1 -> 672, 221.7 -> 224
    try:
        model.set_condition_image_size(96)
        assert model.condition_area == 96 * 96
    finally:
        model.condition_area = AREA
    with pytest.raises(ValueError, match="condition_image_size=8 must be an integer of at least 32"):
        plus.set_condition_image_size(8)
    published = load_config(root / "configs" / "qwen_image_edit_2509_flow_grpo_pickscore.yaml")
    assert _model_facts(published, None)["condition_tokens"] == (384 // 16) ** 2  # VAE factor 8, 2x2 tokens
    default = load_config(published, ["model.condition_image_size=0"])
    assert _model_facts(default, None)["condition_tokens"] == (1024 // 16) ** 2


def test_flow_factory_preset_maps_the_recipe_and_runs_on_the_tiny_model(tmp_path):
    """configs/qwen_image_edit_2509_flow_grpo_pickscore.yaml against Flow-Factory's
    examples/grpo/lora/qwen_image_edit_plus/default.yaml (at a0b2bc5): the recipe's values, written out by hand here,
    and one step of the preset, shrunk, on tiny:qwen_image_edit_plus with a source image per row, true CFG at 4 with
    the gradient through both passes, its window of one SDE step among steps 1..3 of 10 and the recipe's LoRA targets
    (both streams' attention projections and MLPs)."""
    import json

    from diffrl.config import load_config
    from diffrl.rewards import as_reward
    from diffrl.train import build_trainer

    root = Path(__file__).resolve().parents[1]
    preset = root / "configs" / "qwen_image_edit_2509_flow_grpo_pickscore.yaml"
    cfg = load_config(preset)
    g, s, m = cfg.flow_grpo, cfg.sample, cfg.model
    assert (m.path, m.lora_rank, m.lora_alpha, m.lora_init) == (
        "Qwen/Qwen-Image-Edit-2509",
        64,
        128,
        "gaussian",
    )
    assert (m.gradient_checkpointing, m.condition_image_size) == (True, 384)
    assert (g.group_size, g.prompts_per_step, g.num_minibatches, g.num_inner_epochs) == (16, 48, 2, 1)
    assert (g.sampler, g.noise_level, g.sde_window, list(g.sde_window_range)) == ("sde", 1.0, 1, [1, 4])
    assert (g.clip_range, g.kl_beta, g.adv_clip, g.adv_std, cfg.reward_normalize) == (
        1e-4,
        0.0,
        5.0,
        "global",
        "group",
    )
    assert g.cfg_grad == "full" and cfg.reward == cfg.eval_reward == {"pickscore": 1.0}
    assert (s.height, s.width, s.num_steps, s.guidance_scale, s.eval_num_steps, s.eval_guidance_scale) == (
        384,
        384,
        10,
        4.0,
        40,
        4.0,
    )
    assert (s.batch_size, cfg.optim.train_batch_size, cfg.data.eval_size) == (1, 1, 128)
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.beta1, o.beta2, o.eps, o.max_grad_norm) == (
        3e-4,
        1e-4,
        0.9,
        0.999,
        1e-8,
        1.0,
    )
    assert (cfg.ema_decay, cfg.ema_every, cfg.zero_stage, cfg.mixed_precision, cfg.seed) == (
        0.9,
        8,
        2,
        "bf16",
        42,
    )
    assert (cfg.checkpointing_steps, cfg.eval_every) == (20, 20)
    (tmp_path / "images").mkdir()
    rows = []
    for i, prompt in enumerate(["make the cat red", "add a blue square"]):
        _image(50 + i).save(tmp_path / "images" / f"{i}.png")
        rows.append({"prompt": prompt, "image": f"images/{i}.png"})  # as sharegpt4o_image_mini, prefixed
    prompts = tmp_path / "edits.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = build_trainer(
        preset,
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={prompts}",
            f"data.eval={prompts}",
            "model.path=tiny:qwen_image_edit_plus",
            "model.dtype=float32",
            "model.condition_image_size=64",
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
    trainer.model.condition_area = 32 * 32  # the VL encoder's view, small for the tiny model
    transformer = trainer.model.transformer
    adapted = {n.removesuffix(".lora_A") for n, _ in transformer.named_modules() if n.endswith(".lora_A")}
    blocks = len(transformer.transformer_blocks)
    attention = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    mlps = [f"{s}_mlp.net.{k}" for s in ("img", "txt") for k in ("0.proj", "2")]
    expected = {
        f"transformer_blocks.{b}.{x}"
        for b in range(blocks)
        for x in [*(f"attn.{a}" for a in attention), *mlps]
    }
    assert adapted == expected
    calls = []
    original = trainer.model.velocity

    def spy(x, sigma, cond, guidance_scale=4.0, **kw):
        calls.append((guidance_scale, kw.get("detach_uncond"), cond.negative_prompt_embeds is not None))
        return original(x, sigma, cond, guidance_scale, **kw)

    trainer.model.velocity = spy
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train_step(0)
    unchanged = {
        n for n, a, p in zip(trainer.param_names, before, trainer.params, strict=True) if torch.equal(a, p)
    }
    # the last block's text stream is dropped after it: as in the recipe, its LoRA tensors are there but get no
    # gradient (diffrl's default targets leave them out); every other one moved
    last = f"transformer_blocks.{blocks - 1}"
    dead = ["attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
    assert unchanged == {f"{last}.{x}.lora_B.default.weight" for x in dead}
    # every pass guided at 4 against the encoded empty negative prompt; the training passes keep both gradients
    assert calls and all(c[0] == 4.0 and c[2] for c in calls) and any(c[1] is False for c in calls)
    # the second of the two updates is off-policy by one tiny update: the mean ratio is near 1, not exactly
    assert abs(metrics["train/ratio_mean"] - 1.0) < 1e-3
