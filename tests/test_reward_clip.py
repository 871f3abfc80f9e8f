"""Tests of the transformers-CLIP rewards: ``pickscore``, ``clipscore`` and ``aesthetic``.

Offline: tiny random-weight ``CLIPModel`` checkpoints and aesthetic heads are built with
:mod:`diffrl.rewards.tiny.clip` and loaded through the rewards' real loading path (local directories instead of hub
ids). The ``weights`` tests compare against the reference pipelines with the real checkpoints (skipped offline).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from reward_contract import check_reward_contract, finite_difference_check, make_images

from diffrl.rewards import WeightsNotFoundError, load_reward
from diffrl.rewards.aesthetic import AestheticMLP, AestheticScore
from diffrl.rewards.clip_common import CLIPImageTransform, image_embeddings, load_clip_model
from diffrl.rewards.clipscore import CLIPScore
from diffrl.rewards.pickscore import PickScore
from diffrl.rewards.preprocess import OPENAI_CLIP_STD
from diffrl.rewards.tiny.clip import TINY_CLIP_PROJECTION_DIM, build_tiny_aesthetic_head, build_tiny_clip
from diffrl.rewards.weights import HubFile

PROMPTS = ["a red cat", "two dogs on a chair", "a blue car next to a tree", "an apple"]

# Largest |torch - CLIPImageProcessor| allowed on normalised pixels: the reference rounds the image to 8 bits after
# each of PIL's two resize passes (0.5/255 each) and PIL's resampling is fixed point, so up to about 1.1/255 before
# normalisation (measured: 1.08/255); 1.5/255 over the smallest std gives the bound in normalised units.
PIXEL_TOL = 1.5 / 255 / min(OPENAI_CLIP_STD)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_clip")
    clip = build_tiny_clip(root / "clip", seed=0)
    head = build_tiny_aesthetic_head(root / "head" / "aesthetic-model.pth", TINY_CLIP_PROJECTION_DIM, seed=0)
    return {"clip": clip, "head": head, "root": root}


def _make(name: str, tiny, **kwargs):
    if name == "aesthetic":
        return load_reward(name, clip_model=tiny["clip"], head=tiny["head"], **kwargs)
    if name == "pickscore":
        return load_reward(name, model=tiny["clip"], processor=tiny["clip"], **kwargs)
    return load_reward(name, model=tiny["clip"], **kwargs)


@pytest.fixture(scope="module")
def rewards(tiny):
    return {name: _make(name, tiny) for name in ("pickscore", "clipscore", "aesthetic")}


NAMES = ["pickscore", "clipscore", "aesthetic"]


# ------------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", NAMES)
def test_contract(rewards, name):
    reward = rewards[name]
    assert reward.differentiable and reward.name == name
    scores = check_reward_contract(reward, make_images(4, 64), PROMPTS)
    assert scores.std() > 0, "distinct images should get distinct scores"


@pytest.mark.parametrize("name", NAMES)
def test_finite_differences(rewards, name):
    # Pixel values inside (0, 1): the resize clamps to [0, 1] like PIL's 8-bit passes, and central differences
    # are not meaningful at pixels sitting exactly on the clamp (make_images has exact zeros).
    images = 0.1 + 0.8 * make_images(2, 16)
    finite_difference_check(rewards[name], images, PROMPTS[:2])


@pytest.mark.parametrize("name", NAMES)
def test_gradients_float64(tiny, name):
    """The whole pipeline in float64: autograd's directional derivatives equal central differences to 1e-6."""
    reward = _make(name, tiny, dtype=torch.float64).load("cpu")
    images = (0.1 + 0.8 * make_images(2, 24, seed=1)).double()
    x = images.clone().requires_grad_(True)
    reward.score(x, PROMPTS[:2]).sum().backward()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        d = torch.randn(images.shape, generator=g, dtype=torch.float64)
        d /= d.norm()
        with torch.no_grad():
            plus = reward.score(images + 1e-6 * d, PROMPTS[:2]).sum()
            minus = reward.score(images - 1e-6 * d, PROMPTS[:2]).sum()
        numeric = ((plus - minus) / 2e-6).item()
        analytic = (x.grad * d).sum().item()
        assert abs(numeric) > 1e-5, "the test direction should move the score"
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_scores_independent_of_image_device_dtype(rewards):
    images = make_images(2, 64)
    for reward in rewards.values():
        a = reward(images, PROMPTS[:2])
        b = reward(images.double(), PROMPTS[:2])  # float64 images are accepted; scores stay float32
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_low_precision_dtype_runs(tiny, rewards):
    images = make_images(2, 64)
    for name in NAMES:
        reward = _make(name, tiny, dtype=torch.bfloat16)
        low = reward(images, PROMPTS[:2])
        assert low.dtype == torch.float32 and torch.isfinite(low).all()
        assert next(reward.weight_modules()[0].parameters()).dtype == torch.bfloat16
        ref = rewards[name](images, PROMPTS[:2])
        torch.testing.assert_close(low, ref, rtol=0.05, atol=0.05 * ref.abs().max().item() + 0.02)


