"""The reward-hacking monitor (diffrl/trainers/monitor.py): the diversity metric on hand-made images, the warnings
on hand-made metric histories, the toy world's extra-object count, the config checks, and a tiny run that logs the
monitor at every evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diffrl.config import ConfigError, load_config
from diffrl.trainers.monitor import (
    EmbeddingFeatures,
    MonitorState,
    feature_distance,
    image_features,
    monitor_warnings,
    within_prompt_diversity,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = str(ROOT / "configs" / "tiny" / "prompts.txt")


def _flat(*values: float, size: int = 16) -> torch.Tensor:
    return torch.stack([torch.full((3, size, size), v) for v in values])


# ------------------------------------------------------------------------------------------ diversity
@pytest.mark.parametrize("kind", ["pixels", "histogram"])
def test_identical_images_have_zero_diversity_and_distinct_ones_more(kind):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 32, 32, generator=g)
    same = image_features(img.repeat(4, 1, 1, 1), kind)
    assert within_prompt_diversity(same, [0, 0, 0, 0], kind) == 0.0
    other = image_features(torch.cat([img, torch.rand(1, 3, 32, 32, generator=g)]), kind)
    assert within_prompt_diversity(other, [0, 0], kind) > 0.01


def test_diversity_known_values():
    # pixels: RMS difference of constant images is the difference of their values: pairs (0, .5) .5, (0, 1) 1,
    # (.5, 1) .5 -> mean 2/3
    f = image_features(_flat(0.0, 0.5, 1.0), "pixels")
    assert f.shape == (3, 192)
    assert within_prompt_diversity(f, [0, 0, 0], "pixels") == pytest.approx(2 / 3)
    # histogram: a half-black half-white image against a black one: each channel's histograms differ by half the
    # mass (total variation 0.5); against a white one too; black vs white: 1 -> mean (0.5 + 0.5 + 1) / 3
    half = torch.zeros(1, 3, 16, 16)
    half[..., 8:] = 1.0
    h = image_features(torch.cat([half, _flat(0.0), _flat(1.0)]), "histogram")
    assert h.shape == (3, 24)
    assert torch.allclose(h.view(3, 3, 8).sum(-1), torch.ones(3, 3))  # each channel's histogram sums to 1
    assert float(feature_distance(h[0], h[1], "histogram")) == pytest.approx(0.5)
    assert within_prompt_diversity(h, [5, 5, 5], "histogram") == pytest.approx(2 / 3)


def test_diversity_averages_over_prompts_and_skips_lone_images():
    f = image_features(_flat(0.0, 1.0, 0.2, 0.2, 0.7), "pixels")
    # prompt 0: (0, 1) -> 1; prompt 1: two equal images -> 0; prompt 2: one image, left out
    assert within_prompt_diversity(f, [0, 0, 1, 1, 2]) == pytest.approx(0.5)
    assert within_prompt_diversity(f[:1], [0]) is None
    # the order of the rows does not matter
    perm = [4, 2, 0, 3, 1]
    assert within_prompt_diversity(f[perm], [[0, 0, 1, 1, 2][i] for i in perm]) == pytest.approx(0.5)


def test_unknown_features_are_refused():
    with pytest.raises(ValueError, match="not implemented"):
        image_features(_flat(0.0), "vgg")


# ------------------------------------------------------------------------------------------ warnings
def test_proxy_up_gold_down_warns_and_other_histories_do_not():
    first = {"proxy": 0.5, "gold": -1.0}
    prev = {"step": 10, "proxy": 0.5, "gold": -1.0}
    hacked = {"step": 20, "proxy": 0.6, "gold": -1.5}
    (line,) = monitor_warnings(prev, hacked, first)
    assert "between steps 10 and 20" in line and "0.5 -> 0.6" in line and "-1 -> -1.5" in line
    assert "\n" not in line
    assert monitor_warnings(None, hacked, first) == []  # the first evaluation has nothing to compare with
    assert monitor_warnings(prev, {"step": 20, "proxy": 0.6, "gold": -0.8}, first) == []  # both rise
    assert monitor_warnings(prev, {"step": 20, "proxy": 0.4, "gold": -1.5}, first) == []  # both fall
    assert monitor_warnings(prev, {"step": 20, "proxy": 0.6}, first) == []  # no gold measured
    # min_change: a fall of 0.5 passes 0.3, a rise of 0.1 does not
    assert monitor_warnings(prev, hacked, first, min_change=0.3) == []
    assert len(monitor_warnings(prev, hacked, first, min_change=0.05)) == 1


def test_diversity_collapse_warns_once_when_it_crosses_the_line():
    first = {"diversity": 0.2}
    history = [0.2, 0.15, 0.09, 0.05, 0.12, 0.08]  # line at 0.5 x 0.2 = 0.1: crossed at 0.09, again at 0.08
    fired, prev = [], None
    for step, d in enumerate(history):
        cur = {"step": step, "diversity": d}
        fired.append(len(monitor_warnings(prev, cur, first)))
        prev = cur
    assert fired == [0, 0, 1, 0, 0, 1]
    prev = {"step": 1, "diversity": 0.2}
    assert monitor_warnings(prev, {"step": 2, "diversity": 0.01}, first, diversity_collapse=0.0) == []
    assert len(monitor_warnings(prev, {"step": 2, "diversity": 0.01}, first, diversity_collapse=0.1)) == 1
    assert monitor_warnings(prev, {"step": 2, "diversity": 0.03}, first, diversity_collapse=0.1) == []


def test_state_gap_counts_from_the_first_evaluation_and_replays():
    state = MonitorState()
    m0, w0 = state.update(0, {"proxy": 0.3, "gold": -1.0, "diversity": 0.2})
    assert m0["monitor/gap"] == 0.0 and w0 == [] and m0["monitor/warnings"] == 0.0
    m1, w1 = state.update(10, {"proxy": 0.5, "gold": -1.5, "diversity": 0.05})
    # (0.5 - 0.3) - (-1.5 + 1.0) = 0.7; proxy up + gold down, and diversity below 0.5 x 0.2
    assert m1["monitor/gap"] == pytest.approx(0.7) and len(w1) == 2 and m1["monitor/warnings"] == 2.0
    assert m1["monitor/diversity"] == 0.05 and m1["monitor/proxy"] == 0.5
    # a resumed run rebuilds the same memory from its logged rows (later rows ignored)
    rows = [{"step": 0, **m0}, {"step": 10, **m1}, {"step": 20, "monitor/proxy": 9.0, "monitor/gold": 9.0}]
    again = MonitorState()
    again.replay(rows, up_to=10)
    assert again.first == state.first and again.last == state.last
    assert again.update(20, {"proxy": 0.6, "gold": -2.0}) == state.update(20, {"proxy": 0.6, "gold": -2.0})
    assert math.isfinite(state.update(30, {"proxy": float("nan"), "gold": 0.0})[0]["monitor/gold"])


# ------------------------------------------------------------------------------------------ the toy gold signal
def test_shapes_extra_objects_counts_objects_beyond_the_description():
    from diffrl.rewards.registry import load_reward
    from diffrl.toy.scenes import SceneObject, render

    reward = load_reward("shapes_extra_objects")
    desc = {"objects": [{"shape": "circle", "color": "red"}]}
    clean = render([SceneObject("circle", "red", 16, 32, 16.0)])
    one_extra = render(
        [SceneObject("circle", "red", 16, 32, 16.0), SceneObject("square", "blue", 48, 32, 16.0)]
    )
    two_extra = render(
        [
            SceneObject("circle", "red", 12, 16, 14.0),
            SceneObject("square", "blue", 48, 16, 14.0),
            SceneObject("triangle", "green", 30, 48, 14.0),
        ]
    )
    blank = render([])
    scores = reward(torch.stack([clean, one_extra, two_extra, blank]), ["a red circle"] * 4, scene=[desc] * 4)
    assert scores.tolist() == [0.0, -1.0, -2.0, 0.0]  # a missing object is not an extra one
    with pytest.raises(ValueError, match="do not apply"):
        load_reward("shapes_extra_objects", exact_scene=True)


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["monitor.features=vgg"],
            r"monitor.features='vgg' is not implemented; use pixels, histogram, clip or dino",
        ),
        (
            ["monitor.feature_model=toy:clip"],
            r"monitor.feature_model='toy:clip' is only read with monitor.features",
        ),
        (["monitor.gold=nope", "eval_reward={brightness: 1.0}"], r"monitor.gold='nope' is not a component"),
        (
            ["monitor.gold=brightness"],
            r"monitor.gold='brightness' is not a component of eval_reward \(empty\)",
        ),
        (["monitor.diversity_collapse=1.5"], r"monitor.diversity_collapse=1.5 must be in \[0, 1\)"),
    ],
)
def test_bad_monitor_values_raise_one_sentence(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "tiny" / "flow_grpo.yaml", [f"data.train={PROMPTS}", *overrides])


def test_toy_presets_log_the_extra_object_count_as_gold():
    for algo in ("flow_grpo", "diffusion_nft", "refl", "awm"):
        cfg = load_config(ROOT / "configs" / "toy" / f"{algo}.yaml")
        assert cfg.monitor.gold == "shapes_extra_objects" and cfg.eval_reward["shapes_extra_objects"] == 0.0


# ------------------------------------------------------------------------------------------ model embeddings
def test_embedding_distance_is_half_one_minus_cosine():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 2.0], [-1.0, 0.0], [6.0, 8.0]])
    for kind in ("clip", "dino"):
        assert feature_distance(a, b, kind).tolist() == pytest.approx([0.5, 1.0, 0.0], abs=1e-7)
    with pytest.raises(ValueError, match="come from a model"):
        image_features(torch.rand(1, 3, 8, 8), "clip")


def _pil(images: torch.Tensor):
    from PIL import Image

    arr = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in arr], torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


def test_clip_features_are_the_clip_models_image_embeddings():
    """toy:clip, the shipped toy-world CLIP: the embeddings equal CLIPModel.get_image_features on
    CLIPImageProcessor's pixels (of the same 8-bit images) in direction, and copies of an image are at distance 0."""
    from transformers import CLIPImageProcessor, CLIPModel

    from diffrl.utils import shipped_checkpoint

    g = torch.Generator().manual_seed(0)
    pil, images = _pil(torch.rand(3, 3, 48, 40, generator=g))
    feats = EmbeddingFeatures("clip", "toy:clip")(images)
    assert feats.shape[0] == 3 and torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-5)
    directory = shipped_checkpoint("toy:clip")
    model = CLIPModel.from_pretrained(directory).eval()
    pixels = CLIPImageProcessor.from_pretrained(directory)(images=pil, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=pixels)
    ref = getattr(ref, "pooler_output", ref)
    cos = torch.nn.functional.cosine_similarity(feats, ref.float(), dim=-1)
    assert cos.min() > 0.999, cos
    same = EmbeddingFeatures("clip", "toy:clip")(images[:1].repeat(3, 1, 1, 1))
    assert within_prompt_diversity(same, [0, 0, 0], "clip") == pytest.approx(0.0, abs=1e-6)
    assert within_prompt_diversity(feats, [0, 0, 0], "clip") > 1e-4


