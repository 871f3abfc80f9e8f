"""diffrl.models: adapters over diffusers pipelines (SD3/SD3.5, FLUX.1, Qwen-Image, Wan video) and tiny offline builders for tests."""

from .base import Conditioning, FlowModel
from .flux import FluxModel
from .loading import ADAPTERS, detect_family, load_model, load_model_from_config
from .qwen_image import QwenImageModel
from .sd3 import SD3Model
from .wan import WanModel

__all__ = [
    "ADAPTERS",
    "Conditioning",
    "FlowModel",
    "FluxModel",
    "QwenImageModel",
    "SD3Model",
    "WanModel",
    "detect_family",
    "load_model",
    "load_model_from_config",
]
