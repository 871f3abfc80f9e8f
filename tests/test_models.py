"""Model adapters on tiny real SD3 / FLUX pipelines, loaded through ``load_model`` as a real checkpoint is."""

import json
import math

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from diffrl.models import FluxModel, SD3Model, detect_family, load_model
from diffrl.models.flux import pack_latents, unpack_latents
from diffrl.models.tiny import build_tiny_flux, build_tiny_sd3
from diffrl.samplers import rollout

PROMPTS = ["a red circle", "two blue squares left of a green triangle"]
H = W = 32


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("ckpt") / "tiny-sd3", seed=0)


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("ckpt") / "tiny-flux", seed=0)


@pytest.fixture(params=["sd3", "flux"])
def family_dir(request, sd3_dir, flux_dir):
    return request.param, (sd3_dir if request.param == "sd3" else flux_dir)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randomise_lora(model, seed=0):
    # LoRA starts as a no-op (B = 0); give it random weights as training would.
    g = _gen(seed)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ---------------------------------------------------------------- loading


def test_family_detection_and_eval_mode(family_dir):
    family, path = family_dir
    model = load_model(path)
    assert isinstance(model, SD3Model if family == "sd3" else FluxModel)
    assert detect_family(str(path)) is type(model)
    for module in model.pipe.components.values():
        if isinstance(module, torch.nn.Module):
            assert not module.training
            assert not any(p.requires_grad for p in module.parameters())
    assert model.trainable_parameters() == []


def test_unsupported_pipeline_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(
        ValueError,
        match="StableDiffusionXLPipeline.*FluxPipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline, StableDiffusion3Pipeline",
    ):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_model(tmp_path / "..")


def test_uncached_hub_id_fails_clearly_offline():
    with pytest.raises(OSError, match="model_index.json"):
        load_model("diffrl-tests/this-model-does-not-exist")


def test_sd3_without_t5_loads(tmp_path):
    path = build_tiny_sd3(tmp_path / "no-t5", with_t5=False)
    model = load_model(path)
    assert model.pipe.text_encoder_3 is None
    cond = model.encode(PROMPTS)
    assert cond.prompt_embeds.shape[0] == 2 and torch.isfinite(cond.prompt_embeds).all()


def test_sd3_without_t5_collapses_the_zero_padding_exactly(tmp_path):
    # Without T5 the pipeline feeds 77 CLIP tokens + 256 zero tokens; the adapter keeps one zero token and counts
    # it 256 times in the attention. Same maths as the pipeline: rollout, CFG and LoRA gradients agree.
    path = build_tiny_sd3(tmp_path / "no-t5", with_t5=False, num_layers=2)
    model = load_model(path)
    full = load_model(path, collapse_t5_padding=False)
    assert model.collapse_t5_padding and not full.collapse_t5_padding
    cond, cond_full = model.encode(PROMPTS), full.encode(PROMPTS)
    assert cond.prompt_embeds.shape[1] == 77 + 1 and cond_full.prompt_embeds.shape[1] == 77 + 256
    steps, cfg = 4, 4.5
    ref = model.pipe(
        prompt=PROMPTS,
        height=H,
        width=W,
        num_inference_steps=steps,
        guidance_scale=cfg,
        generator=_gen(0),
        output_type="latent",
    ).images  # the pipeline's full-length context goes through the wrapped original processors
    noise = model.sample_noise(2, H, W, generator=_gen(0))
    out = rollout(model, cond, model.schedule(steps, H, W), noise, guidance_scale=cfg)
    torch.testing.assert_close(out.final, ref, rtol=1e-5, atol=1e-5)
    # a wrong multiplicity (no log(256) bias) is far off: the check can fail
    for proc in model.transformer.attn_processors.values():
        proc.log_m = 0.0
    wrong = rollout(model, cond, model.schedule(steps, H, W), noise, guidance_scale=cfg)
    assert (wrong.final - ref).abs().max() > 1e-3
    for proc in model.transformer.attn_processors.values():
        proc.log_m = math.log(256)
    # gradients through a LoRA agree with the uncollapsed model's
    grads = []
    for m, c in ((model, cond), (full, cond_full)):
        m.add_lora(rank=4)
        _randomise_lora(m)
        v = m.velocity(noise, 0.6, c, guidance_scale=cfg)
        v.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.transformer.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    # float32 sums in another order (one key counted 256 times vs 256 keys): agree to ~1e-5 of the norm
    errs = {n: float((grads[0][n] - grads[1][n]).norm() / grads[1][n].norm()) for n in grads[0]}
    assert max(errs.values()) < 1e-3, errs