# ------------------------------------------------------------------------------------------------- preprocessing


def _test_image(height: int, width: int, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "noise":  # worst case: full-range pixel noise, the bicubic filter overshoots everywhere
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    waves = [0.5 + 0.5 * np.sin(2 * np.pi * (f * xs + g * ys) + p) for f, g, p in rng.uniform(0, 6, (3, 3))]
    image = np.stack(waves, -1) + 0.05 * rng.standard_normal((height, width, 3))
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


SIZES = [
    (224, 224),
    (64, 64),
    (512, 512),
    (300, 500),
    (500, 300),
    (177, 250),
    (250, 177),
    (100, 333),
    (700, 1000),
]
SIZES += [(231, 229), (200, 203), (203, 200), (37, 53)]  # margins of 1, 3 (floor 1, round 2) and 96 pixels


def test_preprocess_matches_clip_image_processor(tiny):
    """The torch transform vs transformers' CLIPImageProcessor (torchvision backend) and CLIPImageProcessorPil on
    PIL images: square, landscape, portrait, smaller and larger than 224, odd margins (crop offsets)."""
    from transformers import CLIPImageProcessor

    processors = [CLIPImageProcessor.from_pretrained(tiny["clip"])]
    try:
        from transformers.models.clip import CLIPImageProcessorPil

        processors.append(CLIPImageProcessorPil.from_pretrained(tiny["clip"]))
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
        pass
    transform = CLIPImageTransform.from_pretrained(tiny["clip"])
    worst = 0.0
    for i, (h, w) in enumerate(SIZES):
        for kind in ("smooth", "noise"):
            array = _test_image(h, w, kind, seed=i)
            ours = transform(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255)
            assert ours.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
            for processor in processors:
                ref = processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
                diff = (ours - ref).abs().max().item()
                assert diff <= PIXEL_TOL, (type(processor).__name__, (h, w), kind, diff)
                worst = max(worst, diff)
    assert worst > 0  # the comparison did run on resized images
    print(f"max |torch - CLIPImageProcessor| = {worst:.4f} (normalised units), tolerance {PIXEL_TOL:.4f}")


def test_preprocess_geometry_follows_the_processor():
    """Sizes are rounded down and the crop offset is (new - crop) // 2, as in CLIPImageProcessor."""
    t = CLIPImageTransform()
    assert t.resized_size(177, 250) == (224, int(224 * 250 / 177)) == (224, 316)
    assert t.resized_size(250, 177) == (316, 224)
    assert t.resized_size(100, 333) == (224, 745)  # 745.92: truncated, not rounded
    # A ramp survives resize-free cropping exactly: an image already 224 high and 231 wide is cropped at left=3.
    ramp = torch.linspace(0, 1, 231).expand(1, 3, 224, 231)
    out = CLIPImageTransform(do_normalize=False)(ramp)
    torch.testing.assert_close(out, ramp[..., 3:227])


def test_transform_reads_processor_configs(tmp_path):
    # The legacy layout of laion/CLIP-ViT-H-14-laion2B-s32B-b79K's preprocessor_config.json (ints, not dicts).
    legacy = {
        "crop_size": 224,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": 224,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    t = CLIPImageTransform.from_pretrained(tmp_path)
    assert (t.shortest_edge, t.crop_size) == (224, (224, 224))
    assert t.mean == pytest.approx(legacy["image_mean"]) and t.std == pytest.approx(legacy["image_std"])
    # Other values are read, not assumed.
    other = dict(
        legacy, size={"shortest_edge": 256}, crop_size={"height": 240, "width": 240}, image_mean=[0.5] * 3
    )
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(other))
    t = CLIPImageTransform.from_pretrained(tmp_path)
    assert (t.shortest_edge, t.crop_size, t.mean) == (256, (240, 240), (0.5, 0.5, 0.5))
    assert t(torch.rand(1, 3, 300, 400)).shape == (1, 3, 240, 240)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(dict(legacy, resample=2)))
    with pytest.raises(ValueError, match="resample=2"):
        CLIPImageTransform.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        CLIPImageTransform.from_pretrained(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------- scores


def _reference_clip(tiny, reward):
    """A separate CLIPModel of the same tiny checkpoint, the forward pass PickScore / CLIP score should match."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(tiny["clip"]).eval()
    tokens = reward.tokenizer(
        PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    return model, tokens


def test_pickscore_equals_clip_logits(tiny, rewards):
    reward = rewards["pickscore"]
    images = make_images(4, 96)
    scores = reward(images, PROMPTS)
    model, tokens = _reference_clip(tiny, reward)
    with torch.no_grad():
        out = model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=reward.transform(images),
        )
    torch.testing.assert_close(scores, out.logits_per_image.diagonal(), rtol=1e-5, atol=1e-5)
    assert model.logit_scale.exp().item() == pytest.approx(
        1 / 0.07, rel=1e-4
    )  # a non-trivial scale is applied
    # the embeddings through the sub-modules equal get_image_features (a tensor in transformers 4, an output in 5)
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=reward.transform(images))
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        mine = image_embeddings(model.vision_model, model.visual_projection, reward.transform(images))
    torch.testing.assert_close(mine, feats)


def test_clipscore_options(tiny, rewards):
    images = make_images(4, 64)
    model, tokens = _reference_clip(tiny, rewards["clipscore"])
    with torch.no_grad():
        out = model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=rewards["clipscore"].transform(images),
        )
    cosine = (out.image_embeds * out.text_embeds).sum(-1)
    assert (cosine < 0).any() and (cosine > 0).any()  # so that the clamp below is exercised
    torch.testing.assert_close(rewards["clipscore"](images, PROMPTS), cosine, rtol=1e-5, atol=1e-6)
    torchmetrics_style = _make("clipscore", tiny, scale=100.0, clamp_min=0.0)
    torch.testing.assert_close(
        torchmetrics_style(images, PROMPTS), (100 * cosine).clamp_min(0), rtol=1e-5, atol=1e-4
    )
    assert torchmetrics_style.fingerprint != rewards["clipscore"].fingerprint
    for bad in ({"scale": 0}, {"scale": -1.0}, {"scale": float("nan")}, {"scale": True}, {"clamp_min": "0"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CLIPScore(**bad)


def test_aesthetic_equals_mlp_on_normalised_embedding(tiny, rewards):
    from transformers import CLIPModel

    reward = rewards["aesthetic"]
    images = make_images(4, 80)
    model = CLIPModel.from_pretrained(tiny["clip"]).eval()
    state = torch.load(tiny["head"], map_location="cpu", weights_only=True)
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=reward.transform(images))
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        x = feats / feats.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # the Linear layers; dropout is the identity in eval mode, no activations
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    scores = reward(images, PROMPTS)
    torch.testing.assert_close(scores, x[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reward(images, ["", "x", "y", "z"]), scores)  # the prompt is not used


def test_aesthetic_head_layout_matches_the_original():
    # Keys and shapes of sac+logos+ava1-l14-linearMSE.pth (read from the file in
    # christophschuhmann/improved-aesthetic-predictor; identical to trl-lib/ddpo-aesthetic-predictor's file).
    original = {
        "layers.0.weight": (1024, 768),
        "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,),
        "layers.4.weight": (64, 128),
        "layers.4.bias": (64,),
        "layers.6.weight": (16, 64),
        "layers.6.bias": (16,),
        "layers.7.weight": (1, 16),
        "layers.7.bias": (1,),
    }
    head = AestheticMLP()
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == original
    rebuilt = AestheticMLP.from_state_dict(head.state_dict())
    assert rebuilt.embed_dim == 768
    state = dict(head.state_dict())
    state["layers.1.weight"] = state.pop("layers.0.weight")
    with pytest.raises(ValueError, match="layers.0.weight"):
        AestheticMLP.from_state_dict(state)


def test_aesthetic_head_width_must_match_clip(tiny, tmp_path):
    head = build_tiny_aesthetic_head(tmp_path / "wide.pth", embed_dim=24)
    reward = AestheticScore(clip_model=tiny["clip"], head=head)
    with pytest.raises(ValueError, match="24-d"):
        reward.load("cpu")
    # a directory holding the file, with a custom file name
    reward = AestheticScore(
        clip_model=tiny["clip"], head=tiny["head"].parent, head_filename=tiny["head"].name
    )
    torch.testing.assert_close(
        reward(make_images(2), PROMPTS[:2]), _make("aesthetic", tiny)(make_images(2), PROMPTS[:2])
    )


def test_incomplete_clip_checkpoint_is_rejected(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny["clip"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    state = load_file(broken / "model.safetensors")
    del state["text_projection.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a complete CLIPModel"):
        load_clip_model(broken, "clipscore")


def test_settings_and_fingerprint(tiny, rewards):
    for name, reward in rewards.items():
        settings = reward.settings()
        assert settings["shortest_edge"] == 224 and settings["crop_size"] == (224, 224), name
        assert isinstance(reward.fingerprint, str) and len(reward.fingerprint) == 64
    other = build_tiny_clip(tiny["root"] / "clip_seed1", seed=1)
    assert _make("pickscore", {"clip": other}).fingerprint != rewards["pickscore"].fingerprint
    same = build_tiny_clip(tiny["root"] / "clip_seed0", seed=0)
    assert _make("pickscore", {"clip": same}).fingerprint == rewards["pickscore"].fingerprint


def test_tiny_clip_has_the_hub_layout(tiny, tmp_path):
    from transformers import CLIPTokenizer

    names = {p.name for p in tiny["clip"].iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= names
    assert {"tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.json"} <= names
    # vocab.json + merges.txt alone (tokenizer.json absent) give the same tokens
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((tiny["clip"] / name).read_bytes())
    full, bpe = CLIPTokenizer.from_pretrained(tiny["clip"]), CLIPTokenizer.from_pretrained(tmp_path)
    for text in PROMPTS + ["Zebra-crossing #42, über alles!"]:
        assert bpe(text)["input_ids"] == full(text)["input_ids"]
    with pytest.raises(TypeError, match="tokenizer"):
        build_tiny_clip(tmp_path / "x", tokenizer="not a tokenizer")


# ------------------------------------------------------------------------------------------------- construction


def test_constructors_are_lazy_and_light():
    code = (
        "import sys; from diffrl.rewards import load_reward\n"
        "for n in ('pickscore', 'clipscore', 'aesthetic'): r = load_reward(n); assert not r._loaded\n"
        "print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_bad_arguments_fail_early():
    with pytest.raises(TypeError, match="model=123"):
        PickScore(model=123)
    with pytest.raises(TypeError, match="processor"):
        CLIPScore(processor=3.5)
    with pytest.raises(TypeError, match="head"):
        AestheticScore(head=None)
    with pytest.raises(ValueError, match="head_filename"):
        AestheticScore(head_filename="")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PickScore(model="./no/such/dir").load("cpu")


def test_missing_weights_fail_fast_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    expected = {
        "pickscore": [
            "yuvalkirstain/PickScore_v1/model.safetensors",
            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K/preprocessor_config.json",
            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K/vocab.json",
        ],
        "clipscore": [
            "openai/clip-vit-large-patch14/model.safetensors",
            "openai/clip-vit-large-patch14/merges.txt",
        ],
        "aesthetic": [
            "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth",
            "openai/clip-vit-large-patch14/config.json",
        ],
    }
    for name, files in expected.items():
        with pytest.raises(WeightsNotFoundError) as info:
            load_reward(name)(make_images(1, 16), ["a cat"])
        message = str(info.value)
        for f in files + [f"diffrl download {name}"]:
            assert f in message, (name, f, message)


def test_hub_files():
    processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    tokenizer = ["tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.json"]
    assert PickScore.hub_files() == [
        HubFile("yuvalkirstain/PickScore_v1", "config.json"),
        HubFile("yuvalkirstain/PickScore_v1", "model.safetensors"),
        HubFile(processor, "preprocessor_config.json"),
        *[HubFile(processor, f) for f in tokenizer],
        HubFile(processor, "special_tokens_map.json", optional=True),
    ]
    clip = "openai/clip-vit-large-patch14"
    assert CLIPScore.hub_files() == [
        HubFile(clip, f) for f in ["config.json", "model.safetensors", "preprocessor_config.json", *tokenizer]
    ] + [HubFile(clip, "special_tokens_map.json", optional=True)]
    assert AestheticScore.hub_files() == [
        HubFile("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"),
        HubFile(clip, "config.json"),
        HubFile(clip, "model.safetensors"),
        HubFile(clip, "preprocessor_config.json"),
    ]
    # other repositories; local paths need nothing from the hub
    assert {f.repo_id for f in CLIPScore.hub_files(model="org/clip", processor="org/proc")} == {
        "org/clip",
        "org/proc",
    }
    assert PickScore.hub_files(model="/local/pick", processor="/local/proc") == []
    assert [str(f) for f in AestheticScore.hub_files(head="./head.pth")] == [
        f"{clip}/config.json",
        f"{clip}/model.safetensors",
        f"{clip}/preprocessor_config.json",
    ]
    assert AestheticScore.hub_files(head="org/heads", head_filename="h.pth")[0] == HubFile(
        "org/heads", "h.pth"
    )


# ------------------------------------------------------------------------------------------------- real weights


def _fixed_pil_image() -> Image.Image:
    array = (make_images(1, 512, seed=3)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255


def _features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.mark.weights
def test_pickscore_real_checkpoint_matches_the_official_recipe():
    """The model card's recipe: AutoProcessor (laion ViT-H-14) + AutoModel (PickScore_v1) on a PIL image."""
    from transformers import AutoModel, AutoProcessor

    image, prompt = _fixed_pil_image(), "a colourful abstract painting with stripes and a circle"
    processor = AutoProcessor.from_pretrained("laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    model = AutoModel.from_pretrained("yuvalkirstain/PickScore_v1").eval()
    with torch.no_grad():
        pixels = processor(images=image, return_tensors="pt")
        text = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = F.normalize(_features(model.get_image_features(**pixels)), dim=-1)
        txt = F.normalize(_features(model.get_text_features(**text)), dim=-1)
        reference = (model.logit_scale.exp() * (img * txt).sum(-1)).item()
    score = PickScore()(_to_tensor(image), [prompt]).item()
    assert 10 < reference < 30
    # float vs 8-bit resizing moves the score by far less than the ~1 that separates images of a prompt
    assert score == pytest.approx(reference, abs=0.1)


@pytest.mark.weights
def test_aesthetic_real_checkpoint_matches_the_reference_recipe():
    """TRL's DDPO scorer recipe: CLIPProcessor + CLIPModel.get_image_features, normalise, the original MLP."""
    from huggingface_hub import hf_hub_download
    from transformers import CLIPModel, CLIPProcessor

    image = _fixed_pil_image()
    processor = CLIPProcessor.from_pretrained("openai/clip-vit-large-patch14")
    model = CLIPModel.from_pretrained("openai/clip-vit-large-patch14").eval()
    state = torch.load(
        hf_hub_download("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"),
        map_location="cpu",
        weights_only=True,
    )
    with torch.no_grad():
        emb = _features(model.get_image_features(**processor(images=image, return_tensors="pt")))
        x = emb / emb.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    reference = x.item()
    score = AestheticScore()(_to_tensor(image), [""]).item()
    assert 1 < reference < 10
    assert score == pytest.approx(reference, abs=0.05)


@pytest.mark.weights
def test_clipscore_real_checkpoint_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.multimodal.clip_score")
    image, prompt = _fixed_pil_image(), "a colourful abstract painting with stripes and a circle"
    metric = tm.CLIPScore(model_name_or_path="openai/clip-vit-large-patch14")
    reference = metric(torch.from_numpy(np.array(image)).permute(2, 0, 1), prompt).item()
    score = CLIPScore(scale=100.0, clamp_min=0.0)(_to_tensor(image), [prompt]).item()
    assert 5 < reference < 45
    assert score == pytest.approx(reference, abs=0.2)
