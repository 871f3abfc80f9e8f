"""Distributed training on CPU: ``accelerate launch`` with 2 processes (gloo) against 1 process with the same global
batch, for every trainer; bf16 autocast on CPU; the example accelerate configs.

How the 2-process runs are launched: ``accelerate launch --cpu --num_processes 2`` starts ONE process in accelerate
1.15 (``--cpu`` takes the simple launcher, which only fans out through ``mpirun --mpirun_hostfile``). The local
multi-process launcher is ``--multi_gpu`` (torchrun); with ``ACCELERATE_USE_CPU=true`` in the environment each
process runs on the CPU with the gloo backend (``DistributedType.MULTI_CPU``). The tests check ``num_processes``
in the run's resolved config, so a launch that silently falls back to one process fails.

Tolerances: the two runs draw the same prompts and the same per-row noise, so they sample the same images, but the
forward passes see batches of different sizes (8 rows in one process, 4 in each of two) and the gradient is summed
in a different order (local sums, then the all-reduce mean), so results agree up to float32 rounding, not bitwise.
Reward means agree to ~1e-7 relative and reward stds to ~1e-5 (the second step's std, after one update, is a small
difference of nearly equal rewards); they are compared with rel 1e-4, abs 1e-6, while a statistic computed on one
process's rewards only would be off by percents. Adam divides each gradient by its running RMS, so a last-bit
difference in a near-zero gradient can move a weight by a few percent of one step (lr = 1e-3 in the tiny presets):
the trained weights are compared with atol = 0.02 * lr = 2e-5 (rtol 1e-4), the tolerance the single-process
invariance tests in test_trainers.py use, and the test also checks that the update itself is much larger than that
tolerance so the comparison is not vacuous.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffrl.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]
ALGOS = ["flow_grpo", "diffusion_nft", "refl"]
PRESET = {a: ROOT / "configs" / "tiny" / f"{a}.yaml" for a in ALGOS}
PROMPTS = str(ROOT / "configs" / "tiny" / "prompts.txt")
LR = 1e-3  # optim.lr of the tiny presets
WEIGHT_ATOL = 0.02 * LR
WEIGHT_RTOL = 1e-4
STAT_RTOL, STAT_ATOL = 1e-4, 1e-6  # reward means/stds, eval means (measured: <= 1e-5 relative)
ZSCORE_ATOL = 1e-4  # the mean of z-scores, 0 in exact arithmetic (measured: <= 1e-5)
GATED = "tests.test_distributed:gated_saturation"


def gated_saturation(images, prompts, **metadata):
    """Saturation for prompts of odd length, a constant for the others: those groups have zero reward std.

    Used by the Flow-GRPO and DiffusionNFT runs so that ``sample/zero_std_frac`` is neither 0 nor 1 (the first
    two steps of the tiny presets draw one prompt of each kind) and the process holding the constant group
    drops all its samples under ``flow_grpo.dynamic_sampling``.
    """
    sat = (images.amax(dim=1) - images.amin(dim=1)).mean(dim=(1, 2)).float()
    odd = torch.tensor([len(p) % 2 == 1 for p in prompts], device=sat.device)
    return torch.where(odd, sat, torch.full_like(sat, 0.5))


# reward and options of each trainer's comparison run (on top of the tiny preset)
EXTRA = {
    "flow_grpo": [f"reward={{{GATED}: 1.0}}", "flow_grpo.dynamic_sampling=true"],
    "diffusion_nft": [f"reward={{{GATED}: 1.0}}"],
    # a batch-normalised sum: ReFL scores micro-batches but normalises with the whole step's statistics, gathered
    # over processes; evaluation logs raw scores only (weight 0), as its normalisation is per process
    "refl": [
        "reward={brightness: 1.0, saturation: 0.5}",
        "reward_normalize=batch",
        "eval_reward={brightness: 0.0, saturation: 0.0}",
    ],
    # Flow-GRPO with a batch-normalised sum: each process scores its share, the parts are gathered and every share
    # is z-scored with the statistics of the whole batch
    "flow_grpo-batch": [
        "reward={brightness: 1.0, saturation: 0.5}",
        "reward_normalize=batch",
        "eval_reward={brightness: 0.0, saturation: 0.0}",
    ],
}
CASES = list(EXTRA)


def _algo(case: str) -> str:
    return case.split("-")[0]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One tiny-model cache for the test process and every launched process, built before any launch (two
    processes building it at once would race)."""
    from diffrl.models.loading import tiny_model_dir

    old = os.environ.get("DIFFRL_CACHE")
    cache = tmp_path_factory.mktemp("diffrl-cache-dist")
    os.environ["DIFFRL_CACHE"] = str(cache)
    tiny_model_dir("tiny:sd3")
    yield cache
    if old is None:
        os.environ.pop("DIFFRL_CACHE", None)
    else:
        os.environ["DIFFRL_CACHE"] = old


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(out: Path, case: str) -> list[str]:
    # 2 steps; eval on 3 prompts (split 2 + 1 over two processes); a checkpoint every step, keeping 1, so the
    # run saves, prunes and re-saves (the final save at step 2 replaces checkpoint-000002)
    return [
        f"output_dir={out}",
        f"data.train={PROMPTS}",
        "max_steps=2",
        "checkpointing_steps=1",
        "checkpoints_total_limit=1",
        "data.eval_size=3",
        *EXTRA[case],
    ]


