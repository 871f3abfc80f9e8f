"""diffrl.models: adapters over diffusers pipelines (SD3/SD3.5, FLUX.1) and tiny offline builders for tests."""

from .base import Conditioning, FlowModel
from .flux import FluxModel
from .loading import ADAPTERS, detect_family, load_model, load_model_from_config
from .sd3 import SD3Model

__all__ = [
    "ADAPTERS",
    "Conditioning",
    "FlowModel",
    "FluxModel",
    "SD3Model",
    "detect_family",
    "load_model",
    "load_model_from_config",
]
