"""GenEval reward: the scoring rules on hand-made detections (every tag, strict / partial / exact), the detector
post-processing against a direct transcription of mmdet's, the colour crops and classifier against the reference
recipe, and the whole reward end to end on tiny random models loaded through the real loading path (offline)."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from reward_contract import check_reward_contract, make_images

from diffrl.rewards import HubFile, WeightsNotFoundError, load_reward
from diffrl.rewards.geneval import (
    CLIP_FILE,
    DEFAULT_CLIP,
    DEFAULT_DETECTOR,
    GENEVAL_CLASSES,
    GENEVAL_COLORS,
    Detection,
    GenEval,
    box_iou,
    color_queries,
    detector_labels,
    instance_detections,
    mask_boxes,
    parse_metadata,
    prompt_rows,
    relative_position,
    score_objects,
    select_objects,
)
from diffrl.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# Rows of GenEval's prompts/evaluation_metadata.jsonl, one per tag.
ROWS = {
    "single_object": {
        "tag": "single_object",
        "include": [{"class": "bench", "count": 1}],
        "prompt": "a photo of a bench",
    },
    "two_object": {
        "tag": "two_object",
        "include": [{"class": "bench", "count": 1}, {"class": "sports ball", "count": 1}],
        "prompt": "a photo of a bench and a sports ball",
    },
    "counting": {
        "tag": "counting",
        "include": [{"class": "clock", "count": 2}],
        "exclude": [{"class": "clock", "count": 3}],
        "prompt": "a photo of two clocks",
    },
    "colors": {
        "tag": "colors",
        "include": [{"class": "car", "count": 1, "color": "pink"}],
        "prompt": "a photo of a pink car",
    },
    "position": {
        "tag": "position",
        "include": [
            {"class": "teddy bear", "count": 1},
            {"class": "dog", "count": 1, "position": ["right of", 0]},
        ],
        "prompt": "a photo of a dog right of a teddy bear",
    },
    "color_attr": {
        "tag": "color_attr",
        "include": [
            {"class": "wine glass", "count": 1, "color": "purple"},
            {"class": "apple", "count": 1, "color": "black"},
        ],
        "prompt": "a photo of a purple wine glass and a black apple",
    },
}


def det(label, score=0.95, box=(0, 0, 10, 10), color=None):
    return Detection(label=label, score=score, box=tuple(float(v) for v in box), color=color)


def check(objects, row, **kwargs):
    return score_objects(objects, parse_metadata(row), **kwargs)


# ---------------------------------------------------------------------------------------------- metadata
def test_class_and_colour_lists_are_genevals():
    assert len(GENEVAL_CLASSES) == len(set(GENEVAL_CLASSES)) == 80
    assert GENEVAL_CLASSES[0] == "person" and GENEVAL_CLASSES[-1] == "toothbrush"
    # GenEval's own spellings where COCO / the detectors say mouse, remote, keyboard
    assert GENEVAL_CLASSES[64:67] == ("computer mouse", "tv remote", "computer keyboard")
    assert {"tv", "hair drier", "dining table", "potted plant", "sports ball"} <= set(GENEVAL_CLASSES)
    assert GENEVAL_COLORS == tuple("red orange yellow green blue purple pink brown black white".split())
    # the hub detectors' COCO names (mouse, remote, keyboard) map onto GenEval's, index by index
    from diffrl.rewards.tiny.mask2former import COCO_ID2LABEL

    assert detector_labels(COCO_ID2LABEL, "the tiny detector") == GENEVAL_CLASSES


def test_genevals_own_rows_parse():
    for tag, row in ROWS.items():
        spec = parse_metadata(row)
        assert spec.tag == tag and spec.include
    assert parse_metadata(ROWS["position"]).include[1].position == ("right of", 0)
    assert parse_metadata(ROWS["counting"]).exclude[0].count == 3
    assert (
        parse_metadata({**ROWS["counting"], "include": json.dumps(ROWS["counting"]["include"])})
        .include[0]
        .count
        == 2
    )


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        (
            {"tag": "shapes", "include": [{"class": "dog", "count": 1}]},
            r"tag='shapes' is not a GenEval tag; use one of",
        ),
        ({"tag": "single_object", "include": []}, r"include=\[\] must be a non-empty list"),
        (
            {"tag": "single_object", "include": [{"class": "dgo", "count": 1}]},
            r"class 'dgo' .*did you mean 'dog'",
        ),
        (
            {"tag": "single_object", "include": [{"class": "mouse", "count": 1}]},
            r"class 'mouse' is not one of GenEval",
        ),
        (
            {"tag": "counting", "include": [{"class": "dog", "count": 0}], "exclude": []},
            r"count=0 must be a positive",
        ),
        (
            {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "teal"}]},
            r"color 'teal' is not one of",
        ),
        ({"tag": "single_object", "include": [{"class": "dog"}]}, r"must be a dict with 'class' and 'count'"),
        (
            {"tag": "position", "include": [{"class": "dog", "count": 1, "position": ["right of", 0]}]},
            r"position=\['right of', 0\] must be \[relation, index\]",
        ),
        (
            {
                "tag": "position",
                "include": [
                    {"class": "cat", "count": 1},
                    {"class": "dog", "count": 1, "position": ["near", 0]},
                ],
            },
            r"position=\['near', 0\]",
        ),
        (
            {"tag": "counting", "include": [{"class": "dog", "count": 2}]},
            r"'counting' row has no 'exclude'.*prompt_rows",
        ),
        (
            {
                "tag": "counting",
                "include": [{"class": "dog", "count": 2}],
                "exclude": [{"class": "dog", "count": 3, "color": "red"}],
            },
            r"excludes do not take",
        ),
    ],
)
def test_bad_metadata_is_named_in_one_sentence(row, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        parse_metadata(row)
    assert "\n" not in str(info.value)


def test_prompt_rows_give_every_row_an_exclude():
    rows = prompt_rows(list(ROWS.values()))
    assert [r["exclude"] for r in rows if r["tag"] != "counting"] == [[]] * 5
    assert rows[2]["exclude"] == ROWS["counting"]["exclude"] and rows[0]["prompt"] == "a photo of a bench"
    with pytest.raises(ValueError, match="row 1: geneval metadata: tag="):
        prompt_rows([ROWS["colors"], {"tag": "x", "include": []}])


# ---------------------------------------------------------------------------------------------- selection
def test_selection_threshold_is_strict_and_counting_uses_its_own():
    dets = [det("dog", 0.95), det("dog", 0.85), det("dog", 0.3), det("cat", 0.31)]
    assert {k: len(v) for k, v in select_objects(dets, "single_object").items()} == {"dog": 2, "cat": 1}
    assert {k: len(v) for k, v in select_objects(dets, "counting").items()} == {"dog": 1}
    assert select_objects(dets, "counting", counting_threshold=0.8)["dog"][1].score == 0.85
    ranked = select_objects([det("dog", 0.4), det("dog", 0.9), det("dog", 0.6)], "colors")["dog"]
    assert [d.score for d in ranked] == [0.9, 0.6, 0.4]  # best first


def test_selection_caps_the_count_and_the_overlap_filter_is_off_by_default():
    dets = [det("cup", 0.5 + i / 100, box=(i, 0, i + 10, 10)) for i in range(20)]
    kept = select_objects(dets, "counting", counting_threshold=0.3)["cup"]
    assert len(kept) == 16 and kept[0].score == pytest.approx(0.69)
    # max_overlap < 1: a box overlapping a better one by IoU >= max_overlap goes (after the cap, as in GenEval)
    overlapping = [
        det("cup", 0.9, (0, 0, 9, 9)),
        det("cup", 0.8, (1, 0, 10, 9)),
        det("cup", 0.7, (30, 30, 39, 39)),
    ]
    assert len(select_objects(overlapping, "colors")["cup"]) == 3
    assert [d.score for d in select_objects(overlapping, "colors", max_overlap=0.5)["cup"]] == [0.9, 0.7]


def test_box_iou_uses_genevals_plus_one_convention():
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)  # 5 x 10 shared of 10 x 10 boxes
    assert box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0


# ---------------------------------------------------------------------------------------------- scoring rules
def test_single_object_presence():
    r = check({"bench": [det("bench")]}, ROWS["single_object"])
    assert (r.strict, r.partial, r.exact) == (True, 1.0, True)
    r = check({}, ROWS["single_object"])
    assert (r.strict, r.partial, r.exact) == (False, 0.0, False) and "bench: 0 found" in r.reasons[0]
    # GenEval asks for at least one; the exact-count scores want exactly one
    r = check({"bench": [det("bench"), det("bench")]}, ROWS["single_object"])
    assert (r.strict, r.partial, r.exact) == (True, 0.0, False)
    assert (
        check({"bench": [det("bench")] * 3}, ROWS["single_object"]).partial == 0.0
    )  # clamped (flow_grpo: -1)


def test_two_objects():
    both = {"bench": [det("bench")], "sports ball": [det("sports ball")]}
    assert check(both, ROWS["two_object"]).strict
    one = check({"bench": [det("bench")]}, ROWS["two_object"])
    assert (one.strict, one.partial) == (False, 0.5)


def test_counting_with_exclusion():
    clocks = [det("clock") for _ in range(5)]
    want = {  # n clocks -> (GenEval's strict, partial credit, exact)
        0: (False, 0.0, False),
        1: (False, 0.5, False),
        2: (True, 1.0, True),
        3: (False, 0.5, False),  # the exclude (fewer than 3) fails
        4: (False, 0.0, False),
        5: (False, 0.0, False),  # clamped: flow_grpo's unclamped credit is 1 - 3/2 = -0.5
    }
    for n, expected in want.items():
        r = check({"clock": clocks[:n]} if n else {}, ROWS["counting"])
        assert (r.strict, r.partial, r.exact) == expected, n
    # without the exclude, GenEval's rule is "at least": three clocks pass (why counting rows must carry it)
    assert check({"clock": clocks[:3]}, {**ROWS["counting"], "exclude": []}).strict


def test_counting_uses_the_counting_threshold_end_to_end():
    scores = [0.95, 0.92, 0.85, 0.5]
    objects = select_objects([det("clock", s) for s in scores], "counting")
    assert check(objects, ROWS["counting"]).strict  # two above 0.9
    objects = select_objects([det("clock", s) for s in scores], "colors")
    assert not check(objects, ROWS["counting"]).strict  # four above 0.3 would fail the exclude


def test_colours():
    red, blue = det("car", color="pink"), det("car", color="blue")
    r = check({"car": [red]}, ROWS["colors"])
    assert (r.strict, r.partial, r.exact) == (True, 1.0, True)
    r = check({"car": [blue]}, ROWS["colors"])
    assert (r.strict, r.partial, r.exact) == (False, 0.5, False) and "pink wanted" in r.reasons[0]
    # GenEval judges the colour of the `count` best only; the exact-count credit gives nothing when n != count
    r = check({"car": [red, blue]}, ROWS["colors"])
    assert (r.strict, r.partial, r.exact) == (True, 0.0, False)
    r = check({"car": [blue, red]}, ROWS["colors"])
    assert not r.strict
    two = {"tag": "colors", "include": [{"class": "car", "count": 2, "color": "pink"}]}
    assert check({"car": [red, blue]}, two).partial == pytest.approx((1 + 0.5) / 2)  # k / count = 1/2


def test_colour_queries_name_the_objects_to_classify():
    spec = parse_metadata(ROWS["color_attr"])
    objects = {"wine glass": [det("wine glass"), det("wine glass")], "apple": []}
    queries = color_queries(objects, spec)
    assert [(cls, len(d)) for cls, d in queries] == [("wine glass", 1)]
    assert queries[0][1][0] is objects["wine glass"][0]
    with pytest.raises(ValueError, match="classify the detections color_queries"):
        score_objects(objects, spec)


def test_colour_attributes():
    objects = {"wine glass": [det("wine glass", color="purple")], "apple": [det("apple", color="red")]}
    r = check(objects, ROWS["color_attr"])
    assert (r.strict, r.partial, r.exact) == (False, 0.75, False)  # count, colour, count, no colour
    objects["apple"] = [det("apple", color="black")]
    assert check(objects, ROWS["color_attr"]).strict


def test_relative_position_every_relation():
    centre = (40, 40, 60, 60)
    assert relative_position((0, 40, 20, 60), centre) == {"left of"}
    assert relative_position((80, 40, 100, 60), centre) == {"right of"}
    assert relative_position((40, 0, 60, 20), centre) == {"above"}  # image y points down
    assert relative_position((40, 80, 60, 100), centre) == {"below"}
    assert relative_position((80, 80, 100, 100), centre) == {"right of", "below"}  # diagonal: both
    assert relative_position((0, 0, 20, 20), centre) == {"left of", "above"}
    assert relative_position(centre, centre) == set()


def test_relative_position_margin_comes_from_the_boxes():
    # boxes 10 wide: margin 0.1 * (10 + 10) = 2 px; along one axis a relation needs |offset| - 2 > |offset| / 2
    b = (0, 0, 10, 10)  # centre x = 5
    assert relative_position((1, 0, 11, 10), b) == set()  # offset 1 < margin: no relation at all
    assert relative_position((4, 0, 14, 10), b) == set()  # offset 4: shrunk 2 is exactly half, not more
    assert relative_position((4.2, 0, 14.2, 10), b) == {"right of"}  # 2.2 / 4.2 > 0.5
    assert relative_position((4.2, 0, 14.2, 10), b, margin=0.0) == {"right of"}
    # the same centres with boxes twice as large: margin 4 px, the relation is gone
    assert relative_position((-0.8, -5, 19.2, 15), (-5, -5, 15, 15)) == set()
    assert relative_position((4.2, 0, 14.2, 10), b, margin=0.15) == set()  # margin 3: 1.2 / 4.2 < 0.5
    # a diagonal offset counts on an axis only when that axis carries enough of it
    assert relative_position((30, 12, 40, 22), b) == {"right of"}
    assert relative_position((30, 40, 40, 50), b) == {"right of", "below"}


def test_position_rule():
    bear = det("teddy bear", box=(0, 0, 20, 20))
    right = {"teddy bear": [bear], "dog": [det("dog", box=(40, 0, 60, 20))]}
    r = check(right, ROWS["position"])
    assert (r.strict, r.partial, r.exact) == (True, 1.0, True)
    left = {"teddy bear": [bear], "dog": [det("dog", box=(-60, 0, -40, 20))]}
    r = check(left, ROWS["position"])
    assert (r.strict, r.partial, r.exact) == (False, pytest.approx(2 / 3), False)  # flow_grpo: 0.75
    assert "'right of' wanted" in r.reasons[0]
    r = check({"dog": right["dog"]}, ROWS["position"])  # no target
    assert (r.strict, r.partial) == (False, pytest.approx(1 / 3)) and "target teddy bear" in r.reasons[-1]
    # a relation must hold for every pair of the counted objects (GenEval's "count" best of each)
    two = {
        "tag": "position",
        "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 2, "position": ["below", 0]}],
    }
    cat = det("cat", box=(0, 0, 10, 10))
    ok = {"cat": [cat], "dog": [det("dog", box=(0, 30, 10, 40)), det("dog", box=(20, 40, 30, 50))]}
    assert check(ok, two).strict
    bad = {"cat": [cat], "dog": [det("dog", box=(0, 30, 10, 40)), det("dog", box=(40, 0, 50, 10))]}
    assert not check(bad, two).strict and check(bad, two).partial == pytest.approx(2 / 3)


def test_strict_exact_and_partial_differ_as_documented():
    # two benches for "a photo of a bench": GenEval passes it, flow_grpo's exact rule and credit do not
    objects = {"bench": [det("bench"), det("bench")]}
    r = check(objects, ROWS["single_object"])
    assert r.strict and not r.exact and r.partial == 0.0


# ---------------------------------------------------------------------------------------------- post-processing
def test_mask_boxes_are_tight_with_an_exclusive_end():
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0, 2, 3] = True
    masks[1, 1:4, 2:7] = True
    assert mask_boxes(masks).tolist() == [[3, 2, 4, 3], [2, 1, 7, 4], [0, 0, 0, 0]]


def mmdet_reference(class_logits, mask_logits, input_size, valid_size, image_size, max_per_image=100):
    """mmdet's Mask2Former instance post-processing written out directly (every query upsampled, top-k, boxes
    from masks), for comparison with the reward's implementation."""
    masks = F.interpolate(mask_logits[None].float(), size=input_size, mode="bilinear", align_corners=False)[0]
    masks = masks[:, : valid_size[0], : valid_size[1]]
    masks = F.interpolate(masks[:, None], size=image_size, mode="bilinear", align_corners=False)[:, 0]
    scores = F.softmax(class_logits.float(), dim=-1)[:, :-1]
    nq, nc = scores.shape
    labels = torch.arange(nc).repeat(nq)
    top, index = scores.flatten().topk(max_per_image, sorted=False)
    masks = masks[index // nc]
    binary = (masks > 0).float()
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    out = []
    for j in range(len(index)):
        ys, xs = torch.where(binary[j] > 0)
        box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0]
        label = GENEVAL_CLASSES[int(labels[index[j]])]
        out.append((label, float(top[j] * mask_scores[j]), [float(v) for v in box], float(top[j])))
    return sorted(out, key=lambda t: -t[1])