def _launch_two_processes(case: str, out: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DIFFRL_CACHE": str(cache),
        "ACCELERATE_USE_CPU": "true",  # gloo on CPU even where GPUs are visible
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "diffrl.train",
        str(PRESET[_algo(case)]),
        *_overrides(out, case),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)


def _metrics(out: Path) -> list[dict]:
    # every line must parse: two writers appending to the same file would interleave or duplicate rows
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in ("trainable", "extra", "ema"):
        path = ckpt / f"{name}.safetensors"
        if path.is_file():
            tensors.update({f"{name}/{k}": v for k, v in load_file(str(path)).items()})
    return tensors


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow  # 30-50 s per trainer on a 2-core CPU (a 2-process launch plus a 1-process reference run)
@pytest.mark.parametrize("case", CASES)
def test_two_processes_match_one_process_with_the_same_global_batch(case, tmp_path, shared_cache):
    algo = _algo(case)
    # --- reference: one process, in this test process
    ref_out = tmp_path / "one"
    trainer = build_trainer(
        PRESET[algo],
        _overrides(ref_out, case),
        **({"reward": gated_saturation} if GATED in " ".join(EXTRA[case]) else {}),
    )
    assert trainer.world == 1
    initial = {
        f"trainable/{n}": p.detach().clone() for n, p in zip(trainer.param_names, trainer.params, strict=True)
    }
    trainer.train()

    # --- two processes through accelerate launch
    out = tmp_path / "two"
    t0 = time.perf_counter()
    proc = _launch_two_processes(case, out, shared_cache)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    derived = json.loads((out / "config.json").read_text())["derived"]
    assert derived["num_processes"] == 2, derived

    # --- metrics.jsonl: written by the main process only, one row per logged step
    ref_rows, rows = _metrics(ref_out), _metrics(out)
    assert [(r["step"], sorted(r)) for r in rows] == [(r["step"], sorted(r)) for r in ref_rows]
    train_rows = [r for r in rows if "train/lr" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert [r["step"] for r in rows if any(k.startswith("eval/") for k in r)] == [0, 2]

    # --- group statistics use the rewards of every process: same images, so the same values as one process
    stat_keys = [
        k
        for k in ref_rows[1]
        if k.startswith(("reward/", "eval/reward/")) or k in ("sample/zero_std_frac", "train/ratio_mean")
    ]
    assert any(k.endswith("/std") for k in stat_keys)
    for ref_row, row in zip(ref_rows, rows, strict=True):
        for key in [k for k in ref_row if k.startswith("eval/")] + (
            stat_keys if "train/lr" in ref_row else []
        ):
            # the mean of a batch-normalised sum is 0 up to rounding divided by the parts' (small) stds
            atol = ZSCORE_ATOL if key == "reward/combined/mean" and "reward_normalize=batch" in EXTRA[case] else STAT_ATOL
            assert row[key] == pytest.approx(ref_row[key], rel=STAT_RTOL, abs=atol), (row["step"], key)
    if GATED in " ".join(EXTRA[case]):
        fracs = [r["sample/zero_std_frac"] for r in ref_rows if "sample/zero_std_frac" in r]
        assert 0.0 < fracs[0] < 1.0, fracs  # one zero-std group of two: each process alone would see 0 or 1
        assert [r["sample/zero_std_frac"] for r in train_rows] == fracs

    # --- checkpoints: one writer, atomic rename, complete and loadable
    ref_ckpts = sorted(p.name for p in ref_out.glob("checkpoint-*"))
    ckpts = sorted(p.name for p in out.glob("checkpoint-*"))
    assert ckpts == ref_ckpts == ["checkpoint-000002"]
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".write-test-*"))
    ckpt = out / ckpts[-1]
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    state = torch.load(ckpt / "optim.pt", map_location="cpu", weights_only=False)
    assert state["scheduler"]["last_epoch"] == 2
    assert (out / "lora").is_dir()

    # --- the trained weights (and DiffusionNFT's old policy) agree within the tolerance of the module docstring
    ref, got = _checkpoint_tensors(ref_out / ref_ckpts[-1]), _checkpoint_tensors(ckpt)
    assert ref.keys() == got.keys() and initial.keys() <= ref.keys()
    diff = _max_abs_diff(ref, got)
    update = _max_abs_diff({k: ref[k] for k in initial}, initial)
    print(
        f"\n[{algo}] 2 processes: {seconds:.1f} s; max |w_2proc - w_1proc| = {diff:.3g}; max update = {update:.3g}"
    )
    assert update > 20 * WEIGHT_ATOL, "the weights barely moved: the comparison would prove nothing"
    for key in ref:
        assert got[key].dtype == ref[key].dtype == torch.float32, key
        torch.testing.assert_close(
            got[key], ref[key], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=lambda m, key=key: f"{key}: {m}"
        )


