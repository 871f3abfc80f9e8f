"""``load_model``: read a checkpoint's ``model_index.json``, pick the adapter for its pipeline class, load it."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

from ..utils import SHIPPED_PIPELINES, resolve_dtype, shipped_checkpoint
from .base import FlowModel
from .flux import FluxModel
from .flux2 import Flux2KleinModel, Flux2Model
from .qwen_image import QwenImageModel
from .qwen_image_edit import QwenImageEditModel, QwenImageEditPlusModel
from .sd3 import SD3Model
from .wan import WanModel
from .wan_i2v import WanI2VModel
from .z_image import ZImageModel

__all__ = [
    "load_model",
    "load_model_from_config",
    "check_image_size",
    "detect_family",
    "resolve_dtype",
    "ADAPTERS",
    "TINY_BUILDERS",
]

# pipeline class name in model_index.json -> adapter class
ADAPTERS: dict[str, type[FlowModel]] = {
    SD3Model.pipeline_class_name: SD3Model,
    FluxModel.pipeline_class_name: FluxModel,
    QwenImageModel.pipeline_class_name: QwenImageModel,
    ZImageModel.pipeline_class_name: ZImageModel,
    Flux2Model.pipeline_class_name: Flux2Model,
    Flux2KleinModel.pipeline_class_name: Flux2KleinModel,
    WanModel.pipeline_class_name: WanModel,
    QwenImageEditModel.pipeline_class_name: QwenImageEditModel,
    QwenImageEditPlusModel.pipeline_class_name: QwenImageEditPlusModel,
    WanI2VModel.pipeline_class_name: WanI2VModel,
}


def _read_model_index(path: str, revision: str | None) -> dict:
    from diffusers import DiffusionPipeline

    local = Path(path)
    if local.is_dir() and not (local / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{path} has no model_index.json; pass a diffusers pipeline directory or hub id."
        )
    try:
        return DiffusionPipeline.load_config(path, revision=revision)
    except OSError as err:
        raise OSError(
            f"could not read model_index.json of {path!r} ({err.__class__.__name__}); pass a local diffusers "
            "pipeline directory, or a hub id that is in the Hugging Face cache (or reachable when not offline)."
        ) from err


def detect_family(path: str, revision: str | None = None) -> type[FlowModel]:
    """The adapter class for the checkpoint at ``path`` (local directory or hub id), from its pipeline class."""
    index = _read_model_index(path, revision)
    name = index.get("_class_name")
    if name not in ADAPTERS:
        raise ValueError(
            f"{path!r} is a {name} checkpoint, which diffrl does not support; supported pipelines: "
            f"{', '.join(sorted(ADAPTERS))}."
        )
    return ADAPTERS[name]


#: ``tiny:<family>`` -> (builder in diffrl.models.tiny, its keyword arguments)
TINY_BUILDERS = {
    "sd3": ("build_tiny_sd3", {}),
    "flux": ("build_tiny_flux", {}),
    "qwen_image": ("build_tiny_qwen_image", {}),
    "qwen_image_edit": ("build_tiny_qwen_image_edit", {}),
    "qwen_image_edit_plus": ("build_tiny_qwen_image_edit", {"plus": True}),
    "z_image": ("build_tiny_z_image", {}),
    "flux2": ("build_tiny_flux2", {}),
    "flux2_klein": ("build_tiny_flux2_klein", {}),
    "wan": ("build_tiny_wan", {}),
    "wan22": ("build_tiny_wan", {"two_experts": True}),
    "wan22_ti2v": ("build_tiny_wan", {"ti2v": True}),
    "wan_i2v": ("build_tiny_wan_i2v", {}),
    "wan22_i2v": ("build_tiny_wan_i2v", {"two_experts": True}),
}


def tiny_model_dir(spec: str) -> Path:
    """``tiny:sd3`` / ``tiny:flux``: the tiny random pipeline of :mod:`diffrl.models.tiny`, built once into
    ``$DIFFRL_CACHE/tiny`` (default ``~/.cache/diffrl/tiny``) and then loaded like any local checkpoint."""
    import os
    import shutil
    import tempfile

    from . import tiny

    family = spec.split(":", 1)[1]
    builders = {
        name: functools.partial(getattr(tiny, builder), **kwargs)
        for name, (builder, kwargs) in TINY_BUILDERS.items()
    }
    if family not in builders:
        raise ValueError(
            f"{spec!r} is not a tiny model; use one of {', '.join('tiny:' + f for f in builders)}."
        )
    root = Path(os.environ.get("DIFFRL_CACHE", Path.home() / ".cache" / "diffrl")) / "tiny"
    target = root / f"{family}-v1"
    if not (target / "model_index.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{family}-"))
        builders[family](tmp / "model")
        try:
            os.replace(tmp / "model", target)
        except OSError:  # another process built it first
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _pipeline_path(path: str | Path) -> str:
    """A hub id or directory as given; ``tiny:FAMILY`` and the shipped toy models (``toy``, ``toy:cliptext``) as
    their local directories."""
    path = str(path)
    if path.startswith("tiny:"):
        return str(tiny_model_dir(path))
    if path in SHIPPED_PIPELINES:
        return str(shipped_checkpoint(path))
    return path


@contextlib.contextmanager
def _quiet_loading():
    """No per-component "Loading ..." progress bars of diffusers and transformers while a pipeline loads (a dozen
    nested bars for seconds of work); ``DIFFRL_VERBOSE=1`` keeps them."""
    if os.environ.get("DIFFRL_VERBOSE") == "1":
        yield
        return
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    shown = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if shown[0]:
            dlog.enable_progress_bar()
        if shown[1]:
            tlog.enable_progress_bar()


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    **adapter_kwargs,
) -> FlowModel:
    """Load a checkpoint of a supported family (docs/models.md; a hub id or local diffusers directory) as an adapter.

    The family is detected from the checkpoint's ``model_index.json``. Every module is put in eval mode with
    gradients off; call ``add_lora()`` or ``set_full_finetuning()`` on the result to train it.

    Args:
        path: hub id (e.g. ``"stabilityai/stable-diffusion-3.5-medium"``), local pipeline directory, or
            ``tiny:sd3`` / ``tiny:flux`` for the tiny random test pipelines (built offline once, then loaded from disk),
            or ``toy`` for the pretrained toy-world model shipped in ``diffrl/toy/assets/sd3``.
        dtype: weights' dtype (``torch.bfloat16`` or ``"bf16"`` for GPU training); sampler maths stays float32.
        device: where to put the pipeline.
        revision: hub revision.
        adapter_kwargs: passed to the adapter (``max_sequence_length``, ``prompt_cache_size``; SD3:
            ``collapse_t5_padding``, see :class:`~diffrl.models.sd3.SD3Model`).
    """
    path = _pipeline_path(path)
    torch_dtype = resolve_dtype(dtype)
    adapter_cls = detect_family(path, revision)
    index = _read_model_index(path, revision)
    from diffusers import (
        Flux2KleinPipeline,
        Flux2Pipeline,
        FluxPipeline,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImagePipeline,
        StableDiffusion3Pipeline,
        WanImageToVideoPipeline,
        WanPipeline,
        ZImagePipeline,
    )

    pipeline_cls = {
        "sd3": StableDiffusion3Pipeline,
        "flux": FluxPipeline,
        "qwen_image": QwenImagePipeline,
        "z_image": ZImagePipeline,
        "flux2": Flux2Pipeline,
        "flux2_klein": Flux2KleinPipeline,
        "wan": WanPipeline,
        "qwen_image_edit": QwenImageEditPipeline,
        "qwen_image_edit_plus": QwenImageEditPlusPipeline,
        "wan_i2v": WanImageToVideoPipeline,
    }[adapter_cls.family]
    # Components saved as null (e.g. SD3 without its T5 encoder) must be passed as None to reload.
    absent = {
        k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is None
    }
    with _quiet_loading():
        pipe = pipeline_cls.from_pretrained(path, dtype=torch_dtype, revision=revision, **absent)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return adapter_cls(pipe, **adapter_kwargs)


def load_model_from_config(model_cfg, device: torch.device | str = "cpu") -> FlowModel:
    """The model a run's ``model`` config section describes: ``path`` at ``dtype``, ``max_sequence_length`` T5 tokens
    (0: the adapter's default), the trained ``expert`` and the low-noise expert's ``guidance_scale_2`` of a Wan 2.2
    model, the source images' ``condition_image_size`` of an edit or reference-image model, the VAE in ``vae_dtype``
    (see :func:`set_vae_dtype`) and, with ``offload_text_encoders``, the text encoders kept on the CPU between
    encodings."""
    kwargs = {"max_sequence_length": model_cfg.max_sequence_length} if model_cfg.max_sequence_length else {}
    model = load_model(model_cfg.path, dtype=resolve_dtype(model_cfg.dtype), device=device, **kwargs)
    expert = getattr(model_cfg, "expert", "")
    if expert:
        if not hasattr(model, "set_training_expert"):
            raise ValueError(
                f"model.expert={expert!r} chooses one of Wan 2.2's two experts, but {model_cfg.path} is a "
                f"{model.family} model; leave it empty."
            )
        model.set_training_expert(expert)
    guidance_2 = getattr(model_cfg, "guidance_scale_2", 0.0)
    if guidance_2:
        if getattr(model, "transformer_2", None) is None:
            raise ValueError(
                f"model.guidance_scale_2={guidance_2} is the CFG scale of Wan 2.2's low-noise expert, but "
                f"{model_cfg.path} has one transformer; set it to 0."
            )
        model.guidance_scale_2 = float(guidance_2)
    side = getattr(model_cfg, "condition_image_size", 0)
    if side:
        if not hasattr(model, "set_condition_image_size"):
            raise ValueError(
                f"model.condition_image_size={side} sizes the source images of edit and reference-image models "
                f"(Qwen-Image-Edit, FLUX.2), but {model_cfg.path} is a {model.family} model; set it to 0."
            )
        model.set_condition_image_size(side)
    set_vae_dtype(model, model_cfg.vae_dtype)
    if getattr(model_cfg, "offload_text_encoders", False):
        model.offload_text_encoders()
    return model


def set_vae_dtype(model: FlowModel, vae_dtype: str) -> None:
    """Put the frozen VAE in float32 (``"float32"``, as the Flow-GRPO and DiffusionNFT reference codes decode) or
    leave it in the model's dtype (``"model"``)."""
    if vae_dtype == "float32" and model.vae.dtype != torch.float32:
        model.vae.to(torch.float32)


def check_image_size(path: str | Path, height: int, width: int, revision: str | None = None) -> bool:
    """Check that the model at ``path`` can make ``height`` x ``width`` images from its configuration files alone
    (``model_index.json``, ``transformer/config.json``, ``vae/config.json``: no weights are read), with the adapter's
    own ``latent_shape`` rules, so a size it cannot make fails before minutes of loading. Raises the adapter's
    ``ValueError``; returns False (nothing checked) when the configuration files cannot be read here, e.g. an uncached
    hub id offline, which loading then reports itself."""
    import types

    from diffusers import (
        AutoencoderKL,
        AutoencoderKLFlux2,
        AutoencoderKLQwenImage,
        AutoencoderKLWan,
        Flux2Transformer2DModel,
        FluxTransformer2DModel,
        QwenImageTransformer2DModel,
        SD3Transformer2DModel,
        WanTransformer3DModel,
        ZImageTransformer2DModel,
    )
    from diffusers.configuration_utils import FrozenDict

    try:
        path = _pipeline_path(path)
        adapter_cls = detect_family(path, revision)
        transformer_cls, vae_cls = {
            "sd3": (SD3Transformer2DModel, AutoencoderKL),
            "flux": (FluxTransformer2DModel, AutoencoderKL),
            "qwen_image": (QwenImageTransformer2DModel, AutoencoderKLQwenImage),
            "z_image": (ZImageTransformer2DModel, AutoencoderKL),
            "flux2": (Flux2Transformer2DModel, AutoencoderKLFlux2),
            "flux2_klein": (Flux2Transformer2DModel, AutoencoderKLFlux2),
            "wan": (WanTransformer3DModel, AutoencoderKLWan),
            "qwen_image_edit": (QwenImageTransformer2DModel, AutoencoderKLQwenImage),
            "qwen_image_edit_plus": (QwenImageTransformer2DModel, AutoencoderKLQwenImage),
            "wan_i2v": (WanTransformer3DModel, AutoencoderKLWan),
        }[adapter_cls.family]
        configs = {
            name: FrozenDict(cls.load_config(path, subfolder=name, revision=revision))
            for name, cls in (("transformer", transformer_cls), ("vae", vae_cls))
        }
    except (OSError, ValueError):
        return False
    view = object.__new__(adapter_cls)  # the adapter's size rules on its configuration, no pipeline
    view.transformer = types.SimpleNamespace(config=configs["transformer"])
    view.vae = types.SimpleNamespace(config=configs["vae"])
    view.latent_shape(height, width)
    return True
