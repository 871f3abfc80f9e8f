"""``diffrl doctor``'s memory estimate for every family: the LoRA size and geometry come from the adapter classes
and the published-size rows, checked against the loaded tiny models and against hand-computed counts."""

import math
from pathlib import Path

import pytest
import torch

from diffrl.config import load_config
from diffrl.doctor import estimate_memory, memory
from diffrl.doctor.findings import GiB
from diffrl.models import ADAPTERS, load_model_from_config
from diffrl.models.loading import tiny_model_dir
from diffrl.trainers.engine import setup_training_mode

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "flow_grpo.yaml")
GROUP = ["flow_grpo.group_size=2", "flow_grpo.prompts_per_step=2"]


@pytest.mark.parametrize(
    "spec", ["tiny:sd3", "tiny:flux", "tiny:qwen_image", "tiny:qwen_image_edit", "tiny:qwen_image_edit_plus"]
)
def test_estimate_from_headers_matches_the_loaded_adapter(spec):
    """The LoRA the estimate counts from the safetensors headers (targets, exclusions from the adapter class) is
    exactly the one the trainer sets up; the adapter's size hooks agree with the loaded model."""
    cfg = load_config(TINY, [f"model.path={spec}"])
    est = estimate_memory(cfg, tiny_model_dir(spec))
    model = load_model_from_config(cfg.model, device="cpu")
    setup_training_mode(model, cfg)
    assert est.trainable_params == sum(p.numel() for p in model.trainable_parameters())
    cls = type(model)
    tcfg, vcfg = dict(model.transformer.config), dict(model.vae.config)
    assert cls.vae_geometry(vcfg)[0] == model.vae_scale_factor
    assert cls.vae_geometry(vcfg)[2] == model.latent_shape(64, 64)[0]
    assert sorted(cls.unused_lora_modules_in(tcfg)) == sorted(model._unused_lora_modules())
    # the shapes of a transformer built on the meta device from its config = its safetensors file's
    files = sorted((tiny_model_dir(spec) / "transformer").glob("*.safetensors"))
    headers, _ = memory._tensor_shapes(files)
    assert memory._transformer_on_meta({"_class_name": type(model.transformer).__name__, **tcfg}) == headers


def test_every_published_row_names_an_adapter_and_builds_on_meta():
    for path, row in memory._PUBLISHED.items():
        assert row.pipeline in ADAPTERS, path
        est = estimate_memory(load_config(TINY, [f"model.path={path}", *GROUP]))
        assert "published sizes" in est.source and est.trainable_params > 0


def test_published_lora_counts_equal_hand_counts():
    """LoRA parameters r (in + out) per adapted linear, counted by hand from the architectures."""

    def lora(path):
        return estimate_memory(load_config(TINY, [f"model.path={path}", "model.lora_rank=-1", *GROUP]))

    # SD3.5-M: 24 blocks x 8 attention projections (1536 x 1536), rank 32; the last, context-pre-only block has no
    # to_add_out and its add_q_proj is left out
    assert lora("stabilityai/stable-diffusion-3.5-medium").trainable_params == (24 * 8 - 2) * 32 * (2 * 1536)
    # FLUX.1-dev, rank 64, width 3072: 19 double blocks of 8 projections and 2 x 2 feed-forward linears
    # (3072 -> 12288 -> 3072: 5 width units each in r (in + out)), 38 single blocks of q, k, v (2 units each),
    # proj_mlp (3072 -> 12288: 5) and proj_out (15360 -> 3072: 6)
    double = 8 * 2 + 4 * 5
    single = 3 * 2 + 5 + 6
    assert lora("black-forest-labs/FLUX.1-dev").trainable_params == 64 * 3072 * (19 * double + 38 * single)
    # Qwen-Image: 60 blocks x 8 projections (3072 x 3072), rank 64, less the last block's add_q_proj and to_add_out
    qwen = lora("Qwen/Qwen-Image")
    assert qwen.trainable_params == (60 * 8 - 2) * 64 * (2 * 3072)
    # a 20B transformer (20.43B from its config) + Qwen2.5-VL-7B (8.29B) + the VAE (0.13B)
    assert 28.7e9 < qwen.params < 29.0e9


