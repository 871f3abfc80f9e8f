"""Pre-train a tiny text-to-image model on the toy shapes world, saved in the real diffusers SD3 format.

The result is a genuine :class:`~diffusers.StableDiffusion3Pipeline` directory (``save_pretrained``, safetensors)
that loads as is with ``StableDiffusion3Pipeline.from_pretrained(dir)`` and with :func:`diffrl.models.load_model`
(trained without T5, it is saved with a null T5 whose output is the zeros the pipeline uses without one; diffrl
drops it on load). Three stages (:func:`pretrain` runs them all):

1. :func:`train_vae`: an :class:`~diffusers.AutoencoderKL` (spatial factor 4: 64x64 images -> 16x16 latents, 4
   channels) trained as an autoencoder (L1 + MSE reconstruction, a small KL) on rendered train scenes; then
   :func:`set_latent_stats` sets ``shift_factor`` / ``scaling_factor`` to the latents' mean and 1 / std, so the
   pipeline's scaled latents ``(z - shift) * scale`` have about unit variance, as SD3's do.
2. Text: the two CLIP text encoders of SD3 (tiny, :func:`diffrl.tiny_tokenizers.tiny_clip_tokenizer`) are kept
   *frozen at their random initialisation*, and there is no T5 (the pipeline feeds zeros in its place). Frozen
   encoders let every prompt be encoded once (the exact ``encode_prompt`` output the adapters compute), and the
   words still reach the transformer: each CLIP token's hidden state (concatenated 32 + 32 = 64 =
   ``joint_attention_dim``, so no padding) keeps its token's identity, and the pooled projection summarises
   the prompt.
3. :func:`train_transformer`: an :class:`~diffusers.SD3Transformer2DModel` trained with SD3's rectified-flow
   objective, ``x_s = (1 - s) x0 + s eps``, target ``eps - x0``, timestep input ``1000 s``, ``s`` logit-normal
   (mean 0, std 1); the prompt is replaced by the empty prompt with probability ``cfg_dropout`` so classifier-free
   guidance works; AdamW, an EMA of the weights (the EMA is what is saved).

:func:`evaluate` samples held-out prompts with diffrl's own sampler (:func:`diffrl.sampling.sample_images`, ODE
Euler steps with CFG) and scores them with :class:`diffrl.toy.rewards.ShapesVerifier`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from diffrl.models.sd3 import collapse_empty_t5

__all__ = [
    "ToyModelConfig",
    "build_pipeline",
    "train_vae",
    "set_latent_stats",
    "encode_latents",
    "PromptEncoder",
    "train_transformer",
    "evaluate",
    "pretrain",
    "num_params",
]


@dataclass
class ToyModelConfig:
    """Architecture and training settings (defaults: the configuration of the shipped toy model)."""

    # architecture
    vae_channels: tuple[int, ...] = (16, 32, 32)  # 3 blocks -> spatial factor 4 (64x64 -> 16x16)
    latent_channels: int = 4
    clip_hidden: int = 32
    clip_layers: int = 2
    clip_max_length: int = 16  # tokenizer length (the longest toy prompt is 12 tokens with bos/eos)
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    shift: float = 1.0  # scheduler shift used at sampling time (16x16 latents need no shift towards noise)
    seed: int = 0
    image_size: int = 64
    # VAE training
    vae_steps: int = 500
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl: float = 1e-6
    # transformer training
    n_train: int = 20000
    steps: int = 12000
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 200
    cfg_dropout: float = 0.1
    ema: float = 0.999
    # checkpoints / eval
    ckpt_every: int = 1000
    n_eval: int = 128
    eval_steps: int = 8
    eval_guidance: float = 4.0
    eval_seed: int = 0
    max_sequence_length: int = 256  # T5 slot length, as diffrl's SD3 adapter encodes (zeros without T5)
    extra: dict = field(default_factory=dict)


def _log(msg: str, log: Callable[[str], None] | None) -> None:
    (log or print)(msg)


# ----------------------------------------------------------------------------------------------- building
def build_pipeline(cfg: ToyModelConfig):
    """A fresh (random) SD3 pipeline of this configuration, without T5, every module in eval mode."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diffrl.tiny_tokenizers import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer(cfg.clip_max_length)
    clip_cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=cfg.clip_hidden,
        intermediate_size=2 * cfg.clip_hidden,
        projection_dim=cfg.clip_hidden,
        num_hidden_layers=cfg.clip_layers,
        num_attention_heads=2,
        max_position_embeddings=tok.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        te1 = CLIPTextModelWithProjection(clip_cfg).eval()
        torch.manual_seed(cfg.seed + 1)
        te2 = CLIPTextModelWithProjection(clip_cfg).eval()
        torch.manual_seed(cfg.seed + 2)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
            block_out_channels=tuple(cfg.vae_channels),
            layers_per_block=1,
            act_fn="silu",
            latent_channels=cfg.latent_channels,
            norm_num_groups=8,
            sample_size=cfg.image_size,
            scaling_factor=1.0,
            shift_factor=0.0,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        ).eval()
        f = 2 ** (len(cfg.vae_channels) - 1)
        torch.manual_seed(cfg.seed + 3)
        inner = cfg.num_attention_heads * cfg.attention_head_dim
        transformer = SD3Transformer2DModel(
            sample_size=cfg.image_size // f,
            patch_size=2,
            in_channels=cfg.latent_channels,
            num_layers=cfg.num_layers,
            attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads,
            joint_attention_dim=2 * cfg.clip_hidden,
            caption_projection_dim=inner,
            pooled_projection_dim=2 * cfg.clip_hidden,
            out_channels=cfg.latent_channels,
            pos_embed_max_size=max(32, cfg.image_size // f // 2 * 2),
        ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=te1,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    for m in (te1, te2, vae, transformer):
        m.requires_grad_(False)
    return pipe


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------- VAE
def train_vae(
    vae,
    images: torch.Tensor,
    *,
    steps: int,
    batch: int = 32,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    log_every: int = 100,
) -> list[float]:
    """Train ``vae`` in place as an autoencoder on ``images`` (N, 3, H, W) in [0, 1]; returns the loss per step."""
    g = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: min(1.0, (i + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / max(1, steps)))),
    )
    losses = []
    t0 = time.time()
    for i in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=g)
        x = images[idx] * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        loss_rec = (rec - x).abs().mean() + F.mse_loss(rec, x)
        kl = post.kl().mean() / x[0].numel()
        loss = loss_rec + kl_weight * kl * x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss_rec.item())
        if (i + 1) % log_every == 0 or i == 0:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            _log(
                f"vae step {i + 1}/{steps} rec_loss {recent:.4f} ({(time.time() - t0) / (i + 1):.3f} s/it)",
                log,
            )
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unscaled) posterior ``(mean, std)`` of ``images`` in [0, 1]."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        post = vae.encode(images[i : i + batch] * 2 - 1).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def set_latent_stats(vae, mean: torch.Tensor, std: torch.Tensor) -> tuple[float, float]:
    """Set the VAE's ``shift_factor`` (latent mean) and ``scaling_factor`` (1 / latent std) from posterior
    samples, like SD3's constants; returns ``(scaling_factor, shift_factor)``."""
    g = torch.Generator().manual_seed(0)
    z = mean + std * torch.randn(mean.shape, generator=g)
    shift = float(z.mean())
    scale = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    return scale, shift


