"""Distributed training on CPU: ``accelerate launch`` with 2 processes (gloo) against 1 process with the same global
batch, for every trainer, with DDP and with FSDP2 sharding (``fsdp=true``; resume and the final LoRA too); what
FSDP refuses; bf16 autocast on CPU; the example accelerate configs.

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
import subprocess
import time
from pathlib import Path

import pytest
import torch
from launch_rewards import gated_saturation
from launching import two_process_command, two_process_env
from safetensors.torch import load_file

from diffrl.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]
ALGOS = ["flow_grpo", "diffusion_nft", "refl", "awm", "dpo"]
PRESET = {a: ROOT / "configs" / "tiny" / f"{a}.yaml" for a in ALGOS}
PROMPTS = str(ROOT / "configs" / "tiny" / "prompts.txt")
LR = 1e-3  # optim.lr of the tiny presets
WEIGHT_ATOL = 0.02 * LR
WEIGHT_RTOL = 1e-4
STAT_RTOL, STAT_ATOL = 1e-4, 1e-6  # reward means/stds, eval means (measured: <= 1e-5 relative)
ZSCORE_ATOL = 1e-4  # the mean of z-scores, 0 in exact arithmetic (measured: <= 1e-5)
GATED = "tests.launch_rewards:gated_saturation"


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
    # AWM: group advantages on the gathered rewards, levels and noise keyed by global rows, the EMA adapter
    "awm": [f"reward={{{GATED}: 1.0}}", "awm.kl_weight=0.01"],
    # DPO: pairs formed within each process's whole groups, the loss averaged over the valid pairs of all processes
    "dpo": [f"reward={{{GATED}: 1.0}}", "dpo.pairs=all"],
    # the reference options that keep the update independent of the process count: dropped zero-advantage samples
    # (each process drops its own), old log-probs recomputed in the training shapes, the EMA warm-up; DiffusionNFT's
    # per-sample levels and DPM-2 rollouts (both keyed by global rows)
    "flow_grpo-reference": [
        f"reward={{{GATED}: 1.0}}",
        "flow_grpo.drop_zero_advantage=true",
        "flow_grpo.old_logp=recompute",
        "ema_decay=0.9",
        "ema_warmup=true",
    ],
    "diffusion_nft-reference": [
        f"reward={{{GATED}: 1.0}}",
        "diffusion_nft.per_sample_levels=true",
        "diffusion_nft.solver=dpm2",
    ],
    # AWM with stochastic rollout steps (each row's SDE noise keyed by its global row), DPM-2 after them
    "awm-sde": [f"reward={{{GATED}: 1.0}}", "awm.sampler=sde", "awm.solver=dpm2"],
    # online DPO sampling the reference with SDE steps (each row's noise keyed by its global row), the reference a
    # copy of the policy from step 1
    "dpo-sde": [
        f"reward={{{GATED}: 1.0}}",
        "dpo.rollout_policy=reference",
        "dpo.sampler=sde",
        "dpo.ref_update_every=1",
    ],
    # AWM with SA-Solver rollouts, noisy on the steps ending in awm.sde_t_range (each row's noise its own)
    "awm-sa_solver": [f"reward={{{GATED}: 1.0}}", "awm.sampler=sa_solver", "awm.noise_level=0.4"],
    # AWM off-policy: rollouts from the EMA adapter (lagging from step 1 on), the clipped ratio to it
    "awm-off_policy": [
        f"reward={{{GATED}: 1.0}}",
        "awm.rollout_policy=ema",
        "awm.ema_kl_rate=0.2",
        "awm.clip_range=0.05",
    ],
    # AWM on each group's two most varied rollouts (PODS): each process keeps its own groups' share
    "awm-pods": [f"reward={{{GATED}: 1.0}}", "awm.train_per_group=2"],
    "flow_grpo-pods": [f"reward={{{GATED}: 1.0}}", "flow_grpo.train_per_group=2"],
    "diffusion_nft-pods": [f"reward={{{GATED}: 1.0}}", "diffusion_nft.train_per_group=2"],
    # Flow-GRPO with a batch-normalised sum: each process scores its share, the parts are gathered and every share
    # is z-scored with the statistics of the whole batch
    "flow_grpo-batch": [
        "reward={brightness: 1.0, saturation: 0.5}",
        "reward_normalize=batch",
        "eval_reward={brightness: 0.0, saturation: 0.0}",
    ],
    # Qwen-Image: prompt masks padded per process share, true CFG in Flow-GRPO's rollouts (the 1-process reference
    # run builds tiny:qwen_image in the shared cache before the launch)
    "flow_grpo-qwen_image": [f"reward={{{GATED}: 1.0}}", "model.path=tiny:qwen_image"],
    "diffusion_nft-qwen_image": [f"reward={{{GATED}: 1.0}}", "model.path=tiny:qwen_image"],
    # Pref-GRPO: win rates within the gathered groups, each image's own random trained steps (keyed by global rows)
    "flow_grpo-pref_grpo": [
        f"reward={{{GATED}: 1.0}}",
        "flow_grpo.advantage=winrate",
        "flow_grpo.timestep_selection=random",
        "flow_grpo.timestep_fraction=0.7",
    ],
    # MixGRPO(-Flash): the sliding window (a function of the step) moving every step, DPM-2 after it
    "flow_grpo-mixgrpo": [
        f"reward={{{GATED}: 1.0}}",
        "flow_grpo.sde_window=2",
        "flow_grpo.window_schedule=sliding",
        "flow_grpo.window_shift_every=1",
        "flow_grpo.post_window_solver=dpm2",
    ],
    # GRPO-Guard: RatioNorm with the rollout's transition means, the 1 / |dt| step weights
    "flow_grpo-grpo_guard": [
        f"reward={{{GATED}: 1.0}}",
        "flow_grpo.ratio_norm=true",
        "flow_grpo.grad_reweight=true",
    ],
    # Wan 2.2 with both experts trained (each process's gradients of both, zeros where its levels reached none)
    "flow_grpo-wan22_both": [
        f"reward={{{GATED}: 1.0}}",
        "model.path=tiny:wan22",
        "model.expert=both",
        "sample.num_frames=5",
    ],
}
CASES = list(EXTRA)


def _algo(case: str) -> str:
    return case.split("-")[0]


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


def _launch_two_processes(
    case: str, out: Path, cache: Path, overrides: list[str] | None = None
) -> subprocess.CompletedProcess:
    cmd = [
        *two_process_command(),
        str(PRESET[_algo(case)]),
        *(overrides if overrides is not None else _overrides(out, case)),
    ]
    env = two_process_env(DIFFRL_CACHE=str(cache))
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
        if k.startswith(("reward/", "eval/reward/"))
        or k in ("sample/zero_std_frac", "train/ratio_mean", "sample/pair_frac", "train/num_pairs")
    ]
    assert any(k.endswith("/std") for k in stat_keys)
    for ref_row, row in zip(ref_rows, rows, strict=True):
        # evaluation rows: the rewards and the reward-hacking monitor (proxy, gold, gap: gathered over processes)
        for key in [k for k in ref_row if k.startswith(("eval/", "monitor/"))] + (
            stat_keys if "train/lr" in ref_row else []
        ):
            # the mean of a batch-normalised sum is 0 up to rounding divided by the parts' (small) stds
            atol = (
                ZSCORE_ATOL
                if key == "reward/combined/mean" and "reward_normalize=batch" in EXTRA[case]
                else STAT_ATOL
            )
            assert row[key] == pytest.approx(ref_row[key], rel=STAT_RTOL, abs=atol), (row["step"], key)
    if GATED in " ".join(EXTRA[case]):
        # DPO: the fraction of pair slots with a preference (the constant group's pairs have none)
        frac = "sample/pair_frac" if algo == "dpo" else "sample/zero_std_frac"
        fracs = [r[frac] for r in ref_rows if frac in r]
        assert 0.0 < fracs[0] < 1.0, fracs  # one zero-std group of two: each process alone would see 0 or 1
        assert [r[frac] for r in train_rows] == fracs

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


@pytest.mark.slow  # ~60 s on a 2-core CPU (a 2-process launch plus a 1-process reference run)
def test_two_processes_match_one_process_for_offline_dpo(tmp_path, shared_cache):
    """Offline Diffusion-DPO from a preference file: the main process encodes and caches the pairs, the other reads
    the cache; each step's 4 pairs are split 2 + 2 over the processes, the loss averaged over all of them, so the
    trained weights and the logged loss agree with one process's within the tolerances of the module docstring."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    colours = [(230, 20, 20), (20, 20, 230), (20, 200, 20), (240, 240, 240), (30, 30, 30), (200, 200, 20)]
    for i, c in enumerate(colours):
        Image.new("RGB", (32, 32), c).save(data / f"{i}.png")
    rows = [{"prompt": f"pair {i}", "chosen": f"{i}.png", "rejected": f"{(i + 1) % 6}.png"} for i in range(6)]
    (data / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def overrides(out: Path) -> list[str]:
        return [
            f"output_dir={out}",
            f"data.train={PROMPTS}",  # the evaluation prompts (3 held out)
            "max_steps=2",
            "checkpointing_steps=1",
            "checkpoints_total_limit=1",
            "data.eval_size=3",
            "dpo.mode=offline",
            f"dpo.dataset={data / 'prefs.jsonl'}",
            "dpo.pairs_per_step=4",
            "reward={saturation: 1.0}",
        ]

    ref_out = tmp_path / "one"
    trainer = build_trainer(PRESET["dpo"], overrides(ref_out))
    assert trainer.world == 1
    initial = {
        f"trainable/{n}": p.detach().clone() for n, p in zip(trainer.param_names, trainer.params, strict=True)
    }
    trainer.train()
    out = tmp_path / "two"
    proc = _launch_two_processes("dpo", out, shared_cache, overrides(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    derived = json.loads((out / "config.json").read_text())["derived"]
    assert derived["num_processes"] == 2 and derived["pairs_per_process"] == 2, derived
    assert len(list(out.glob("dpo-latents-*.safetensors"))) == 1  # one writer
    ref_rows, rows = _metrics(ref_out), _metrics(out)
    assert [(r["step"], sorted(r)) for r in rows] == [(r["step"], sorted(r)) for r in ref_rows]
    for ref_row, row in zip(ref_rows, rows, strict=True):
        for key in [k for k in ref_row if k.startswith("eval/") or k in ("train/loss", "train/num_pairs")]:
            assert row[key] == pytest.approx(ref_row[key], rel=STAT_RTOL, abs=STAT_ATOL), (row["step"], key)
    ckpt = sorted(p.name for p in out.glob("checkpoint-*"))[-1]
    ref, got = _checkpoint_tensors(ref_out / ckpt), _checkpoint_tensors(out / ckpt)
    assert ref.keys() == got.keys() and initial.keys() <= ref.keys()
    update = _max_abs_diff({k: ref[k] for k in initial}, initial)
    print(
        f"\n[dpo offline] max |w_2proc - w_1proc| = {_max_abs_diff(ref, got):.3g}; max update = {update:.3g}"
    )
    assert update > 20 * WEIGHT_ATOL, "the weights barely moved: the comparison would prove nothing"
    for key in ref:
        torch.testing.assert_close(
            got[key], ref[key], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=lambda m, key=key: f"{key}: {m}"
        )


# ---------------------------------------------------------------------------------------------- FSDP2 on CPU
# fsdp=true shards the transformer with fully_shard over the gloo processes (accelerate never reports FSDP on the
# CPU). Same tolerances as DDP: the sharded runs differ from one process by the summation order of the gradients.

# reward and options of each trainer's FSDP run (dynamic_sampling is refused under FSDP; EMA is on for DiffusionNFT)
FSDP_EXTRA = {
    "flow_grpo": [f"reward={{{GATED}: 1.0}}"],
    "diffusion_nft": [f"reward={{{GATED}: 1.0}}", "ema_decay=0.5"],
    "refl": EXTRA["refl"],
    # off-policy: the rollouts sampled with the sharded EMA adapter, which lags from step 1 on (decay 0.2), the
    # clipped ratio to it, and the EMA pull
    "awm": [*EXTRA["awm"], "awm.rollout_policy=ema", "awm.ema_kl_rate=0.2", "awm.clip_range=0.05"],
    # the reference adapter becomes a copy of the sharded policy at step 1 and is checkpointed with it
    "dpo": [*EXTRA["dpo"], "dpo.ref_update_every=1"],
}


def two_step_overrides(out: Path, algo: str, *extra: str) -> list[str]:
    """2 steps, a checkpoint after each (both kept: the resume tests start from the first), for the sharded runs."""
    return [
        f"output_dir={out}",
        f"data.train={PROMPTS}",
        "max_steps=2",
        "checkpointing_steps=1",
        "checkpoints_total_limit=2",
        "data.eval_size=3",
        *FSDP_EXTRA[algo],
        *extra,
    ]


def _fsdp_overrides(out: Path, algo: str) -> list[str]:
    return two_step_overrides(out, algo, "fsdp=true")


@pytest.fixture(scope="module")
def fsdp_run(shared_cache, tmp_path_factory):
    """The 2-process FSDP run of a trainer (with extra overrides), launched once per module: ``(output_dir,
    seconds)``."""
    runs: dict[tuple, tuple[Path, float]] = {}

    def run(algo: str, extra: tuple[str, ...] = ()) -> tuple[Path, float]:
        key = (algo, extra)
        if key not in runs:
            out = tmp_path_factory.mktemp(f"fsdp-{algo}") / "two"
            t0 = time.perf_counter()
            proc = _launch_two_processes(algo, out, shared_cache, _fsdp_overrides(out, algo) + list(extra))
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
            runs[key] = (out, time.perf_counter() - t0)
        return runs[key]

    return run


def _lora_file(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))


def assert_matches_one_process(
    out: Path,
    ref_out: Path,
    initial: dict,
    *,
    state_ratio: tuple[float, float],
    lora: bool = True,
    slack: float = 1.0,
    weight_atol: float = WEIGHT_ATOL,
) -> tuple[float, float]:
    """A 2-process sharded run (``out``) against the 1-process run with the same global batch (``ref_out``): the same
    metric rows with the same reward statistics and ``train/grad_norm``, a local AdamW state ``state_ratio`` of the
    1-process one, the same checkpoint files (whole tensors; the AdamW state in the unsharded layout, with the same
    values), and the same trained weights and final LoRA within the DDP tolerance. Returns ``(max weight difference,
    max update)``; the update must be far above the tolerance, so that the comparison proves something."""
    ref_rows, rows = _metrics(ref_out), _metrics(out)
    assert [(r["step"], sorted(r)) for r in rows] == [(r["step"], sorted(r)) for r in ref_rows]
    for ref_row, row in zip(ref_rows, rows, strict=True):
        for key in [k for k in ref_row if k.startswith(("reward/", "eval/reward/"))]:
            atol = ZSCORE_ATOL if key == "reward/combined/mean" else STAT_ATOL
            assert row[key] == pytest.approx(ref_row[key], rel=STAT_RTOL, abs=atol), (row["step"], key)
        assert row.get("train/skipped", 0.0) == 0.0, row
        if "memory/optimizer_state_mib" in ref_row:  # this process's AdamW states, against one process's
            ratio = row["memory/optimizer_state_mib"] / ref_row["memory/optimizer_state_mib"]
            assert state_ratio[0] < ratio < state_ratio[1], ratio
        if "train/grad_norm" in ref_row:  # the global norm of the averaged gradient, before clipping
            assert row["train/grad_norm"] == pytest.approx(
                ref_row["train/grad_norm"], rel=1e-4 * slack, abs=1e-6
            )
    ckpts = sorted(p.name for p in out.glob("checkpoint-*"))
    assert ckpts == sorted(p.name for p in ref_out.glob("checkpoint-*"))
    assert ckpts == ["checkpoint-000001", "checkpoint-000002"]
    ref, got = _checkpoint_tensors(ref_out / ckpts[-1]), _checkpoint_tensors(out / ckpts[-1])
    assert ref.keys() == got.keys() and initial.keys() <= ref.keys()
    ref_opt = torch.load(ref_out / ckpts[-1] / "optim.pt", map_location="cpu", weights_only=False)
    opt = torch.load(out / ckpts[-1] / "optim.pt", map_location="cpu", weights_only=False)
    assert opt["scheduler"] == ref_opt["scheduler"]
    groups = [
        [{k: v for k, v in g.items() if k != "params"} for g in o["optimizer"]["param_groups"]]
        for o in (opt, ref_opt)
    ]
    assert groups[0] == groups[1]
    assert opt["optimizer"]["param_groups"][0]["params"] == ref_opt["optimizer"]["param_groups"][0]["params"]
    assert opt["optimizer"]["state"].keys() == ref_opt["optimizer"]["state"].keys()
    for i, st in opt["optimizer"]["state"].items():
        ref_st = ref_opt["optimizer"]["state"][i]
        assert float(st["step"]) == float(ref_st["step"]) == 2.0
        assert not hasattr(st["exp_avg"], "placements")  # whole tensors, not shards
        torch.testing.assert_close(st["exp_avg"], ref_st["exp_avg"], rtol=1e-4 * slack, atol=1e-7 * slack)
        torch.testing.assert_close(
            st["exp_avg_sq"], ref_st["exp_avg_sq"], rtol=1e-3 * slack, atol=1e-10 * slack
        )
    pairs = {k: (got[k], ref[k]) for k in ref}
    if lora:  # the final LoRA (diffusers format; the EMA weights where EMA is on)
        ref_lora, lora_w = _lora_file(ref_out), _lora_file(out)
        assert ref_lora.keys() == lora_w.keys() and ref_lora
        pairs.update({f"lora/{k}": (lora_w[k], ref_lora[k]) for k in lora_w})
    update = _max_abs_diff({k: ref[k] for k in initial}, initial)
    assert update > 20 * WEIGHT_ATOL, "the weights barely moved: the comparison would prove nothing"
    for name, (a, b) in pairs.items():
        assert a.dtype == b.dtype == torch.float32, name
        torch.testing.assert_close(
            a, b, rtol=WEIGHT_RTOL, atol=weight_atol, msg=lambda m, name=name: f"{name}: {m}"
        )
    return max(float((a - b).abs().max()) for a, b in pairs.values()), update


def _resume_two_processes(
    algo: str, checkpoint: Path, out: Path, cache: Path, overrides: list[str]
) -> subprocess.CompletedProcess:
    """Continue from ``checkpoint`` (of another run) into ``out`` with a 2-process launch, which must succeed."""
    proc = _launch_two_processes(algo, out, cache, [*overrides, f"resume_from_checkpoint={checkpoint}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow  # 35-45 s per trainer on a 2-core CPU (a 2-process launch plus a 1-process reference run)
@pytest.mark.parametrize("algo", ALGOS)
def test_fsdp_two_processes_match_one_process_with_the_same_global_batch(algo, tmp_path, fsdp_run):
    ref_out = tmp_path / "one"
    trainer = build_trainer(
        PRESET[algo],
        _fsdp_overrides(ref_out, algo),
        **({"reward": gated_saturation} if GATED in " ".join(FSDP_EXTRA[algo]) else {}),
    )
    assert trainer.world == 1 and not trainer.sharded  # fsdp=true with one process trains unsharded
    initial = {
        f"trainable/{n}": p.detach().clone() for n, p in zip(trainer.param_names, trainer.params, strict=True)
    }
    trainer.train()

    out, seconds = fsdp_run(algo)
    derived = json.loads((out / "config.json").read_text())["derived"]
    assert derived["num_processes"] == 2 and derived["fsdp"] is True, derived

    # DPO's gradient is the difference of the chosen and the rejected samples' gradients, which cancel in part: the
    # summation order of the shards shows in its norm (measured 1.2e-4 relative) and in AdamW's first moment
    # (measured 1e-6 absolute), 10x the other trainers'; the weights agree within the same tolerance as every trainer's
    slack = 30.0 if algo == "dpo" else 1.0
    diff, update = assert_matches_one_process(out, ref_out, initial, state_ratio=(0.4, 0.65), slack=slack)
    print(
        f"\n[{algo}] FSDP 2 processes: {seconds:.1f} s; max |w_fsdp - w_1proc| = {diff:.3g}; max update = {update:.3g}"
    )


@pytest.mark.slow  # ~40 s (a 2-process launch plus a 1-process reference run)
def test_fsdp_full_fine_tuning_matches_one_process_and_saves_the_whole_pipeline(tmp_path, fsdp_run):
    """Every transformer weight trained and sharded: the checkpoint gathers them all, and the final pipeline is
    written from an unsharded copy that diffusers loads as the original transformer class."""
    from diffrl.models import load_model

    # an evaluation before each checkpoint: its forward leaves the root's own (trained) weights gathered, which the
    # optimiser-state gather once failed on (KeyError: 0) until Distributed.reshard_roots gave them back
    extra = ("model.lora_rank=0", "flow_grpo.kl_beta=0", "eval_every=1")
    ref_out = tmp_path / "one"
    trainer = build_trainer(
        PRESET["flow_grpo"], _fsdp_overrides(ref_out, "flow_grpo") + list(extra), reward=gated_saturation
    )
    assert not trainer.model.has_lora and len(trainer.params) == len(
        list(trainer.model.transformer.parameters())
    )
    initial = {
        f"trainable/{n}": p.detach().clone() for n, p in zip(trainer.param_names, trainer.params, strict=True)
    }
    trainer.train()
    out, _ = fsdp_run("flow_grpo", extra)
    assert json.loads((out / "config.json").read_text())["derived"]["fsdp"] is True
    ref, got = (
        _checkpoint_tensors(ref_out / "checkpoint-000002"),
        _checkpoint_tensors(out / "checkpoint-000002"),
    )
    assert ref.keys() == got.keys() and initial.keys() <= ref.keys()
    update = _max_abs_diff({k: ref[k] for k in initial}, initial)
    assert update > 20 * WEIGHT_ATOL, "the weights barely moved: the comparison would prove nothing"
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)
    opt = torch.load(out / "checkpoint-000002" / "optim.pt", map_location="cpu", weights_only=False)[
        "optimizer"
    ]
    assert len(opt["state"]) == len(initial) and not hasattr(opt["state"][0]["exp_avg"], "placements")
    # the final pipeline: the original class in its config, the trained weights, loadable by diffrl and diffusers
    config = json.loads((out / "pipeline" / "transformer" / "config.json").read_text())
    assert config["_class_name"] == type(trainer.model.transformer).__name__ == "SD3Transformer2DModel"
    loaded = load_model(str(out / "pipeline"))
    weights = dict(loaded.transformer.named_parameters())
    for name, p in zip(trainer.param_names, trainer.params, strict=True):
        torch.testing.assert_close(weights[name].float(), p.detach(), rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)


@pytest.mark.slow  # ~60 s (a 2-process launch plus a 1-process reference run)
def test_fsdp_pref_grpo_random_steps_with_micro_batches_of_one_match_one_process(tmp_path, fsdp_run):
    """Pref-GRPO's per-image random steps under FSDP (as the shipped Pref-GRPO presets run): with micro-batches of
    one image every process runs the same number of forwards, so the sharded run neither deadlocks nor differs from
    one process."""
    extra = (
        "flow_grpo.advantage=winrate",
        "flow_grpo.timestep_selection=random",
        "flow_grpo.timestep_fraction=0.7",
        "flow_grpo.ratio_norm=true",
        "flow_grpo.grad_reweight=true",
        "optim.train_batch_size=1",
    )
    ref_out = tmp_path / "one"
    trainer = build_trainer(
        PRESET["flow_grpo"], _fsdp_overrides(ref_out, "flow_grpo") + list(extra), reward=gated_saturation
    )
    initial = {
        f"trainable/{n}": p.detach().clone() for n, p in zip(trainer.param_names, trainer.params, strict=True)
    }
    trainer.train()
    out, seconds = fsdp_run("flow_grpo", extra)
    assert json.loads((out / "config.json").read_text())["derived"]["fsdp"] is True
    diff, update = assert_matches_one_process(out, ref_out, initial, state_ratio=(0.4, 0.65))
    print(f"\n[pref_grpo] FSDP 2 processes: {seconds:.1f} s; max diff {diff:.3g}; max update = {update:.3g}")


@pytest.mark.slow  # ~30 s each (a 2-process launch plus a 1-process reference run)
@pytest.mark.parametrize(
    "family, block_key",
    [("flux", "single_transformer_blocks"), ("z_image", "noise_refiner"), ("wan", "blocks.")],
)
def test_fsdp_shards_each_familys_blocks_and_matches_one_process(family, block_key, tmp_path, fsdp_run):
    """Each adapter names the block lists FSDP2 shards (``shard_block_lists``): FLUX's ``single_transformer_blocks``
    next to ``transformer_blocks``, Z-Image's refiners and layers, Wan's ``blocks``; the 2-process sharded run
    trains the same LoRA as one process."""
    from diffrl.models.loading import load_model, tiny_model_dir

    tiny_model_dir(f"tiny:{family}")  # built here before the launch: two processes building it would race
    assert load_model(f"tiny:{family}").shard_blocks()  # the adapter finds blocks to shard
    extra = (f"model.path=tiny:{family}",)
    ref_out = tmp_path / "one"
    build_trainer(
        PRESET["diffusion_nft"],
        _fsdp_overrides(ref_out, "diffusion_nft") + list(extra),
        reward=gated_saturation,
    ).train()
    out, seconds = fsdp_run("diffusion_nft", extra)
    assert json.loads((out / "config.json").read_text())["derived"]["fsdp"] is True
    ref, got = _lora_file(ref_out), _lora_file(out)
    assert ref.keys() == got.keys() and any(block_key in k for k in ref)
    assert max(float(ref[k].abs().max()) for k in ref if "lora_B" in k) > 20 * WEIGHT_ATOL  # B starts at 0
    print(
        f"\n[{family} diffusion_nft] FSDP 2 processes: {seconds:.1f} s; max diff {_max_abs_diff(ref, got):.3g}"
    )
    for key in ref:
        torch.testing.assert_close(
            got[key], ref[key], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=lambda m, key=key: f"{key}: {m}"
        )


@pytest.mark.slow  # ~40 s (two 2-process launches)
def test_fsdp_with_bf16_and_gradient_checkpointing_equals_ddp_bitwise(tmp_path, shared_cache, fsdp_run):
    """Sharding changes nothing but where the weights live: with 2 processes FSDP's reduce-scatter average and
    DDP's all-reduce mean are the same float sum ``(a + b) / 2``, so the runs agree bitwise, also under bf16
    autocast with the transformer's gradient checkpointing (one process differs from both by bf16 rounding of
    differently sized batches). Without gradient clipping: ``clip_grad_norm_`` sums the squares of each sharded
    gradient's two halves where DDP takes the norm of the whole tensor, so with clipping on the coefficient, and
    then the weights, differ in the last bit (measured: 7.5e-9 on weights of about 0.2, half a float32 ulp); the
    clipped runs are compared with a tolerance against one process in the tests above."""
    extra = ("model.gradient_checkpointing=true", "mixed_precision=bf16", "optim.max_grad_norm=0")
    sharded, _ = fsdp_run("refl", extra)
    ddp = tmp_path / "ddp"
    proc = _launch_two_processes(
        "refl", ddp, shared_cache, _fsdp_overrides(ddp, "refl") + [*extra, "fsdp=false"]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert json.loads((ddp / "config.json").read_text())["derived"]["fsdp"] is False
    assert json.loads((sharded / "config.json").read_text())["derived"]["fsdp"] is True
    a, b = _checkpoint_tensors(ddp / "checkpoint-000002"), _checkpoint_tensors(sharded / "checkpoint-000002")
    la, lb = _lora_file(ddp), _lora_file(sharded)
    assert a.keys() == b.keys() and la.keys() == lb.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), (key, float((a[key] - b[key]).abs().max()))
    for key in la:
        assert torch.equal(la[key], lb[key]), key
    rows = [r for r in _metrics(sharded) if "train/lr" in r]
    assert [r["train/skipped"] for r in rows] == [0.0, 0.0]


@pytest.mark.slow  # ~20 s (one more 2-process launch; the uninterrupted run is shared with the test above)
@pytest.mark.parametrize("algo", ["diffusion_nft", "flow_grpo", "dpo", "awm"])
def test_fsdp_resume_replays_the_uninterrupted_run_bitwise(algo, tmp_path, shared_cache, fsdp_run):
    whole, _ = fsdp_run(algo)  # steps 1 and 2 without a stop
    resumed = tmp_path / "resumed"
    _resume_two_processes(
        algo, whole / "checkpoint-000001", resumed, shared_cache, _fsdp_overrides(resumed, algo)
    )
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-000002"]
    a = _checkpoint_tensors(whole / "checkpoint-000002")
    b = _checkpoint_tensors(resumed / "checkpoint-000002")
    assert a.keys() == b.keys()
    for key in a:  # weights, EMA, DiffusionNFT's old policy: bitwise
        assert torch.equal(a[key], b[key]), (key, float((a[key] - b[key]).abs().max()))
    opt_a = torch.load(whole / "checkpoint-000002" / "optim.pt", map_location="cpu", weights_only=False)
    opt_b = torch.load(resumed / "checkpoint-000002" / "optim.pt", map_location="cpu", weights_only=False)
    for i, st in opt_a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt_b["optimizer"]["state"][i][k])), (i, k)
    la, lb = _lora_file(whole), _lora_file(resumed)
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    # the resumed run logs step 2 only, with the uninterrupted run's training metrics
    row_a = next(r for r in _metrics(whole) if r["step"] == 2 and "train/lr" in r)
    (row_b,) = [r for r in _metrics(resumed) if "train/lr" in r]
    assert row_b["step"] == 2
    assert {k: v for k, v in row_a.items() if k != "time/step_seconds"} == {
        k: v for k, v in row_b.items() if k != "time/step_seconds"
    }


@pytest.mark.slow  # ~20 s (a 1-process run and one 2-process launch)
def test_fsdp_resumes_an_unsharded_checkpoint(tmp_path, shared_cache):
    """Checkpoints are the same files sharded or not (``fsdp`` may change on resume): a 2-process FSDP run resumed
    from a 1-process checkpoint ends where the 1-process run does, within the DDP tolerance."""
    algo = "diffusion_nft"
    one = tmp_path / "one"
    build_trainer(PRESET[algo], [*_fsdp_overrides(one, algo), "fsdp=false"], reward=gated_saturation).train()
    resumed = tmp_path / "resumed"
    _resume_two_processes(
        algo, one / "checkpoint-000001", resumed, shared_cache, _fsdp_overrides(resumed, algo)
    )
    assert json.loads((resumed / "config.json").read_text())["derived"]["fsdp"] is True
    ref, got = (
        _checkpoint_tensors(one / "checkpoint-000002"),
        _checkpoint_tensors(resumed / "checkpoint-000002"),
    )
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(
            got[key], ref[key], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=lambda m, key=key: f"{key}: {m}"
        )
    opt = torch.load(resumed / "checkpoint-000002" / "optim.pt", map_location="cpu", weights_only=False)
    assert {float(st["step"]) for st in opt["optimizer"]["state"].values()} == {
        2.0
    }  # the Adam state was restored


@pytest.mark.slow  # shares the DiffusionNFT FSDP launch; ~5 s on its own after it
def test_fsdp_final_lora_loads_like_an_unsharded_one(fsdp_run):
    from diffusers import StableDiffusion3Pipeline

    from diffrl.models import load_model
    from diffrl.models.lora_files import load_lora
    from diffrl.sampling import sample_images

    out, _ = fsdp_run("diffusion_nft")
    from_lora, from_checkpoint = load_model("tiny:sd3"), load_model("tiny:sd3")
    assert "diffusers LoRA" in load_lora(from_lora, out / "lora")
    # the final LoRA holds the EMA weights, which the checkpoint's ema.safetensors holds too
    assert "training checkpoint" in load_lora(from_checkpoint, out / "checkpoint-000002")
    opts = dict(num_steps=3, guidance_scale=4.5, height=32, width=32, seed=0)
    a = sample_images(from_lora, ["a red circle", "a blue square"], batch_size=2, **opts)
    b = sample_images(from_checkpoint, ["a red circle", "a blue square"], batch_size=2, **opts)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    base = sample_images(load_model("tiny:sd3"), ["a red circle", "a blue square"], batch_size=2, **opts)
    assert (a - base).abs().max() > 1e-4  # the LoRA changes the images: the comparison is not vacuous
    pipe = StableDiffusion3Pipeline.from_pretrained(os.environ["DIFFRL_CACHE"] + "/tiny/sd3-v1")
    pipe.load_lora_weights(out / "lora")
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())


