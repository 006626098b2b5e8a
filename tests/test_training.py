"""Real GRPO steps on each tiny family with all-image, all-text, mixed and multi-image batches."""

import math
import random

import pytest
import torch
from conftest import ALL_FAMILIES, MULTI_IMAGE_FAMILIES, TEXT_MIX_FAMILIES, small_config
from datasets import Dataset, concatenate_datasets

from vlm_rl.data import make_shapes_dataset
from vlm_rl.data.synthetic import FEATURES, draw_shape
from vlm_rl.models import adapter_for
from vlm_rl.trainers import VLMGRPOTrainer


def longer_is_better(completions, **kwargs):
    """A reward with spread on a random policy, so every step has non-zero advantages and gradients."""
    return [float(len(completion[0]["content"])) for completion in completions]


def vision_and_language_params(model):
    """Parameters of the vision side (tower and projector) and of the language model, by the family adapter."""
    adapter = adapter_for(model.config)
    groups = {name: adapter.parameter_group(name) for name, _ in model.named_parameters()}
    assert None not in groups.values(), f"parameters in no group: {[n for n, g in groups.items() if g is None]}"
    vision = {n: p for n, p in model.named_parameters() if groups[n] in ("vision", "projector")}
    language = {n: p for n, p in model.named_parameters() if groups[n] == "language"}
    assert vision and language
    return vision, language


def changed(params, before):
    return [name for name, p in params.items() if not p.detach().equal(before[name])]


def mixed_dataset():
    """Prompts ordered so that the first generation batch is [image, image, text, text].

    With 2 generations and 4 completions per log-prob chunk, the old-policy pass then scores one chunk
    that holds images and one that holds none, inside a batch that mixes both.
    """
    images = make_shapes_dataset(4, text_fraction=0.0, seed=1)
    texts = make_shapes_dataset(4, text_fraction=1.0, seed=2)
    halves = [images.select([0, 1]), texts.select([0, 1]), images.select([2, 3]), texts.select([2, 3])]
    return concatenate_datasets(halves)


def multi_image_dataset():
    """Rows with two images of different sizes, one image, and (where the family allows) none."""
    rng = random.Random(0)
    rows = []
    for i in range(8):
        count = (2, 1, 2, 0)[i % 4]
        images = [draw_shape("circle", "red", 56, rng), draw_shape("square", "blue", 84, rng)][:count]
        rows.append({"prompt": [{"role": "user", "content": "Are the shapes the same color?"}], "images": images,
                     "answer": "no", "task": "image"})  # fmt: skip
    return Dataset.from_list(rows, features=FEATURES)


CASES = [(family, batches) for family in ALL_FAMILIES for batches in ("image", "text", "mixed", "multi")
         if (batches not in ("text", "mixed") or family in TEXT_MIX_FAMILIES)
         and (batches != "multi" or family in MULTI_IMAGE_FAMILIES)]  # fmt: skip


@pytest.mark.parametrize(("family", "batches"), CASES)
def test_grpo_steps_train_the_right_parameters(family, batches, load_tiny, tmp_path):
    model, processor = load_tiny(family)
    if batches == "mixed":
        dataset = mixed_dataset()
    elif batches == "multi":
        dataset = multi_image_dataset()
        if family not in TEXT_MIX_FAMILIES:
            dataset = dataset.filter(lambda row: len(row["images"]) > 0)
    else:
        dataset = make_shapes_dataset(8, text_fraction=1.0 if batches == "text" else 0.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    args = small_config(tmp_path, steps_per_generation=2, max_steps=2, shuffle_dataset=False)
    trainer = VLMGRPOTrainer(
        model=model, reward_funcs=[longer_is_better], args=args, train_dataset=dataset, processing_class=processor
    )
    trainer.train()

    assert trainer.state.global_step == 2
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(math.isfinite(loss) for loss in losses)
    vision, language = vision_and_language_params(model)
    assert changed(language, before), "the language model did not train"
    if batches == "text":
        assert not changed(vision, before), "text-only batches must leave the vision tower untouched"
    else:
        assert changed(vision, before), "image batches must train the vision tower"


def select_micro_batch(trainer, batch, rows):
    """Rows `rows` of a scored generation batch, split the way the trainer's `_prepare_inputs` splits it."""
    split = trainer.adapter.split_vision_inputs(batch, batch["num_images"])
    size = len(batch["num_images"])
    selected = {}
    for key, value in split.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == size:
            selected[key] = value[rows]
        elif isinstance(value, list) and len(value) == size:
            selected[key] = [value[i] for i in rows]
        else:
            selected[key] = value
    return trainer._merge_micro_batch(selected)


@pytest.mark.parametrize("family", TEXT_MIX_FAMILIES)
def test_text_only_micro_batch_of_a_mixed_batch_trains(family, load_tiny, tmp_path):
    model, processor = load_tiny(family)
    args = small_config(tmp_path, per_device_train_batch_size=8, shuffle_dataset=False)
    trainer = VLMGRPOTrainer(
        model=model, reward_funcs=[longer_is_better], args=args, train_dataset=mixed_dataset(),
        processing_class=processor,
    )  # fmt: skip
    rows = [row for row in mixed_dataset().select(range(4)) for _ in range(2)]  # [image, image, text, text] x 2
    batch = trainer._generate_and_score_completions(rows)
    assert batch["num_images"] == [1, 1, 1, 1, 0, 0, 0, 0] and "pixel_values" in batch

    for micro_rows, vision_trains in (([4, 5, 6, 7], False), ([0, 5, 2, 7], True)):
        model.zero_grad()
        micro_batch = select_micro_batch(trainer, batch, micro_rows)
        assert ("pixel_values" in micro_batch and micro_batch["pixel_values"].numel() > 0) == vision_trains
        loss = trainer.compute_loss(model, micro_batch)
        loss.backward()
        assert torch.isfinite(loss)
        vision, language = vision_and_language_params(model)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in language.values())
        vision_grads = any(p.grad is not None and p.grad.abs().sum() > 0 for p in vision.values())
        assert vision_grads == vision_trains
