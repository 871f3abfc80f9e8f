"""HPSv2 / HPSv2.1 reward: contract, gradients, loading path, preprocessing parity, hub files (tiny open_clip offline)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw
from reward_contract import check_reward_contract, finite_difference_check, make_images
from torchvision.transforms import InterpolationMode

from diffrl.rewards import HubFile, WeightsNotFoundError, load_reward
from diffrl.rewards.hpsv2 import HPS_FILES, HPSv2, hps_preprocess
from diffrl.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from diffrl.rewards.tiny.open_clip import TINY_OPEN_CLIP_ARCH, save_tiny_hps_checkpoint

PROMPTS = ["a cat with two horns on its head", "a red car", "an astronaut riding a horse", "a bowl of fruit"]

# (width, height): square, landscape, portrait; smaller and larger than 224; exactly 224.
SIZES = [(256, 256), (320, 180), (150, 300), (100, 100), (1024, 768), (64, 200), (333, 517), (224, 224)]

# Measured on this stack (torch 2.14, torchvision 0.29), in normalised units: max |ours - HPSv2 transform| = 0.0
# exactly (same antialiased bicubic kernel on the same float tensor, same rounding and padding). Against open_clip's
# PIL pipeline (resize_mode="longest"): max 0.013-0.016, mean < 0.004 (8-bit rounding of PIL's resize, about
# 1/255/std); up to 0.077 when upsampling more than 2x across a hard edge (PIL clips the bicubic overshoot to
# [0, 255], the float tensor path of HPSv2 and of this module does not).
HPS_TRANSFORM_ATOL = 1e-5
OPEN_CLIP_PIL_ATOL = 0.02
OPEN_CLIP_PIL_ATOL_UPSAMPLE = 0.1


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_hps_checkpoint(tmp_path_factory.mktemp("hps"), seed=0)


@pytest.fixture(scope="module")
def tiny_reward(tiny_checkpoint):
    return HPSv2(checkpoint=tiny_checkpoint, arch=TINY_OPEN_CLIP_ARCH)


def _pil_images(seed: int = 0):
    """Smooth RGB PIL images of every size in SIZES (gradients, a sine pattern and a disc)."""
    rng = np.random.default_rng(seed)
    out = []
    for w, h in SIZES:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        fx, fy = rng.uniform(3, 15, size=2)
        arr = np.stack(
            [xx / w * 255, yy / h * 255, 128 + 110 * np.sin(xx / fx + yy / fy)],
            axis=-1,
        )
        cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, 0.2 * min(w, h)
        arr[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = (230, 40, 60)
        out.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    return out


def hps_reference_transform(pil: Image.Image, size: int = 224) -> torch.Tensor:
    """HPSv2's evaluation transform (``light_augmentation=True``), rebuilt from its steps with torchvision:
    RGB -> ToTensor -> longest side to ``size`` on the float tensor (bicubic, Python ``round``; skipped when the
    longest side already is ``size``) -> zero padding (left/top get the floor half) -> OpenAI CLIP normalisation."""
    x = TF.to_tensor(pil.convert("RGB"))
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        new_h, new_w = round(h * scale), round(w * scale)
        x = TF.resize(x, [new_h, new_w], InterpolationMode.BICUBIC)
        pad_h, pad_w = size - new_h, size - new_w
        x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def _as_input(pil: Image.Image) -> torch.Tensor:
    return TF.to_tensor(pil.convert("RGB"))[None]


# ------------------------------------------------------------------ contract and gradients
def test_contract(tiny_reward):
    scores = check_reward_contract(tiny_reward, make_images(4, 64), PROMPTS)
    assert (scores.abs() <= 1.0 + 1e-5).all()  # a cosine
    assert tiny_reward.differentiable and tiny_reward.name == "hpsv2"


def test_contract_non_square_inputs(tiny_reward):
    images = make_images(3, 96)[..., :, :64]  # (3, 3, 96, 64): portrait
    check_reward_contract(tiny_reward, images, PROMPTS[:3])


def test_finite_differences(tiny_reward):
    finite_difference_check(tiny_reward, make_images(2, 48), PROMPTS[:2])


def test_model_frozen_and_prompts_matter(tiny_reward):
    images = make_images(2, 64)
    a = tiny_reward(images, ["a red car", "a red car"])
    b = tiny_reward(images, ["a bowl of fruit", "a bowl of fruit"])
    assert not torch.allclose(a, b)
    assert all(not p.requires_grad for p in tiny_reward.model.parameters())
    assert not tiny_reward.model.training


def test_bfloat16_weights_close_to_float32(tiny_checkpoint, tiny_reward):
    images = make_images(2, 64)
    bf = HPSv2(checkpoint=tiny_checkpoint, arch=TINY_OPEN_CLIP_ARCH, dtype=torch.bfloat16)
    out = bf(images, PROMPTS[:2])
    assert out.dtype == torch.float32
    assert next(bf.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(out, tiny_reward(images, PROMPTS[:2]), atol=0.05, rtol=0)


# ------------------------------------------------------------------ parity with the reference pipeline
def test_preprocessing_matches_hps_transform():
    worst = 0.0
    for pil in _pil_images():
        ours = hps_preprocess(_as_input(pil))[0]
        ref = hps_reference_transform(pil)
        assert ours.shape == ref.shape == (3, 224, 224)
        worst = max(worst, (ours - ref).abs().max().item())
    assert worst <= HPS_TRANSFORM_ATOL, worst


def test_preprocessing_close_to_open_clip_longest_transform():
    from open_clip.transform import image_transform

    oc = image_transform(
        224, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, resize_mode="longest"
    )
    for pil in _pil_images(seed=1):
        ours = hps_preprocess(_as_input(pil))[0]
        ref = oc(pil)
        diff = (ours - ref).abs()
        tol = OPEN_CLIP_PIL_ATOL_UPSAMPLE if 224 / max(pil.size) > 2 else OPEN_CLIP_PIL_ATOL
        assert diff.max().item() <= tol, (pil.size, diff.max().item())
        assert diff.mean().item() <= 0.005, (pil.size, diff.mean().item())
        # the padding is black before normalisation in both pipelines
        w, h = pil.size
        if w > h:
            torch.testing.assert_close(ours[:, 0, :], ref[:, 0, :], atol=1e-6, rtol=0)


def test_padding_is_black_before_normalisation():
    img = torch.ones(
        1, 3, 100, 200
    )  # white landscape -> resized to 224 x 112, padded 56 rows above and below
    out = hps_preprocess(img)[0]
    black = (-torch.tensor(OPENAI_CLIP_MEAN) / torch.tensor(OPENAI_CLIP_STD)).view(3, 1)
    torch.testing.assert_close(out[:, :56, :].reshape(3, -1), black.expand(3, 56 * 224))
    torch.testing.assert_close(out[:, -56:, :].reshape(3, -1), black.expand(3, 56 * 224))
    white = ((1 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)).view(3, 1)
    torch.testing.assert_close(
        out[:, 60:164, :].reshape(3, -1), white.expand(3, 104 * 224), atol=1e-5, rtol=0
    )


def test_score_equals_independent_open_clip(tiny_checkpoint, tiny_reward):
    import open_clip

    model = open_clip.create_model(TINY_OPEN_CLIP_ARCH, pretrained=None)
    model.load_state_dict(torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)["state_dict"])
    model.eval()
    worst = 0.0
    for i, pil in enumerate(_pil_images(seed=2)):
        prompt = PROMPTS[i % len(PROMPTS)]
        with torch.no_grad():
            img = F.normalize(model.encode_image(hps_reference_transform(pil)[None]), dim=-1)
            txt = F.normalize(model.encode_text(open_clip.tokenize([prompt])), dim=-1)
            expected = (img @ txt.T).diagonal()
            got = tiny_reward(_as_input(pil), [prompt])
        worst = max(worst, (got - expected).abs().max().item())
    # identical preprocessing (HPS_TRANSFORM_ATOL) and identical weights: float32 round-off only
    assert worst <= 1e-5, worst


# ------------------------------------------------------------------ loading, options, hub files
def test_hub_files_default_and_versions():
    files = HPSv2.hub_files()
    assert files == [HubFile("xswu/HPSv2", "HPS_v2.1_compressed.pt")]
    assert [str(f) for f in files] == ["xswu/HPSv2/HPS_v2.1_compressed.pt"]
    assert HPSv2.hub_files(version="v2.0") == [HubFile("xswu/HPSv2", "HPS_v2_compressed.pt")]
    assert HPSv2.hub_files(version="v2") == HPSv2.hub_files(version="v2.0")
    assert HPSv2.hub_files(version="v2.0") != HPSv2.hub_files(version="v2.1")
    assert HPSv2.hub_files(checkpoint="/some/local/HPS_v2.1_compressed.pt") == []
    assert HPSv2.hub_files(checkpoint="me/my-hps", version="v2.0") == [
        HubFile("me/my-hps", "HPS_v2_compressed.pt")
    ]
    assert HPS_FILES == {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def test_registry_builds_lazily():
    reward = load_reward("hpsv2", version="v2.0")
    assert isinstance(reward, HPSv2) and not reward._loaded and reward.version == "v2.0"
    assert reward.settings()["version"] == "v2.0"


def test_bad_options_rejected_early():
    with pytest.raises(ValueError, match=r"unknown HPS version 'v3'.*'v2.1'"):
        HPSv2(version="v3")
    with pytest.raises(ValueError, match="unknown HPS version"):
        HPSv2.hub_files(version="2.1")
    with pytest.raises(ValueError, match="arch"):
        HPSv2(arch="")


@pytest.mark.parametrize("version", ["v2.1", "v2.0"])
def test_missing_weights_fail_fast_offline(version, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    reward = HPSv2(version=version)
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        reward(make_images(1, 32), ["x"])
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert f"xswu/HPSv2/{HPS_FILES[version]}" in message
    assert "diffrl download hpsv2" in message
    other = HPS_FILES["v2.0" if version == "v2.1" else "v2.1"]
    assert other not in message


def test_local_checkpoint_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HPSv2(checkpoint=tmp_path / "missing.pt", arch=TINY_OPEN_CLIP_ARCH).load()
    with pytest.raises(ValueError, match="not an open_clip model name"):
        HPSv2(checkpoint=tiny_checkpoint, arch="no-such-arch").load()
    state = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    state.pop("logit_scale")
    broken = tmp_path / "broken.pt"
    torch.save({"state_dict": state}, broken)
    with pytest.raises(ValueError, match="does not fit open_clip arch"):
        HPSv2(checkpoint=broken, arch=TINY_OPEN_CLIP_ARCH).load()


def test_directory_checkpoint_uses_version_file_name(tiny_checkpoint, tiny_reward):
    # a directory is searched for the version's file name (the tiny file is saved as HPS_v2.1_compressed.pt)
    images = make_images(2, 64)
    from_dir = HPSv2(checkpoint=tiny_checkpoint.parent, arch=TINY_OPEN_CLIP_ARCH)
    torch.testing.assert_close(from_dir(images, PROMPTS[:2]), tiny_reward(images, PROMPTS[:2]))
    with pytest.raises(FileNotFoundError, match="HPS_v2_compressed.pt"):
        HPSv2(version="v2.0", checkpoint=tiny_checkpoint.parent, arch=TINY_OPEN_CLIP_ARCH).load()


def test_fingerprint_depends_on_weights_and_version(tiny_checkpoint, tmp_path, tiny_reward):
    other = save_tiny_hps_checkpoint(tmp_path, seed=1)
    assert HPSv2(checkpoint=other, arch=TINY_OPEN_CLIP_ARCH).fingerprint != tiny_reward.fingerprint
    same = HPSv2(checkpoint=tiny_checkpoint, arch=TINY_OPEN_CLIP_ARCH)
    assert same.fingerprint == tiny_reward.fingerprint
    v20 = HPSv2(version="v2.0", checkpoint=tiny_checkpoint, arch=TINY_OPEN_CLIP_ARCH)
    assert v20.fingerprint != tiny_reward.fingerprint


# ------------------------------------------------------------------ real checkpoints (skipped offline)
def _drawn_image() -> Image.Image:
    """A fixed 512 x 384 picture: a red disc on a white background."""
    img = Image.new("RGB", (512, 384), (255, 255, 255))
    ImageDraw.Draw(img).ellipse((156, 92, 356, 292), fill=(220, 20, 30))
    return img


@pytest.mark.weights
@pytest.mark.parametrize("version", ["v2.1", "v2.0"])
def test_real_checkpoint(version):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reward = HPSv2(version=version, device=device).load()
    pil = _drawn_image()
    match, other = "a red circle on a white background", "a photo of a dog running in a park"
    x = _as_input(pil).to(device)
    with torch.no_grad():
        scores = reward(x.expand(2, -1, -1, -1), [match, other])
        # the same model on HPSv2's own preprocessing of the PIL image and open_clip's tokenizer
        import open_clip

        img = F.normalize(
            reward.model.encode_image(hps_reference_transform(pil)[None].to(device)).float(), dim=-1
        )
        txt = F.normalize(reward.model.encode_text(open_clip.tokenize([match]).to(device)).float(), dim=-1)
    torch.testing.assert_close(scores[:1], (img * txt).sum(-1), atol=1e-4, rtol=0)
    # raw cosines (the README's tables print x100: about 0.25-0.33 for generated images)
    assert 0.0 < scores[0].item() < 0.5, scores
    assert scores[0] > scores[1], scores


@pytest.mark.weights
@pytest.mark.parametrize("version", ["v2.1", "v2.0"])
def test_real_checkpoint_matches_hpsv2_package(version):
    """Against the reference package when it is installed (it also fetches LAION's ViT-H-14 weights)."""
    try:
        from hpsv2 import img_score
    except Exception as err:  # not installed, or the 1.2.0 wheel without its BPE vocabulary file
        pytest.skip(f"the hpsv2 package is not usable here ({err})")
    from huggingface_hub import hf_hub_download

    path = hf_hub_download("xswu/HPSv2", HPS_FILES[version])
    pil, prompt = _drawn_image(), "a red circle on a white background"
    expected = float(img_score.score(pil, prompt, cp=path, hps_version=version)[0])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    got = HPSv2(version=version, device=device)(_as_input(pil).to(device), [prompt]).item()
    # the reference runs under CUDA float16 autocast on a GPU
    assert got == pytest.approx(expected, abs=5e-3 if device == "cuda" else 1e-4)