# Wan 2.2's experts under FSDP: tiny:wan22 (at 32 x 32 with 4 steps: level 1000 to the high-noise expert, 858, 602, 9 to
# the low-noise one)
WAN22 = ("model.path=tiny:wan22", "sample.num_frames=5")
WAN22_CASES = {
    # shared step windows: every process routes each trained step to the same expert
    "flow_grpo-both": ("flow_grpo", ("model.expert=both",)),
    # each sample its own levels: the processes route differently, the idle passes keep them in step
    "diffusion_nft-both": ("diffusion_nft", ("model.expert=both", "diffusion_nft.per_sample_levels=true")),
    "diffusion_nft-low": ("diffusion_nft", ("model.expert=low", "diffusion_nft.per_sample_levels=true")),
    # the transformer's gradient checkpointing recomputes each block's forward (FSDP's all-gathers) in the backward
    "diffusion_nft-both-checkpointing": (
        "diffusion_nft",
        ("model.expert=both", "diffusion_nft.per_sample_levels=true", "model.gradient_checkpointing=true"),
    ),
    # AWM and DPO: every sample's levels drawn by its global row; one expert trained under shared windows
    "awm-both": ("awm", ("model.expert=both",)),
    "dpo-both": ("dpo", ("model.expert=both",)),
    "flow_grpo-high": ("flow_grpo", ("model.expert=high",)),
    # Pref-GRPO's random steps per image (steps 0-2: one high-noise level, two low-noise ones), micro-batches of one
    "flow_grpo-both-random": (
        "flow_grpo",
        (
            "model.expert=both",
            "flow_grpo.timestep_selection=random",
            "flow_grpo.timestep_fraction=0.7",
            "optim.train_batch_size=1",
        ),
    ),
    # ReFL: the gradient through the last sampling steps (shared levels) and the reward, batch-normalised with the
    # whole step's statistics over micro-batches and processes (the preset's reward_normalize=batch: a video run's
    # combination is a FrameCombinedReward, so ReFL finds it; before, the wrapped sum z-scored each micro-batch's
    # frames and 2 processes ended 2.8e-4 from one)
    "refl-both": ("refl", ("model.expert=both",)),
}


