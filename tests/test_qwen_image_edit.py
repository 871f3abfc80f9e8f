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
