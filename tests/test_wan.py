"""The Wan adapter against diffusers' own WanPipeline, on the tiny offline pipelines (``tiny:wan``, and ``tiny:wan22``
with Wan 2.2's two experts): schedule, prompt encoding, a noise-free rollout with CFG (and the expert switch),
decoding to video, and a LoRA that a plain diffusers process loads with ``load_lora_weights``."""

import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import UniPCMultistepScheduler, WanPipeline  # noqa: E402

from diffrl.models import ADAPTERS, WanModel, load_model  # noqa: E402
from diffrl.models.loading import check_image_size, tiny_model_dir  # noqa: E402
from diffrl.models.wan import check_num_frames, unipc_flow_sigmas  # noqa: E402
from diffrl.samplers import rollout  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_tiny_cache", "one_thread")

PROMPTS = ["a red cat", "the blue square on the left of a tree", "two green circles"]
SIZE = (32, 48)
FRAMES = 5


@pytest.fixture(scope="module")
def model():
    return load_model("tiny:wan", num_frames=FRAMES)


@pytest.fixture(scope="module")
def pipe():
    p = WanPipeline.from_pretrained(tiny_model_dir("tiny:wan"))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def model22():
    return load_model("tiny:wan22", num_frames=FRAMES)


@pytest.fixture(scope="module")
def pipe22():
    p = WanPipeline.from_pretrained(tiny_model_dir("tiny:wan22"))
    p.set_progress_bar_config(disable=True)
    return p


def test_detected_loaded_and_frame_rule(model):
    assert ADAPTERS["WanPipeline"] is WanModel
    assert isinstance(model, WanModel) and model.family == "wan" and model.num_experts == 1
    assert model.uses_negative_prompt and model.guidance_is_cfg
    assert (model.default_num_steps, model.default_guidance_scale, model.default_num_frames) == (50, 5.0, 81)
    # 5 frames -> (5 - 1) / 4 + 1 = 2 latent frames; 4x spatial compression
    assert model.latent_shape(32, 48) == (4, 2, 8, 12)
    assert model.latent_frames(1) == 1 and model.latent_frames(81) == 21
    with pytest.raises(ValueError, match="multiple of 8"):
        model.latent_shape(36, 32)
    with pytest.raises(ValueError, match=r"num_frames=6 must be 1 more than a multiple of 4 .* use 5 or 9"):
        model.num_frames = 6
    assert model.num_frames == FRAMES  # a refused value leaves the setting as it was
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="positive integer"):
            check_num_frames(bad)
    assert check_image_size("tiny:wan", 32, 32) is True
    with pytest.raises(ValueError, match="multiple of 8"):
        check_image_size("tiny:wan", 36, 32)


@pytest.mark.parametrize("steps", [2, 4, 7])
def test_schedule_equals_pipeline_bitwise(model, pipe, steps):
    pipe.scheduler.set_timesteps(steps)
    got = model.schedule(steps, *SIZE)
    assert torch.equal(got, pipe.scheduler.sigmas), (got, pipe.scheduler.sigmas)
    # the transformer's timesteps are 1000 * level, as the adapter feeds them
    assert torch.equal(got[:-1] * 1000, pipe.scheduler.timesteps)


@pytest.mark.parametrize("shift,steps,final", [(3.0, 50, "zero"), (5.0, 40, "zero"), (3.0, 4, "sigma_min")])
def test_unipc_flow_levels_bitwise(shift, steps, final):
    """The released checkpoints' scheduler (UniPC with flow sigmas): the same levels as diffusers computes."""
    sched = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, final_sigmas_type=final
    )
    sched.set_timesteps(steps)
    got = unipc_flow_sigmas(steps, flow_shift=shift, final_sigmas_type=final)
    assert torch.equal(got, sched.sigmas)
    assert got[0].item() == pytest.approx(1 - 1e-6, abs=1e-7)