def test_instance_post_processing_matches_mmdets():
    g = torch.Generator().manual_seed(0)
    class_logits = torch.randn(12, 81, generator=g) * 3
    mask_logits = torch.randn(12, 10, 12, generator=g) * 4
    kwargs = dict(input_size=(40, 48), valid_size=(36, 44), image_size=(50, 61))
    ours = instance_detections(class_logits, mask_logits, **kwargs)
    ref = mmdet_reference(class_logits, mask_logits, **kwargs)
    ours = sorted(ours, key=lambda d: -d.score)
    assert len(ours) == len(ref) == 100
    for d, (label, score, box, _) in zip(ours, ref, strict=True):
        assert d.label == label and d.box == tuple(box) and d.score == pytest.approx(score, abs=1e-6)
        assert d.mask.shape == (50, 61) and d.mask.dtype == torch.bool
    # skipping the pairs whose class probability is not above a threshold loses no detection scoring above it
    some = instance_detections(class_logits, mask_logits, min_class_score=0.3, **kwargs)
    kept = {(label, round(score, 6)) for label, score, _, prob in ref if prob > 0.3}
    assert {(d.label, round(d.score, 6)) for d in some} == kept
    assert {(d.label, round(d.score, 6)) for d in ours if d.score > 0.3} <= kept
    assert len(instance_detections(class_logits, mask_logits, max_per_image=5, **kwargs)) == 5


