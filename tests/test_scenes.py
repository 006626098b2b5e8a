"""The synthetic scene tasks of the learning benchmark: rows that need the image, and biased-teacher SFT replies."""

import re
from collections import Counter

import numpy as np
import pytest

from vlm_rl.config import DataArguments
from vlm_rl.data import load_task
from vlm_rl.data.scenes import CELL, make_count_diff_dataset, make_counting_dataset
from vlm_rl.data.stats import DataError
from vlm_rl.data.synthetic import COLORS
from vlm_rl.rewards.accuracy import math_accuracy
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