def test_encode_equals_pipeline_and_is_cached(model, pipe):
    model.clear_prompt_cache()
    cond = model.encode(PROMPTS, negative_prompt="")
    embeds, neg = pipe.encode_prompt(PROMPTS, negative_prompt="", max_sequence_length=512, device="cpu")
    assert cond.prompt_embeds.shape == embeds.shape == (3, 512, 32)
    # one prompt at a time here, a batch there: the same maths
    assert (cond.prompt_embeds - embeds).abs().max().item() < 1e-5
    for i, p in enumerate(PROMPTS):  # each prompt alone: bitwise
        with torch.no_grad():
            alone, _ = pipe.encode_prompt(p, do_classifier_free_guidance=False, max_sequence_length=512)
        assert torch.equal(cond.prompt_embeds[i], alone[0])
    assert torch.equal(cond.negative_prompt_embeds, neg)
    # the padding is zeros, as the pipeline's: the prompts have few tokens out of 512
    real = (cond.prompt_embeds != 0).any(-1).sum(1)
    assert (real > 0).all() and (real < 20).all()
    calls = []
    handle = model.pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = model.encode(PROMPTS[::-1])
    finally:
        handle.remove()
    assert not calls and torch.equal(again.prompt_embeds[0], cond.prompt_embeds[2])


def _pipeline_latents(pipe, prompts, negative, cfg, steps, seed, output_type="latent"):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(
        prompts,
        negative_prompt=negative,
        guidance_scale=cfg,
        height=SIZE[0],
        width=SIZE[1],
        num_frames=FRAMES,
        num_inference_steps=steps,
        generator=gens,
        output_type=output_type,
    ).frames


def _ours(model, prompts, negative, cfg, steps, seed):
    cond = model.encode(prompts, negative_prompt=negative)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    noise = model.sample_noise(len(prompts), *SIZE, generator=gens)
    return rollout(model, cond, model.schedule(steps, *SIZE), noise, guidance_scale=cfg).final


@pytest.mark.parametrize(
    "prompts,negative,cfg,steps",
    [
        (["a red cat"], "", 5.0, 2),
        (PROMPTS[:2], ["", "blurry"], 4.0, 3),
        (PROMPTS[1:], None, 1.0, 2),  # no CFG
    ],
)
def test_rollout_reproduces_pipeline(model, pipe, prompts, negative, cfg, steps):
    expected = _pipeline_latents(pipe, prompts, negative, cfg, steps, seed=7)
    got = _ours(model, prompts, negative, cfg, steps, seed=7)
    assert got.shape == expected.shape == (len(prompts), 4, 2, 8, 12)
    diff = (got - expected).abs().max().item()
    assert diff < 1e-5, diff


def test_wan22_expert_switch_reproduces_pipeline(model22, pipe22):
    """Two experts: the high-noise one at timesteps >= 875, the low-noise one below, as the pipeline switches."""
    steps = 4
    levels = model22.schedule(steps, *SIZE)
    high = (levels[:-1] * 1000 >= 875).tolist()
    assert True in high and False in high  # the rollout crosses the boundary
    calls = []
    hooks = [
        m.register_forward_hook(lambda mod, a, kw_out, name=name: calls.append(name))
        for name, m in (("high", model22.transformer), ("low", model22.transformer_2))
    ]
    try:
        got = _ours(model22, PROMPTS[:2], "", 5.0, steps, seed=3)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [
        "high" if h else "low" for h in high
    ]  # one batched CFG pass per step, on the right expert
    expected = _pipeline_latents(pipe22, PROMPTS[:2], "", 5.0, steps, seed=3)
    assert (got - expected).abs().max().item() < 1e-5
    # a batch of mixed levels is split between the experts: each row as if alone
    x = torch.randn(2, *model22.latent_shape(*SIZE), generator=torch.Generator().manual_seed(0))
    cond = model22.encode(PROMPTS[:2])
    sig = torch.tensor([0.95, 0.3])
    with torch.no_grad():
        mixed = model22.velocity(x, sig, cond, 5.0)
        rows = [model22.velocity(x[i : i + 1], sig[i : i + 1], cond.select(i), 5.0) for i in range(2)]
        swapped = model22.velocity(x, sig.flip(0), cond, 5.0)
    assert (mixed - torch.cat(rows)).abs().max().item() < 1e-5
    assert (mixed - swapped).abs().max().item() > 1e-3  # the two experts differ
    # guidance_scale_2: the low-noise expert's CFG scale, as the pipeline's
    model22.guidance_scale_2 = 2.0
    try:
        got2 = _ours(model22, PROMPTS[:2], "", 5.0, steps, seed=3)
    finally:
        model22.guidance_scale_2 = None
    gens = [torch.Generator().manual_seed(3 + i) for i in range(2)]
    expected2 = pipe22(
        PROMPTS[:2],
        negative_prompt="",
        guidance_scale=5.0,
        guidance_scale_2=2.0,
        height=SIZE[0],
        width=SIZE[1],
        num_frames=FRAMES,
        num_inference_steps=steps,
        generator=gens,
        output_type="latent",
    ).frames
    assert (got2 - expected2).abs().max().item() < 1e-5
    assert (got2 - got).abs().max().item() > 1e-3
    with pytest.raises(
        ValueError, match="guidance_scale_2=2.0 is the CFG scale of Wan 2.2's low-noise expert"
    ):
        load_model("tiny:wan", guidance_scale_2=2.0)
    with pytest.raises(ValueError, match="set model.expert to high, low or both"):
        model22.add_lora()