def _nft_levels_route_the_processes_differently(steps: int = 2, per_process: int = 4, k: int = 3) -> bool:
    """Whether DiffusionNFT's per-sample levels (drawn per global row as diffusion_nft.py draws them: a permutation
    of the 4 levels of tiny:wan22 at 32 x 32, its first k trained) give one process a micro-batch with rows for an
    expert the other's has none for, at some training level: the case the idle passes keep in step (so the
    comparison below is not vacuous)."""
    import numpy as np

    from diffrl.models import load_model

    model = load_model("tiny:wan22", num_frames=5)
    levels = model.schedule(4, 32, 32)[:-1]
    high = (levels * 1000 >= model.boundary_timestep).tolist()
    assert 0 < sum(high) < len(high)  # both experts have levels
    for step in range(steps):
        for li in range(k):
            routes = [
                {
                    high[
                        int(
                            np.random.default_rng([0, step, 15485863, rank * per_process + i]).permutation(4)[
                                li
                            ]
                        )
                    ]
                    for i in range(per_process)
                }
                for rank in (0, 1)
            ]
            if routes[0] != routes[1]:
                return True
    return False


def _wan22_lora_files(out: Path) -> dict[str, torch.Tensor]:
    """The final LoRA of a Wan 2.2 run: the high-noise (or only) expert's file and, for both, transformer_2's."""
    files = {"": out / "lora" / "pytorch_lora_weights.safetensors"}
    second = out / "lora" / "transformer_2" / "pytorch_lora_weights.safetensors"
    if second.is_file():
        files["transformer_2/"] = second
    return {f"{prefix}{k}": v for prefix, path in files.items() for k, v in load_file(str(path)).items()}


