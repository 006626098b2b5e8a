"""The synthetic scene tasks of the learning benchmark: rows that need the image, and biased-teacher SFT replies."""

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vlm_rl.config import DataArguments
from vlm_rl.data import load_task
from vlm_rl.data.scenes import CELL, make_count_diff_dataset, make_counting_dataset, make_grounding_dataset
from vlm_rl.data.stats import DataError
from vlm_rl.data.synthetic import COLORS, fill_shape
from vlm_rl.rewards.accuracy import math_accuracy
from vlm_rl.rewards.boxes import parse_boxes
from vlm_rl.rewards.counting import counting_accuracy


def colour_blobs(image, color: str) -> int:
    """Grid cells holding some of `color` (each shape sits in its own cell)."""
    pixels = np.asarray(image).astype(int)
    match = (np.abs(pixels - np.array(COLORS[color])).sum(-1) < 10).astype(int)
    rows, columns = match.shape[0] // CELL, match.shape[1] // CELL
    cells = match[: rows * CELL, : columns * CELL].reshape(rows, CELL, columns, CELL).sum((1, 3))
    return int((cells > 20).sum())


def test_counting_rows_show_as_many_shapes_of_the_colour_as_the_answer_says():
    rows = make_counting_dataset(40, "train", image_cells=(4, 4))
    for row in rows:
        color = re.search(r"How many (\w+) shapes", row["prompt"][0]["content"]).group(1)
        assert colour_blobs(row["images"][0], color) == int(row["answer"])
    assert set(rows["answer"]) == {"1", "2", "3", "4", "5"}
    # The question never tells the answer: every count comes with every colour.
    assert len({(row["prompt"][0]["content"], row["answer"]) for row in rows}) > 12


def test_counting_teacher_over_counts_large_counts_and_its_replies_parse():
    rows = make_counting_dataset(600, "sft", image_cells=(4, 4))
    replies = [[{"role": "assistant", "content": row["completion"][0]["content"]}] for row in rows]
    correct = counting_accuracy(replies, answer=rows["answer"])
    by_count = Counter()
    for answer, score in zip(rows["answer"], correct, strict=True):
        by_count[answer] += score
    totals = Counter(rows["answer"])
    assert by_count["1"] == totals["1"] and by_count["2"] == totals["2"]  # small counts: right
    for count in ("3", "4", "5"):  # large ones: one too many 80 % of the time
        assert 0.1 < by_count[count] / totals[count] < 0.3
    assert all(re.fullmatch(r"<think>.+</think><answer>\d</answer>", r[0]["content"]) for r in replies)


def test_count_diff_mixes_text_rows_and_scores_with_math_accuracy():
    rows = make_count_diff_dataset(200, "sft", image_cells=(4, 4), text_fraction=0.25)
    tasks = Counter(rows["task"])
    assert 30 < tasks["text"] < 70 and tasks["count_diff"] == 200 - tasks["text"]
    for row in rows:
        a_color, b_color = re.search(
            r"How many more (\w+) shapes than (\w+) shapes", row["prompt"][0]["content"]
        ).groups()
        if row["task"] == "count_diff":
            a, b = colour_blobs(row["images"][0], a_color), colour_blobs(row["images"][0], b_color)
            assert a - b == int(row["answer"]) and not row["images"][1:]
        else:
            assert row["images"] == []
    replies = [[{"role": "assistant", "content": row["completion"][0]["content"]}] for row in rows]
    scores = math_accuracy(replies, answer=rows["answer"])
    text = [s for s, task in zip(scores, rows["task"], strict=True) if task == "text"]
    assert all(text) and 0.4 < np.mean(scores) < 1.0  # the teacher is right on text rows, biased on images


def test_the_scene_tasks_load_from_a_recipe_with_an_sft_split_and_the_most_common_answer_as_chance():
    task = load_task(DataArguments(dataset="synthetic:counting", split="sft", image_size=112, train_size=8), seed=0)
    assert "completion" in task.train.column_names and "completion" not in task.eval.column_names
    answers = Counter(task.eval["answer"])
    assert task.chance == max(answers.values()) / len(task.eval)
    # Other seeds: other rows; the held-out rows are never training rows.
    other = load_task(DataArguments(dataset="synthetic:counting", image_size=112, train_size=8), seed=1)
    assert other.train["prompt"] != task.train["prompt"] or other.train["answer"] != task.train["answer"]
    with pytest.raises(DataError, match="split: synthetic:shapes trains on 'train', not 'sft'"):
        load_task(DataArguments(dataset="synthetic:shapes", split="sft"), seed=0)
    with pytest.raises(DataError, match="image_size: synthetic:counting needs room for 10 shapes"):
        load_task(DataArguments(dataset="synthetic:counting", image_size=56), seed=0)


def kind_mask(shape: str, color: str, side: int) -> np.ndarray:
    """Where `fill_shape` paints `shape` in a `side`-pixel square."""
    image = Image.new("RGB", (side, side))
    fill_shape(ImageDraw.Draw(image), shape, color, (0, 0, side - 1, side - 1))
    return (np.asarray(image) == COLORS[color]).all(-1)


def test_grounding_rows_box_the_one_shape_asked_for_inside_the_image():
    """Of all grid-aligned squares of the answer's size, exactly one holds the shape asked for: the answer's box."""
    rows = make_grounding_dataset(60, "test", image_cells=(6, 4), seed=3)
    for row in rows:
        image = np.asarray(row["images"][0].convert("RGB"))
        assert image.shape == (4 * CELL, 6 * CELL, 3)
        x1, y1, x2, y2 = json.loads(row["answer"])
        side = x2 + 1 - x1
        assert 0 <= x1 < x2 < image.shape[1] and 0 <= y1 < y2 < image.shape[0] and side == y2 + 1 - y1
        assert side in (CELL, 2 * CELL) and x1 % CELL == 0 and y1 % CELL == 0, "a square of one or two cells"
        color, shape = row["prompt"][0]["content"].removeprefix("Where is the ").split("?")[0].split()
        painted, mask = (image == COLORS[color]).all(-1), kind_mask(shape, color, side)
        found = [
            (x, y)
            for y in range(0, image.shape[0] - side + 1, CELL)
            for x in range(0, image.shape[1] - side + 1, CELL)
            if (painted[y : y + side, x : x + side] == mask).all()
        ]
        assert found == [(x1, y1)], (row["prompt"][0]["content"], row["answer"], found)


def test_grounding_teacher_shifts_most_boxes_one_cell_sideways():
    """The `sft` teacher's box: the true one, or (at `bias_rate`) the same box one cell left or right."""
    rows = make_grounding_dataset(400, "sft", image_cells=(6, 4), seed=0)
    shifted = 0
    for row in rows:
        text = row["completion"][0]["content"]
        assert text.startswith("<think>") and "</think><answer>[" in text and text.endswith("]</answer>")
        (box,) = parse_boxes(text.split("<answer>")[1])
        true = json.loads(row["answer"])
        pixels = [
            round(v * s / 1000)
            for v, s in zip((box.x1, box.y1, box.x2, box.y2), (6 * CELL, 4 * CELL) * 2, strict=True)
        ]
        dx = pixels[0] - true[0]
        assert pixels[1] == true[1] and dx in (0, CELL, -CELL), (text, row["answer"])
        assert pixels[2] - pixels[0] == true[2] + 1 - true[0], "the teacher keeps the box's size"
        shifted += dx != 0
    assert 0.68 < shifted / len(rows) < 0.82, "bias_rate 0.75"