def test_instance_post_processing_on_a_known_object():
    class_logits = torch.full((2, 81), -10.0)
    class_logits[0, GENEVAL_CLASSES.index("dog")] = 10.0  # query 0: surely a dog
    class_logits[1, -1] = 10.0  # query 1: no object
    mask_logits = torch.full((2, 16, 16), -20.0)
    mask_logits[0, 4:8, 2:12] = 20.0
    mask_logits[1, 12:, 12:] = 20.0  # only in the padding: cropped away
    dets = instance_detections(
        class_logits,
        mask_logits,
        input_size=(16, 16),
        valid_size=(12, 12),
        image_size=(12, 12),
        max_per_image=3,
    )
    best = max(dets, key=lambda d: d.score)
    assert best.label == "dog" and best.score == pytest.approx(1.0, abs=1e-3)
    assert best.box == (2.0, 4.0, 12.0, 8.0)  # the block, right/bottom exclusive, clipped to the valid region
    others = [d for d in dets if d is not best]
    assert all(d.score < 1e-3 for d in others)


# ---------------------------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from safetensors.torch import save_file

    from diffrl.rewards.tiny.mask2former import build_tiny_mask2former
    from diffrl.rewards.tiny.open_clip import TINY_OPEN_CLIP_ARCH, build_tiny_open_clip

    root = tmp_path_factory.mktemp("geneval")
    detector = build_tiny_mask2former(root / "detector")
    clip_dir = root / "clip"
    clip_dir.mkdir()
    state = {k: v.contiguous() for k, v in build_tiny_open_clip(seed=0).state_dict().items()}
    save_file(state, clip_dir / CLIP_FILE)  # laid out like the hub file open_clip reads
    return detector, clip_dir, TINY_OPEN_CLIP_ARCH