@pytest.mark.slow  # 60-120 s each on 2 busy cores (a 2-process launch plus a 1-process reference run)
@pytest.mark.parametrize("case", list(WAN22_CASES))
def test_fsdp_wan22_experts_match_one_process(case, tmp_path, fsdp_run):
    """Wan 2.2 under FSDP2, one expert or both, each trained expert sharded as its own root: the 2-process run trains
    what one process does (metrics, checkpoint, AdamW state, both final LoRA files) within the DDP tolerance, also
    where levels drawn per sample route the two processes' rows to different experts."""
    from diffrl.models.loading import tiny_model_dir

    tiny_model_dir("tiny:wan22")  # built here before the launch: two processes building it would race
    algo, options = WAN22_CASES[case]
    extra = (*WAN22, *options)
    if "per_sample_levels=true" in " ".join(options):
        assert _nft_levels_route_the_processes_differently()
    ref_out = tmp_path / "one"
    trainer = build_trainer(
        PRESET[algo],
        _fsdp_overrides(ref_out, algo) + list(extra),
        **({"reward": gated_saturation} if GATED in " ".join(FSDP_EXTRA[algo]) else {}),
    )
    initial = {
        f"trainable/{n}": p.detach().clone() for n, p in zip(trainer.param_names, trainer.params, strict=True)
    }
    trainer.train()
    out, seconds = fsdp_run(algo, extra)
    assert json.loads((out / "config.json").read_text())["derived"]["fsdp"] is True
    # DPO: the chosen and rejected gradients cancel in part, so the summation order shows 10x more (as for SD3 above)
    # in AdamW's moments, and Adam turns it into weight differences of up to 7e-5 here: measured the same under DDP
    # (6.9e-5 from one process; FSDP 7.3e-5, 9e-5 from DDP), so DPO's weights get 0.1 lr
    slack, weight_atol = (30.0, 0.1 * LR) if algo == "dpo" else (1.0, WEIGHT_ATOL)
    diff, update = assert_matches_one_process(
        out, ref_out, initial, state_ratio=(0.4, 0.65), lora=False, slack=slack, weight_atol=weight_atol
    )
    ref, got = _wan22_lora_files(ref_out), _wan22_lora_files(out)
    assert ref.keys() == got.keys() and (any(k.startswith("transformer_2/") for k in ref) == ("both" in case))
    for key in ref:
        torch.testing.assert_close(
            got[key], ref[key], rtol=WEIGHT_RTOL, atol=weight_atol, msg=lambda m, key=key: f"{key}: {m}"
        )
    trained = _checkpoint_tensors(out / "checkpoint-000002")
    moved = {n.split("/", 1)[1].split(".", 1)[0] for n in initial if not torch.equal(initial[n], trained[n])}
    assert moved == ({"high", "low"} if "both" in case else {"blocks"}), moved  # every trained expert learnt
    print(
        f"\n[wan22 {case}] FSDP 2 processes: {seconds:.1f} s; max diff {diff:.3g}; max update = {update:.3g}"
    )


