"""The toy world (diffrl.toy) and its verifier reward (shapes_verifier): the verifier agrees with the generator on
clean, noisy and blurred renders, rejects mismatched prompts, gives monotone partial credit, keeps the reward
contract; prompt sets are disjoint, deterministic and load through diffrl.data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from reward_contract import check_reward_contract

from diffrl.data import load_prompts, train_eval_prompts
from diffrl.toy import (
    CATEGORIES,
    HELD_OUT_COMBOS,
    PALETTE,
    SHAPES,
    SceneObject,
    layout,
    make_prompt_sets,
    normalize_description,
    prompt_for,
    render,
    sample_scene,
    score_objects,
    split_of,
    write_prompt_sets,
)
from diffrl.toy.rewards import ShapesSoft, ShapesVerifier, detect_objects, soft_verify, verify
from diffrl.toy.scenes import _canonical_key


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """One torch thread for the whole module (see conftest.one_thread)."""


def _scenes(n, seed, **kwargs):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kwargs) for _ in range(n)]


@pytest.fixture(scope="module")
def world():
    items = _scenes(500, 123)
    return items, torch.stack([it["image"] for it in items]), [it["scene"] for it in items]


@pytest.fixture(scope="module")
def verifier():
    return ShapesVerifier()


def _blur(x, sigma):
    r = int(np.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = torch.nn.functional.pad(x, (r, r, r, r), mode="replicate")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)


# ------------------------------------------------------------------------------------------ the world
def test_generator_covers_categories_and_satisfies_its_descriptions(world):
    items, images, _ = world
    assert images.shape == (500, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    assert {it["scene"]["category"] for it in items} == set(CATEGORIES)
    for it in items:
        desc = it["scene"]
        json.dumps(desc)  # JSON-serialisable
        assert normalize_description(desc) == desc
        assert it["prompt"] == prompt_for(desc)
        assert 1 <= len(it["objects"]) <= 4
        assert score_objects(it["objects"], desc) == (1.0, True)
        for o in it["objects"]:
            assert 12 <= o["size"] <= 24 and o["shape"] in SHAPES and o["color"] in PALETTE


def test_prompt_texts():
    rng = np.random.default_rng(0)
    seen = {c: prompt_for(json.loads(json.dumps(_pick(rng, c)))) for c in CATEGORIES}
    assert seen["counting"].split()[0] in ("two", "three", "four") and seen["counting"].endswith("s")
    assert any(p in seen["position"] for p in ("to the left of", "to the right of", "above", "below"))
    assert " and " in seen["two_object"] and " and " in seen["color_attr"]
    assert prompt_for({"objects": [{"shape": "circle", "color": "orange"}]}) == "an orange circle"


def _pick(rng, category):
    from diffrl.toy import sample_description

    return sample_description(rng, category)[1]


def test_layout_is_deterministic_and_scales():
    desc = _pick(np.random.default_rng(0), "position")
    a = layout(desc, np.random.default_rng(5))
    b = layout(desc, np.random.default_rng(5))
    assert a == b
    big = layout(desc, np.random.default_rng(5), image_size=128)
    img = render(big, image_size=128)
    assert img.shape == (3, 128, 128)
    p, s = ShapesVerifier().verify(img[None], [desc])
    assert s.item() == 1.0 and p.item() == 1.0


def test_description_errors_name_the_field():
    with pytest.raises(ValueError, match="objects"):
        normalize_description({"relation": None})
    with pytest.raises(ValueError, match=r"objects\[0\]\.color"):
        normalize_description({"objects": [{"shape": "circle", "color": "pink"}]})
    with pytest.raises(ValueError, match="relation.type"):
        normalize_description(
            {
                "objects": [{"shape": "circle"}, {"shape": "square"}],
                "relation": {"type": "near", "a": 0, "b": 1},
            }
        )
    assert (
        normalize_description(json.dumps({"objects": [{"shape": "circle", "color": "red"}]}))["objects"][0][
            "count"
        ]
        == 1
    )


# ------------------------------------------------------------------------------------------ the verifier
def test_verifier_accepts_clean_renders(world, verifier):
    _, images, scenes = world
    partial, strict = verifier.verify(images, scenes)
    assert strict.mean().item() >= 0.99, strict.mean().item()
    assert partial.min().item() >= 0.0 and partial.max().item() <= 1.0
    assert torch.all(partial[strict == 1] == 1.0)


def test_verifier_robust_to_noise_and_blur(world, verifier):
    _, images, scenes = world
    g = torch.Generator().manual_seed(0)
    noisy = (_blur(images, 1.0) + 0.03 * torch.randn(images.shape, generator=g)).clamp(
        0, 1
    )  # blur sigma 1 px
    _, strict = verifier.verify(noisy, scenes)
    assert strict.mean().item() >= 0.95, strict.mean().item()


def _mismatches(desc, rng):
    """Descriptions that differ from ``desc`` in one requirement: a colour, a shape, swapped colours, the count,
    the relation flipped or turned."""
    out = []
    groups = desc["objects"]
    for gi, g in enumerate(groups):
        other_color = [c for c in PALETTE if c != g["color"]][int(rng.integers(len(PALETTE) - 1))]
        other_shape = [s for s in SHAPES if s != g["shape"]][int(rng.integers(len(SHAPES) - 1))]
        for key, value in (("color", other_color), ("shape", other_shape)):
            d = json.loads(json.dumps(desc))
            d["objects"][gi][key] = value
            out.append(d)
        if g["exact"]:
            for n in (g["count"] - 1, g["count"] + 1):
                if n >= 1:
                    d = json.loads(json.dumps(desc))
                    d["objects"][gi]["count"] = n
                    out.append(d)
    if len(groups) == 2 and groups[0]["color"] != groups[1]["color"]:
        d = json.loads(json.dumps(desc))
        d["objects"][0]["color"], d["objects"][1]["color"] = groups[1]["color"], groups[0]["color"]
        out.append(d)
    if desc["relation"] is not None:
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        turn = {"left of": "above", "right of": "below", "above": "right of", "below": "left of"}
        for table in (flip, turn):
            d = json.loads(json.dumps(desc))
            d["relation"]["type"] = table[d["relation"]["type"]]
            out.append(d)
    return out


def test_verifier_rejects_mismatched_prompts(world, verifier):
    items, images, _ = world
    rng = np.random.default_rng(7)
    rows, descs = [], []
    for i, it in enumerate(items):
        changed = [d for d in _mismatches(it["scene"], rng) if not score_objects(it["objects"], d)[1]]
        for j in rng.permutation(len(changed))[:2]:  # two of the changes that genuinely differ, per scene
            rows.append(i)
            descs.append(changed[j])
    assert len(descs) >= 900
    _, strict = verifier.verify(images[rows], descs)
    rejected = 1 - strict.mean().item()
    assert rejected >= 0.99, rejected
    # every kind of change is represented: colour swaps of colour-attribution prompts, counts, relations
    kinds = {items[r]["scene"]["category"] for r in rows}
    assert kinds == set(CATEGORIES)


def _obj(shape, color, cx, cy, size=16.0):
    return SceneObject(shape, color, cx, cy, size)


def _partials(verifier, desc, layouts):
    images = torch.stack([render(objs) for objs in layouts])
    partial, strict = verifier.verify(images, [desc] * len(layouts))
    # the soft verifier (shapes_soft) keeps the verifier's order on every layout of these tests
    soft = soft_verify(images, [desc] * len(layouts)).tolist()
    assert [soft[i] < soft[i + 1] for i in range(len(soft) - 1)] == [
        partial[i] < partial[i + 1] for i in range(len(soft) - 1)
    ], (soft, partial.tolist())
    return partial.tolist(), strict.tolist()


def test_partial_credit_is_monotone(verifier):
    count = {
        "category": "counting",
        "objects": [{"shape": "circle", "color": "green", "count": 3, "exact": True}],
    }
    spots = [(12, 12), (40, 12), (12, 44), (44, 44)]
    layouts = [[_obj("circle", "green", x, y) for x, y in spots[:k]] for k in range(4)]
    p, s = _partials(verifier, count, layouts)
    assert p == sorted(p) and len(set(p)) == 4 and s == [0, 0, 0, 1], p
    p4, s4 = _partials(verifier, count, [[_obj("circle", "green", x, y) for x, y in spots]])
    assert p4[0] < p[3] and s4 == [0]  # one too many

    pos = {
        "category": "position",
        "objects": [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"}],
        "relation": {"type": "left of", "a": 0, "b": 1},
    }
    layouts = [
        [],
        [_obj("circle", "red", 48, 32)],
        [_obj("circle", "red", 48, 32), _obj("square", "blue", 16, 32)],  # both, wrong side
        [_obj("circle", "red", 16, 32), _obj("square", "blue", 48, 32)],
    ]
    p, s = _partials(verifier, pos, layouts)
    assert p == sorted(p) and len(set(p)) == 4 and s == [0, 0, 0, 1], p

    attr = {
        "category": "color_attr",
        "objects": [{"shape": "square", "color": "red"}, {"shape": "circle", "color": "green"}],
    }
    layouts = [
        [_obj("triangle", "blue", 32, 32)],
        [_obj("square", "green", 16, 32), _obj("circle", "red", 48, 32)],  # colours swapped: half credit each
        [_obj("square", "red", 16, 32), _obj("circle", "red", 48, 32)],
        [_obj("square", "red", 16, 32), _obj("circle", "green", 48, 32)],
    ]
    p, s = _partials(verifier, attr, layouts)
    assert p == sorted(p) and len(set(p)) == 4 and s == [0, 0, 0, 1], p


def test_removing_an_object_lowers_partial_credit(verifier):
    items = _scenes(60, 99)
    full, fewer, descs = [], [], []
    for it in items:
        objs = [SceneObject(**o) for o in it["objects"]]
        full.append(render(objs))
        fewer.append(render(objs[1:]))
        descs.append(it["scene"])
    p_full, _ = verifier.verify(torch.stack(full), descs)
    p_fewer, s_fewer = verifier.verify(torch.stack(fewer), descs)
    assert torch.all(p_fewer < p_full) and s_fewer.sum() == 0
    soft_full, soft_fewer = soft_verify(torch.stack(full), descs), soft_verify(torch.stack(fewer), descs)
    assert torch.all(soft_fewer < soft_full - 0.05), (soft_full - soft_fewer).min()


def test_exact_scene_option():
    desc = {"objects": [{"shape": "circle", "color": "red"}]}
    img = render([_obj("circle", "red", 16, 32), _obj("square", "blue", 48, 32)])[None]
    assert (
        ShapesVerifier(strict=True)(img, ["a red circle"], scene=[desc]).item() == 1.0
    )  # GenEval: extras allowed
    assert ShapesVerifier(strict=True, exact_scene=True)(img, ["a red circle"], scene=[desc]).item() == 0.0


def test_blank_and_garbage_images_score_zero(verifier):
    desc = {"objects": [{"shape": "circle", "color": "red"}]}
    blank = torch.full((2, 3, 64, 64), 0.96)
    g = torch.Generator().manual_seed(0)
    garbage = torch.rand((4, 3, 64, 64), generator=g)
    _, strict = verifier.verify(torch.cat([blank, garbage]), [desc] * 6)
    assert strict.sum() == 0
    assert detect_objects(blank) == [[], []]


# ------------------------------------------------------------------------------------------ the reward contract
def test_reward_contract(world):
    items, images, scenes = world
    reward = ShapesVerifier()
    assert reward.name == "shapes_verifier" and not reward.differentiable
    prompts = [it["prompt"] for it in items[:5]]
    imgs = images[:5].clone()
    imgs[1] = render([])  # an empty image scores below 1
    scores = check_reward_contract(reward, imgs, prompts, scene=scenes[:5])
    assert scores[1] == 0 and scores[0] == 1
    strict = check_reward_contract(ShapesVerifier(strict=True), imgs, prompts, scene=scenes[:5])
    assert set(strict.tolist()) <= {0.0, 1.0}
    # JSON strings work as well as dicts; the fingerprint depends on the options
    as_json = reward(imgs, prompts, scene=[json.dumps(s) for s in scenes[:5]])
    assert torch.equal(as_json, scores)
    assert ShapesVerifier().fingerprint != ShapesVerifier(strict=True).fingerprint
    partial, strict01 = verify(imgs, scenes[:5])
    assert torch.equal(partial, scores) and torch.equal(strict01, strict)


def test_missing_scene_metadata_is_a_clear_error(world):
    _, images, _ = world
    with pytest.raises(ValueError, match="'scene'"):
        ShapesVerifier()(images[:2], ["a", "b"])
    with pytest.raises(ValueError, match=r"objects"):
        ShapesVerifier()(images[:2], ["a", "b"], scene=[{"relation": None}, {"relation": None}])


def test_a_field_some_prompts_lack_reaches_the_reward_as_none_and_is_named(world):
    from diffrl.data import PromptSet

    _, images, scenes = world
    ps = PromptSet(["a", "b", "c"], [{"scene": scenes[0], "tag": "x"}, {"scene": scenes[1]}, {"note": 1}])
    assert ps.batch_metadata() == {
        "note": [None, None, 1],
        "scene": [scenes[0], scenes[1], None],
        "tag": ["x", None, None],
    }
    with pytest.raises(ValueError, match=r"image 2: its prompt row has no 'scene'"):
        ShapesVerifier()(images[:3], ps.prompts, **ps.batch_metadata())


# ------------------------------------------------------------------------------------------ the soft verifier
def test_soft_verifier_scores_clean_renders_high(world):
    items, images, scenes = world
    soft = soft_verify(images, scenes)
    # the verifier gives 1 to these; the soft score is 1 up to its sigmoids
    assert soft.min().item() > 0.85 and soft.max().item() <= 1.0, (soft.min(), soft.max())
    blank = soft_verify(torch.full((1, 3, 64, 64), 0.96), scenes[:1])
    assert blank.item() < 0.01


def test_soft_verifier_gradient_draws_the_missing_object():
    """Gradient ascent on the pixels of a scene that lacks its blue square: the verifier ends up accepting it."""
    desc = {
        "category": "position",
        "objects": [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"}],
        "relation": {"type": "left of", "a": 0, "b": 1},
    }
    x0 = render([_obj("circle", "red", 16, 32)])[None]
    z = torch.logit(x0.clamp(1e-3, 1 - 1e-3)).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.1)
    before = soft_verify(x0, [desc]).item()
    for _ in range(30):
        loss = -soft_verify(torch.sigmoid(z), [desc]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.sigmoid(z).detach()
    partial, strict = verify(x, [desc])
    assert verify(x0, [desc])[1].item() == 0 and strict.item() == 1, partial
    assert soft_verify(x, [desc]).item() > before + 0.4


def test_soft_reward_contract(world):
    items, images, scenes = world
    reward = ShapesSoft()
    assert reward.name == "shapes_soft" and reward.differentiable
    prompts = [it["prompt"] for it in items[:5]]
    scores = check_reward_contract(reward, images[:5].clone(), prompts, scene=scenes[:5])
    assert scores.min() > 0.85
    assert ShapesSoft().fingerprint != ShapesSoft(blob_size=16).fingerprint
    with pytest.raises(ValueError, match="blob_size=0"):
        ShapesSoft(blob_size=0)
    with pytest.raises(ValueError, match="'scene'"):
        reward(images[:2], ["a", "b"])


def test_registry_entry_loads():
    from diffrl.rewards import load_reward

    reward = load_reward("diffrl.toy.rewards:ShapesVerifier", strict=True)
    assert isinstance(reward, ShapesVerifier) and reward.strict
    assert isinstance(load_reward("shapes_soft"), ShapesSoft)


# ------------------------------------------------------------------------------------------ prompt sets
def test_prompt_sets_disjoint_and_deterministic():
    train, held = make_prompt_sets(600, 200, seed=0)
    again_train, again_held = make_prompt_sets(600, 200, seed=0)
    assert train == again_train and held == again_held
    other_train, other_held = make_prompt_sets(600, 200, seed=1)
    assert [t["prompt"] for t in other_train] != [t["prompt"] for t in train]
    assert len(train) == 600 and len(held) == 200
    assert len({h["prompt"] for h in held}) == 200  # eval prompts are distinct
    for a, b in ((train, held), (train, other_held), (other_train, held)):
        assert not {t["prompt"] for t in a} & {h["prompt"] for h in b}
        assert not {_canonical_key(t["scene"]) for t in a} & {_canonical_key(h["scene"]) for h in b}
    for t in train:
        assert split_of(t["scene"]) == "train"
        assert not any((g["shape"], g["color"]) in HELD_OUT_COMBOS for g in t["scene"]["objects"])
    assert all(split_of(h["scene"]) == "eval" for h in held)
    assert {t["scene"]["category"] for t in train} == set(CATEGORIES)
    assert {h["scene"]["category"] for h in held} >= {"two_object", "counting", "position", "color_attr"}
    with pytest.raises(ValueError, match="distinct"):
        make_prompt_sets(0, 100000, seed=0)


def test_jsonl_round_trip_through_the_prompt_loader(tmp_path, verifier):
    train_path, eval_path = write_prompt_sets(tmp_path / "toy", 40, 16, seed=3)
    train, held = make_prompt_sets(40, 16, seed=3)
    for path, items in ((train_path, train), (eval_path, held)):
        ps = load_prompts(str(path))
        assert ps.prompts == [it["prompt"] for it in items]
        meta = ps.batch_metadata()
        assert list(meta) == ["scene"] and meta["scene"] == [it["scene"] for it in items]
        rng = np.random.default_rng(0)
        images = torch.stack([render(layout(s, rng)) for s in meta["scene"]])
        scores = ShapesVerifier(strict=True)(images, ps.prompts, **meta)
        assert scores.mean().item() >= 0.99
    tr, ev = train_eval_prompts(str(train_path), str(eval_path), eval_size=8)
    assert len(tr) == 40 and len(ev) == 8 and "scene" in ev.batch_metadata()


def test_shipped_toy_prompt_files_are_reproducible(tmp_path):
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location(
        "make_toy_prompts", root / "scripts" / "make_toy_prompts.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--out", str(tmp_path)])
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_text() == (root / "configs" / "toy" / name).read_text(), name
    # the eval prompts are held out: no eval prompt is a training prompt, none names an unseen combination
    from diffrl.toy.scenes import split_of

    rows = [json.loads(line) for line in (root / "configs" / "toy" / "eval.jsonl").read_text().splitlines()]
    train = {
        json.loads(line)["prompt"]
        for line in (root / "configs" / "toy" / "train.jsonl").read_text().splitlines()
    }
    assert all(split_of(r["scene"]) == "eval" for r in rows) and not {r["prompt"] for r in rows} & train


def test_soft_verifier_ranks_the_toy_models_samples_like_the_verifier():
    """On the shipped toy model's own samples (4 seeds of 48 training prompts), shapes_soft orders two images of
    one prompt as the verifier's partial credit does (measured 98% on 96 prompts; the toy CLIP manages 68%)."""
    from diffrl.models import load_model
    from diffrl.sampling import sample_images

    train = Path(__file__).resolve().parent.parent / "configs" / "toy" / "train.jsonl"
    items = [json.loads(line) for line in train.read_text().splitlines()[:48]]
    prompts, scenes = [it["prompt"] for it in items], [it["scene"] for it in items]
    model = load_model("toy")
    partial, soft = [], []
    for seed in range(4):
        images = sample_images(
            model, prompts, num_steps=8, guidance_scale=1.0, height=64, width=64, seed=seed, batch_size=48
        )
        partial.append(verify(images, scenes)[0])
        soft.append(soft_verify(images, scenes))
    partial, soft = torch.stack(partial), torch.stack(soft)  # (seeds, prompts)
    agree = total = 0
    for a in range(4):
        for b in range(a + 1, 4):
            differ = partial[a] != partial[b]
            total += int(differ.sum())
            agree += int((((partial[a] - partial[b]) * (soft[a] - soft[b])) > 0)[differ].sum())
    assert total >= 50, total  # enough pairs that differ to measure
    assert agree / total >= 0.9, (agree, total)