# ---------------------------------------------------------------- prompts


def test_prompt_encoding_is_cached_and_equals_pipeline(family_dir):
    family, path = family_dir
    model = load_model(path)
    cond = model.encode(PROMPTS)
    assert len(model._cache) == (3 if family == "sd3" else 2)  # SD3 also caches the negative prompt ""
    again = model.encode(list(reversed(PROMPTS)))
    assert len(model._cache) == (3 if family == "sd3" else 2)
    torch.testing.assert_close(again.prompt_embeds, cond.prompt_embeds.flip(0), rtol=0, atol=0)
    if family == "sd3":
        ref, neg, pooled, neg_pooled = model.pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=True
        )
        torch.testing.assert_close(cond.negative_prompt_embeds, neg, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cond.negative_pooled, neg_pooled, rtol=1e-6, atol=1e-6)
    else:
        ref, pooled, text_ids = model.pipe.encode_prompt(PROMPTS, None)
        torch.testing.assert_close(cond.text_ids, text_ids)
    torch.testing.assert_close(cond.prompt_embeds, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cond.pooled, pooled, rtol=1e-6, atol=1e-6)
    # groups: each prompt G times in a row
    grouped = cond.repeat_interleave(3)
    assert len(grouped) == 6 and torch.equal(grouped.prompt_embeds[3], cond.prompt_embeds[1])


def test_offloaded_text_encoders_move_only_to_encode_uncached_prompts(sd3_dir, monkeypatch):
    """model.offload_text_encoders: the encoders are sent to the CPU, brought to the model's device only around
    the encoding of prompts the cache lacks (and sent back), and the embeddings equal the un-offloaded model's."""
    plain = load_model(sd3_dir).encode(PROMPTS)
    model = load_model(sd3_dir)
    encoders = model.text_encoders()
    assert len(encoders) == 3  # the tiny SD3 pipeline's two CLIP encoders and its T5
    every = [(i, "cpu") for i in range(3)]
    moves = []
    for i, enc in enumerate(encoders):
        monkeypatch.setattr(enc, "to", lambda *a, i=i, enc=enc, **k: moves.append((i, str(a[0]))) or enc)
    model.offload_text_encoders()
    assert moves == every
    moves.clear()
    cond = model.encode(PROMPTS)
    assert (
        moves == every + every
    )  # once to the model's device (here the CPU) and back, for prompts and negative
    torch.testing.assert_close(cond.prompt_embeds, plain.prompt_embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, plain.pooled, rtol=0, atol=0)
    moves.clear()
    model.encode(PROMPTS)  # all cached: the encoders stay where they are
    assert moves == []
    from pathlib import Path

    from diffrl.config import load_config
    from diffrl.models import load_model_from_config

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny"
    cfg = load_config(
        tiny / "flow_grpo.yaml",
        ["model.offload_text_encoders=true", f"model.path={sd3_dir}", f"data.train={tiny / 'prompts.txt'}"],
    )
    assert load_model_from_config(cfg.model)._offload_text


def test_prompt_cache_is_bounded(sd3_dir):
    model = load_model(sd3_dir, prompt_cache_size=2)
    model.encode(["a", "b", "c", "d"], negative_prompt=None)
    assert len(model._cache) == 2


# ---------------------------------------------------------------- parity with the diffusers pipelines