@pytest.mark.slow  # ~90 s (a 2-process launch plus a 1-process reference run)
def test_fsdp_wan22_full_fine_tuning_of_both_experts_saves_the_whole_pipeline(tmp_path, fsdp_run):
    """Every weight of both experts trained and sharded (AWM, levels drawn per sample, no KL): the checkpoint matches
    one process, and the final pipeline holds both experts, gathered into their original class, loadable by diffrl."""
    from diffrl.models import load_model
    from diffrl.models.loading import tiny_model_dir

    tiny_model_dir("tiny:wan22")
    extra = (*WAN22, "model.expert=both", "model.lora_rank=0", "awm.kl_weight=0", "awm.ema_kl_weight=0")
    ref_out = tmp_path / "one"
    trainer = build_trainer(
        PRESET["awm"], _fsdp_overrides(ref_out, "awm") + list(extra), reward=gated_saturation
    )
    assert not trainer.model.has_lora and {n.split(".", 1)[0] for n in trainer.param_names} == {"high", "low"}
    initial = {
        f"trainable/{n}": p.detach().clone() for n, p in zip(trainer.param_names, trainer.params, strict=True)
    }
    trainer.train()
    out, seconds = fsdp_run("awm", extra)
    assert json.loads((out / "config.json").read_text())["derived"]["fsdp"] is True
    ref, got = (
        _checkpoint_tensors(ref_out / "checkpoint-000002"),
        _checkpoint_tensors(out / "checkpoint-000002"),
    )
    assert ref.keys() == got.keys() and initial.keys() <= ref.keys()
    update = _max_abs_diff({k: ref[k] for k in initial}, initial)
    assert update > 20 * WEIGHT_ATOL, "the weights barely moved: the comparison would prove nothing"
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)
    for name in ("transformer", "transformer_2"):
        config = json.loads((out / "pipeline" / name / "config.json").read_text())
        assert config["_class_name"] == "WanTransformer3DModel"
    loaded = load_model(str(out / "pipeline"))
    weights = {
        **{f"high.{n}": p for n, p in loaded.pipe.transformer.named_parameters()},
        **{f"low.{n}": p for n, p in loaded.pipe.transformer_2.named_parameters()},
    }
    for name, p in zip(trainer.param_names, trainer.params, strict=True):
        torch.testing.assert_close(weights[name].float(), p.detach(), rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)
    print(f"\n[wan22 full both awm] FSDP 2 processes: {seconds:.1f} s; max update = {update:.3g}")


