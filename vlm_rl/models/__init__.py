"""Model and processor loading, and the tiny offline models used by the demo and the tests."""

from vlm_rl.models.loading import load_model_and_processor, resolve_model_path
from vlm_rl.models.processing import image_only_processor_class, load_processor
from vlm_rl.models.tiny import FAMILIES, build_tiny_model

__all__ = [
    "FAMILIES",
    "build_tiny_model",
    "image_only_processor_class",
    "load_model_and_processor",
    "load_processor",
    "resolve_model_path",
]