def test_dino_features_are_the_dinov2_models_pooled_class_token(tmp_path):
    """A tiny random DINOv2 saved with its real processor config: the features equal the model's pooled output on
    the transformers processor's pixels, in direction."""
    from transformers import AutoImageProcessor, BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=28,
        patch_size=7,
    )
    Dinov2Model(config).save_pretrained(tmp_path)
    BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 28, "width": 28},
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(1)
    pil, images = _pil(torch.rand(4, 3, 40, 48, generator=g))
    feats = EmbeddingFeatures("dino", str(tmp_path))(images)
    model = Dinov2Model.from_pretrained(tmp_path).eval()
    pixels = AutoImageProcessor.from_pretrained(tmp_path)(images=pil, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model(pixel_values=pixels).pooler_output
    cos = torch.nn.functional.cosine_similarity(feats, ref, dim=-1)
    assert cos.min() > 0.999, cos


def test_a_missing_feature_model_says_how_to_fetch_it(monkeypatch, tmp_path):
    from diffrl.rewards import WeightsNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        WeightsNotFoundError, match=r"hf download facebook/dinov2-small config.json.*monitor.features=pixels"
    ):
        EmbeddingFeatures("dino")(torch.rand(1, 3, 32, 32))


# ------------------------------------------------------------------------------------------ a tiny run
def test_a_tiny_run_logs_the_monitor_at_every_evaluation(tmp_path, monkeypatch, capsys):
    from diffrl.trainers import build_trainer

    monkeypatch.setenv("DIFFRL_CACHE", str(tmp_path / "cache"))
    trainer = build_trainer(
        ROOT / "configs" / "tiny" / "flow_grpo.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={PROMPTS}",
            "max_steps=2",
            "eval_every=1",
            "checkpointing_steps=0",
            "data.eval_size=2",
            "sample.eval_images_per_prompt=2",
            "reward={saturation: 1.0}",
            "eval_reward={brightness: 1.0, saturation: 0.0}",
        ],
    )
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/reward/brightness/mean" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    keys = {"monitor/proxy", "monitor/gold", "monitor/gap", "monitor/diversity", "monitor/warnings"}
    for r in evals:
        assert keys <= set(r), r
        # proxy: the training reward (saturation) on the evaluation images; gold: the evaluation reward's sum
        assert r["monitor/proxy"] == pytest.approx(r["eval/reward/saturation/mean"], rel=1e-6)
        assert r["monitor/gold"] == pytest.approx(r["eval/reward/brightness/mean"], rel=1e-6)
        assert 0 < r["monitor/diversity"] <= 1
    first = evals[0]
    assert first["monitor/gap"] == 0.0
    last = evals[-1]
    expect = (last["monitor/proxy"] - first["monitor/proxy"]) - (last["monitor/gold"] - first["monitor/gold"])
    assert last["monitor/gap"] == pytest.approx(expect, abs=1e-9)
    warned = capsys.readouterr().out.count("[diffrl] warning:")
    assert warned == sum(int(r["monitor/warnings"]) for r in evals)


