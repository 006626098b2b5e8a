"""`synthetic:motion` (vlm_rl/data/motion.py): clips whose answer is in the order of their frames."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from vlm_rl.config import DataArguments
from vlm_rl.data import DataError, load_task
from vlm_rl.data.motion import DIRECTIONS, SIDES, make_motion_dataset
from vlm_rl.data.synthetic import COLORS
from vlm_rl.data.video import Clip

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def centre(frame, color: str) -> np.ndarray:
    """(x, y) of the pixels of `color` in `frame`."""
    pixels = np.argwhere((np.asarray(frame) == COLORS[color]).all(axis=-1))
    assert len(pixels), f"no {color} pixel in the frame"
    return pixels.mean(axis=0)[::-1]


def direction(frames: list, color: str) -> str:
    """Which way the shape of `color` goes from the first frame to the last (image y grows downwards)."""
    dx, dy = centre(frames[-1], color) - centre(frames[0], color)
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def test_each_clip_shows_the_named_shape_moving_its_answers_way_and_reversed_frames_flip_it():
    rows = make_motion_dataset(60, "test", image_size=56)
    assert {row["answer"] for row in rows} == set(DIRECTIONS)
    for row in rows:
        question = row["prompt"][0]["content"]
        color = question.split()[4]
        frames = row["videos"]
        assert len(frames) == 4 and frames[0].size == (56, 56)
        assert direction(frames, color) == row["answer"]
        # The same frames, reversed, are the opposite answer: only their order tells which.
        assert direction(frames[::-1], color) == OPPOSITE[row["answer"]]
        steps = np.diff([centre(frame, color) for frame in frames], axis=0)
        assert (np.abs(steps).max(axis=1) >= 8).all()  # every frame moves on: a temporal patch of 2 frames keeps order
        assert row["answer"] not in question.split(":")[0]


def test_the_teacher_flips_up_and_down_on_most_vertical_clips_and_gets_the_others_right():
    rows = make_motion_dataset(400, "sft", image_size=56)
    flipped = {"vertical": 0, "horizontal": 0}
    counts = {"vertical": 0, "horizontal": 0}
    for row in rows:
        reply = row["completion"][0]["content"]
        said = reply.split("<answer>")[1].split("</answer>")[0]
        start, end = SIDES[said]
        assert reply.startswith(f"<think>From the {start} to the {end}.</think>")  # reasoning matches its answer
        axis = "vertical" if row["answer"] in ("up", "down") else "horizontal"
        counts[axis] += 1
        flipped[axis] += said != row["answer"]
        assert said in (row["answer"], OPPOSITE[row["answer"]])
    assert flipped["horizontal"] == 0
    assert 0.7 <= flipped["vertical"] / counts["vertical"] <= 0.9


def test_held_out_clips_are_not_training_or_sft_clips():
    def digests(split: str) -> set[str]:
        rows = make_motion_dataset(150, split, image_size=56)
        return {hashlib.sha1(b"".join(np.asarray(f).tobytes() for f in row["videos"])).hexdigest() for row in rows}

    held_out = digests("test")
    assert len(held_out) == 150
    assert not held_out & digests("train") and not held_out & digests("sft")
    assert digests("test") == held_out  # the same rows on every run


def test_a_recipe_loads_motion_rows_as_clips_with_an_honest_chance():
    args = DataArguments(dataset="synthetic:motion", split="sft", train_size=8, eval_size=200, image_size=56)
    task = load_task(args, seed=0)
    row = task.train[0]
    (clip,) = row["videos"]
    assert isinstance(clip, Clip) and clip.shape == (4, 56, 56, 3) and clip.metadata.total_num_frames == 4
    assert row["images"] == [] and "completion" in row
    assert "completion" not in task.eval[0]
    assert 0.2 <= task.chance <= 0.32  # the most common of four directions, on 200 held-out rows
    with pytest.raises(DataError, match=r"^image_size: synthetic:motion needs a multiple of 28 pixels"):
        load_task(DataArguments(dataset="synthetic:motion", image_size=60), seed=0)


def test_sft_puts_the_recipes_video_settings_on_the_processor_it_saves(load_tiny, tmp_path):
    from datasets import Dataset
    from test_sft import sft_config

    from vlm_rl.sft import build_trainer

    model, processor = load_tiny("qwen2_vl")
    rows = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]}]
    )
    config = sft_config(tmp_path, video_max_pixels=3136, video_num_frames=4)
    build_trainer(model, processor, config, rows)
    video_processor = processor.video_processor
    assert video_processor.size["longest_edge"] == 3136 and video_processor.num_frames == 4