@pytest.mark.slow  # ~60 s (one more 2-process launch; the uninterrupted run is shared with the test above)
def test_fsdp_wan22_both_experts_resume_replays_the_uninterrupted_run_bitwise(
    tmp_path, shared_cache, fsdp_run
):
    """Both experts sharded: a 2-process run resumed from its first checkpoint ends bit for bit where the
    uninterrupted one does (weights of both experts, EMA, the old policy, AdamW state, both LoRA files)."""
    from diffrl.models.loading import tiny_model_dir

    tiny_model_dir("tiny:wan22")
    algo, options = WAN22_CASES["diffusion_nft-both"]
    extra = (*WAN22, *options)
    whole, _ = fsdp_run(algo, extra)
    resumed = tmp_path / "resumed"
    _resume_two_processes(
        algo, whole / "checkpoint-000001", resumed, shared_cache, _fsdp_overrides(resumed, algo) + list(extra)
    )
    a = _checkpoint_tensors(whole / "checkpoint-000002")
    b = _checkpoint_tensors(resumed / "checkpoint-000002")
    assert a.keys() == b.keys()
    assert {k.split("/", 1)[1].split(".", 1)[0] for k in a if k.startswith("trainable/")} == {"high", "low"}
    for key in a:
        assert torch.equal(a[key], b[key]), (key, float((a[key] - b[key]).abs().max()))
    opt_a = torch.load(whole / "checkpoint-000002" / "optim.pt", map_location="cpu", weights_only=False)
    opt_b = torch.load(resumed / "checkpoint-000002" / "optim.pt", map_location="cpu", weights_only=False)
    assert opt_a["optimizer"]["state"].keys() == opt_b["optimizer"]["state"].keys()
    for i, st in opt_a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt_b["optimizer"]["state"][i][k])), (i, k)
    la, lb = _wan22_lora_files(whole), _wan22_lora_files(resumed)
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