def test_wan22_trains_one_expert_and_saves_it_for_load_lora_weights(tmp_path):
    """expert="low": the LoRA sits on transformer_2 only, so the high-noise steps of a rollout are exactly the base
    model's and the low-noise ones differ; the saved file loads into a fresh pipeline's transformer_2
    (``load_into_transformer_2=True``) and reproduces the samples; diffrl's own loader puts it back there too."""
    from diffrl.models.lora_files import load_lora

    model = load_model("tiny:wan22", num_frames=FRAMES, expert="low")
    assert model.transformer is model.pipe.transformer_2 and model.high_noise_expert is model.pipe.transformer
    model.add_lora(rank=4, alpha=8)
    assert not any(p.requires_grad for p in model.pipe.transformer.parameters())
    assert any(p.requires_grad for p in model.pipe.transformer_2.parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    levels = model.schedule(4, *SIZE)
    n_high = int((levels[:-1] * 1000 >= 875).sum())
    assert 0 < n_high < 4
    cond = model.encode(["a red cat"], negative_prompt="")
    noise = model.sample_noise(1, *SIZE, generator=[torch.Generator().manual_seed(1)])
    with torch.no_grad():
        ours = rollout(model, cond, levels, noise, guidance_scale=5.0)
        with model.disable_adapter():
            base = rollout(model, cond, levels, noise, guidance_scale=5.0)
    assert torch.equal(ours.latents[:, : n_high + 1], base.latents[:, : n_high + 1])
    assert (ours.final - base.final).abs().max().item() > 1e-3
    path = model.save_lora(tmp_path / "lora")
    fresh = WanPipeline.from_pretrained(tiny_model_dir("tiny:wan22"))
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(path, load_into_transformer_2=True)
    gens = [torch.Generator().manual_seed(1)]
    expected = fresh(
        "a red cat",
        negative_prompt="",
        guidance_scale=5.0,
        height=SIZE[0],
        width=SIZE[1],
        num_frames=FRAMES,
        num_inference_steps=4,
        generator=gens,
        output_type="latent",
    ).frames
    assert (ours.final - expected).abs().max().item() < 1e-5
    assert json.loads((path / "diffrl_wan_expert.json").read_text()) == {"expert": "low"}
    again = load_model(
        "tiny:wan22", num_frames=FRAMES
    )  # no expert given: the file next to the LoRA says which
    load_lora(again, path)
    assert again.expert == "low" and not any(
        "lora" in n for n, _ in again.pipe.transformer.named_parameters()
    )
    with torch.no_grad():
        reloaded = rollout(again, again.encode(["a red cat"]), levels, noise, guidance_scale=5.0).final
    assert (reloaded - ours.final).abs().max().item() < 1e-5
    with pytest.raises(
        ValueError, match=r"expert='mid' must be 'high' \(transformer\), 'low' \(transformer_2\) or 'both'"
    ):
        load_model("tiny:wan22", expert="mid")
    with pytest.raises(ValueError, match="this model has one transformer"):
        load_model("tiny:wan", expert="low")


def test_bfloat16_weights_keep_float32_sampler_maths():
    """bf16 weights (the GPU dtype; here on the CPU): the velocity stays within 5% of the float32 one (measured about
    2%, CFG 5 amplifies the rounding), a mixed-level batch splits between Wan 2.2's experts in bf16, and the SDE
    rollout's log-probs and the decoded video are float32 and finite."""
    m32 = load_model("tiny:wan22", num_frames=FRAMES)
    m16 = load_model("tiny:wan22", num_frames=FRAMES, dtype="bf16")
    x = torch.randn(2, *m32.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    sig = torch.tensor([0.95, 0.3])
    with torch.no_grad():
        v32 = m32.velocity(x, sig, m32.encode(PROMPTS[:2]), 5.0)
        v16 = m16.velocity(x, sig, m16.encode(PROMPTS[:2]), 5.0)
        assert v16.dtype == torch.bfloat16
        rel = ((v16.float() - v32).norm() / v32.norm()).item()
        assert rel < 0.05, rel
        out = rollout(
            m16,
            m16.encode(PROMPTS[:2]),
            m16.schedule(3, 32, 32),
            x,
            guidance_scale=5.0,
            sampler="sde",
            generator=torch.Generator().manual_seed(1),
        )
        video = m16.decode(out.final)
    assert out.log_probs.dtype == torch.float32 and torch.isfinite(out.log_probs).all()
    assert (
        video.dtype == torch.float32 and video.shape == (2, FRAMES, 3, 32, 32) and torch.isfinite(video).all()
    )


def test_decode_equals_pipeline_video(model, pipe):
    video = _pipeline_latents(pipe, ["two green circles"], "", 3.0, 2, seed=3, output_type="pt")
    latents = _ours(model, ["two green circles"], "", 3.0, 2, seed=3)
    ours = model.decode(latents)
    assert ours.shape == video.shape == (1, FRAMES, 3, *SIZE)
    assert ours.min() >= 0 and ours.max() <= 1
    assert (ours - video).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="video latents"):
        model.decode(latents[:, :, 0])


_LOAD_LORA = """
import json, sys, torch
from diffusers import WanPipeline
assert "diffrl" not in sys.modules
pipe = WanPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
pipe.load_lora_weights(sys.argv[2])
gens = [torch.Generator().manual_seed(1)]
out = pipe("a red cat", negative_prompt="", guidance_scale=5.0, height=32, width=48, num_frames=5,
           num_inference_steps=2, generator=gens, output_type="latent").frames
print(json.dumps(out.flatten().tolist()))
"""


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    """tiny:wan with a rank-4 LoRA whose B matrices are random (so it changes the samples), saved to disk."""
    model = load_model("tiny:wan", num_frames=FRAMES)
    model.add_lora(rank=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    path = model.save_lora(tmp_path_factory.mktemp("wan-lora") / "lora")
    return model, path


def test_lora_saved_for_load_lora_weights(lora_model):
    model, path = lora_model
    names = {n for n, p in model.transformer.named_parameters() if p.requires_grad}
    for part in ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v"):
        assert any(f"blocks.1.{part}.lora_A" in n for n in names), part
    assert not any("ffn" in n for n in names)
    ours = _ours(model, ["a red cat"], "", 5.0, 2, seed=1)
    with model.disable_adapter():
        base = _ours(model, ["a red cat"], "", 5.0, 2, seed=1)
    assert (ours - base).abs().max().item() > 1e-3  # the adapter changes the samples
    fresh = WanPipeline.from_pretrained(tiny_model_dir("tiny:wan"))
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(path)
    expected = _pipeline_latents(fresh, ["a red cat"], "", 5.0, 2, seed=1)
    assert (ours - expected).abs().max().item() < 1e-5


_LOAD_LORA = """
import json, sys, torch
from diffusers import WanPipeline
assert "diffrl" not in sys.modules
pipe = WanPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
pipe.load_lora_weights(sys.argv[2])
gens = [torch.Generator().manual_seed(1)]
out = pipe("a red cat", negative_prompt="", guidance_scale=5.0, height=32, width=48, num_frames=5,
           num_inference_steps=2, generator=gens, output_type="latent").frames
print(json.dumps(out.flatten().tolist()))
"""


@pytest.mark.slow
def test_lora_loads_in_a_process_without_diffrl(lora_model):
    """The saved LoRA in a fresh Python process that imports diffusers only (about 20 s here: slow)."""
    model, path = lora_model
    ours = _ours(model, ["a red cat"], "", 5.0, 2, seed=1)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_LORA, str(tiny_model_dir("tiny:wan")), str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1])).view_as(ours)
    assert (ours - expected).abs().max().item() < 1e-5