@torch.no_grad()
def reconstruction_check(vae, images: torch.Tensor, scenes: list[dict]) -> dict:
    """How well the verifier reads the VAE's reconstructions (an upper bound on what the generator can reach)."""
    from diffrl.toy.rewards import ShapesVerifier

    post = vae.encode(images * 2 - 1).latent_dist
    rec = (vae.decode(post.mean).sample / 2 + 0.5).clamp(0, 1)
    ver = ShapesVerifier()
    p_in, s_in = ver.verify(images, scenes)
    p_rec, s_rec = ver.verify(rec, scenes)
    return {
        "l1": float((rec - images).abs().mean()),
        "strict_orig": float(s_in.mean()),
        "strict_recon": float(s_rec.mean()),
        "partial_recon": float(p_rec.mean()),
        "n": images.shape[0],
    }


# ----------------------------------------------------------------------------------------------- text
class PromptEncoder:
    """Caches the (frozen) pipeline's ``encode_prompt`` output per prompt, storing only the CLIP part: the
    T5 slot is zeros without T5 and is appended on the fly, so the batches equal what the SD3 adapter computes."""

    def __init__(self, pipe, max_sequence_length: int = 256):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.clip_len = pipe.tokenizer_max_length

    @torch.no_grad()
    def add(self, prompts: list[str], batch: int = 256) -> None:
        todo = sorted({p for p in prompts if p not in self.cache})
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=chunk,
                prompt_2=None,
                prompt_3=None,
                device=torch.device("cpu"),
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
            assert embeds.shape[1] == self.clip_len + self.max_sequence_length
            assert torch.all(embeds[:, self.clip_len :] == 0)
            for j, p in enumerate(chunk):
                self.cache[p] = (embeds[j, : self.clip_len].clone(), pooled[j].clone())

    def batch(self, prompts: list[str], collapsed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds, pooled)``; with ``collapsed`` the T5 slot is one zero token (for
        :class:`~diffrl.models.sd3.CollapsedContextAttnProcessor`) instead of ``max_sequence_length`` of them."""
        embeds = torch.stack([self.cache[p][0] for p in prompts])
        pooled = torch.stack([self.cache[p][1] for p in prompts])
        n_pad = 1 if collapsed else self.max_sequence_length
        zeros = embeds.new_zeros(embeds.shape[0], n_pad, embeds.shape[-1])
        return torch.cat([embeds, zeros], dim=1), pooled


# ----------------------------------------------------------------------------------------------- transformer
def train_transformer(
    pipe,
    latents_mean: torch.Tensor,
    latents_std: torch.Tensor,
    prompts: list[str],
    *,
    cfg: ToyModelConfig,
    encoder: PromptEncoder | None = None,
    on_checkpoint: Callable[[int, torch.nn.Module], None] | None = None,
    log: Callable[[str], None] | None = None,
    log_every: int = 50,
) -> tuple[list[float], torch.nn.Module]:
    """Flow-matching training of ``pipe.transformer`` on raw VAE posteriors ``(mean, std)`` (N, C, h, w) with
    their ``prompts``; returns ``(loss per step, EMA transformer)``. ``on_checkpoint(step, ema)`` is called every
    ``cfg.ckpt_every`` steps and at the end. Afterwards ``pipe.transformer`` holds the EMA weights."""
    vae_cfg = pipe.vae.config
    scale, shift = vae_cfg.scaling_factor, vae_cfg.shift_factor
    encoder = encoder or PromptEncoder(pipe, cfg.max_sequence_length)
    encoder.add(list(prompts) + [""])
    collapsed = cfg.max_sequence_length > 1
    empty_embeds, empty_pooled = encoder.batch([""], collapsed)

    model = pipe.transformer
    model.train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    default_processors = model.attn_processors
    if collapsed:  # exact and cheaper: one zero T5 token counted max_sequence_length times
        collapse_empty_t5(model, encoder.clip_len, cfg.max_sequence_length)
    decay_params = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed.pos_embed" not in n]
    other_params = [
        p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed.pos_embed" not in n)
    ]
    opt = torch.optim.AdamW(
        [
            {"params": decay_params, "weight_decay": cfg.weight_decay},
            {"params": other_params, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.99),
    )
    steps = cfg.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: (
            min(1.0, (i + 1) / max(1, cfg.warmup))
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / max(1, steps))))
        ),
    )
    g = torch.Generator().manual_seed(cfg.seed + 10)
    n = latents_mean.shape[0]
    losses: list[float] = []
    t0 = time.time()
    for i in range(steps):
        idx = torch.randint(0, n, (cfg.batch,), generator=g)
        z = latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=g)
        x0 = (z - shift) * scale
        eps = torch.randn(x0.shape, generator=g)
        s = torch.sigmoid(torch.randn(cfg.batch, generator=g)).view(-1, 1, 1, 1)
        xs = (1 - s) * x0 + s * eps
        target = eps - x0
        batch_prompts = [prompts[j] for j in idx.tolist()]
        embeds, pooled = encoder.batch(batch_prompts, collapsed)
        drop = torch.rand(cfg.batch, generator=g) < cfg.cfg_dropout
        if drop.any():
            embeds[drop] = empty_embeds
            pooled[drop] = empty_pooled
        pred = model(
            hidden_states=xs,
            timestep=s.flatten() * 1000,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        d = min(cfg.ema, (1 + i) / (10 + i))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - d)
        losses.append(loss.item())
        if (i + 1) % log_every == 0 or i == 0:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            _log(
                f"dit step {i + 1}/{steps} loss {recent:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"({(time.time() - t0) / (i + 1):.3f} s/it)",
                log,
            )
        if on_checkpoint is not None and ((i + 1) % cfg.ckpt_every == 0 or i + 1 == steps):
            on_checkpoint(i + 1, ema)
    model.set_attn_processor(default_processors)
    model.load_state_dict(ema.state_dict())
    model.eval().requires_grad_(False)
    return losses, ema


# ----------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(
    model_or_dir,
    *,
    n_eval: int = 128,
    num_steps: int = 8,
    guidance_scale: float = 4.0,
    seed: int = 0,
    split: str = "eval",
    prompt_seed: int = 0,
    image_size: int = 64,
    batch_size: int = 64,
    return_images: bool = False,
) -> dict:
    """Strict / partial accuracy of samples of ``n_eval`` prompts from ``make_prompt_sets(…, seed=prompt_seed)``
    (``split="eval"``: the held-out set; ``"train"``: train prompts), overall and per category."""
    from diffrl.models import load_model
    from diffrl.sampling import sample_images
    from diffrl.toy.rewards import ShapesVerifier
    from diffrl.toy.scenes import make_prompt_sets

    model = load_model(model_or_dir) if isinstance(model_or_dir, (str, Path)) else model_or_dir
    train, held = make_prompt_sets(
        n_eval if split == "train" else 0, n_eval if split == "eval" else 0, prompt_seed, train_repeats=False
    )
    items = held if split == "eval" else train
    prompts = [it["prompt"] for it in items]
    scenes = [it["scene"] for it in items]
    images = sample_images(
        model,
        prompts,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        height=image_size,
        width=image_size,
        seed=seed,
        batch_size=batch_size,
    )
    partial, strict = ShapesVerifier().verify(images, scenes)
    by_cat: dict[str, dict] = {}
    for sc, p, s in zip(scenes, partial.tolist(), strict.tolist(), strict=True):
        c = by_cat.setdefault(sc["category"], {"n": 0, "strict": 0.0, "partial": 0.0})
        c["n"] += 1
        c["strict"] += s
        c["partial"] += p
    for c in by_cat.values():
        c["strict"] /= c["n"]
        c["partial"] /= c["n"]
    out = {
        "split": split,
        "n": len(prompts),
        "num_steps": num_steps,
        "guidance_scale": guidance_scale,
        "strict": float(strict.mean()),
        "partial": float(partial.mean()),
        "by_category": by_cat,
    }
    if return_images:
        out["images"] = images
        out["prompts"] = prompts
    return out


def dir_size_mb(path: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def save_pipeline(
    pipe, path: str | Path, cfg: ToyModelConfig | None = None, extra: dict | None = None
) -> Path:
    """``pipe.save_pretrained(path)`` (safetensors) plus a ``toy_model.json`` with the configuration. A pipeline
    without T5 is saved with a null one (:func:`~diffrl.models.sd3.null_t5_encoder`, exactly zero output, as the
    pipeline without T5 uses), so that a plain ``StableDiffusion3Pipeline.from_pretrained(path)`` loads it."""
    from diffusers import StableDiffusion3Pipeline

    from diffrl.models.sd3 import null_t5_encoder
    from diffrl.tiny_tokenizers import tiny_t5_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if getattr(pipe, "text_encoder_3", None) is None:
        tokenizer_3 = tiny_t5_tokenizer()
        components = dict(pipe.components)
        components["tokenizer_3"] = tokenizer_3
        components["text_encoder_3"] = null_t5_encoder(
            pipe.transformer.config.joint_attention_dim, len(tokenizer_3)
        )
        pipe = StableDiffusion3Pipeline(**components)
    pipe.save_pretrained(path, safe_serialization=True)
    if cfg is not None or extra:
        meta = {"config": asdict(cfg) if cfg is not None else None, **(extra or {})}
        (path / "toy_model.json").write_text(json.dumps(meta, indent=2, default=str))
    return path


# ----------------------------------------------------------------------------------------------- all
def pretrain(
    cfg: ToyModelConfig,
    out_dir: str | Path,
    *,
    log: Callable[[str], None] | None = None,
    eval_checkpoints: bool = True,
) -> dict:
    """Run the three stages and write ``out_dir/final`` and ``out_dir/ckpt-{step}`` pipelines plus
    ``out_dir/summary.json``; returns the summary (losses, timings, accuracies)."""
    from diffrl.toy.scenes import generate_dataset

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"config": asdict(cfg)}
    torch.manual_seed(cfg.seed)

    t = time.time()
    data = generate_dataset(cfg.n_train, seed=cfg.seed, image_size=cfg.image_size, split="train")
    _log(f"rendered {cfg.n_train} train scenes in {time.time() - t:.1f}s", log)
    pipe = build_pipeline(cfg)
    summary["params"] = {
        "transformer": num_params(pipe.transformer),
        "vae": num_params(pipe.vae),
        "text_encoder": num_params(pipe.text_encoder),
        "text_encoder_2": num_params(pipe.text_encoder_2),
    }
    _log(f"params {summary['params']}", log)

    t = time.time()
    vae_losses = train_vae(
        pipe.vae,
        data["images"],
        steps=cfg.vae_steps,
        batch=cfg.vae_batch,
        lr=cfg.vae_lr,
        kl_weight=cfg.vae_kl,
        seed=cfg.seed + 5,
        log=log,
    )
    summary["vae_time_s"] = time.time() - t
    summary["vae_loss"] = {"first": vae_losses[0], "last50": sum(vae_losses[-50:]) / len(vae_losses[-50:])}
    mean, std = encode_latents(pipe.vae, data["images"])
    scale, shift = set_latent_stats(pipe.vae, mean, std)
    _log(
        f"vae done in {summary['vae_time_s']:.0f}s; scaling_factor {scale:.4f} shift_factor {shift:.4f}", log
    )
    nrc = min(256, cfg.n_train)
    summary["vae_recon"] = reconstruction_check(pipe.vae, data["images"][:nrc], data["scenes"][:nrc])
    _log(f"vae reconstruction check {summary['vae_recon']}", log)
    del data["images"]

    ckpts: dict = {}

    def on_checkpoint(step: int, ema: torch.nn.Module) -> None:
        live = pipe.transformer
        pipe.transformer = ema
        try:
            path = save_pipeline(pipe, out_dir / f"ckpt-{step}", cfg, {"step": step})
            rec = {"path": str(path), "size_mb": dir_size_mb(path)}
            if eval_checkpoints and cfg.n_eval > 0:
                t_e = time.time()
                res = evaluate(
                    path,
                    n_eval=cfg.n_eval,
                    num_steps=cfg.eval_steps,
                    guidance_scale=cfg.eval_guidance,
                    seed=cfg.eval_seed,
                    image_size=cfg.image_size,
                )
                rec["eval"] = res
                _log(
                    f"ckpt {step}: held-out strict {res['strict']:.3f} partial {res['partial']:.3f} "
                    f"(n={res['n']}, {time.time() - t_e:.0f}s) "
                    + " ".join(
                        f"{k}:{v['strict']:.2f}/{v['partial']:.2f}" for k, v in res["by_category"].items()
                    ),
                    log,
                )
                (path / "toy_model.json").write_text(
                    json.dumps({"config": asdict(cfg), "step": step, "eval": res}, indent=2, default=str)
                )
            ckpts[step] = rec
            (out_dir / "summary.json").write_text(
                json.dumps({**summary, "checkpoints": ckpts}, indent=2, default=str)
            )
        finally:
            pipe.transformer = live

    t = time.time()
    losses, _ = train_transformer(
        pipe, mean, std, data["prompts"], cfg=cfg, on_checkpoint=on_checkpoint, log=log
    )
    summary["dit_time_s"] = time.time() - t
    k = max(1, min(100, len(losses) // 5))
    summary["dit_loss"] = {
        "first": sum(losses[:k]) / k,
        "last": sum(losses[-k:]) / k,
        "curve": [sum(losses[i : i + k]) / len(losses[i : i + k]) for i in range(0, len(losses), k)],
    }
    summary["checkpoints"] = ckpts
    final = save_pipeline(pipe, out_dir / "final", cfg, {"step": cfg.steps})
    summary["final"] = {"path": str(final), "size_mb": dir_size_mb(final)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
