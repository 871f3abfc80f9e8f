"""diffrl.models: adapters over diffusers pipelines (SD3/SD3.5, FLUX.1, Qwen-Image, Z-Image, FLUX.2, Wan video) and tiny offline builders for tests."""

from .base import Conditioning, FlowModel
from .flux import FluxModel
from .flux2 import Flux2KleinModel, Flux2Model
from .loading import ADAPTERS, detect_family, load_model, load_model_from_config
from .qwen_image import QwenImageModel
from .sd3 import SD3Model
from .wan import WanModel
from .z_image import ZImageModel

__all__ = [
    "ADAPTERS",
    "Conditioning",
    "FlowModel",
    "Flux2KleinModel",
    "Flux2Model",
    "FluxModel",
    "QwenImageModel",
    "SD3Model",
    "ZImageModel",
    "WanModel",
    "detect_family",
    "load_model",
    "load_model_from_config",
]
