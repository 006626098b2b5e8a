"""Model and processor loading, family adapters, freezing, and the tiny offline models."""

from vlm_rl.models.adapters import FamilyAdapter
from vlm_rl.models.families import adapter_for, build_tiny_model, register_adapter, registered_adapters, tiny_families
from vlm_rl.models.freezing import apply_freezing
from vlm_rl.models.loading import load_model_and_processor, resolve_model_path
from vlm_rl.models.lora import lora_target_modules, use_base_as_reference, wrap_with_lora
from vlm_rl.models.processing import image_only_processor_class, load_processor

__all__ = [
    "FamilyAdapter",
    "adapter_for",
    "apply_freezing",
    "build_tiny_model",
    "image_only_processor_class",
    "load_model_and_processor",
    "load_processor",
    "lora_target_modules",
    "register_adapter",
    "registered_adapters",
    "resolve_model_path",
    "tiny_families",
    "use_base_as_reference",
    "wrap_with_lora",
]