# ---------------------------------------------------------------------------------------------- bf16 on CPU


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change once set: start from a clean one
    and leave a clean one for the next test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("algo", ALGOS)
def test_bf16_autocast_on_cpu(algo, tmp_path, shared_cache, fresh_accelerate_state, monkeypatch):
    import diffrl.trainers.flow_grpo as fg

    seen = {"velocity": set(), "rollout_logp": set(), "step_logp": set()}
    if algo == "flow_grpo":
        rollout, sde_step = fg.rollout, fg.sde_step

        def recording_rollout(*args, **kwargs):
            out = rollout(*args, **kwargs)
            seen["rollout_logp"].add(out.log_probs.dtype)
            return out

        def recording_sde_step(*args, **kwargs):
            out = sde_step(*args, **kwargs)
            seen["step_logp"].add(out.log_prob.dtype)
            return out

        monkeypatch.setattr(fg, "rollout", recording_rollout)
        monkeypatch.setattr(fg, "sde_step", recording_sde_step)

    trainer = build_trainer(
        PRESET[algo],
        [
            f"output_dir={tmp_path}",
            f"data.train={PROMPTS}",
            "mixed_precision=bf16",
            "max_steps=2",
            "checkpointing_steps=0",
            "data.eval_size=1",
        ],
    )
    assert trainer.accelerator.mixed_precision == "bf16"
    velocity = trainer.model.velocity

    def recording_velocity(*args, **kwargs):
        v = velocity(*args, **kwargs)
        seen["velocity"].add(v.dtype)
        return v

    monkeypatch.setattr(trainer.model, "velocity", recording_velocity)
    trainer.train()

    assert torch.bfloat16 in seen["velocity"], seen  # autocast is really on
    assert all(p.dtype == torch.float32 for p in trainer.params)
    weights = load_file(str(tmp_path / "checkpoint-000002" / "trainable.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    rows = _metrics(tmp_path)
    train_rows = [r for r in rows if "train/lr" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for row in train_rows:
        assert row["train/skipped"] == 0.0, row
        assert all(torch.isfinite(torch.tensor(float(v))) for v in row.values()), row
    assert any(k.startswith("eval/") for k in rows[0])
    if algo == "flow_grpo":
        assert seen["rollout_logp"] == seen["step_logp"] == {torch.float32}, seen
        # the first inner step recomputes the rollout's log-probs under the same autocast: on-policy, ratio 1
        first = train_rows[0]
        assert first["train/ratio_mean"] == 1.0 and first["train/clipfrac"] == 0.0, first


# ---------------------------------------------------------------------------------------------- accelerate configs


def test_example_accelerate_configs_parse_and_use_ddp_only():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import ComputeEnvironment, DistributedType

    files = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert {f.name for f in files} >= {"single_gpu.yaml", "multi_gpu.yaml", "multi_node.yaml"}
    for path in files:
        # what `accelerate launch --config_file` reads; unknown keys fail
        cfg = load_config_from_file(str(path))
        assert isinstance(cfg, ClusterConfig), path.name
        assert cfg.compute_environment == ComputeEnvironment.LOCAL_MACHINE, path.name
        assert cfg.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU), path.name
        assert not cfg.fsdp_config and not cfg.deepspeed_config, path.name
        assert cfg.mixed_precision == "no", path.name  # diffrl's own mixed_precision key decides
        assert cfg.num_processes >= 1 and cfg.num_processes % cfg.num_machines == 0, path.name
        if cfg.distributed_type == DistributedType.NO:
            assert cfg.num_processes == 1 and cfg.num_machines == 1, path.name
        else:
            assert cfg.num_processes >= 2, path.name
        if cfg.num_machines > 1:
            assert cfg.main_process_ip and cfg.main_process_port, path.name
        # what `accelerate launch --config_file FILE -m diffrl.train ...` makes of it (no process is started)
        args = launch_command_parser().parse_args(
            ["--config_file", str(path), "-m", "diffrl.train", "configs/tiny/flow_grpo.yaml"]
        )
        args, _, _ = _validate_launch_command(args)
        assert args.multi_gpu == (cfg.distributed_type == DistributedType.MULTI_GPU), path.name
        assert (args.num_processes, args.num_machines) == (cfg.num_processes, cfg.num_machines), path.name
        assert not args.use_fsdp and not args.use_deepspeed, path.name
