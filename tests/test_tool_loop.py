"""TRL 1.16's tool loop through `VLMGRPOTrainer` when a tool answers with an image (issue 18, "thinking with images").

A tiny random policy is made to call the tool by `tool_call_bias` (tests/test_trl_options.py) under the Qwen3-VL
template TRL parses tool calls for. Each call returns a new image (its colour counts the calls) and a line of text: the
assistant's call, the tool's reply with its image and the next assistant turn all belong to the completion, and the
tool's tokens carry no loss. Batches mix image and text-only prompts.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import small_config
from PIL import Image
from test_sharing import completion_length_reward
from test_trl_options import count_shared_forwards, numbers, tool_call_bias
from trl.chat_template_utils import qwen3_vl_chat_template
from trl.data_utils import prepare_multimodal_messages

from vlm_rl.data import make_shapes_dataset
from vlm_rl.trainers import VLMGRPOTrainer

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
TOOL_TEXT = "a closer look"


def image_tool(same_image: bool = False):
    """A fresh `lookup` tool: every call returns an image of its own (the colour counts the calls), or the same image
    every time, and a line of text."""
    calls = []

    def lookup() -> list:
        """Look closer at the image.

        Returns:
            An image and a caption.
        """
        calls.append(len(calls))
        image = Image.new("RGB", (40, 40), (0 if same_image else 30 * len(calls), 100, 200))
        return [{"type": "image", "image": image}, {"type": "text", "text": TOOL_TEXT}]

    return lookup


class TurnLog:
    """A reward (with spread, so the policy changes) that keeps each row's prompt, images and completion turns."""

    __name__ = "turn_log"

    def __init__(self):
        self.rows: list[dict] = []

    def __call__(self, prompts, completions, completion_ids, images=None, **kwargs):
        for i, (prompt, completion, ids) in enumerate(zip(prompts, completions, completion_ids, strict=True)):
            self.rows.append({"prompt": prompt, "images": (images or [None] * len(prompts))[i], "turns": completion,
                              "completion_ids": list(ids)})  # fmt: skip
        return completion_length_reward(completions)


def tool_trainer(
    load_tiny, family: str, output_dir, rewards=None, same_image: bool = False, **overrides
) -> VLMGRPOTrainer:
    """A trainer on 4 mixed rows (2 prompts × 2 completions per step, one with an image) whose every completion calls
    the image tool once, then writes a free turn."""
    model, processor = load_tiny(family)
    # The tiny models' templates cannot render tool calls; TRL parses them for the Qwen3-VL template.
    processor.chat_template = processor.tokenizer.chat_template = qwen3_vl_chat_template
    config = {
        "max_steps": 1,
        "learning_rate": 1e-4,
        "max_completion_length": 128,
        "max_tool_calling_iterations": 1,
        "generation_kwargs": {"sequence_bias": tool_call_bias(processor.tokenizer)},
    }
    return VLMGRPOTrainer(
        model=model,
        reward_funcs=rewards or [completion_length_reward],
        args=small_config(output_dir, **{**config, **overrides}),
        train_dataset=make_shapes_dataset(4, text_fraction=0.5, seed=5),
        processing_class=processor,
        tools=[image_tool(same_image)],
    )


def capture_loss_inputs(trainer) -> list[dict]:
    """Records the micro-batches `compute_loss` trains on."""
    seen, compute_loss = [], trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        seen.append(inputs)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    return seen


def count_vision_images(trainer) -> list[int]:
    """The images each vision-tower call encodes (rows of `grid_thw`), during `compute_loss` only."""
    counts, active = [], [False]
    visual = trainer.model.model.visual

    def hook(module, args, kwargs, output):
        if active[0]:
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            counts.append(int(grid.size(0)))

    visual.register_forward_hook(hook, with_kwargs=True)
    compute_loss = trainer.compute_loss

    def counting(*args, **kwargs):
        active[0] = True
        try:
            return compute_loss(*args, **kwargs)
        finally:
            active[0] = False

    trainer.compute_loss = counting
    return counts


@pytest.mark.parametrize(("family", "same_image"), [*((family, False) for family in FAMILIES), ("qwen2_vl", True)])
def test_image_tool_replies_train_with_both_switches_as_without(family, same_image, load_tiny, tmp_path):
    """The same tool image in every completion must still be shown once per completion (stock grouping of rows by all
    their images put it once per prompt: "Image features and image tokens do not match")."""
    logs, weights, images = {}, {}, {}
    for on in (False, True):
        switches = {"share_prompt_prefix": on, "encode_images_once": on}
        trainer = tool_trainer(load_tiny, family, tmp_path / str(on), same_image=same_image, **switches)
        counts = count_shared_forwards(trainer)
        images[on] = count_vision_images(trainer)
        trainer.train()
        logs[on] = [numbers(row) for row in trainer.state.log_history if "loss" in row]
        weights[on] = {key: value.detach().clone() for key, value in trainer.model.named_parameters()}
        if on:
            assert counts["shared"] > 0 and counts["encoded"] > 0, counts
    row = logs[True][0]
    assert row["tools/call_frequency"] == 1.0 and row["tools/failure_frequency"] == 0.0
    assert all(math.isfinite(value) for value in row.values()), row
    for key, value in logs[False][0].items():
        assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for key, value in weights[False].items():
        torch.testing.assert_close(weights[True][key], value, atol=1e-5, rtol=0, msg=key)
    assert logs[False][0]["grad_norm"] > 0
    # The training forward: one image prompt (2 completions) and one text prompt (2 completions), each completion with
    # a tool image. Plain: the prompt image once per completion; with the switches: each distinct image once (the
    # features are then indexed out to every completion segment that shows it).
    assert images[False] == [2 + 4] and images[True] == [1 + (1 if same_image else 4)], images