SMALL = {"shortest_edge": 64, "longest_edge": 128}  # a small detector input keeps the tests fast


@pytest.fixture(scope="module")
def tiny_reward(tiny_dirs):
    detector, clip_dir, arch = tiny_dirs
    return GenEval(detector=detector, clip_checkpoint=clip_dir, clip_arch=arch, detector_size=SMALL).load(
        "cpu"
    )


def batch_metadata(rows):
    rows = prompt_rows(rows)
    return {key: [r[key] for r in rows] for key in ("tag", "include", "exclude")}


TINY_ROWS = [  # the tiny detector's classes are dog, cat, bench and cup
    {"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
    {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "bench", "count": 1}]},
    {"tag": "counting", "include": [{"class": "cat", "count": 1}], "exclude": [{"class": "cat", "count": 2}]},
    {"tag": "colors", "include": [{"class": "bench", "count": 1, "color": "red"}]},
    {
        "tag": "position",
        "include": [{"class": "cup", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}],
    },
    {
        "tag": "color_attr",
        "include": [
            {"class": "cat", "count": 1, "color": "blue"},
            {"class": "dog", "count": 2, "color": "red"},
        ],
    },
]


def test_contract_end_to_end(tiny_reward):
    images = make_images(6, 64, seed=1)
    meta = batch_metadata(TINY_ROWS)
    scores = check_reward_contract(tiny_reward, images, ["x"] * 6, **meta)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert tiny_reward.name == "geneval" and not tiny_reward.differentiable
    assert tiny_reward.required_metadata == ("tag", "include")


