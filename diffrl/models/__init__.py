"""diffrl.models: adapters over diffusers pipelines (SD3/SD3.5, FLUX.1, FLUX.2, Qwen-Image and Qwen-Image-Edit,
Z-Image, Wan video) and tiny offline builders for tests."""

from .base import Conditioning, FlowModel
from .flux import FluxModel
from .flux2 import Flux2KleinModel, Flux2Model
from .loading import ADAPTERS, detect_family, load_model, load_model_from_config
from .qwen_image import QwenImageModel
from .qwen_image_edit import QwenImageEditModel, QwenImageEditPlusModel
from .sd3 import SD3Model
from .wan import WanModel
from .wan_i2v import WanI2VModel
from .z_image import ZImageModel

__all__ = [
    "ADAPTERS",
    "Conditioning",
    "FlowModel",
    "Flux2KleinModel",
    "Flux2Model",
    "FluxModel",
    "QwenImageEditModel",
    "QwenImageEditPlusModel",
    "QwenImageModel",
    "SD3Model",
    "ZImageModel",
    "WanModel",
    "WanI2VModel",
    "detect_family",
    "load_model",
    "load_model_from_config",
]
