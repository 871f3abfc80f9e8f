"""diffrl.models: adapters over diffusers pipelines (SD3/SD3.5, FLUX.1, Qwen-Image, Qwen-Image-Edit) and tiny offline builders for tests."""

from .base import Conditioning, FlowModel
from .flux import FluxModel
from .loading import ADAPTERS, detect_family, load_model, load_model_from_config
from .qwen_image import QwenImageModel
from .qwen_image_edit import QwenImageEditModel, QwenImageEditPlusModel
from .sd3 import SD3Model

__all__ = [
    "ADAPTERS",
    "Conditioning",
    "FlowModel",
    "FluxModel",
    "QwenImageEditModel",
    "QwenImageEditPlusModel",
    "QwenImageModel",
    "SD3Model",
    "detect_family",
    "load_model",
    "load_model_from_config",
]