def test_sde_log_prob_on_video_equals_flattened_frames():
    """The SDE step's log-prob of a 5-D latent is the mean over all non-batch dims: the 4-D computation with the
    frames folded into the channels gives the same number, and so does the hand-written Gaussian density."""
    from diffrl.samplers import cps_step, dpm2_step, ode_step, sde_step

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 2, 8, 12, generator=g)
    v = torch.randn(3, 4, 2, 8, 12, generator=g)
    z = torch.randn(3, 4, 2, 8, 12, generator=g)
    for step in (sde_step, cps_step):
        video = step(x, v, 0.8, 0.6, 0.7, noise=z)
        flat = step(x.flatten(1, 2), v.flatten(1, 2), 0.8, 0.6, 0.7, noise=z.flatten(1, 2))
        assert video.log_prob.shape == (3,)
        assert torch.allclose(video.log_prob, flat.log_prob, atol=1e-6, rtol=0)
        assert torch.equal(video.sample.flatten(1, 2), flat.sample)
        std = video.std.reshape(3, 1, 1, 1, 1)
        density = (
            -((video.sample - video.mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * np.log(2 * np.pi)
        )
        assert torch.allclose(video.log_prob, density.mean(dim=(1, 2, 3, 4)), atol=1e-5, rtol=0)
    # the deterministic steps act element-wise: the same numbers in either layout
    ode5, ode4 = ode_step(x, v, 0.8, 0.6), ode_step(x.flatten(1, 2), v.flatten(1, 2), 0.8, 0.6)
    assert torch.equal(ode5.sample.flatten(1, 2), ode4.sample)
    d5 = dpm2_step(x, v, z, 0.9, 0.8, 0.6)
    d4 = dpm2_step(x.flatten(1, 2), v.flatten(1, 2), z.flatten(1, 2), 0.9, 0.8, 0.6)
    assert torch.equal(d5.sample.flatten(1, 2), d4.sample) and d5.log_prob is None


# ------------------------------------------------------------------------------------- sampling and the trainers

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_diffrl_sample_writes_lossless_animated_webp(tmp_path):
    """``diffrl sample`` on a video model: one animated WebP per video whose frames are the sampled frames exactly
    (lossless), at the asked frame rate; the grid shows the middle frames; a bad frame count fails before loading."""
    from PIL import Image

    from diffrl.sampling import load_for_sampling, run_sample, sample_images, to_uint8

    lines = []
    out = run_sample(
        "tiny:wan",
        ["a red cat", "two dogs"],
        tmp_path / "out",
        num_frames=FRAMES,
        height=32,
        width=32,
        num_steps=2,
        fps=8,
        progress=False,
        log=lines.append,
    )
    assert "videos 32x32 x 5 frames" in lines[0] and "2 videos" in lines[-1]
    model = load_for_sampling("tiny:wan", device="cpu")
    model.num_frames = FRAMES
    videos = sample_images(
        model, ["a red cat", "two dogs"], num_steps=2, guidance_scale=5.0, height=32, width=32
    )
    assert videos.shape == (2, FRAMES, 3, 32, 32)
    for i in range(2):
        with Image.open(out / f"0000{i}.webp") as im:
            assert im.n_frames == FRAMES
            for f in range(FRAMES):
                im.seek(f)
                got = torch.from_numpy(np.array(im.convert("RGB")))
                assert im.info["duration"] == 125  # 8 frames per second
                assert torch.equal(got, to_uint8(videos[i, f : f + 1])[0]), (i, f)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == ["00000.webp", "00001.webp"]
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 * 32 + 3 * 2, 32 + 2 * 2)
    with pytest.raises(ValueError, match="num_frames=7 must be 1 more than a multiple of 4"):
        run_sample("tiny:wan", ["a"], tmp_path / "bad", num_frames=7, progress=False, log=lines.append)


def test_video_features_and_eval_strip_use_frames(tmp_path):
    """The monitor's features of a video are its middle frame's; the evaluation picture draws videos (a strip of the
    first, middle and last frames) where a 5-D tensor would otherwise fail to draw."""
    from diffrl.trainers.eval_grid import save_eval_grid
    from diffrl.trainers.monitor import image_features

    g = torch.Generator().manual_seed(0)
    videos = torch.rand(2, 5, 3, 16, 16, generator=g)
    for kind in ("pixels", "histogram"):
        assert torch.equal(image_features(videos, kind), image_features(videos[:, 2], kind))
    path = save_eval_grid(videos, ["a", "b"], {"r": torch.tensor([0.1, 0.2])}, tmp_path / "grid.png")
    assert path.stat().st_size > 0


@pytest.mark.parametrize(
    "algo",
    ["flow_grpo"] + [pytest.param(a, marks=pytest.mark.slow) for a in ("diffusion_nft", "refl", "awm")],
)  # about 3 s each on 2 busy cores: Flow-GRPO by default, the others with --run-slow
def test_every_trainer_takes_a_step_on_wan(algo, tmp_path, capsys):
    """Each trainer's tiny preset on ``tiny:wan`` with 5-frame videos: one step moves every trainable tensor with finite
    metrics; the run says which frames its image reward scores; Flow-GRPO's first update is on-policy (ratio exactly
    1, no KL) in float32."""
    from diffrl.train import build_trainer

    trainer = build_trainer(
        ROOT / "configs" / "tiny" / f"{algo}.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={ROOT / 'configs' / 'tiny' / 'prompts.txt'}",
            "model.path=tiny:wan",
            f"sample.num_frames={FRAMES}",
            "video.frames=[0,-1]",
            "video.combine=min",
            "max_steps=1",
            "eval_every=0",
            "checkpointing_steps=0",
            "report_to=none",
        ],
    )
    assert isinstance(trainer.model, WanModel) and trainer.model.num_frames == FRAMES
    assert "frames [0, 4] of 5 per video, combined by their min" in capsys.readouterr().out
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train_step(0)
    unchanged = [
        n for n, a, p in zip(trainer.param_names, before, trainer.params, strict=True) if torch.equal(a, p)
    ]
    assert not unchanged, f"{len(unchanged)} trainable tensors did not move, e.g. {unchanged[:2]}"
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
    assert metrics["reward/frames_scored"] == 2.0
    if algo == "flow_grpo":
        assert metrics["train/ratio_mean"] == 1.0 and metrics["train/approx_kl"] == 0.0


def test_wan22_flow_grpo_step_trains_the_low_noise_expert(tmp_path):
    """model.expert=low on tiny:wan22: Flow-GRPO's step moves every LoRA tensor of transformer_2 (the steps below
    the boundary), leaves the high-noise expert untouched, and is on-policy (ratio exactly 1)."""
    from diffrl.train import build_trainer

    trainer = build_trainer(
        ROOT / "configs" / "tiny" / "flow_grpo.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={ROOT / 'configs' / 'tiny' / 'prompts.txt'}",
            "model.path=tiny:wan22",
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
    assert metrics["train/ratio_mean"] == 1.0 and metrics["train/approx_kl"] == 0.0


def test_image_model_refuses_num_frames(tmp_path):
    from diffrl.config import ConfigError
    from diffrl.train import build_trainer

    with pytest.raises(
        ConfigError, match=r"sample.num_frames=5 is for video models, but tiny:sd3 makes images"
    ):
        build_trainer(
            ROOT / "configs" / "tiny" / "flow_grpo.yaml",
            [
                f"output_dir={tmp_path / 'run'}",
                f"data.train={ROOT / 'configs' / 'tiny' / 'prompts.txt'}",
                "sample.num_frames=5",
                "report_to=none",
            ],
        )