def test_reward_follows_its_detections(tiny_reward):
    """The reward's scores are the scoring rules applied to its own detector's selected objects and colours, with
    each row's threshold; and the tiny detector gives images with none, one and several objects of a class."""
    images = make_images(8, 64, seed=1)
    rows = [TINY_ROWS[i % len(TINY_ROWS)] for i in range(8)]
    specs = [parse_metadata(r) for r in prompt_rows(rows)]
    pixels = (images * 255).round().to(torch.uint8)
    candidates = tiny_reward.detect(pixels)
    partial = []
    counts = set()
    for i, (dets, spec) in enumerate(zip(candidates, specs, strict=True)):
        objects = select_objects(dets, spec.tag)
        counts |= {len(objects.get(c, [])) for c in ("dog", "cat", "bench", "cup")}
        for cls, chosen in color_queries(objects, spec):
            colors = tiny_reward.classify_colors(pixels[i].permute(1, 2, 0).numpy(), chosen, cls)
            objects[cls] = [
                Detection(d.label, d.score, d.box, d.mask, c) for d, c in zip(chosen, colors, strict=True)
            ] + objects[cls][len(chosen) :]
        partial.append(score_objects(objects, spec).partial)
    assert {0, 1} <= counts and max(counts) >= 2
    got = tiny_reward(images, ["x"] * 8, **batch_metadata(rows))
    assert got.tolist() == pytest.approx(partial)
    assert len(set(got.tolist())) > 1