def test_sd3_rollout_reproduces_pipeline_with_cfg(sd3_dir):
    model = load_model(sd3_dir)
    steps, cfg = 4, 4.5
    ref = model.pipe(
        prompt=PROMPTS,
        height=H,
        width=W,
        num_inference_steps=steps,
        guidance_scale=cfg,
        generator=_gen(0),
        output_type="latent",
    ).images
    noise = model.sample_noise(2, H, W, generator=_gen(0))
    out = rollout(model, model.encode(PROMPTS), model.schedule(steps, H, W), noise, guidance_scale=cfg)
    torch.testing.assert_close(out.final, ref, rtol=1e-5, atol=1e-5)
    # CFG really is on: without it the result differs
    plain = rollout(model, model.encode(PROMPTS), model.schedule(steps, H, W), noise, guidance_scale=1.0)
    assert (plain.final - ref).abs().max() > 1e-3
    # decode equals the pipeline's image output
    images = model.pipe(
        prompt=PROMPTS,
        height=H,
        width=W,
        num_inference_steps=steps,
        guidance_scale=cfg,
        generator=_gen(0),
        output_type="pt",
    ).images
    torch.testing.assert_close(model.decode(out.final), images, rtol=1e-5, atol=1e-5)


def test_flux_rollout_reproduces_pipeline(flux_dir):
    model = load_model(flux_dir)
    steps, guidance = 4, 3.5
    ref = model.pipe(
        prompt=PROMPTS,
        height=H,
        width=W,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=_gen(0),
        output_type="latent",
    ).images
    _, h, w = model.latent_shape(H, W)
    noise = model.sample_noise(2, H, W, generator=_gen(0))
    out = rollout(model, model.encode(PROMPTS), model.schedule(steps, H, W), noise, guidance_scale=guidance)
    torch.testing.assert_close(pack_latents(out.final), ref, rtol=1e-5, atol=1e-5)
    # the guidance embedding is used
    other = rollout(model, model.encode(PROMPTS), model.schedule(steps, H, W), noise, guidance_scale=1.0)
    assert (other.final - out.final).abs().max() > 1e-4
    images = model.pipe(
        prompt=PROMPTS,
        height=H,
        width=W,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=_gen(0),
        output_type="pt",
    ).images
    torch.testing.assert_close(model.decode(out.final), images, rtol=1e-5, atol=1e-5)


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 4, 6, 8)
    assert pack_latents(x).shape == (2, 12, 16)
    assert torch.equal(unpack_latents(pack_latents(x), 6, 8), x)


