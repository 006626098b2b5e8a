"""LoRA from recipe fields: which linear layers of which parts get an adapter, per family, and the wrapping.

The parts (language model, vision tower, projector) come from the family adapter's parameter-name prefixes,
the same ones the freezing options use, so LoRA lands exactly in the parts a recipe asks for, whatever the
family names its modules. Target modules are resolved to full module names here rather than left to PEFT's
`all-linear`, which would also wrap the vision tower and the projector.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from vlm_rl.models.adapters import FamilyAdapter
from vlm_rl.models.families import adapter_for

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

    from vlm_rl.config import ModelArguments

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
_PART_FIELDS = {"language": "the language model", "vision": "lora_vision_tower", "projector": "lora_projector"}


def lora_parts(model_args: ModelArguments) -> list[str]:
    """The parts that get LoRA: the language model unless frozen, plus the vision tower / projector if asked."""
    parts = [] if model_args.freeze_language_model else ["language"]
    if model_args.lora_vision_tower:
        parts.append("vision")
    if model_args.lora_projector:
        parts.append("projector")
    if not parts:
        raise ValueError(
            "use_peft with freeze_language_model puts LoRA nowhere: set lora_vision_tower and/or lora_projector, "
            "or unset freeze_language_model."
        )
    return parts


def _matches(module_name: str, target: str) -> bool:
    """PEFT's rule for a name in `target_modules`: the full module name, or its dotted suffix."""
    return module_name == target or module_name.endswith("." + target)


def lora_target_modules(
    model: nn.Module,
    parts: list[str],
    names: list[str] | None = None,
    adapter: FamilyAdapter | None = None,
) -> list[str]:
    """Full names of the linear layers in `parts` that LoRA wraps: all of them, or those matching `names`.

    The output layer (LM head) is never wrapped. Fails, naming the field and what exists, when a name in
    `names` matches no linear layer of the chosen parts, or when a chosen part would get no LoRA at all.
    """
    adapter = adapter or adapter_for(model.config)
    output_layer = model.get_output_embeddings()
    linear: dict[str, list[str]] = {part: [] for part in parts}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not output_layer:
            part = adapter.parameter_group(name)
            if part in linear:
                linear[part].append(name)
    wanted = None if names in (None, [], [ALL_LINEAR]) else list(names)
    if wanted is not None:
        available = sorted({name.rsplit(".", 1)[-1] for found in linear.values() for name in found})
        unmatched = [t for t in wanted if not any(_matches(n, t) for found in linear.values() for n in found)]
        if unmatched:
            raise ValueError(
                f"lora_target_modules {unmatched} match no linear layer in the parts that get LoRA ({parts}) of "
                f"this {adapter.label} model; its linear layers there are named {available} (a name matches a "
                "layer's full name or its last dotted parts)."
            )
        linear = {part: [n for n in found if any(_matches(n, t) for t in wanted)] for part, found in linear.items()}
    empty = [part for part, found in linear.items() if not found]
    if empty:
        what = f" matching lora_target_modules {wanted}" if wanted is not None else ""
        fields = ", ".join(_PART_FIELDS[part] for part in empty)
        raise ValueError(
            f"The {adapter.label} model has no linear layer{what} in {empty} ({fields}) for LoRA to wrap "
            f"(prefixes {[getattr(adapter, f'{part}_modules') for part in empty]}); unset the field or choose "
            "other target modules."
        )
    return [name for part in parts for name in linear[part]]


def lora_config(model: nn.Module, model_args: ModelArguments) -> LoraConfig:
    """The `LoraConfig` a recipe's LoRA fields describe, with target modules resolved for this model."""
    from peft import LoraConfig

    targets = lora_target_modules(model, lora_parts(model_args), model_args.lora_target_modules)
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
    )


def wrap_with_lora(model: nn.Module, model_args: ModelArguments) -> PeftModel:
    """The model with fresh LoRA adapters where the recipe asks; only the adapters are trainable.

    A local base model is recorded by its absolute path in the adapter config, so `vlm-rl export` finds it
    from any working directory. Call it after the training arguments exist (they declare a ZeRO-3 launch).
    """
    from peft import get_peft_model
    from transformers.integrations import is_deepspeed_zero3_enabled

    config = lora_config(model, model_args)
    # As TRL does when it wraps the model itself: under ZeRO-3 the adapters keep the base model's dtype, since
    # ZeRO-3 gathers parameters into buffers of one dtype and fp32 adapters on a bf16 base fail the first step
    # (trl#6089, DeepSpeed#8072).
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=not is_deepspeed_zero3_enabled())
    base = config.base_model_name_or_path
    if base and Path(base).is_dir():
        config.base_model_name_or_path = str(Path(base).resolve())
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info(
        "LoRA (r=%d) on %s: %d layers, %d trainable of %d parameters.",
        config.r, lora_parts(model_args), len(config.target_modules), trainable, total,
    )  # fmt: skip
    return peft_model


def use_base_as_reference(model: nn.Module) -> None:
    """Make the adapter-disabled base model the GRPO reference where that is the same policy: a fresh adapter.

    TRL 1.16, given a model already wrapped in PEFT and `beta > 0`, adds a second adapter named `ref` (a frozen copy
    of the trainable one) and computes reference log-probs through it. A fresh LoRA adapter (every B matrix zero, as
    PEFT initialises it) is a no-op, so that copy equals the base model; it only costs a second set of adapter
    weights, an adapter pass in every reference forward, and a `ref/` directory in every checkpoint. Then the copy
    is removed and TRL disables the adapters for the reference pass, as it does when it wraps the model itself.
    An adapter that is already trained (after SFT, or loaded by the user), or any other kind of PEFT adapter, keeps
    TRL's `ref` copy: the reference is the policy the run starts from, not the base model.
    """
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None and "ref" in peft_config and _is_fresh_lora(model, "ref"):
        model.delete_adapter("ref")


_LORA_B = ("lora_B", "lora_embedding_B")  # the LoRA weights PEFT initialises to zero


def _is_fresh_lora(model: PeftModel, adapter: str) -> bool:
    """Whether LoRA adapter `adapter` changes nothing: plain LoRA (no DoRA) whose B matrices are all zero."""
    config = model.peft_config[adapter]
    if config.peft_type != "LORA" or getattr(config, "use_dora", False):
        return False
    b_matrices = [
        parameter
        for name, parameter in model.named_parameters()
        if any(f"{kind}.{adapter}." in name or name.endswith(f"{kind}.{adapter}") for kind in _LORA_B)
    ]
    with _gathered(b_matrices):  # ZeRO-3 holds a shard of each weight per process
        return bool(b_matrices) and not any(parameter.any() for parameter in b_matrices)


def _gathered(parameters: list[nn.Parameter]):
    """A context in which `parameters` are whole, also when ZeRO-3 partitions them (on every process at once)."""
    if any(hasattr(parameter, "ds_id") for parameter in parameters):
        import deepspeed  # only under ZeRO-3; an optional, slow import

        return deepspeed.zero.GatheredParameters(parameters)
    return contextlib.nullcontext()