def test_strict_and_exact_scores(tiny_dirs, tiny_reward):
    detector, clip_dir, arch = tiny_dirs
    images = make_images(6, 64, seed=1)
    meta = batch_metadata(TINY_ROWS)
    results = tiny_reward.results(images, [parse_metadata(r) for r in prompt_rows(TINY_ROWS)])
    common = dict(detector=detector, clip_checkpoint=clip_dir, clip_arch=arch, detector_size=SMALL)
    strict = GenEval(strict=True, **common)(images, ["x"] * 6, **meta)
    exact = GenEval(strict=True, exact_counts=True, **common)(images, ["x"] * 6, **meta)
    assert strict.tolist() == [float(r.strict) for r in results]
    assert exact.tolist() == [float(r.exact) for r in results]
    assert set(strict.tolist()) <= {0.0, 1.0}
    assert tiny_reward(images, ["x"] * 6, **meta).tolist() == pytest.approx([r.partial for r in results])


def test_colour_crops_follow_the_reference_recipe(tiny_reward):
    """Mask on GenEval's #999 grey, crop to the box (PIL rounds), then open_clip's eval transform: resize the
    shorter side to 224 (bicubic), centre crop, OpenAI mean/std."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
    mask = np.zeros((48, 80), bool)
    mask[10:30, 20:35] = True
    mask[12, 60] = True
    detection = Detection("cup", 0.9, (20.0, 10.0, 61.0, 30.0), torch.from_numpy(mask))
    ours = tiny_reward.crops(image, [detection])[0]
    ref_pil = Image.composite(
        Image.fromarray(image), Image.new("RGB", (80, 48), (153, 153, 153)), Image.fromarray(mask)
    )
    ref_pil = ref_pil.crop((20, 10, 61, 30))
    ref = T.Compose(
        [
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ]
    )(ref_pil.convert("RGB"))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    grey = (153 / 255 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    # the centre of the crop is image column 40, outside the mask: grey; its left edge (column 30) is inside
    torch.testing.assert_close(ours[:, 112, 112], grey, atol=1e-5, rtol=0)
    assert not torch.allclose(ours[:, 112, 0], grey, atol=0.1)


def test_colour_classifier_matches_clip_benchmarks_recipe(tiny_dirs, tiny_reward):
    import open_clip

    model = tiny_reward.clip
    tokenizer = open_clip.get_tokenizer(tiny_dirs[2])
    templates = ["a photo of a {c} cup", "a photo of a {c}-colored cup", "a photo of a {c} object"]
    with torch.no_grad():
        columns = []
        for color in GENEVAL_COLORS:
            emb = F.normalize(
                model.encode_text(tokenizer([t.format(c=color) for t in templates])), dim=-1
            ).mean(0)
            columns.append(emb / emb.norm())
        classifier = torch.stack(columns, dim=1)
    torch.testing.assert_close(tiny_reward._color_classifier("cup"), classifier)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    dets = [Detection("cup", 0.9, (float(i), 0.0, float(i + 30), 40.0)) for i in range(0, 30, 6)]
    with torch.no_grad():
        features = F.normalize(model.encode_image(tiny_reward.crops(image, dets)), dim=-1)
        expected = [GENEVAL_COLORS[i] for i in (100.0 * features @ classifier).argmax(1).tolist()]
    assert tiny_reward.classify_colors(image, dets, "cup") == expected


def test_metadata_errors_come_before_the_weights_load(tmp_path):
    reward = GenEval(detector=tmp_path / "no-such-detector")  # loading would fail with FileNotFoundError
    images = make_images(2, 32)
    good = batch_metadata([ROWS["single_object"], ROWS["colors"]])
    with pytest.raises(
        ValueError, match="needs the metadata fields 'tag' and 'include'.*'include' is missing"
    ):
        reward(images, ["a", "b"], tag=good["tag"])
    with pytest.raises(ValueError, match=r"image 1: geneval metadata: color 'teal'|image 1: .*color 'teal'"):
        bad = [dict(i) for i in good["include"][1]]
        bad[0]["color"] = "teal"
        reward(images, ["a", "b"], tag=good["tag"], include=[good["include"][0], bad])
    with pytest.raises(ValueError, match=r"image 1: .*'counting' row has no 'exclude'"):
        reward(
            images,
            ["a", "b"],
            tag=["single_object", "counting"],
            include=[ROWS["single_object"]["include"]] * 2,
        )
    with pytest.raises(ValueError, match=r"metadata 'include' as 1 values for 2 images"):
        reward(images, ["a", "b"], tag="single_object", include=[ROWS["single_object"]["include"]])
    assert not reward._loaded
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reward(images, ["a", "b"], **good)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"exact_counts": True}, r"exact_counts=True only changes the strict"),
        ({"threshold": 1.5}, r"threshold=1.5 must be a number in \[0, 1\]"),
        ({"max_overlap": 0.0}, r"max_overlap=0.0 must be a number in \(0, 1\]"),
        ({"max_objects": 0}, r"max_objects=0 must be a positive integer"),
        ({"position_threshold": -1}, r"position_threshold=-1 must be a number >= 0"),
        ({"detector_size": {"shortest_edge": 800}}, r"detector_size=\{'shortest_edge': 800\} must be"),
        ({"crop_background": "greyish"}, r"crop_background='greyish' is not a PIL colour"),
        ({"clip_arch": ""}, r"clip_arch='' must be an open_clip model name"),
        ({"detector": 3}, r"detector=3 must be a hub id"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        GenEval(**kwargs)


def test_checkpoint_checks(tiny_dirs, tmp_path):
    detector, clip_dir, arch = tiny_dirs
    # a Mask2Former whose classes are not COCO's, in COCO order: refused from its config, before its weights
    other = tmp_path / "ade"
    shutil.copytree(detector, other)
    config = json.loads((other / "config.json").read_text())
    config["id2label"]["64"] = "rug"
    (other / "config.json").write_text(json.dumps(config))
    (other / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"calls class 64 'rug' where COCO has 'computer mouse'"):
        GenEval(detector=other, clip_checkpoint=clip_dir, clip_arch=arch).load()
    assert detector_labels({i: n for i, n in enumerate(GENEVAL_CLASSES)}, "x") == GENEVAL_CLASSES
    with pytest.raises(ValueError, match="predicts 2 classes"):
        detector_labels({0: "a", 1: "b"}, "x")
    with pytest.raises(ValueError, match="not an open_clip model name"):
        GenEval(detector=detector, clip_checkpoint=clip_dir, clip_arch="no-such-arch").load()
    from safetensors.torch import load_file, save_file

    state = load_file(clip_dir / CLIP_FILE)
    state.pop("visual.proj")
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match=f"does not fit open_clip arch '{arch}'"):
        GenEval(detector=detector, clip_checkpoint=tmp_path / "broken.safetensors", clip_arch=arch).load()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        GenEval(detector=empty, clip_checkpoint=clip_dir, clip_arch=arch).load()


def test_fingerprint_and_settings(tiny_dirs, tiny_reward):
    detector, clip_dir, arch = tiny_dirs
    strict = GenEval(
        strict=True, detector=detector, clip_checkpoint=clip_dir, clip_arch=arch, detector_size=SMALL
    )
    assert strict.settings()["score"] == "strict" and tiny_reward.settings()["score"] == "partial"
    assert strict.fingerprint != tiny_reward.fingerprint


# ---------------------------------------------------------------------------------------------- hub files
def test_hub_files_and_dry_run_listing():
    from diffrl.hub import reward_hub_files

    want = [
        HubFile(DEFAULT_DETECTOR, "config.json"),
        HubFile(DEFAULT_DETECTOR, "model.safetensors"),
        HubFile(DEFAULT_DETECTOR, "preprocessor_config.json"),
        HubFile(DEFAULT_CLIP, CLIP_FILE),
    ]
    assert GenEval.hub_files() == want
    assert reward_hub_files("geneval", {}) == want
    assert [str(f) for f in want][-1] == "timm/vit_large_patch14_clip_224.openai/open_clip_model.safetensors"
    assert GenEval.hub_files(detector="/local/detector", clip_checkpoint="/local/clip.safetensors") == []
    assert GenEval.hub_files(detector="me/m2f", clip_checkpoint="me/clip")[0] == HubFile(
        "me/m2f", "config.json"
    )
    assert GenEval.hub_files(detector="me/m2f", clip_checkpoint="me/clip")[-1] == HubFile(
        "me/clip", CLIP_FILE
    )


def test_registry_builds_lazily():
    reward = load_reward("geneval", strict=True)
    assert isinstance(reward, GenEval) and reward.strict and not reward._loaded


def test_missing_weights_fail_fast_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    reward = GenEval()
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        reward(make_images(1, 32), ["a photo of a bench"], **batch_metadata([ROWS["single_object"]]))
    assert time.perf_counter() - start < 10
    message = str(info.value)
    for f in GenEval.hub_files():
        assert str(f) in message
    assert "diffrl download geneval" in message


# ---------------------------------------------------------------------------------------------- real checkpoints
@pytest.mark.weights
def test_real_checkpoints_load_and_score():
    """The default detector (its COCO labels checked) and CLIP load from the hub cache and score every tag."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reward = GenEval(device=device).load()
    images = make_images(len(ROWS), 512, seed=2).to(device)
    meta = batch_metadata(list(ROWS.values()))
    scores = reward(images, [r["prompt"] for r in ROWS.values()], **meta)
    assert scores.shape == (len(ROWS),) and ((scores >= 0) & (scores <= 1)).all()