def test_per_sample_sigma_equals_rowwise(family_dir):
    _, path = family_dir
    model = load_model(path)
    cond = model.encode(PROMPTS)
    x = model.sample_noise(2, H, W, generator=_gen(1))
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        v = model.velocity(x, sigma, cond, 3.0)
        rows = [model.velocity(x[i : i + 1], sigma[i : i + 1], cond.select(i), 3.0) for i in range(2)]
    torch.testing.assert_close(v, torch.cat(rows), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise(sd3_dir):
    model = load_model(sd3_dir)
    with pytest.raises(ValueError, match="height=30"):
        model.latent_shape(30, 32)
    cond = model.encode(PROMPTS)
    with pytest.raises(ValueError, match="cond holds 2 prompts"):
        model.velocity(torch.zeros(3, 4, 8, 8), 0.5, cond)
    with pytest.raises(ValueError, match="prompts"):
        model.encode([])
    with pytest.raises(ValueError, match="dtype"):
        load_model(sd3_dir, dtype="float8")


# ---------------------------------------------------------------- training surface


def test_decode_is_differentiable(family_dir):
    _, path = family_dir
    model = load_model(path)
    latents = model.sample_noise(2, H, W, generator=_gen(0)).requires_grad_(True)
    images = model.decode(latents)
    assert images.shape == (2, 3, H, W) and images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_lora_reference_policy_and_diffusers_round_trip(family_dir, tmp_path):
    family, path = family_dir
    model = load_model(path)
    cond = model.encode(PROMPTS)
    x = model.sample_noise(2, H, W, generator=_gen(2))
    sigma = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        base = model.velocity(x, sigma, cond, 3.0)
    model.add_lora()
    assert model.has_lora
    trainable = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    rank = model.default_lora_rank
    assert model.transformer.peft_config["default"].r == rank
    assert (
        model.transformer.peft_config["default"].lora_alpha == 2 * rank
    )  # alpha != rank: the scale must round-trip
    with torch.no_grad():
        torch.testing.assert_close(model.velocity(x, sigma, cond, 3.0), base)  # B = 0 at init
    _randomise_lora(model)
    with torch.no_grad():
        adapted = model.velocity(x, sigma, cond, 3.0)
        with model.disable_adapter():
            reference = model.velocity(x, sigma, cond, 3.0)
        after = model.velocity(x, sigma, cond, 3.0)
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(reference, base, rtol=0, atol=0)
    torch.testing.assert_close(after, adapted, rtol=0, atol=0)
    # every target family layer got an adapter
    lora_layers = {n.rsplit(".lora_", 1)[0] for n in trainable}
    if family == "sd3":
        assert any(n.endswith("attn.add_k_proj") for n in lora_layers)
        # the last block is context pre-only: its text queries never reach the output, so they get no LoRA
        last = len(model.transformer.transformer_blocks) - 1
        assert f"transformer_blocks.{last}.attn.add_q_proj" not in lora_layers
    else:
        assert any(n.endswith("ff.net.2") for n in lora_layers)
        assert any("single_transformer_blocks" in n and n.endswith("proj_mlp") for n in lora_layers)

    # save in the diffusers format; a plain diffusers pipeline loads it with load_lora_weights
    out_dir = model.save_lora(tmp_path / "lora")
    assert (out_dir / "pytorch_lora_weights.safetensors").is_file()
    pipe_cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    pipe = pipe_cls.from_pretrained(path)
    pipe.load_lora_weights(out_dir)
    fresh = (SD3Model if family == "sd3" else FluxModel)(pipe)
    with torch.no_grad():
        loaded = fresh.velocity(x, sigma, fresh.encode(PROMPTS), 3.0)
    torch.testing.assert_close(loaded, adapted, rtol=1e-5, atol=1e-5)
    # and the whole pipeline call agrees with a diffrl rollout of the adapted model
    kwargs = dict(
        prompt=PROMPTS, height=H, width=W, num_inference_steps=3, guidance_scale=3.0, output_type="latent"
    )
    ref = pipe(generator=_gen(5), **kwargs).images
    ours = rollout(
        model, cond, model.schedule(3, H, W), model.sample_noise(2, H, W, _gen(5)), guidance_scale=3.0
    ).final
    if family == "flux":
        ours = pack_latents(ours)
    # the pipeline encodes both prompts in one batch, diffrl one at a time: the embeddings differ in the last bits,
    # which the randomised LoRA amplifies a little
    torch.testing.assert_close(ours, ref, rtol=5e-5, atol=5e-5)


def test_gradient_checkpointing_gives_the_same_gradients(family_dir):
    _, path = family_dir
    grads = []
    for checkpointing in (False, True):
        model = load_model(path)
        model.add_lora()
        _randomise_lora(model)
        if checkpointing:
            model.enable_gradient_checkpointing()
        cond = model.encode(PROMPTS)
        out = rollout(
            model,
            cond,
            model.schedule(3, H, W),
            model.sample_noise(2, H, W, _gen(0)),
            guidance_scale=2.0,
            grad_window=(-2, None),
            gradient_checkpointing=checkpointing,
        )
        model.decode(out.final).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.transformer.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_full_finetuning_has_no_reference(sd3_dir, tmp_path):
    model = load_model(sd3_dir)
    model.set_full_finetuning()
    assert len(model.trainable_parameters()) == len(list(model.transformer.parameters()))
    with pytest.raises(ValueError, match="reference policy"):
        with model.disable_adapter():
            pass
    with pytest.raises(ValueError, match="full fine-tuning"):
        model.add_lora()
    model.save_pretrained(tmp_path / "full")
    reloaded = load_model(tmp_path / "full")
    assert isinstance(reloaded, SD3Model)


def test_bf16_weights_keep_float32_sampler_maths(sd3_dir):
    model = load_model(sd3_dir, dtype="bf16")
    assert model.dtype == torch.bfloat16
    out = rollout(
        model,
        model.encode(PROMPTS),
        model.schedule(3, H, W),
        model.sample_noise(2, H, W, _gen(0)),
        guidance_scale=3.0,
        sampler="sde",
        generator=_gen(1),
    )
    assert out.latents.dtype == torch.float32 and out.log_probs.dtype == torch.float32
    assert torch.isfinite(out.log_probs).all()


def test_cfg_batch_is_reused_but_never_stale(sd3_dir):
    model = load_model(sd3_dir)
    cond = model.encode(PROMPTS)
    first = cond.cfg_batch()
    assert cond.cfg_batch()[0] is first[0]  # concatenated once
    torch.testing.assert_close(first[0], torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds]))
    cond.prompt_embeds = cond.prompt_embeds + 1  # a new tensor: the cached concatenation must not be served
    torch.testing.assert_close(cond.cfg_batch()[0][2:], cond.prompt_embeds)
    with pytest.raises(ValueError, match="negative"):
        model.encode(PROMPTS, negative_prompt=None).cfg_batch()