@pytest.mark.parametrize(
    "algo, overrides, match",
    [
        ("diffusion_nft", ["mixed_precision=fp16"], "mixed_precision=fp16"),
        ("refl", ["optim.use_8bit_adam=true"], "use_8bit_adam"),
        ("flow_grpo", ["flow_grpo.dynamic_sampling=true"], "dynamic_sampling"),
    ],
)
def test_fsdp_refuses_what_it_does_not_support(algo, overrides, match):
    from diffrl.config import ConfigError, load_config, validate

    base = [f"data.train={PROMPTS}", *overrides]
    cfg = load_config(PRESET[algo], base)  # fine without FSDP
    with pytest.raises(ConfigError, match=match):
        load_config(PRESET[algo], [*base, "fsdp=true"])
    with pytest.raises(ConfigError, match=match):  # an accelerate FSDP launch, whatever fsdp says
        validate(cfg, 2, sharded=True)


def test_fsdp_with_one_process_trains_unsharded_and_says_so(tmp_path, shared_cache, capsys):
    trainer = build_trainer(
        PRESET["diffusion_nft"], [f"output_dir={tmp_path}", f"data.train={PROMPTS}", "fsdp=true"]
    )
    assert trainer.world == 1 and trainer.sharded is False
    assert "fsdp=true with one process: nothing to shard" in capsys.readouterr().out
    assert not any(hasattr(p, "placements") for p in trainer.params)  # plain tensors, not DTensors


