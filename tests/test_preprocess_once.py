"""Each distinct image is preprocessed once per generation batch: the same processor outputs, fewer image-processor
calls (vlm_rl/models/preprocess_once.py)."""

import numpy as np
import pytest
import torch
from conftest import shapes_trainer
from PIL import Image

from vlm_rl.models.families import tiny_families
from vlm_rl.models.inputs import prompt_inputs
from vlm_rl.models.preprocess_once import images_preprocessed_once

QWEN_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


class CountingImageProcessor:
    """The processor's image processor, counting the images it is handed."""

    def __init__(self, inner):
        self.inner, self.images = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, images, **kwargs):
        self.images += sum(len(row) if isinstance(row, list) else 1 for row in images)
        return self.inner(images, **kwargs)


def picture(seed: int, size=(84, 56)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_rows_sharing_an_image_get_the_same_inputs_from_one_preprocessing(family, load_tiny):
    _, processor = load_tiny(family)
    adapter = tiny_families()[family]
    # Two pictures of the same size and two copies of each (separate objects, equal pixels), a text-only row and a
    # row with both pictures.
    rows = [[picture(0)], [picture(0)], [picture(1)], [], [picture(1)], [picture(1), picture(0)]]
    prompts = [
        [{"role": "user", "content": [*[{"type": "image"}] * len(row), {"type": "text", "text": "what is it?"}]}]
        for row in rows
    ]
    plain = prompt_inputs(adapter, processor, prompts, rows)
    counter = processor.image_processor = CountingImageProcessor(processor.image_processor)
    with images_preprocessed_once(processor, adapter) as memo:
        once = prompt_inputs(adapter, processor, prompts, rows)
        again = prompt_inputs(adapter, processor, prompts, rows)
    assert processor.image_processor is counter  # put back
    assert counter.images == 2 and memo.calls == 1  # the second call of the same batch is served from the memo
    for inputs in (once, again):
        assert set(inputs) == set(plain)
        for key, value in plain.items():
            assert torch.equal(inputs[key], value), key


def test_families_that_pad_per_call_are_left_alone(load_tiny):
    _, processor = load_tiny("llava_next")
    inner = processor.image_processor
    with images_preprocessed_once(processor, tiny_families()["llava_next"]) as memo:
        assert memo is None and processor.image_processor is inner


def test_a_training_step_preprocesses_each_group_image_once(load_tiny, tmp_path):
    model, processor = load_tiny("qwen2_vl")
    counter = processor.image_processor = CountingImageProcessor(processor.image_processor)
    trainer = shapes_trainer(model, processor, tmp_path, max_steps=1, num_generations=4, per_device_train_batch_size=8)
    trainer.train()
    # 2 prompts × 4 generations, each row one image: TRL preprocesses 8 images for generation and 8 for scoring.
    assert counter.images == 2