def test_trainer_recomputes_rollout_log_probs_bitwise(family_dir):
    # What Flow-GRPO does at its first inner step: same weights, same batch -> ratio exactly 1 in float32.
    from diffrl.samplers import sde_step

    _, path = family_dir
    model = load_model(path)
    model.add_lora()
    _randomise_lora(model)
    cond = model.encode(PROMPTS)
    sigmas = model.schedule(4, H, W)
    out = rollout(
        model,
        cond,
        sigmas,
        model.sample_noise(2, H, W, _gen(0)),
        guidance_scale=3.0,
        sampler="sde",
        sde_window=(0, 3),
        generator=_gen(1),
    )
    for k in out.stochastic_steps().tolist():
        v = model.velocity(out.latents[:, k], sigmas[k].expand(2), cond, 3.0)  # with grad, as in training
        again = sde_step(
            out.latents[:, k], v, sigmas[k], sigmas[k + 1], 0.7, prev_sample=out.latents[:, k + 1]
        )
        assert torch.equal(again.log_prob.detach(), out.log_probs[:, k])
        assert torch.equal(torch.exp(again.log_prob - out.log_probs[:, k]).detach(), torch.ones(2))
        again.log_prob.sum().backward()  # the log-prob is differentiable in the LoRA weights
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_rollout_matches_pipeline(sd3_dir, dtype):
    model = load_model(sd3_dir, dtype=dtype, device="cuda")
    cond = model.encode(PROMPTS)
    noise = model.sample_noise(2, H, W, generator=_gen(0))
    ref = model.pipe(
        prompt=PROMPTS,
        height=H,
        width=W,
        num_inference_steps=4,
        guidance_scale=4.5,
        latents=noise.to(dtype),
        output_type="latent",
    ).images
    out = rollout(model, cond, model.schedule(4, H, W), noise, guidance_scale=4.5)
    # the pipeline keeps its latents in the model dtype, diffrl in float32: equal up to that rounding
    torch.testing.assert_close(out.final, ref.float(), rtol=2e-2, atol=2e-2)
    sde = rollout(
        model,
        cond,
        model.schedule(4, H, W),
        noise,
        guidance_scale=4.5,
        sampler="sde",
        sde_window=(0, 3),
        generator=torch.Generator("cuda").manual_seed(1),
    )
    assert sde.log_probs.dtype == torch.float32 and torch.isfinite(sde.log_probs[:, :3]).all()


