"""benchmarks/demo_seeds.py: the demo over seeds, each run re-measured on more images."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("demo_seeds", ROOT / "benchmarks" / "demo_seeds.py")
ds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ds)


def _remeasured(base, final, n=8, objects=2.5):
    return {
        "results": {
            "base": {"all": {"n": n, "strict": base, "objects": 2.0}},
            "fine-tuned": {"all": {"n": n, "strict": final, "objects": objects}},
        }
    }


def test_seed_rows_and_their_spread_are_hand_computed():
    summary = {
        "base_strict_accuracy": 0.25,
        "final_strict_accuracy": 0.5,
        "total_cpu_seconds": 600.0,
        "eval_images": 96,
    }
    row = ds.seed_row(3, summary, _remeasured(0.3, 0.45))
    assert (
        row["seed"] == 3 and row["images"] == 8 and row["demo_images"] == 96 and row["cpu_seconds"] == 600.0
    )
    assert (row["demo_base"], row["demo_final"], row["demo_gain"]) == (25.0, 50.0, 25.0)
    assert row["gain"] == pytest.approx(15.0) and row["final"] == pytest.approx(45.0)
    mean, sd = ds.spread([20.0, 25.0, 30.0])  # sample sd: sqrt((25 + 0 + 25) / 2) = 5
    assert (mean, sd) == (25.0, 5.0)
    assert ds.spread([7.0]) == (7.0, 0.0)
    rows = [row, ds.seed_row(4, summary, _remeasured(0.3, 0.55))]
    lines = ds.table(rows)
    assert lines[-1].startswith("| mean +- sd |") and "+20.0 +- 7.1" in lines[-1]  # gains 15, 25: sd 7.07
    assert "| 96 / 8 |" in lines[2]


def test_two_seeds_run_and_are_re_measured(tmp_path, capsys):
    """Two 1-step demos on 6 held-out prompts, each re-measured on the same 6 prompts; the seed whose summary is
    already there is re-measured only (a second call runs no demo)."""
    lines = (ROOT / "configs" / "toy" / "eval.jsonl").read_text().splitlines()[:6]
    small = tmp_path / "eval.jsonl"
    small.write_text("\n".join(lines) + "\n")
    out = tmp_path / "seeds"
    args = ["--out", str(out), "--seeds", "0", "1", "--images-per-prompt", "1", "--max-prompts", "6"]
    demo = ["max_steps=1", f"data.eval={small}", "report_to=none"]
    demo += ["awm.prompts_per_step=2", "awm.group_size=2"]
    assert ds.main([*args, "--", *demo]) == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [r["seed"] for r in rows] == [0, 1]
    for r in rows:
        summary = json.loads((out / f"seed-{r['seed']}" / "demo_summary.json").read_text())
        assert r["demo_gain"] == pytest.approx(
            100 * (summary["final_strict_accuracy"] - summary["base_strict_accuracy"])
        )
        remeasured = json.loads((out / f"seed-{r['seed']}" / "remeasured.json").read_text())
        assert r["final"] == pytest.approx(100 * remeasured["results"]["fine-tuned"]["all"]["strict"])
        assert r["images"] == 6
    # the same base model and seeds: both runs re-measure the same base accuracy
    assert rows[0]["base"] == rows[1]["base"]
    capsys.readouterr()
    assert ds.main([*args, "--", *demo]) == 0
    assert "diffrl demo:" not in capsys.readouterr().out  # nothing trained again
    with pytest.raises(SystemExit):
        ds.main([*args, "--", "seed=3"])
