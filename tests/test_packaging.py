"""The wheel a user installs: built from the tracked files alone, installed into an empty folder and run from
elsewhere, it imports every mapped subpackage (``rewards/`` and ``samplers/`` live outside ``diffrl/``), ships the toy
model and the presets, and runs ``diffrl demo`` with its default preset. The presets, named ``configs/...`` as the
README names them, load from any working directory."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_presets_named_from_the_repository_root_load_from_anywhere(tmp_path, monkeypatch):
    from diffrl.config import ConfigError, load_config
    from diffrl.utils import SHIPPED_CONFIGS, shipped_config_path

    monkeypatch.chdir(tmp_path)
    assert SHIPPED_CONFIGS == ROOT / "configs"  # the checkout's (editable install)
    assert shipped_config_path("configs/tiny/flow_grpo.yaml") == str(
        ROOT / "configs" / "tiny" / "flow_grpo.yaml"
    )
    for unchanged in ("configs/tiny/none.yaml", "tiny/flow_grpo.yaml", str(tmp_path / "configs" / "x.yaml")):
        assert shipped_config_path(unchanged) == unchanged
    (tmp_path / "configs" / "tiny").mkdir(parents=True)  # a file of the working directory comes first
    (tmp_path / "configs" / "tiny" / "flow_grpo.yaml").write_text("algorithm: refl\n")
    assert shipped_config_path("configs/tiny/flow_grpo.yaml") == "configs/tiny/flow_grpo.yaml"
    cfg = load_config("configs/toy/awm.yaml")  # its data.train is configs/toy/train.jsonl
    assert cfg.data.train == str(ROOT / "configs" / "toy" / "train.jsonl")
    assert cfg.data.eval == str(ROOT / "configs" / "toy" / "eval.jsonl")
    with pytest.raises(ConfigError, match="config file configs/toy/none.yaml does not exist"):
        load_config("configs/toy/none.yaml")


def _tracked_copy(dest: Path) -> Path:
    """The files git tracks (no build/ left-overs, no run outputs), copied to ``dest``."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files are tracked")
    names = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z"], check=True, capture_output=True
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in names)):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(
            f"building the wheel offline needs setuptools >= 77 (pyproject), found {setuptools.__version__}"
        )
    tmp = tmp_path_factory.mktemp("wheel")
    src = _tracked_copy(tmp / "src")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp / "dist"),
            ".",
        ],
        cwd=src,
        check=True,
        capture_output=True,
    )
    (path,) = (tmp / "dist").glob("diffrl-*.whl")
    return path


def test_the_wheel_holds_the_mapped_packages_the_toy_model_and_the_presets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "diffrl/__init__.py",
        "diffrl/rewards/__init__.py",
        "diffrl/rewards/registry.py",
        "diffrl/samplers/__init__.py",
        "diffrl/toy/assets/sd3/model_index.json",
        "diffrl/toy/assets/sd3/transformer/config.json",
        "diffrl/toy/assets/sd3_cliptext/model_index.json",
        "diffrl/toy/assets/sd3_cliptext/text_encoder/model.safetensors",
        "diffrl/toy/assets/sd3_cliptext/transformer/diffusion_pytorch_model.safetensors",
        "diffrl/toy/assets/clip/config.json",
        "diffrl/configs/toy/demo.yaml",
        "diffrl/configs/toy/diffusion_nft.yaml",
        "diffrl/configs/toy/train.jsonl",
        "diffrl/configs/toy/eval.jsonl",
        "diffrl/configs/tiny/flow_grpo.yaml",
        "diffrl/configs/accelerate/fsdp.yaml",
    ):
        assert required in names, required
    assert any(
        n.startswith("diffrl/toy/assets/sd3/transformer/") and n.endswith(".safetensors") for n in names
    )
    assert not any(
        n.startswith(("tests/", "benchmarks/", "notebooks/", "rewards/", "samplers/")) for n in names
    )


def test_the_installed_wheel_runs_the_demo_from_anywhere(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    eval_rows = (ROOT / "configs" / "toy" / "eval.jsonl").read_text().splitlines()[:4]
    (elsewhere / "eval.jsonl").write_text("\n".join(eval_rows) + "\n")
    # -P: the working directory is not put on sys.path; PYTHONPATH puts the installed copy before the checkout's
    # editable install, so nothing of the repository is imported
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def python(code: str) -> str:
        run = subprocess.run(
            [sys.executable, "-P", "-c", code],
            cwd=elsewhere,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        return run.stdout.strip()

    where = python("import diffrl, diffrl.samplers, diffrl.rewards.registry; print(diffrl.__file__)")
    assert Path(where).is_relative_to(site)
    # diffrl train configs/toy/awm.yaml from here: the preset and its prompt file come from the wheel
    train = python(
        "from diffrl.config import load_config; print(load_config('configs/toy/awm.yaml').data.train)"
    )
    assert Path(train).is_relative_to(site) and Path(train).is_file()
    demo = subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "diffrl",
            "demo",
            "--pictures",
            "2",
            "output_dir=run",
            "max_steps=1",
            "eval_every=0",
            "data.eval=eval.jsonl",
            "report_to=none",
            "awm.prompts_per_step=2",
            "awm.group_size=2",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    summary = json.loads((elsewhere / "run" / "demo_summary.json").read_text())
    assert summary["eval_images"] == 16  # 4 held-out prompts, 4 images each (the demo preset)
    config = json.loads((elsewhere / "run" / "config.json").read_text())["config"]
    assert config["model"]["path"] == "toy:cliptext"  # the demo's base, found inside the installed package
    assert Path(config["data"]["train"]).is_relative_to(
        site
    )  # the preset's prompt file, shipped in the wheel
    assert (elsewhere / "run" / "before_after.png").is_file()