@pytest.mark.weights
def test_real_sd35_medium_checkpoint_matches_pipeline():
    # Runs only with the real checkpoint in the Hugging Face cache (and HF_HUB_OFFLINE unset).
    model = load_model(
        "stabilityai/stable-diffusion-3.5-medium",
        dtype=torch.bfloat16,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    assert isinstance(model, SD3Model)
    noise = model.sample_noise(1, 256, 256, generator=_gen(0))
    ref = model.pipe(
        prompt=PROMPTS[:1],
        height=256,
        width=256,
        num_inference_steps=2,
        guidance_scale=4.5,
        latents=noise.to(model.dtype),
        output_type="latent",
    ).images
    out = rollout(model, model.encode(PROMPTS[:1]), model.schedule(2, 256, 256), noise, guidance_scale=4.5)
    torch.testing.assert_close(out.final, ref.float(), rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------- the shipped toy model as a plain pipeline

_PLAIN_TOY = """
import sys
import torch
from diffusers import StableDiffusion3Pipeline

pipe = StableDiffusion3Pipeline.from_pretrained(sys.argv[1])  # as is: no component passed by hand
pipe.set_progress_bar_config(disable=True)
kwargs = dict(prompt=sys.argv[3:], height=64, width=64, num_inference_steps=4, guidance_scale=3.0)
latents = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent").images
images = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt").images
assert not [m for m in sys.modules if m == "diffrl" or m.startswith("diffrl.")], "diffrl was imported"
torch.save({"latents": latents, "images": images, "t5": type(pipe.text_encoder_3).__name__}, sys.argv[2])
"""


def test_toy_model_loads_in_plain_diffusers_and_makes_diffrls_images(tmp_path, sd3_dir):
    """The shipped toy directory loads with a bare ``StableDiffusion3Pipeline.from_pretrained(dir)`` in a process
    that never imports diffrl (its null T5 outputs the zeros the pipeline uses without T5), and that pipeline's
    latents and images equal diffrl's noise-free rollout of ``load_model("toy")``, which drops the null T5 again
    and attends to the collapsed context."""
    import subprocess
    import sys

    from diffrl.models.sd3 import is_null_t5
    from diffrl.toy.assets import toy_model_dir

    toy_dir = str(toy_model_dir())
    out = tmp_path / "plain.pt"
    prompts = ["a red circle", "two blue squares"]
    subprocess.run(
        [sys.executable, "-c", _PLAIN_TOY, toy_dir, str(out), *prompts],
        check=True,
        capture_output=True,
        text=True,
    )
    plain = torch.load(out)
    assert plain["t5"] == "T5EncoderModel"

    shipped = StableDiffusion3Pipeline.from_pretrained(toy_dir).text_encoder_3
    assert is_null_t5(shipped)
    assert not is_null_t5(
        StableDiffusion3Pipeline.from_pretrained(sd3_dir).text_encoder_3
    )  # a real, random T5

    # the null T5 changes nothing: the same pipeline told to run without T5 makes the same bits
    without = StableDiffusion3Pipeline.from_pretrained(toy_dir, text_encoder_3=None, tokenizer_3=None)
    without.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt=prompts, height=64, width=64, num_inference_steps=4, guidance_scale=3.0, output_type="latent"
    )
    assert torch.equal(without(**kwargs, generator=_gen(0)).images, plain["latents"])

    model = load_model("toy")
    assert model.pipe.text_encoder_3 is None and model.collapse_t5_padding
    noise = model.sample_noise(2, 64, 64, generator=_gen(0))
    got = rollout(model, model.encode(prompts), model.schedule(4, 64, 64), noise, guidance_scale=3.0)
    # the toy's latents reach |6.5|: float32 rounding of a different operation order, relative 1e-5
    torch.testing.assert_close(got.final, plain["latents"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(model.decode(got.final), plain["images"], rtol=1e-5, atol=5e-5)


def test_a_fully_fine_tuned_toy_model_saves_a_pipeline_plain_diffusers_loads(tmp_path):
    """After full fine-tuning, ``save_pretrained`` writes the toy model's null T5 back (``load_model`` dropped it), so
    the saved directory loads with a bare ``from_pretrained(dir)`` in a process without diffrl, as the shipped one
    does, and makes the fine-tuned model's images; the model in memory still runs without T5."""
    import subprocess
    import sys

    model = load_model("toy:cliptext")
    model.set_full_finetuning()
    with torch.no_grad():  # a changed model: every weight of the first block scaled
        for p in model.transformer.transformer_blocks[0].parameters():
            p.mul_(1.5)
    model.save_pretrained(tmp_path / "full")
    assert model.pipe.text_encoder_3 is None and model.collapse_t5_padding
    out = tmp_path / "plain.pt"
    prompts = ["a red circle", "two blue squares"]
    subprocess.run(
        [sys.executable, "-c", _PLAIN_TOY, str(tmp_path / "full"), str(out), *prompts],
        check=True,
        capture_output=True,
        text=True,
    )
    plain = torch.load(out)
    assert plain["t5"] == "T5EncoderModel"
    noise = model.sample_noise(2, 64, 64, generator=_gen(0))
    got = rollout(model, model.encode(prompts), model.schedule(4, 64, 64), noise, guidance_scale=3.0)
    torch.testing.assert_close(got.final, plain["latents"], rtol=1e-5, atol=1e-4)
    reloaded = load_model(tmp_path / "full")  # and diffrl drops the null T5 again
    assert reloaded.pipe.text_encoder_3 is None and reloaded.collapse_t5_padding
