"""The family registry: which adapter handles which `config.model_type`, and each family's tiny model.

One way: each family module imports `vlm_rl.models.adapters` (the base class) and `vlm_rl.models.tiny` (the
builders' helpers); this package imports the families and maps their model types to them. Nothing it imports
imports it back (`tests/test_imports.py`). A family of your own: `register_adapter` (docs/models.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TypeVar

from vlm_rl.models.adapters import FamilyAdapter, GenericAdapter
from vlm_rl.models.families.blip2 import Blip2Adapter, InstructBlipAdapter
from vlm_rl.models.families.gemma3 import Gemma3Adapter
from vlm_rl.models.families.idefics3 import Idefics3Adapter, SmolVLMAdapter
from vlm_rl.models.families.internvl import InternVLAdapter
from vlm_rl.models.families.llava import LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter
from vlm_rl.models.families.qwen_vl import GridAdapter, Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3VLAdapter

logger = logging.getLogger(__name__)

BUILT_IN = (
    Blip2Adapter,
    InstructBlipAdapter,
    Gemma3Adapter,
    Idefics3Adapter,
    SmolVLMAdapter,
    InternVLAdapter,
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    Qwen2VLAdapter,
    Qwen2_5_VLAdapter,
    Qwen3VLAdapter,
)
ADAPTERS: dict[str, type[FamilyAdapter]] = {
    model_type: adapter for adapter in BUILT_IN for model_type in adapter.model_types
}
"""`config.model_type` -> the adapter class of its family: the built-in families, then any `register_adapter` adds."""

_WARNED_UNKNOWN: set[str | None] = set()

A = TypeVar("A", bound=type[FamilyAdapter])


def register_adapter(adapter_class: A) -> A:
    """Make a family of your own known by its name and its `model_types`. Takes the `FamilyAdapter` subclass (each
    lookup makes a fresh instance, so an adapter keeps no state) and returns it, so it also works as a decorator."""
    if not (isinstance(adapter_class, type) and issubclass(adapter_class, FamilyAdapter)):
        raise TypeError(
            f"register_adapter takes a FamilyAdapter subclass, got {adapter_class!r}: pass the class itself, "
            "e.g. register_adapter(MyAdapter)."
        )
    if adapter_class.name in registered_adapters():
        raise ValueError(
            f"A family adapter named {adapter_class.name!r} is already registered; give yours another name."
        )
    if not adapter_class.model_types:
        raise ValueError(
            f"{adapter_class.__name__} lists no model_types; set the `config.model_type` values it handles."
        )
    taken = [model_type for model_type in adapter_class.model_types if model_type in ADAPTERS]
    if taken:
        raise ValueError(
            f"Model type {taken[0]!r} of {adapter_class.__name__} already has an adapter "
            f"({ADAPTERS[taken[0]].__name__}); remove it from {adapter_class.__name__}.model_types."
        )
    ADAPTERS.update(dict.fromkeys(adapter_class.model_types, adapter_class))
    return adapter_class


def registered_adapters() -> dict[str, FamilyAdapter]:
    """Every registered family, by name, in registration order."""
    return {adapter.name: adapter() for adapter in dict.fromkeys(ADAPTERS.values())}


def family_adapter(model_type: str | None) -> FamilyAdapter | None:
    """The adapter registered for `model_type`, or None."""
    adapter = ADAPTERS.get(model_type or "")
    return adapter() if adapter else None


def adapter_for(config) -> FamilyAdapter:
    """The adapter of a model config (or a model); `GenericAdapter` for an unknown family, with a warning the first
    time each model type is asked for (the trainer, the freezing options and the rollouts all ask)."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    adapter = family_adapter(model_type)
    if adapter is not None:
        return adapter
    if model_type not in _WARNED_UNKNOWN:
        _WARNED_UNKNOWN.add(model_type)
        logger.warning(
            "No vlm-rl adapter for model type %r; falling back to TRL's shape-based handling of vision inputs, "
            "which can mis-assign images in mixed multi-image batches. Known families: %s.",
            model_type,
            ", ".join(sorted(ADAPTERS)),
        )
    return GenericAdapter()


def tiny_families() -> dict[str, FamilyAdapter]:
    """The registered families, by name: each has a tiny model, so each is in every per-family test."""
    return registered_adapters()


def build_tiny_model(
    family_name: str,
    output_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Build, save and return the directory of a tiny random model of `family_name`."""
    families = tiny_families()
    if family_name not in families:
        raise ValueError(f"Unknown tiny-model family {family_name!r}; choose one of {sorted(families)}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    families[family_name].build_tiny(
        output_dir, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, seed=seed
    )
    (output_dir / "vlm_rl_tiny.json").write_text(json.dumps({"family": family_name, "seed": seed}, indent=2) + "\n")
    return output_dir


__all__ = [
    "ADAPTERS",
    "GridAdapter",
    "adapter_for",
    "build_tiny_model",
    "family_adapter",
    "register_adapter",
    "registered_adapters",
    "tiny_families",
]
