"""ImageReward: contract and gradients on a tiny original-format checkpoint, key conversion at full size (meta
tensors), an independent step-by-step forward from the original key names, preprocessing parity with the
reference's PIL transform, offline failure, hub files, and (with the real weights) the README's published scores."""

from __future__ import annotations

import math
import time
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from reward_contract import check_reward_contract, finite_difference_check, make_images

from diffrl.rewards import WeightsNotFoundError, load_reward
from diffrl.rewards.imagereward import (
    DROPPED_KEYS,
    DROPPED_PREFIXES,
    MAX_LENGTH,
    SCORE_MEAN,
    SCORE_STD,
    ImageReward,
    build_score_mlp,
    convert_imagereward_state_dict,
    text_config_from_med_config,
    vision_config_from_state_dict,
)
from diffrl.rewards.tiny.blip import REAL_MED_CONFIG, build_tiny_imagereward, imagereward_original_shapes
from diffrl.rewards.weights import HubFile

PROMPTS = [
    "a photo of a cat",
    "a red dog in the city at night",
    "a painting of an ocean with clouds and birds, day time, low depth field effect",
    "portrait",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_imagereward(tmp_path_factory.mktemp("imagereward"), seed=0)


def _tiny_reward(tiny_dir, **kwargs):
    return ImageReward(
        checkpoint=tiny_dir / "ImageReward.pt",
        med_config=tiny_dir / "med_config.json",
        tokenizer=tiny_dir / "tokenizer",
        **kwargs,
    )


@pytest.fixture(scope="module")
def tiny_reward(tiny_dir):
    return _tiny_reward(tiny_dir).load("cpu")


# ---------------------------------------------------------------------------------------------- contract


def test_contract(tiny_reward):
    scores = check_reward_contract(tiny_reward, make_images(4, 64), PROMPTS)
    assert scores.std() > 1e-3  # the scores depend on the image and prompt
    assert tiny_reward.differentiable and tiny_reward.name == "imagereward"


def test_finite_differences(tiny_reward):
    # small images and eps=1e-2: float32 noise of the scores (~1e-6) stays far below the directional derivatives;
    # pixel values kept inside (0, 1) so the resize's PIL-like clamp to [0, 1] is not active at the probe points
    finite_difference_check(tiny_reward, 0.2 + 0.6 * make_images(2, 32, seed=1), PROMPTS[:2], eps=1e-2)


def test_load_by_name_and_local_dir(tiny_dir):
    reward = load_reward("imagereward", checkpoint=tiny_dir, tokenizer=tiny_dir / "tokenizer")
    assert isinstance(reward, ImageReward)
    images = make_images(2, 48)
    direct = _tiny_reward(tiny_dir)(images, PROMPTS[:2])
    torch.testing.assert_close(
        reward(images, PROMPTS[:2]), direct, rtol=0, atol=0
    )  # med_config.json found next to it


# ---------------------------------------------------------------------------------------------- key conversion


def _meta_state_dict(**sizes):
    shapes = imagereward_original_shapes(**sizes)
    return {
        k: torch.empty(s, device="meta", dtype=torch.int64 if k.endswith("position_ids") else torch.float32)
        for k, s in shapes.items()
    }


def test_full_size_conversion_loads_strict():
    from transformers import BlipTextModel, BlipVisionModel

    original = _meta_state_dict()  # ImageReward v1.0: ViT-L/16 at 224, BERT-base, names and shapes only
    n_params = sum(t.numel() for k, t in original.items() if not k.endswith("position_ids"))
    assert (
        abs(n_params * 4 - 1786880927) < 1e6
    )  # the size of THUDM/ImageReward's ImageReward.pt (fp32 + pickle)
    vision_sd, text_sd, mlp_sd = convert_imagereward_state_dict(original)
    dropped = [k for k in original if k in DROPPED_KEYS or k.startswith(DROPPED_PREFIXES)]
    assert sorted(dropped) == sorted(
        [
            "blip.text_encoder.embeddings.position_ids",
            "blip.vision_proj.weight",
            "blip.vision_proj.bias",
            "blip.text_proj.weight",
            "blip.text_proj.bias",
        ]
    )
    assert len(vision_sd) + len(text_sd) + len(mlp_sd) + len(dropped) == len(original)

    vcfg = vision_config_from_state_dict(vision_sd)
    assert (vcfg.hidden_size, vcfg.num_hidden_layers, vcfg.num_attention_heads) == (1024, 24, 16)
    assert (vcfg.image_size, vcfg.patch_size, vcfg.intermediate_size, vcfg.layer_norm_eps) == (
        224,
        16,
        4096,
        1e-6,
    )
    tcfg = text_config_from_med_config(REAL_MED_CONFIG, vcfg.hidden_size)
    assert (tcfg.hidden_size, tcfg.num_hidden_layers, tcfg.encoder_hidden_size, tcfg.vocab_size) == (
        768,
        12,
        1024,
        30524,
    )
    with torch.device("meta"):
        vision = BlipVisionModel(vcfg)
        text = BlipTextModel(tcfg, add_pooling_layer=False)
    for module, sd in ((vision, vision_sd), (text, text_sd), (build_score_mlp(mlp_sd), mlp_sd)):
        result = module.load_state_dict(sd, strict=True, assign=True)
        assert not result.missing_keys and not result.unexpected_keys
        assert set(module.state_dict()) == set(sd)
    assert text.encoder.layer[0].crossattention.self.key.weight.shape == (768, 1024)


@pytest.mark.parametrize(
    "bad_key",
    [
        "blip.something_new.weight",
        "blip.text_encoder.pooler.dense.weight",
        "blip.visual_encoder.head.weight",
        "mlp.layers.1.weight",
        "module.mlp.layers.0.weight",
    ],
)
def test_unknown_key_raises(bad_key):
    original = _meta_state_dict(
        vision_width=64, vision_depth=1, text_hidden=32, text_layers=1, text_intermediate=64
    )
    original[bad_key] = torch.empty(2, device="meta")
    with pytest.raises(KeyError, match=bad_key.replace(".", r"\.")):
        convert_imagereward_state_dict(original)


def test_missing_key_raises_on_load(tiny_dir, tmp_path):
    state = torch.load(tiny_dir / "ImageReward.pt", weights_only=True)
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.value.bias"]
    torch.save(state, tmp_path / "ImageReward.pt")
    reward = ImageReward(
        checkpoint=tmp_path / "ImageReward.pt",
        med_config=tiny_dir / "med_config.json",
        tokenizer=tiny_dir / "tokenizer",
    )
    with pytest.raises(ValueError, match="crossattention.self.value.bias"):
        reward.load("cpu")


# ---------------------------------------------------------------------------------------------- independent forward


def _reference_score(sd, med, pixel_values, input_ids, attention_mask, vision_heads):
    """ImageReward's forward written out from the original key names (vit.py, med.py, ImageReward.py)."""
    b = pixel_values.shape[0]
    p = "blip.visual_encoder."
    w = sd[p + "patch_embed.proj.weight"]
    width, patch = w.shape[0], w.shape[-1]
    x = F.conv2d(pixel_values, w, sd[p + "patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(b, -1, -1), x], dim=1)
    x = x + sd[p + "pos_embed"][:, : x.shape[1]]
    n, hd = x.shape[1], width // vision_heads
    depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(p + "blocks."))
    for i in range(depth):
        q = f"{p}blocks.{i}."
        h = F.layer_norm(x, (width,), sd[q + "norm1.weight"], sd[q + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[q + "attn.qkv.weight"], sd[q + "attn.qkv.bias"])
        qkv = qkv.reshape(b, n, 3, vision_heads, hd).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * hd**-0.5).softmax(-1)
        h = (attn @ qkv[2]).transpose(1, 2).reshape(b, n, width)
        x = x + F.linear(h, sd[q + "attn.proj.weight"], sd[q + "attn.proj.bias"])
        h = F.layer_norm(x, (width,), sd[q + "norm2.weight"], sd[q + "norm2.bias"], eps=1e-6)
        h = F.linear(
            F.gelu(F.linear(h, sd[q + "mlp.fc1.weight"], sd[q + "mlp.fc1.bias"])), sd[q + "mlp.fc2.weight"]
        )
        x = x + h + sd[q + "mlp.fc2.bias"]
    image_embeds = F.layer_norm(x, (width,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-6)

    t = "blip.text_encoder."
    hidden, heads, eps = med["hidden_size"], med["num_attention_heads"], med["layer_norm_eps"]
    thd = hidden // heads

    def ln(v, name):
        return F.layer_norm(v, (hidden,), sd[name + ".weight"], sd[name + ".bias"], eps=eps)

    def lin(v, name):
        return F.linear(v, sd[name + ".weight"], sd[name + ".bias"])

    def attention(h, ctx, prefix, mask):
        def split(v):
            return v.reshape(v.shape[0], v.shape[1], heads, thd).transpose(1, 2)

        scores = split(lin(h, prefix + ".self.query")) @ split(lin(ctx, prefix + ".self.key")).transpose(
            -1, -2
        )
        scores = scores / math.sqrt(thd)
        if mask is not None:
            scores = scores + mask
        out = (scores.softmax(-1) @ split(lin(ctx, prefix + ".self.value"))).transpose(1, 2).reshape(h.shape)
        return ln(lin(out, prefix + ".output.dense") + h, prefix + ".output.LayerNorm")

    length = input_ids.shape[1]
    h = (
        sd[t + "embeddings.word_embeddings.weight"][input_ids]
        + sd[t + "embeddings.position_embeddings.weight"][:length]
    )
    h = ln(h, t + "embeddings.LayerNorm")
    ext = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    for i in range(med["num_hidden_layers"]):
        q = f"{t}encoder.layer.{i}."
        h = attention(h, h, q + "attention", ext)
        h = attention(h, image_embeds, q + "crossattention", None)  # image_atts are all ones
        h = ln(lin(F.gelu(lin(h, q + "intermediate.dense")), q + "output.dense") + h, q + "output.LayerNorm")
    z = h[:, 0, :]
    for index in (0, 2, 4, 6, 7):
        z = lin(z, f"mlp.layers.{index}")
    return ((z - SCORE_MEAN) / SCORE_STD)[:, 0]


def test_score_matches_step_by_step_forward(tiny_dir, tiny_reward):
    import json

    sd = torch.load(tiny_dir / "ImageReward.pt", weights_only=True)
    med = json.loads((tiny_dir / "med_config.json").read_text())
    images = make_images(4, 64, seed=3)
    pixel_values = tiny_reward.preprocess(images)
    input_ids, attention_mask = tiny_reward.tokenize(PROMPTS)
    expected = _reference_score(sd, med, pixel_values, input_ids, attention_mask, vision_heads=2)
    with torch.no_grad():
        got = tiny_reward(images, PROMPTS)
        got_pixels = tiny_reward.score_pixel_values(pixel_values, PROMPTS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_pixels, got, rtol=0, atol=0)
    assert expected.std() > 1e-2


def test_tokenization_matches_reference(tiny_reward):
    tok = tiny_reward.tokenizer
    input_ids, attention_mask = tiny_reward.tokenize(PROMPTS + ["word " * 60])
    assert input_ids.shape == (5, MAX_LENGTH) and attention_mask.shape == (5, MAX_LENGTH)
    # the reference scores with the tokenizer's ids as they are: [CLS] first, not replaced by [ENC]
    assert (input_ids[:, 0] == tok.cls_token_id).all()
    vocab = len(tok.get_vocab())
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [vocab - 2, vocab - 1]  # 30522, 30523 for BERT
    assert tok.bos_token == "[DEC]"
    assert attention_mask[-1].all()  # truncated to 35
    ids = input_ids[0][attention_mask[0].bool()].tolist()
    assert ids == tok("a photo of a cat")["input_ids"] and ids[-1] == tok.sep_token_id


def test_dtype_bfloat16_runs(tiny_dir, tiny_reward):
    reward = _tiny_reward(tiny_dir, dtype=torch.bfloat16)
    images = make_images(2, 64)
    scores = reward(images, PROMPTS[:2])
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, tiny_reward(images, PROMPTS[:2]), rtol=0.1, atol=0.1)


# ---------------------------------------------------------------------------------------------- preprocessing


def _pil_reference_transform():
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose(
        [
            Resize(224, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(224),
            lambda image: image.convert("RGB"),
            ToTensor(),
            Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )


# Within about one 8-bit step of PIL's output after normalisation (1 / 255 / 0.27 = 0.0146; measured max 0.0156,
# for upscaling 64 px): the torch resize runs PIL's two separable passes, each clipped to [0, 1], on floats
# instead of 8-bit values.
@pytest.mark.parametrize(
    "shape, max_tol",
    [
        ((224, 224), 1e-6),
        ((512, 512), 0.02),
        ((512, 768), 0.02),
        ((480, 640), 0.02),  # longer side 298.67 px: truncated to 298 as torchvision does, not rounded
        ((1024, 1024), 0.02),
        ((300, 200), 0.02),
        ((64, 64), 0.02),
    ],
)
def test_preprocessing_matches_pil_reference(shape, max_tol):
    reference = _pil_reference_transform()
    h, w = shape
    for seed in range(3):
        images = F.interpolate(
            make_images(2, 64, seed=seed), size=(h, w), mode="bilinear", align_corners=False
        )
        u8 = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        ours = ImageReward().preprocess(u8.float() / 255)  # nothing is loaded for preprocessing
        ref = torch.stack([reference(Image.fromarray(a.permute(1, 2, 0).numpy())) for a in u8])
        assert ours.shape == ref.shape == (2, 3, 224, 224)
        diff = (ours - ref).abs()
        assert diff.max() < max_tol and diff.mean() < 0.006, (diff.max().item(), diff.mean().item())


# ---------------------------------------------------------------------------------------------- files


def test_weights_absent_offline_fail_fast(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    reward = ImageReward()
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        reward(make_images(1, 32), ["a cat"])
    assert time.perf_counter() - start < 10
    message = str(info.value)
    for name in (
        "THUDM/ImageReward/ImageReward.pt",
        "THUDM/ImageReward/med_config.json",
        "bert-base-uncased/vocab.txt",
        "bert-base-uncased/tokenizer_config.json",
        "diffrl download imagereward",
    ):
        assert name in message, (name, message)


def test_local_checkpoint_without_med_config_needs_hub_med_config(tiny_dir, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    lone = tmp_path / "ckpt" / "ImageReward.pt"
    lone.parent.mkdir()
    shutil.copy(tiny_dir / "ImageReward.pt", lone)
    reward = ImageReward(checkpoint=lone, tokenizer=tiny_dir / "tokenizer")
    with pytest.raises(WeightsNotFoundError) as info:
        reward.load("cpu")
    message = str(info.value)
    assert "needs THUDM/ImageReward/med_config.json," in message and "ImageReward.pt" not in message
    shutil.copy(tiny_dir / "med_config.json", lone.parent / "med_config.json")  # found next to the checkpoint
    ImageReward(checkpoint=lone, tokenizer=tiny_dir / "tokenizer").load("cpu")


def test_hub_files(tiny_dir, tmp_path):
    default = [
        HubFile("THUDM/ImageReward", "ImageReward.pt"),
        HubFile("THUDM/ImageReward", "med_config.json"),
        HubFile("bert-base-uncased", "tokenizer_config.json"),
        HubFile("bert-base-uncased", "vocab.txt"),
    ]
    assert ImageReward.hub_files() == default
    assert ImageReward.hub_files(checkpoint="me/my-reward") == [
        HubFile("me/my-reward", "ImageReward.pt"),
        HubFile("me/my-reward", "med_config.json"),
        *default[2:],
    ]
    local = dict(checkpoint=tiny_dir / "ImageReward.pt", tokenizer=tiny_dir / "tokenizer")
    assert ImageReward.hub_files(**local) == []  # med_config.json is next to the checkpoint
    lone = tmp_path / "ImageReward.pt"
    lone.write_bytes(b"")
    assert ImageReward.hub_files(checkpoint=lone, tokenizer=tiny_dir / "tokenizer") == [default[1]]
    assert ImageReward.hub_files(checkpoint=lone, med_config="me/cfg") == [
        HubFile("me/cfg", "med_config.json"),
        *default[2:],
    ]


def test_bad_options_raise_early():
    with pytest.raises(TypeError, match="checkpoint"):
        ImageReward(checkpoint=3)
    with pytest.raises(TypeError, match="tokenizer"):
        ImageReward(tokenizer=None)
    with pytest.raises(ValueError, match="vision_config"):
        ImageReward(vision_config={"num_heads": 2})
    with pytest.raises(ValueError, match="batch_size"):
        ImageReward(batch_size=0)


# ---------------------------------------------------------------------------------------------- real weights

# README of THUDM/ImageReward (example.py): prompt, images assets/images/{1..4}.webp and the printed rewards.
README_PROMPT = "a painting of an ocean with clouds and birds, day time, low depth field effect"
README_REWARDS = [0.5811622738838196, 0.2745276093482971, -1.4131819009780884, -2.029569625854492]
ASSET_URL = "https://raw.githubusercontent.com/THUDM/ImageReward/main/assets/images/{}.webp"


@pytest.fixture(scope="module")
def readme_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagereward-assets")
    images = []
    for i in range(1, 5):
        path = folder / f"{i}.webp"
        try:
            urllib.request.urlretrieve(ASSET_URL.format(i), path)
        except OSError as err:
            pytest.skip(f"cannot fetch the README's example images ({err})")
        images.append(Image.open(path))
    return images


@pytest.mark.weights
def test_real_checkpoint_matches_readme_with_reference_preprocessing(readme_images):
    reward = ImageReward().load("cuda" if torch.cuda.is_available() else "cpu")
    reference = _pil_reference_transform()
    pixel_values = torch.stack([reference(image) for image in readme_images])
    with torch.no_grad():
        scores = reward.score_pixel_values(pixel_values, [README_PROMPT] * 4).cpu()
    torch.testing.assert_close(scores, torch.tensor(README_REWARDS), rtol=0, atol=1e-2)


@pytest.mark.weights
def test_real_checkpoint_differentiable_path_close_to_readme(readme_images):
    reward = ImageReward()
    scores = torch.cat(
        [
            reward(
                torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 255,
                [README_PROMPT],
            )
            for image in readme_images
        ]
    ).cpu()
    assert scores.argsort(descending=True).tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(scores, torch.tensor(README_REWARDS), rtol=0, atol=0.05)