def test_a_tiny_run_measures_diversity_with_clip_embeddings(tmp_path, monkeypatch):
    from diffrl.trainers import build_trainer

    monkeypatch.setenv("DIFFRL_CACHE", str(tmp_path / "cache"))
    trainer = build_trainer(
        ROOT / "configs" / "tiny" / "flow_grpo.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={PROMPTS}",
            "max_steps=1",
            "eval_every=1",
            "checkpointing_steps=0",
            "data.eval_size=2",
            "sample.eval_images_per_prompt=3",
            "monitor.features=clip",
            "monitor.feature_model=toy:clip",
        ],
    )
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "monitor/diversity" in r]
    assert [r["step"] for r in evals] == [0, 1]
    assert all(0 < r["monitor/diversity"] <= 1 for r in evals)
    assert trainer.monitor.embedder is not None and trainer.monitor.embedder.spec == "toy:clip"


def test_demo_curves_get_a_monitor_panel_when_the_run_logged_it(tmp_path):
    from PIL import Image

    from diffrl.demo import plot_curves

    rows = [
        {"step": 0, "eval/reward/shapes_verifier/mean": 0.5, "eval/reward/shapes_extra_objects/mean": -0.1},
        {"step": 1, "reward/shapes_verifier/mean": 0.6},
        {"step": 2, "eval/reward/shapes_verifier/mean": 0.7, "eval/reward/shapes_extra_objects/mean": -0.9},
    ]
    rows[0]["monitor/gap"], rows[2]["monitor/gap"] = 0.0, 1.0
    with_panel = Image.open(plot_curves(rows, tmp_path / "a.png")).size
    plain = [{k: v for k, v in r.items() if "extra" not in k and "monitor" not in k} for r in rows]
    without = Image.open(plot_curves(plain, tmp_path / "b.png")).size
    assert with_panel[0] == pytest.approx(1.5 * without[0], rel=0.02)  # three panels instead of two