def test_fsdp1_is_refused(tmp_path, monkeypatch):  # DeepSpeed's checks: test_deepspeed.py
    import types

    import accelerate

    fake = types.SimpleNamespace(
        distributed_type=types.SimpleNamespace(name="FSDP"),
        state=types.SimpleNamespace(fsdp_plugin=types.SimpleNamespace(fsdp_version=1)),
    )
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: fake)
    with pytest.raises(NotImplementedError, match="fsdp_version: 2"):
        build_trainer(PRESET["flow_grpo"], [f"output_dir={tmp_path}", f"data.train={PROMPTS}"])


# ---------------------------------------------------------------------------------------------- bf16 on CPU


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


def test_example_accelerate_configs_parse_and_use_ddp_fsdp2_or_deepspeed():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import ComputeEnvironment, DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    files = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert {f.name for f in files} >= {"single_gpu.yaml", "multi_gpu.yaml", "multi_node.yaml", "fsdp.yaml"}
    for path in files:
        # what `accelerate launch --config_file` reads; unknown keys fail
        cfg = load_config_from_file(str(path))
        assert isinstance(cfg, ClusterConfig), path.name
        assert cfg.compute_environment == ComputeEnvironment.LOCAL_MACHINE, path.name
        fsdp = cfg.distributed_type == DistributedType.FSDP
        ds = cfg.distributed_type == DistributedType.DEEPSPEED  # checked further in test_deepspeed.py
        assert cfg.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU) or fsdp or ds, (
            path.name
        )
        assert bool(cfg.deepspeed_config) == ds, path.name
        assert bool(cfg.fsdp_config) == fsdp, path.name
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
        assert args.multi_gpu == (cfg.distributed_type == DistributedType.MULTI_GPU) or ds, path.name
        assert (args.num_processes, args.num_machines) == (cfg.num_processes, cfg.num_machines), path.name
        assert args.use_fsdp == fsdp and args.use_deepspeed == ds, path.name
        if fsdp:
            # the environment the launcher gives each process, and the plugin accelerate builds from it: FSDP2,
            # which the trainer checks (acc.state.fsdp_plugin.fsdp_version), and no rank-0-only weight loading
            env = prepare_multi_gpu_env(args)
            assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2", path.name
            assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false", path.name
            saved = dict(os.environ)
            try:
                os.environ.update(
                    {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}
                )
                plugin = FullyShardedDataParallelPlugin()
            finally:
                os.environ.clear()
                os.environ.update(saved)
            assert plugin.fsdp_version == 2 and not plugin.cpu_ram_efficient_loading, path.name
