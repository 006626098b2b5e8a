"""Freezing parts of a VLM (vision tower, projector, language model) through its family adapter."""

from __future__ import annotations

import logging

from torch import nn

from vlm_rl.models.adapters import FamilyAdapter
from vlm_rl.models.families import adapter_for

logger = logging.getLogger(__name__)


def apply_freezing(
    model: nn.Module,
    *,
    vision_tower: bool = False,
    projector: bool = False,
    language_model: bool = False,
    adapter: FamilyAdapter | None = None,
) -> dict[str, int]:
    """Set `requires_grad=False` on the chosen parts; return the trainable parameter count per group.

    A frozen part trains nothing, LoRA weights inside it included: on a PEFT model, call this after wrapping,
    and LoRA then trains in the parts left unfrozen only. Fails if a part to freeze has no parameters, since
    that means the adapter does not know this model's layout and nothing would be frozen.
    """
    adapter = adapter or adapter_for(model.config)
    frozen = {group for group, chosen in (("vision", vision_tower), ("projector", projector),
                                          ("language", language_model)) if chosen}  # fmt: skip
    found: dict[str, int] = {}
    trainable: dict[str, int] = {}
    for name, param in model.named_parameters():
        group = adapter.parameter_group(name) or "other"
        found[group] = found.get(group, 0) + param.numel()
        if group in frozen:
            param.requires_grad_(False)
        if param.requires_grad:
            trainable[group] = trainable.get(group, 0) + param.numel()
    missing = sorted(group for group in frozen if not found.get(group))
    if missing:
        raise ValueError(
            f"Cannot freeze {missing} of this {adapter.label} model: no parameter matches the adapter's prefixes "
            f"({ {g: getattr(adapter, f'{g}_modules') for g in missing} })."
        )
    if frozen and not trainable:
        raise ValueError(f"Freezing {sorted(frozen)} leaves this {adapter.label} model nothing to train.")
    if frozen:
        logger.info("Froze %s; trainable parameters per part: %s.", sorted(frozen), trainable)
    return trainable
