"""``diffrl doctor``'s memory estimate for every family: the LoRA size and geometry come from the adapter classes
and the published-size rows, checked against the loaded tiny models and against hand-computed counts."""

from pathlib import Path

import pytest

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
