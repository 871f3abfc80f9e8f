"""benchmarks/toy_failures.py: the failure breakdown of hand-placed objects is the hand-computed one."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("toy_failures", ROOT / "benchmarks" / "toy_failures.py")
tf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tf)

LEFT_OF = {
    "category": "position",
    "objects": [
        {"shape": "circle", "color": "red", "count": 1, "exact": False},
        {"shape": "square", "color": "blue", "count": 1, "exact": False},
    ],
    "relation": {"type": "left of", "a": 0, "b": 1},
}
TWO_GREEN_CIRCLES = {
    "category": "counting",
    "objects": [{"shape": "circle", "color": "green", "count": 2, "exact": True}],
    "relation": None,
}


def obj(shape, color, cx, cy=32.0):
    return {"shape": shape, "color": color, "cx": cx, "cy": cy}


RED, BLUE, GREEN = obj("circle", "red", 10), obj("square", "blue", 50), obj("circle", "green", 30)


def test_position_images_split_into_relation_reversed_and_missing():
    right = tf.image_failures([RED, BLUE], LEFT_OF, 2.0)
    assert right == {"strict": True, "present": True, "objects": 2, "relation": True, "reversed_only": False}
    swapped = tf.image_failures([obj("circle", "red", 50), obj("square", "blue", 10)], LEFT_OF, 2.0)
    assert swapped == {
        "strict": False,
        "present": True,
        "objects": 2,
        "relation": False,
        "reversed_only": True,
    }
    # one above the other: neither left of nor right of (the offset across exceeds the offset along)
    stacked = tf.image_failures([obj("circle", "red", 30, 5), obj("square", "blue", 31, 60)], LEFT_OF, 2.0)
    assert (stacked["present"], stacked["relation"], stacked["reversed_only"]) == (True, False, False)
    # an extra blue square on the right makes the relation hold: extras are allowed, as in the verifier
    both = tf.image_failures([obj("circle", "red", 30), obj("square", "blue", 5), BLUE], LEFT_OF, 2.0)
    assert (both["strict"], both["relation"], both["reversed_only"]) == (True, True, False)
    missing = tf.image_failures([RED, obj("square", "red", 50)], LEFT_OF, 2.0)
    assert (missing["present"], missing["relation"]) == (False, False)


def test_counting_is_exact_only_with_the_asked_number():
    two = tf.image_failures([GREEN, obj("circle", "green", 50), RED], TWO_GREEN_CIRCLES, 2.0)
    assert two == {"strict": True, "present": True, "objects": 3, "count_exact": True}
    three = tf.image_failures(
        [GREEN, obj("circle", "green", 50), obj("circle", "green", 10)], TWO_GREEN_CIRCLES, 2.0
    )
    assert three == {"strict": False, "present": True, "objects": 3, "count_exact": False}
    one = tf.image_failures([GREEN], TWO_GREEN_CIRCLES, 2.0)
    assert (one["present"], one["count_exact"]) == (False, False)


def test_summary_fractions_count_relations_among_images_with_both_objects():
    rows = [
        tf.image_failures([RED, BLUE], LEFT_OF, 2.0),  # right
        tf.image_failures([obj("circle", "red", 50), obj("square", "blue", 10)], LEFT_OF, 2.0),  # reversed
        tf.image_failures([RED], LEFT_OF, 2.0),  # blue square missing: not in the relation fractions
        tf.image_failures([GREEN, obj("circle", "green", 50)], TWO_GREEN_CIRCLES, 2.0),  # exact
        tf.image_failures(
            [GREEN, obj("circle", "green", 50), RED, BLUE], TWO_GREEN_CIRCLES, 2.0
        ),  # exact, extras
        tf.image_failures([GREEN] * 3, TWO_GREEN_CIRCLES, 2.0),  # three: present, count wrong
    ]
    s = tf.summarise(rows, ["position"] * 3 + ["counting"] * 3)
    pos, cnt, every = s["position"], s["counting"], s["all"]
    assert (pos["n"], pos["n_present"]) == (3, 2)
    assert pos["strict"] == pytest.approx(1 / 3) and pos["present"] == pytest.approx(2 / 3)
    assert (pos["relation"], pos["reversed_only"], pos["neither"]) == (0.5, 0.5, 0.0)
    assert pos["objects"] == pytest.approx(5 / 3)
    assert (cnt["n_present"], cnt["count_exact"]) == (3, pytest.approx(2 / 3))
    assert cnt["strict"] == pytest.approx(2 / 3) and cnt["objects"] == 3.0
    assert every["n"] == 6 and every["strict"] == pytest.approx(3 / 6) and "relation" not in every


def _strict_of(path: str, n_prompts: int, seed: int) -> float:
    """The verifier's strict accuracy of one image per held-out prompt from the model at ``path``, sampled as the
    script samples."""
    import json

    import torch

    from diffrl.models import load_model
    from diffrl.sampling import sample_images
    from diffrl.toy.rewards import verify

    rows = [
        json.loads(line) for line in (ROOT / "configs/toy/eval.jsonl").read_text().splitlines()[:n_prompts]
    ]
    kw = dict(num_steps=8, guidance_scale=1.0, height=64, width=64, seed=seed, batch_size=64)
    with torch.no_grad():
        images = sample_images(load_model(path), [r["prompt"] for r in rows], **kw)
    return float(verify(images, [r["scene"] for r in rows])[1].float().mean())


def test_script_strict_accuracy_is_the_verifiers_on_the_same_images(tmp_path):
    import json

    out = tmp_path / "failures.json"
    assert (
        tf.main(["--max-prompts", "12", "--images-per-prompt", "2", "--seed", "7", "--json", str(out)]) == 0
    )
    result = json.loads(out.read_text())["results"]
    assert set(result) == {"base"}  # no --lora: the base model only
    assert result["base"]["all"]["n"] == 24
    # two images a prompt, seeds 7 and 8, 12 prompts each
    assert result["base"]["all"]["strict"] == pytest.approx(
        (_strict_of("toy", 12, 7) + _strict_of("toy", 12, 8)) / 2
    )
    per_category = sum(s["n"] for c, s in result["base"].items() if c != "all")
    assert per_category == 24


def test_finetuned_pipeline_is_sampled_with_the_bases_seeds(tmp_path):
    """``--finetuned`` (a fully fine-tuned run's pipeline/) is compared with ``--model`` on the same seeds: here the
    shipped toy model against the toy:cliptext pipeline folder, each row the verifier's on that model's images."""
    import json

    from diffrl.toy.assets import toy_cliptext_model_dir

    tuned = str(toy_cliptext_model_dir())
    out = tmp_path / "failures.json"
    args = ["--max-prompts", "12", "--images-per-prompt", "1", "--seed", "3", "--json", str(out)]
    assert tf.main([*args, "--finetuned", tuned]) == 0
    result = json.loads(out.read_text())["results"]
    assert set(result) == {"base", "fine-tuned"}
    assert result["base"]["all"]["strict"] == pytest.approx(_strict_of("toy", 12, 3))
    assert result["fine-tuned"]["all"]["strict"] == pytest.approx(_strict_of(tuned, 12, 3))


def test_finetuned_must_be_a_pipeline_folder_and_not_given_with_lora(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tf.main(["--finetuned", str(tmp_path)])
    assert "no model_index.json there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tf.main(["--finetuned", str(tmp_path), "--lora", str(tmp_path)])
    assert "give one of them" in capsys.readouterr().err