def test_a_resumed_run_logs_the_monitor_an_uninterrupted_one_does(tmp_path, monkeypatch):
    from diffrl.trainers import build_trainer

    monkeypatch.setenv("DIFFRL_CACHE", str(tmp_path / "cache"))

    def run(out: str, steps: int, *extra: str) -> list[dict]:
        build_trainer(
            ROOT / "configs" / "tiny" / "flow_grpo.yaml",
            [
                f"output_dir={tmp_path / out}",
                f"data.train={PROMPTS}",
                f"max_steps={steps}",
                "eval_every=2",
                "checkpointing_steps=2",
                "data.eval_size=2",
                "sample.eval_images_per_prompt=2",
                "reward={saturation: 1.0}",
                "eval_reward={brightness: 1.0}",
                *extra,
            ],
        ).train()
        rows = [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k.startswith("monitor/") or k == "step"} for r in rows]

    full = run("full", 4)
    run("half", 2)
    resumed = run("half", 4, "resume_from_checkpoint=latest")
    monitored = [r for r in full if "monitor/gap" in r]
    assert [r["step"] for r in monitored] == [0, 2, 4]
    assert [r for r in resumed if "monitor/gap" in r] == monitored  # the gap at step 4 counts from step 0


def test_toy_world_evaluations_warn_of_extra_objects_and_of_collapsed_diversity(
    tmp_path, monkeypatch, capsys
):
    """The toy preset's monitor (proxy: the shapes verifier, gold: minus the extra objects it ignores) through the
    trainer's evaluation, on 4 held-out prompts x 2 images whose pictures are drawn by hand with the toy world's
    renderer in place of the model's: at step 0 each picture lacks the second object (the verifier fails, no extra
    objects); at step 10 each holds the described objects plus two more (the verifier passes, the gold signal falls
    by 2): one "reward hacking?" line; at step 20 both images of a prompt are the same picture: one "diversity
    collapse?" line, and no hacking line (proxy and gold unchanged)."""
    import numpy as np

    from diffrl.toy.scenes import PALETTE, SHAPES, layout, render
    from diffrl.trainers import build_trainer

    trainer = build_trainer(
        ROOT / "configs" / "toy" / "flow_grpo.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            "report_to=none",
            "data.eval_size=4",
            "sample.eval_images_per_prompt=2",
            "sample.eval_num_steps=1",
        ],
    )
    scenes = trainer.eval_set.batch_metadata()["scene"]

    def picture(desc: dict, phase: str, seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        if phase == "missing":
            return render(layout({**desc, "objects": desc["objects"][:1], "relation": None}, rng))
        used = {(g["shape"], g["color"]) for g in desc["objects"]}
        shape, color = next((s, c) for s in SHAPES for c in PALETTE if (s, c) not in used)
        extra = {"shape": shape, "color": color, "count": 2, "exact": False}
        return render(
            layout({**desc, "objects": [*desc["objects"], extra], "relation": desc["relation"]}, rng)
        )

    phase = {"name": "missing", "row": 0}

    def decode(latents):
        out = []
        for _ in range(latents.shape[0]):
            row = phase["row"]  # evaluation row r * n + p: image r of prompt p
            p, r = row % 4, row // 4
            seed = p if phase["name"] == "collapsed" else 10 * p + r
            out.append(picture(scenes[p], "missing" if phase["name"] == "missing" else "extra", seed))
            phase["row"] += 1
        return torch.stack(out)

    monkeypatch.setattr(trainer.model, "decode", decode)
    rows = []
    for step, name in ((0, "missing"), (10, "extra"), (20, "collapsed")):
        trainer.step, phase["name"], phase["row"] = step, name, 0
        rows.append(trainer.evaluate())
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("[diffrl] warning:")]
    acc = [r["eval/reward/shapes_accuracy/mean"] for r in rows]
    gold = [r["monitor/gold"] for r in rows]
    assert acc[0] == 0.0 and acc[1] == acc[2] == 1.0, acc
    assert gold == [0.0, -2.0, -2.0], gold
    assert rows[1]["monitor/gap"] == pytest.approx(rows[1]["monitor/proxy"] - rows[0]["monitor/proxy"] + 2.0)
    assert rows[0]["monitor/diversity"] > 0.01 and rows[2]["monitor/diversity"] == 0.0
    assert [r["monitor/warnings"] for r in rows] == [0.0, 1.0, 1.0]
    assert len(warnings) == 2
    assert "reward hacking? between steps 0 and 10" in warnings[0] and "fell 0 -> -2" in warnings[0]
    assert "diversity collapse? at step 20 within-prompt diversity is 0" in warnings[1]
