"""Freezing options per family: frozen parts get no gradient and do not change; the rest trains."""

import pytest
from conftest import ALL_FAMILIES, small_config
from peft import LoraConfig, get_peft_model

from vlm_rl.data import make_shapes_dataset
from vlm_rl.models import adapter_for, apply_freezing
from vlm_rl.trainers import VLMGRPOTrainer

PARTS = ("vision", "projector", "language")


def longer_is_better(completions, **kwargs):
    return [float(len(completion[0]["content"])) for completion in completions]


def train_one_step(model, processor, tmp_path):
    args = small_config(tmp_path, max_steps=1, learning_rate=1e-2)
    trainer = VLMGRPOTrainer(
        model=model, reward_funcs=[longer_is_better], args=args, train_dataset=make_shapes_dataset(4),
        processing_class=processor,
    )  # fmt: skip
    trainer.train()


def changed_by_part(model, before) -> dict[str, set[str]]:
    """Per part, the names of parameters whose values changed."""
    adapter = adapter_for(model.config)
    changed = {part: set() for part in PARTS}
    for name, param in model.named_parameters():
        if not param.detach().equal(before[name]):
            changed[adapter.parameter_group(name)].add(name)
    return changed


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("part", PARTS)
def test_frozen_part_does_not_train(family, part, load_tiny, tmp_path):
    model, processor = load_tiny(family)
    trainable = apply_freezing(
        model, vision_tower=part == "vision", projector=part == "projector", language_model=part == "language"
    )
    assert part not in trainable and set(trainable) == set(PARTS) - {part}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_one_step(model, processor, tmp_path)

    adapter = adapter_for(model.config)
    for name, param in model.named_parameters():
        if adapter.parameter_group(name) == part:
            assert not param.requires_grad and param.grad is None, name
    changed = changed_by_part(model, before)
    assert not changed[part], f"frozen {part} changed: {sorted(changed[part])[:3]}"
    for other in set(PARTS) - {part}:
        assert changed[other], f"{other} did not train with {part} frozen"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_lora_on_top_of_a_frozen_vision_tower(family, load_tiny, tmp_path):
    model, processor = load_tiny(family)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    apply_freezing(model, vision_tower=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_one_step(model, processor, tmp_path)

    changed = changed_by_part(model, before)
    assert not changed["vision"], "a frozen vision tower's LoRA weights must not train"
    assert changed["language"] and all("lora_" in name for name in changed["language"]), (
        "only the language model's LoRA weights train"
    )
    assert all("lora_" in name for name in changed["projector"])


def test_freezing_every_part_is_an_error(load_tiny):
    model, _ = load_tiny("qwen2_vl")
    with pytest.raises(ValueError, match="leaves this Qwen2-VL model nothing to train"):
        apply_freezing(model, vision_tower=True, projector=True, language_model=True)
