import pytest

from diffrl.cli import main
from diffrl.hub import collect_targets
from diffrl.rewards import HubFile, Reward


class NeedsFiles(Reward):
    name = "needs_files"

    @classmethod
    def hub_files(cls, version="a", **kwargs):
        return [
            HubFile("org/repo", f"weights-{version}.pt"),
            HubFile("org/repo", "extra.json", optional=True),
        ]


def test_collect_targets_from_words_and_config(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model: stabilityai/stable-diffusion-3.5-medium\n"
        "train:\n  reward: {hpsv2: 1.0, pickscore: {weight: 0.5, kwargs: {dtype: bf16}}}\n"
        "eval_rewards: [imagereward, {name: hpsv2, kwargs: {version: v2}}]\n"
    )
    rewards, models = collect_targets(["jpeg_compressibility", "quality=80", str(cfg)])
    assert rewards[0] == ("jpeg_compressibility", {"quality": 80})
    assert ("pickscore", {"dtype": "bf16"}) in rewards and ("hpsv2", {"version": "v2"}) in rewards
    assert ("imagereward", {}) in rewards
    assert models == ["stabilityai/stable-diffusion-3.5-medium"]
    with pytest.raises(ValueError, match="before any reward"):
        collect_targets(["version=v2"])


def test_download_dry_run_lists_exact_files(capsys):
    assert main(["download", "test_cli:NeedsFiles", "version=b", "jpeg_compressibility", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "org/repo weights-b.pt" in out and "org/repo extra.json (optional)" in out
    assert "reward jpeg_compressibility: 0 hub file(s)" in out


def test_download_errors_are_one_line(capsys):
    assert main(["download", "no_such_reward", "--dry-run"]) == 2
    assert "unknown reward 'no_such_reward'" in capsys.readouterr().err
    assert main(["download", "missing.yaml", "--dry-run"]) == 2


def test_download_offline_fails_clearly(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert main(["download", "test_cli:NeedsFiles"]) == 1
    assert "could not fetch org/repo/weights-a.pt" in capsys.readouterr().err


def test_download_reads_a_training_preset(capsys):
    from pathlib import Path

    preset = Path(__file__).resolve().parents[1] / "configs" / "sd35m_diffusion_nft_multireward.yaml"
    rewards, models = collect_targets([str(preset)])
    assert models == ["stabilityai/stable-diffusion-3.5-medium"]
    assert ("hpsv2", {"version": "v2.1"}) in rewards and ("pickscore", {}) in rewards
    assert main(["download", str(preset), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "xswu/HPSv2 HPS_v2.1_compressed.pt" in out and "model stabilityai/stable-diffusion-3.5-medium" in out
    )


def test_cpu_threads_policy(monkeypatch):
    import torch

    from diffrl.utils import set_cpu_threads

    saved = torch.get_num_threads()
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_cpu_threads() == 1 and torch.get_num_threads() == 1  # CPU only: one thread by default
        assert set_cpu_threads(2) == 2 and torch.get_num_threads() == 2  # --threads wins
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        # the user's OMP_NUM_THREADS is kept
        assert set_cpu_threads() is None and torch.get_num_threads() == 2
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_cpu_threads() is None  # with a GPU torch's default stays
        with pytest.raises(ValueError, match="threads=0 must be a positive integer"):
            set_cpu_threads(0)
    finally:
        torch.set_num_threads(saved)


# ---------------------------------------------------------------------------------------------- shared error report


def test_known_errors_map_to_the_same_exit_codes_for_every_command():
    import errno

    from diffrl.cli.errors import exit_code
    from diffrl.config import ConfigError
    from diffrl.hub import DownloadError
    from diffrl.trainers.engine import RewardError, TrainingAborted

    for err in (
        ConfigError("x"),
        ValueError("x"),
        FileNotFoundError("x"),
        PermissionError("x"),
        ImportError("x"),
    ):
        assert exit_code(err) == 2, err  # bad input, before the work starts
        assert exit_code(err, started=True) == (1 if isinstance(err, OSError) else None), err
    for err in (TrainingAborted("x"), RewardError("x"), DownloadError("x")):
        assert exit_code(err) == exit_code(err, started=True) == 1, err
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    assert exit_code(disk_full) == exit_code(disk_full, started=True) == 1
    assert exit_code(KeyboardInterrupt()) == 130
    assert exit_code(RuntimeError("a bug")) is None  # keeps its traceback


def test_command_errors_print_one_line_and_clean_up_after_a_failure(capsys):
    from diffrl.cli.errors import CommandErrors
    from diffrl.trainers.engine import TrainingAborted

    ended = []
    with CommandErrors() as errors:
        errors.started(cleanup=lambda: ended.append(True))
        raise TrainingAborted("3 steps in a row had a non-finite loss")
    assert errors.code == 1 and ended == [True]
    assert capsys.readouterr().err == "error: 3 steps in a row had a non-finite loss\n"
    with CommandErrors(prefix="diffrl demo") as errors:
        raise KeyboardInterrupt
    assert errors.code == 130 and capsys.readouterr().err == "diffrl demo: interrupted\n"
    with pytest.raises(RuntimeError), CommandErrors():
        raise RuntimeError("a bug")


def test_a_disk_full_while_fetching_is_a_failure(capsys, monkeypatch):
    import errno

    import diffrl.hub

    def full(files, models, log=print):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diffrl.hub, "fetch", full)
    assert main(["download", "jpeg_compressibility"]) == 1
    assert capsys.readouterr().err.strip() == "error: [Errno 28] No space left on device"


def test_only_the_cli_parses_arguments():
    """The library modules import neither argparse nor diffrl.cli (``python -m diffrl`` and ``python -m
    diffrl.train`` start the command line, from their ``__main__`` code only)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "diffrl").rglob("*.py")):
        if "cli" in path.relative_to(root / "diffrl").parts or path.name == "__main__.py":
            continue
        tree = ast.parse(path.read_text())
        main_blocks = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        inside_main = {id(n) for block in main_blocks for n in ast.walk(block)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in inside_main:
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif node.level:  # relative: ``from ..cli import x`` inside diffrl
                    names = [f"diffrl.{node.module or ''}"]
                else:
                    names = [node.module or ""]
                bad = [
                    n for n in names if n == "argparse" or n == "diffrl.cli" or n.startswith("diffrl.cli.")
                ]
                assert not bad, (
                    f"{path.relative_to(root)} imports {bad}; argument parsing lives in diffrl.cli"
                )


def test_sample_help_names_every_tiny_model(capsys):
    from diffrl.cli.sample import TINY_FAMILIES
    from diffrl.models.loading import TINY_BUILDERS

    assert sorted(TINY_FAMILIES) == sorted(TINY_BUILDERS)
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    assert all(f in helptext for f in TINY_FAMILIES), helptext


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_prompt_is_the_prompts_option(command):
    from diffrl.cli.sample import eval_parser, sample_parser

    parser = sample_parser() if command == "sample" else eval_parser()
    rest = ["--out", "o"] if command == "sample" else ["--reward", "brightness"]
    one = parser.parse_args(["toy", "--prompt", "a red circle", *rest])
    two = parser.parse_args(["toy", "--prompts", "a red circle", "a blue square", *rest])
    assert one.prompts == ["a red circle"] and two.prompts == ["a red circle", "a blue square"]
