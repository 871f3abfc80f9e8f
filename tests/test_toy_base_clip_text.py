"""benchmarks/toy_base_clip_text.py: the toy model rebuilt around the toy CLIP's text encoder starts as the shipped
model without its first (random) text encoder, and its first encoder is the toy CLIP's text tower."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
_spec = importlib.util.spec_from_file_location(
    "toy_base_clip_text", ROOT / "benchmarks" / "toy_base_clip_text.py"
)
tb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tb)

PROMPTS = ["a red circle to the left of a blue square", "a blue square to the left of a red circle"]


def test_text_encoder_is_the_toy_clips_text_tower():
    from transformers import CLIPModel, CLIPTokenizer

    from diffrl.toy.assets import toy_clip_dir

    enc = tb.toy_clip_text_encoder(str(toy_clip_dir()))
    clip = CLIPModel.from_pretrained(toy_clip_dir()).eval()
    ids = CLIPTokenizer.from_pretrained(toy_clip_dir())(PROMPTS, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        expected = clip.text_projection(clip.text_model(ids.input_ids).pooler_output)
        torch.testing.assert_close(enc(ids.input_ids).text_embeds, expected)
    assert not any(p.requires_grad for p in enc.parameters())


def test_widened_transformer_starts_as_the_shipped_one_without_its_first_encoder():
    from diffusers import StableDiffusion3Pipeline

    from diffrl.toy.assets import toy_clip_dir, toy_model_dir

    pipe = tb.build(str(toy_model_dir()), str(toy_clip_dir()))
    old = StableDiffusion3Pipeline.from_pretrained(toy_model_dir(), text_encoder_3=None, tokenizer_3=None)
    assert pipe.transformer.config.joint_attention_dim == 96 and pipe.text_encoder.config.hidden_size == 64
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    old_embeds, _, old_pooled, _ = old.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    # the kept second encoder fills the last 32 features in both layouts
    torch.testing.assert_close(embeds[:, :16, 64:], old_embeds[:, :16, 32:])
    torch.testing.assert_close(pooled[:, 64:], old_pooled[:, 32:])
    assert embeds[:, :16, :64].abs().sum() > 0 and not torch.equal(embeds[0, :16, :64], embeds[1, :16, :64])

    old_zeroed = old_embeds.clone()
    old_zeroed[..., :32] = 0  # the shipped model with its first encoder silenced
    old_pooled_zeroed = old_pooled.clone()
    old_pooled_zeroed[:, :32] = 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        new_out = pipe.transformer(x, embeds, pooled, t, return_dict=False)[0]
        old_out = old.transformer(x, old_zeroed, old_pooled_zeroed, t, return_dict=False)[0]
        torch.testing.assert_close(new_out, old_out, rtol=1e-5, atol=1e-5)
        # and the toy CLIP's features are what the new columns will learn from: zero columns at step 0
        assert pipe.transformer.context_embedder.weight[:, :64].abs().max() == 0


def test_the_shipped_clip_text_model_is_this_scripts_build():
    """``toy:cliptext`` (the demo's base) is a checkpoint of this build: the toy CLIP's text tower, the shipped
    model's second encoder and VAE unchanged, the widened transformer, loaded by name through ``load_model``."""
    from safetensors.torch import load_file

    from diffrl.models import load_model
    from diffrl.toy.assets import toy_clip_dir, toy_cliptext_model_dir, toy_model_dir

    shipped = toy_cliptext_model_dir()
    enc = tb.toy_clip_text_encoder(str(toy_clip_dir()))
    weights = load_file(shipped / "text_encoder" / "model.safetensors")
    expected = enc.state_dict()
    assert set(weights) <= set(expected) and len(weights) >= len(expected) - 1  # position_ids may be dropped
    for key, value in weights.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    for part in ("text_encoder_2/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (shipped / part).read_bytes() == (toy_model_dir() / part).read_bytes(), part
    model = load_model("toy:cliptext")
    assert model.pipe.transformer.config.joint_attention_dim == 96
    assert model.pipe.text_encoder.config.hidden_size == 64
    assert json.loads((shipped / "toy_model.json").read_text())["step"] == 5000