def test_qwen_image_activations_and_buffers_equal_the_formula():
    """The published Qwen-Image estimate term by term: 2x2 tokens of the 8x VAE, 512 text tokens, width 3072, 60
    blocks, true CFG doubling the batch under Flow-GRPO but not under DiffusionNFT."""
    common = [
        "model.path=Qwen/Qwen-Image",
        "model.dtype=bfloat16",
        "model.gradient_checkpointing=true",
        "sample.height=512",
        "sample.width=512",
        "sample.batch_size=4",
        "sample.num_steps=10",
        "optim.train_batch_size=1",
    ]
    grpo = estimate_memory(load_config(TINY, [*common, *GROUP, "sample.guidance_scale=4"]))
    tokens = (512 // 16) ** 2 + 512
    per_sample = tokens * 3072 * 2  # bf16 activations
    train = 2 * 1 * per_sample * (60 + 16)
    sample = 2 * 4 * per_sample * 16 + 4 * 512 * 512 * 96 * 2 * 3
    assert grpo.activations == max(train, sample)
    latent = 16 * 64 * 64 * 4
    # 2 prompts x 2 images: their embeddings and the negatives', and 11 trajectory levels each
    assert grpo.buffers == 4 * (512 * 3584 * 2 * 2 + 11 * latent)
    assert grpo.weights == grpo.params * 2
    nft = estimate_memory(
        load_config(
            str(ROOT / "configs" / "tiny" / "diffusion_nft.yaml"),
            [*common, "diffusion_nft.group_size=2", "diffusion_nft.prompts_per_step=2"],
        )
    )
    assert nft.activations == max(per_sample * (60 + 16), 4 * per_sample * 16 + 4 * 512 * 512 * 96 * 2 * 3)
    # Qwen-Image-Edit: the same weights; the source image's 64 x 64 latent tokens (1024 px) follow the noisy ones and
    # its 1337 vision tokens (1024 px in 28 px merged patches) the prompt's
    edit = estimate_memory(
        load_config(TINY, [*common, *GROUP, "sample.guidance_scale=4", "model.path=Qwen/Qwen-Image-Edit"])
    )
    assert edit.params == grpo.params and edit.trainable_params == grpo.trainable_params
    edit_tokens = 32 * 32 + 64 * 64 + 512 + 1337
    assert edit.activations == max(
        2 * edit_tokens * 3072 * 2 * 76, 8 * edit_tokens * 3072 * 2 * 16 + sample - 2 * 4 * per_sample * 16
    )


def test_launch_page_table_is_what_the_generator_renders_now():
    """docs/launch.md's "What fits on one GPU" table is the estimate's output now (regenerate it with
    ``python docs/gen_memory_table.py``), and a stale table is detected."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_memory_table", ROOT / "docs" / "gen_memory_table.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rendered = gen.render()
    text = (ROOT / "docs" / "launch.md").read_text()
    assert rendered in text, (
        "docs/launch.md's memory table is out of date; run python docs/gen_memory_table.py"
    )
    assert "| `Qwen/Qwen-Image` | LoRA |" in rendered
    stale = gen.replace_block(text, rendered.replace("bf16 (23)", "bf16 (22)"))
    assert stale != text and gen.replace_block(stale, rendered) == text


def test_every_real_preset_is_estimated_from_published_sizes():
    """The shipped presets of real checkpoints get an estimate without their weights; the Qwen-Image preset's
    LoRA is the reference's (12 linears a block, none left out when the targets are given) and its estimate over
    8 GPUs is what its header says (49 GiB, within 85% of an 80 GiB GPU)."""
    presets = sorted(p for p in (ROOT / "configs").glob("*.yaml"))
    assert any(p.name.startswith("qwen_image_") for p in presets)
    for path in presets:
        est = estimate_memory(load_config(path), cuda=True, num_processes=8)
        assert "published sizes" in est.source and est.total > 0, path
    qwen = estimate_memory(
        load_config(ROOT / "configs" / "qwen_image_flow_grpo_pickscore.yaml"), cuda=True, num_processes=8
    )
    # per block: 8 attention projections (2 width units each) + 2 MLPs per stream (3072 -> 12288 -> 3072: 5 + 5)
    assert qwen.trainable_params == 60 * (8 * 2 + 2 * (5 + 5)) * 3072 * 64
    assert round(qwen.total / GiB) == 49 and qwen.total < 0.85 * 80 * GiB


@pytest.mark.parametrize("spec", ["tiny:z_image", "tiny:flux2", "tiny:flux2_klein", "tiny:wan", "tiny:wan22"])
def test_newer_families_estimate_from_headers_match_the_loaded_adapter(spec):
    """Z-Image, FLUX.2 and Wan through the same adapter hooks: the counted LoRA is the trainer's (for Wan 2.2, the
    trained expert's only), every component's weights are counted (both Wan 2.2 experts stay in memory), and the
    hooks' latent geometry is the loaded model's."""
    import math

    expert = ["model.expert=low"] if spec == "tiny:wan22" else []  # Wan 2.2 trains one expert a run
    cfg = load_config(TINY, [f"model.path={spec}", *expert])
    est = estimate_memory(cfg, tiny_model_dir(spec))
    model = load_model_from_config(cfg.model, device="cpu")
    setup_training_mode(model, cfg)
    assert est.trainable_params == sum(p.numel() for p in model.trainable_parameters())

    def weights(module):  # parameters (tied ones once) and saved buffers (FLUX.2's VAE batch-norm statistics)
        saved = set(module.state_dict())
        tensors = [*module.named_parameters(), *((n, b) for n, b in module.named_buffers() if n in saved)]
        return sum(t.numel() for n, t in tensors if "lora_" not in n)  # LoRA tensors are not pipeline weights

    held = sum(weights(c) for c in model.pipe.components.values() if isinstance(c, torch.nn.Module))
    assert est.params == held
    if spec == "tiny:wan22":  # the frozen low-noise expert is held besides the trained one
        wan21 = estimate_memory(load_config(TINY, ["model.path=tiny:wan"]), tiny_model_dir("tiny:wan"))
        assert est.params == wan21.params + weights(model.pipe.transformer_2)
    cls = type(model)
    tcfg, vcfg = dict(model.transformer.config), dict(model.vae.config)
    f, _, c_lat = cls.vae_geometry(vcfg)
    frames, _ = cls.memory_frames(cfg.sample.num_frames, vcfg)
    assert f == model.vae_scale_factor
    # the stored latent the estimate sizes is the model's latent
    assert math.prod(model.latent_shape(64, 64)) == c_lat * frames * (64 // f) ** 2
    assert sorted(cls.unused_lora_modules_in(tcfg)) == sorted(model._unused_lora_modules())
    files = sorted((tiny_model_dir(spec) / "transformer").glob("*.safetensors"))
    headers, _ = memory._tensor_shapes(files)
    assert memory._transformer_on_meta({"_class_name": type(model.transformer).__name__, **tcfg}) == headers


def test_newer_published_lora_counts_and_sizes_equal_hand_counts():
    """LoRA parameters r (in + out) per adapted linear, counted by hand from the published architectures."""

    def est(path):
        return estimate_memory(load_config(TINY, [f"model.path={path}", "model.lora_rank=-1", *GROUP]))

    # Z-Image-Turbo, rank 32: 30 layers + 2 noise- + 2 context-refiner layers, each 4 attention projections
    # (3840 x 3840: 2 width units) and the SwiGLU w1, w3 (3840 -> 10240) and w2 (10240 -> 3840)
    z = est("Tongyi-MAI/Z-Image-Turbo")
    assert z.trainable_params == 32 * 34 * (4 * 2 * 3840 + 3 * (3840 + 10240))
    assert 10.2e9 < z.params < 10.3e9  # 6.15B + Qwen3-4B 4.02B + VAE 0.08B
    # FLUX.2 [dev], rank 64, width 6144: 8 double blocks of 8 projections (2 units) and, per stream, linear_in
    # (6144 -> 2 x 18432 SwiGLU: 7 units) and linear_out (18432 -> 6144: 4); 48 single blocks of the fused
    # to_qkv_mlp_proj (6144 -> 3 x 6144 + 2 x 18432: 10 units) and to_out (6144 + 18432 -> 6144: 5)
    dev = est("black-forest-labs/FLUX.2-dev")
    assert dev.trainable_params == 64 * 6144 * (8 * (8 * 2 + 2 * (7 + 4)) + 48 * (10 + 5))
    assert 56.2e9 < dev.params < 56.4e9  # 32.2B + Mistral-Small 24B + VAE
    # FLUX.2 [klein] 4B: the same per-block counts at width 3072, 5 double and 20 single blocks
    klein = est("black-forest-labs/FLUX.2-klein-4B")
    assert klein.trainable_params == 64 * 3072 * (5 * 38 + 20 * 15)
    # Wan, rank 32: q, k, v, out of the self- and the cross-attention of every block (width x width)
    assert est("Wan-AI/Wan2.1-T2V-1.3B-Diffusers").trainable_params == 32 * 30 * 8 * 2 * 1536
    w14 = est("Wan-AI/Wan2.1-T2V-14B-Diffusers")
    assert w14.trainable_params == 32 * 40 * 8 * 2 * 5120
    # Wan 2.2 A14B: the same LoRA on one expert; the other 14B expert is held frozen (+ 14.29B weights)
    w22 = est("Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    assert w22.trainable_params == w14.trainable_params
    assert 14.28e9 < w22.params - w14.params < 14.30e9


def test_wan_video_and_z_image_activations_equal_the_formula():
    """Wan 2.1 14B at 81 frames of 480 x 832 term by term: 21 latent frames of 60 x 104 latents in 2 x 2 patches,
    512 UMT5 tokens, width 5120, 40 blocks, CFG doubling the batch, the VAE decoding 4 frames at a time; Z-Image's
    tokens and blocks (its 2 refiner layers counted once) at 512 px."""
    common = [
        "model.dtype=bfloat16",
        "model.gradient_checkpointing=true",
        "sample.batch_size=1",
        "sample.num_steps=10",
        "sample.guidance_scale=5",
        "optim.train_batch_size=1",
        *GROUP,
    ]
    wan = [*common, "model.path=Wan-AI/Wan2.1-T2V-14B-Diffusers", "sample.height=480", "sample.width=832"]
    e = estimate_memory(load_config(TINY, [*wan, "sample.num_frames=81"]))
    tokens = 21 * 30 * 52 + 512
    per_sample = tokens * 5120 * 2
    train = 2 * per_sample * (40 + 16)
    sample = 2 * per_sample * 16 + 4 * 480 * 832 * 96 * 2 * 3
    assert e.activations == max(train, sample) == train
    latent = 16 * 21 * 60 * 104 * 4
    # 2 prompts x 2 videos: 512 x 4096 embeddings and the negatives', and 11 trajectory levels each
    assert e.buffers == 4 * (512 * 4096 * 2 * 2 + 11 * latent)
    # sample.num_frames=0 is the model's default (81); 17 frames: 5 latent frames
    assert estimate_memory(load_config(TINY, wan)).activations == e.activations
    short = estimate_memory(load_config(TINY, [*wan, "sample.num_frames=17"]))
    assert short.activations == 2 * (5 * 30 * 52 + 512) * 5120 * 2 * 56
    z = estimate_memory(
        load_config(
            TINY, [*common, "model.path=Tongyi-MAI/Z-Image-Turbo", "sample.height=512", "sample.width=512"]
        )
    )
    z_tokens = (512 // 16) ** 2 + 512
    assert z.activations == 2 * z_tokens * 3840 * 2 * (32 + 16)
    assert z.buffers == 4 * (512 * 2560 * 2 * 2 + 11 * 16 * 64 * 64 * 4)
    # FLUX.2 [dev]: 32-channel latents of the 8x VAE in 2 x 2 patches, 512 padded Mistral tokens (three 5120-wide
    # hidden states: 15360), width 6144, 8 + 48 blocks; guidance is an embedding, so no CFG copy
    dev = [*common, "model.path=black-forest-labs/FLUX.2-dev", "sample.height=512", "sample.width=512"]
    d = estimate_memory(load_config(TINY, dev))
    assert d.train_activations == ((512 // 16) ** 2 + 512) * 6144 * 2 * (56 + 16)
    assert d.buffers == 4 * (512 * 15360 * 2 + 11 * 32 * 64 * 64 * 4)


def _bench_memory():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "benchmarks" / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_memory_refuses_without_cuda(monkeypatch, capsys):
    """benchmarks/bench_memory.py measures on a CUDA GPU only: without one it says so and measures nothing."""
    bench = _bench_memory()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "measure", lambda args: pytest.fail("measured without a GPU"))
    assert bench.main(["--model", "Qwen/Qwen-Image", "--height", "512", "--width", "512"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "someone/unknown"], "is not a published row"),
        (["--families", "sd35m,flux3"], "unknown family flux3"),
        (["--families", ","], "unknown family (none given)"),
        (["--model", "Qwen/Qwen-Image", "--families", "all"], "not both"),
        (["--height", "500"], "--height 500 must be a positive multiple of 16"),
        (["--families", "wan21_1.3b", "--width", "0"], "--width 0 must be a positive multiple of 16"),
        (["--frames", "16"], "--frames 16 must be 4k + 1"),
        (["--batch", "0"], "--batch 0 must be a positive number"),
    ],
)
def test_bench_memory_argument_errors(argv, message, capsys):
    bench = _bench_memory()
    with pytest.raises(SystemExit) as err:
        bench.parse_args(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_bench_memory_families_and_sizes():
    """--families picks published rows in order (``all``: every family once); images default to 512 px, videos to
    17 frames of 480 x 832, and the estimate is of that size: Wan 2.1 1.3B's (5 x 30 x 52 video + 512 text tokens) x
    width 1536 x 2 bytes x (30 blocks + 16)."""
    bench = _bench_memory()
    args = bench.parse_args(["--families", "all"])
    assert args.models == list(bench.FAMILIES.values()) and len(set(args.models)) == 9
    assert all(m in memory._PUBLISHED for m in args.models)
    assert bench.parse_args(["--families", "qwen_image,sd35m,qwen_image"]).models == [
        "Qwen/Qwen-Image",
        "stabilityai/stable-diffusion-3.5-medium",
    ]
    assert bench.parse_args([]).models == ["stabilityai/stable-diffusion-3.5-medium"]
    assert bench.workload("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", args) == (480, 832, 17)
    assert bench.workload("black-forest-labs/FLUX.2-dev", args) == (512, 512, 1)
    est = bench.estimate(args, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert est.train_activations == (5 * 30 * 52 + 512) * 1536 * 2 * (30 + 16)


@pytest.mark.parametrize(
    "family", ["sd35m", "flux1", "qwen_image", "z_image", "flux2_dev", "flux2_klein", "wan21_14b"]
)
def test_bench_memory_inputs_run_a_shrunk_transformer_on_the_cpu(family):
    """The GPU run's code on the CPU, at a one-block, one-head copy of each family's published transformer config:
    the inputs it builds go through the real diffusers class, the family's default LoRA gets a gradient in every
    tensor, and the estimate of the full-size row has all its terms (Wan 2.2 A14B shares Wan 2.1 14B's config)."""
    bench = _bench_memory()
    model_id = bench.FAMILIES[family]
    row = memory._PUBLISHED[model_id]
    adapter = ADAPTERS[row.pipeline]
    small = bench.shrink(row.transformer)
    model, trainable = bench.build(row, adapter, small, "cpu")
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    # frozen weights and floating buffers in bf16, as a bf16 checkpoint loads them (SD3's position table is
    # registered in float32 by diffusers; built at full size in float32 it once read 0.85 GiB over the estimate)
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    assert all(t.dtype == torch.bfloat16 for t in frozen if t.is_floating_point())
    video = getattr(adapter, "is_video", False)
    x = bench.inputs(row, adapter, small, (32, 48, 5 if video else 1), 2, "cpu")
    out = bench.train_pass(model, x, "cpu")
    given = x["hidden_states"] if "hidden_states" in x else torch.stack(x["x"])
    assert out.shape == given.shape  # a velocity per latent value
    # the LoRA starts as a no-op (B = 0): every B gets a gradient, and through it the whole adapter trains
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = dict(zip(names, (p.grad for p in trainable), strict=True))
    assert all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    est = bench.estimate(bench.parse_args(["--families", family]))
    assert est.trainable_params > 0 and est.train_activations > 0 and est.trained == est.trainable_params * 16


def test_bench_memory_compares_with_the_training_pass_term():
    """The estimate the benchmark compares with is one training pass without a CFG copy: for SD3.5-M at 512 px,
    (32 x 32 + 333) tokens x width 1536 x 2 bytes x (24 blocks + 16) with checkpointing."""
    bench = _bench_memory()
    est = bench.estimate(
        bench.parse_args(["--model", "stabilityai/stable-diffusion-3.5-medium", "--batch", "1"])
    )
    assert est.train_activations == (32 * 32 + 333) * 1536 * 2 * (24 + 16)
    assert est.trained == est.trainable_params * 16  # float32 LoRA, grads, AdamW m and v


def test_offloaded_text_encoders_leave_the_weights_and_the_peak_is_the_larger_moment():
    """``model.offload_text_encoders``: the text encoders leave ``weights`` and come back only for the encoding
    moment, so the peak is the resident terms plus the larger of the activations and the text encoders. Hand counts
    at bf16: FLUX.2 [dev]'s 24.0B Mistral encoder (48 GB) outweighs a 512 px training pass with checkpointing; Z-Image's
    4.022B Qwen3-4B (8 GB) does not outweigh an 8-sample pass without checkpointing."""

    def pair(path, *extra):
        args = [f"model.path={path}", "model.dtype=bfloat16", "mixed_precision=bf16", *GROUP, *extra]
        on = estimate_memory(load_config(TINY, args))
        off = estimate_memory(load_config(TINY, [*args, "model.offload_text_encoders=true"]))
        return on, off

    def resident(e):
        return e.weights + e.trained + e.buffers + e.rewards + e.overhead

    on, off = pair(
        "black-forest-labs/FLUX.2-dev",
        "model.gradient_checkpointing=true",
        "sample.height=512",
        "sample.width=512",
    )
    assert on.text_encoders == 0 and on.total == resident(on) + on.activations
    assert off.text_encoders == pytest.approx(2 * 24.0e9, abs=4)
    assert on.weights - off.weights == off.text_encoders
    assert (off.trained, off.buffers, off.activations) == (on.trained, on.buffers, on.activations)
    # (32 x 32 image + 512 text tokens) x width 6144 x 2 bytes x (56 blocks + 16), four samples a pass (the preset)
    assert off.activations == 4 * (32 * 32 + 512) * 6144 * 2 * (56 + 16) < off.text_encoders
    # the encoding moment is the peak: offloading saves only the activations' size
    assert off.total == resident(off) + off.text_encoders == on.total - on.activations
    assert any("larger of the encoding moment" in n for n in off.notes)

    on, off = pair(
        "Tongyi-MAI/Z-Image-Turbo", "optim.train_batch_size=8", "sample.height=1024", "sample.width=1024"
    )
    assert off.text_encoders == pytest.approx(2 * 4.022e9, abs=4) and off.text_encoders < off.activations
    assert off.total == resident(off) + off.activations == on.total - off.text_encoders  # saves all 8 GB


def test_offloaded_text_encoders_counted_from_headers_as_the_adapter_moves_them():
    """From a pipeline directory: the bytes taken out are those of the components the adapter offloads
    (``FlowModel.text_encoders()``), counted from the safetensors headers."""
    spec = "tiny:flux2_klein"
    cfg = load_config(TINY, [f"model.path={spec}", "model.offload_text_encoders=true"])
    est = estimate_memory(cfg, tiny_model_dir(spec))
    model = load_model_from_config(cfg.model, device="cpu")
    moved = sum(p.numel() for m in model.text_encoders() for p in m.parameters())
    assert moved > 0 and est.text_encoders == moved * 4  # float32
    plain = estimate_memory(load_config(TINY, [f"model.path={spec}"]), tiny_model_dir(spec))
    assert plain.weights - est.weights == est.text_encoders


def test_every_published_row_splits_its_vae_from_its_text_encoders():
    # every VAE (with Wan 2.1 I2V's CLIP image encoder, which stays on the device too) is 0.05-1B parameters (Wan
    # 2.2's 48-channel one 0.70B), every text encoder stack above 1B
    for path, row in memory._PUBLISHED.items():
        assert 0.05e9 < row.vae_params < 1e9 < row.text_encoder_params, path


def test_doctor_says_the_peak_is_the_larger_moment_when_offloading():
    cfg = load_config(
        TINY, ["model.path=black-forest-labs/FLUX.2-dev", "model.offload_text_encoders=true", *GROUP]
    )
    finding = memory.check_memory(cfg, None, 0, [], "cpu")
    assert "less the offloaded text encoders" in finding.message
    assert "max(activations" in finding.message and "text encoders while encoding" in finding.message
    assert "larger of the encoding moment" in finding.message


def test_conditioning_images_of_the_training_rows_add_their_tokens(tmp_path):
    """FLUX.2 reference images and Qwen-Image-Edit-2509 source images: each adds ``condition_tokens`` (a square
    image at ``model.condition_image_size``, 16 pixels a token) to every pass, as many as the most a row of
    ``data.train`` has; text-to-image rows add none; an unreadable prompt file falls back to the adapter's
    default (FLUX.2: none, Qwen-Image-Edit: one) and says so."""
    import json

    rows = [{"prompt": "a", "image": ["x.png", "y.png"]}, {"prompt": "b", "image": "z.png"}, {"prompt": "c"}]
    two = tmp_path / "two.jsonl"
    two.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    none = tmp_path / "none.jsonl"
    none.write_text(json.dumps({"prompt": "a"}) + "\n")
    common = [
        "model.dtype=bfloat16",
        "sample.height=512",
        "sample.width=512",
        "sample.batch_size=4",
        "optim.train_batch_size=1",
        "model.condition_image_size=384",
        *GROUP,
    ]

    def est(path, train):
        return estimate_memory(load_config(TINY, [*common, f"model.path={path}", f"data.train={train}"]))

    plain, refs = est("black-forest-labs/FLUX.2-dev", none), est("black-forest-labs/FLUX.2-dev", two)
    width, blocks = 6144, 8 + 48  # FLUX.2 [dev]: 48 heads x 128, 8 double + 48 single blocks
    extra = 2 * (384 // 16) ** 2  # two reference images of 24 x 24 tokens
    assert refs.sample_activations - plain.sample_activations == 4 * extra * width * 2 * 16
    assert refs.train_activations - plain.train_activations == extra * width * 2 * 16 * blocks
    assert "2 conditioning image(s) a row (the most in data.train) x 576 tokens" in " ".join(refs.notes)
    assert "0 conditioning image(s) a row (the most in data.train)" in " ".join(plain.notes)
    missing = est("black-forest-labs/FLUX.2-dev", tmp_path / "absent.jsonl")
    assert missing.sample_activations == plain.sample_activations
    assert "assumed (data.train not read" in " ".join(missing.notes)
    # Qwen-Image-Edit-2509: at least its one source image even where the rows name none, two where a row has two
    edit_none = est("Qwen/Qwen-Image-Edit-2509", none)
    edit_two = est("Qwen/Qwen-Image-Edit-2509", two)
    # one more image of 24 x 24 tokens, in both passes of true CFG (the tiny preset samples with guidance 4.5)
    assert load_config(TINY).sample.guidance_scale > 1
    assert (
        edit_two.train_activations - edit_none.train_activations == 2 * (384 // 16) ** 2 * 3072 * 2 * 16 * 60
    )


def test_bench_memory_weights_term_counts_persistent_buffers_like_the_doctor():
    """The weights the benchmark compares with are the checkpoint's tensors, as ``diffrl doctor`` counts them from
    the safetensors headers: SD3.5-M's parameters plus its persistent 384 x 384 x 1536 position table."""
    import diffusers

    row = memory._PUBLISHED["stabilityai/stable-diffusion-3.5-medium"]
    config = {k: v for k, v in row.transformer.items() if k != "_class_name"}
    with torch.device("meta"):
        model = diffusers.SD3Transformer2DModel.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    n_state = sum(math.prod(s) for s in memory._transformer_on_meta(row.transformer).values())
    assert n_state - n_params == 384 * 384 * 1536
