"""Synthetic scenes of several shapes, for tasks with multi-token answers: counting, grounding and a count difference.

Each task has three independent random streams: `train` and `test` rows (prompt, images, `answer`) for GRPO and
held-out evaluation, and `sft` rows that add a `completion`: a short `<think>…</think><answer>…</answer>` reply from
a *biased teacher*. The teacher sees the scene but is systematically wrong on part of it (it over-counts large
counts, misplaces some boxes), like SFT on a weaker model's outputs: a warm start that reads the image and knows
the format but is mediocre, which a verifiable reward can then correct. A policy that learned only the SFT data
keeps the teacher's errors; GRPO against the true `answer` is what removes them.

Shapes sit in the cells of a grid of 28-pixel cells, one cell per merged vision token of the Qwen-VL families
(14-pixel patches merged 2×2), so each object is seen by whole tokens. The question never tells the answer: a
policy that ignores the image scores near chance, which the blind (image-swapped) evaluation measures.
"""

from __future__ import annotations

import json
import random

from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw

from vlm_rl.data.synthetic import COLORS, SHAPES, fill_shape

CELL = 28
SPLITS = ("train", "test", "sft")
COUNTS = (1, 2, 3, 4, 5)
SCENE_TASKS = ("counting", "grounding", "count_diff")
FEATURES = Features(
    {
        "prompt": List({"role": Value("string"), "content": Value("string")}),
        "images": List(ImageFeature()),
        "answer": Value("string"),
        "task": Value("string"),
    }
)
SFT_FEATURES = Features({**FEATURES, "completion": List({"role": Value("string"), "content": Value("string")})})


def _check(split: str, image_cells: tuple[int, int]) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r} for a synthetic scene task; use one of {list(SPLITS)}.")
    if min(image_cells) < 2:
        raise ValueError(f"A scene needs at least 2×2 cells of {CELL} pixels, got {image_cells}.")


def canvas(cells: tuple[int, int], rng: random.Random) -> Image.Image:
    """A light-grey background of `cells` (columns, rows) grid cells."""
    grey = rng.randint(200, 255)
    return Image.new("RGB", (cells[0] * CELL, cells[1] * CELL), (grey, grey, grey))


def scatter(objects: list[tuple[str, str]], cells: tuple[int, int], rng: random.Random) -> Image.Image:
    """`objects` ((shape, colour) pairs), each in its own random cell, 18–22 pixels wide, at a random offset.

    One size for all: with sizes that vary, "how much of this colour is there" is only a coarse count, and the tiny
    model's SFT stopped at that feature instead of learning to see the shapes (docs/learning.md).
    """
    image = canvas(cells, rng)
    pen = ImageDraw.Draw(image)
    spots = rng.sample([(c, r) for c in range(cells[0]) for r in range(cells[1])], len(objects))
    for (shape, color), (column, row) in zip(objects, spots, strict=True):
        size = rng.randint(18, 22)
        x, y = column * CELL + rng.randint(0, CELL - size), row * CELL + rng.randint(0, CELL - size)
        fill_shape(pen, shape, color, (x, y, x + size - 1, y + size - 1))
    return image


def think_answer(reasoning: str, answer: str) -> list[dict[str, str]]:
    """The assistant turn of an SFT row."""
    return [{"role": "assistant", "content": f"<think>{reasoning}</think><answer>{answer}</answer>"}]


def _row(question: str, images: list, answer: str, task: str) -> dict:
    return {"prompt": [{"role": "user", "content": question}], "images": images, "answer": answer, "task": task}


def _dataset(rows: list[dict], split: str) -> Dataset:
    return Dataset.from_list(rows, features=SFT_FEATURES if split == "sft" else FEATURES)


def biased_count(count: int, rng: random.Random, *, from_count: int = 3, rate: float = 0.8) -> int:
    """The teacher's count: one too many, at `rate`, for counts of `from_count` and more."""
    return count + 1 if count >= from_count and rng.random() < rate else count


def make_counting_dataset(
    num_rows: int, split: str = "train", *, image_cells: tuple[int, int] = (4, 4), seed: int = 0
) -> Dataset:
    """Counting: "How many {colour} shapes are there?", 1–5 of them among 0–4 of other colours; `answer` the count.

    The teacher (`sft` rows) answers one too many for counts of 3 and more, 80 % of the time.
    """
    _check(split, image_cells)
    rng = random.Random(f"counting-{split}-{seed}")
    rows = []
    others = {color: [c for c in COLORS if c != color] for color in COLORS}
    for _ in range(num_rows):
        color, count = rng.choice(list(COLORS)), rng.choice(COUNTS)
        distractors = rng.randint(0, min(4, image_cells[0] * image_cells[1] - count))
        objects = [(rng.choice(SHAPES), color) for _ in range(count)]
        objects += [(rng.choice(SHAPES), rng.choice(others[color])) for _ in range(distractors)]
        question = f"How many {color} shapes are there?"
        row = _row(question, [scatter(objects, image_cells, rng)], str(count), "counting")
        if split == "sft":
            row["completion"] = think_answer(f"I count the {color} shapes.", str(biased_count(count, rng)))
        rows.append(row)
    return _dataset(rows, split)


def make_count_diff_dataset(
    num_rows: int,
    split: str = "train",
    *,
    image_cells: tuple[int, int] = (4, 4),
    text_fraction: float = 0.25,
    seed: int = 0,
) -> Dataset:
    """Count difference: "How many more {a} shapes than {b} shapes?": two counts read from the image, then subtracted.

    2–5 shapes of colour a and fewer of colour b (0 to a−1), so the answer is 1–5. `text_fraction` of the rows
    state both counts in words and show no image (`task` "text"): the arithmetic alone, mixed into the same batches.
    The teacher (`sft` rows) over-counts colour a by one, like the counting teacher, for a counts of 4 and more.
    """
    _check(split, image_cells)
    rng = random.Random(f"count-diff-{split}-{seed}")
    rows = []
    for _ in range(num_rows):
        a_color, b_color = rng.sample(list(COLORS), 2)
        a = rng.randint(2, 5)
        b = rng.randint(0, a - 1)
        question = f"How many more {a_color} shapes than {b_color} shapes are there?"
        if rng.random() < text_fraction:
            question = f"There are {a} {a_color} shapes and {b} {b_color} shapes. {question}"
            row = _row(question, [], str(a - b), "text")
        else:
            objects = [(rng.choice(SHAPES), a_color) for _ in range(a)] + [(rng.choice(SHAPES), b_color)] * b
            row = _row(question, [scatter(objects, image_cells, rng)], str(a - b), "count_diff")
        if split == "sft":
            seen_a = a if row["task"] == "text" else biased_count(a, rng, from_count=4)
            reasoning = f"{seen_a} {a_color} and {b} {b_color}."
            row["completion"] = think_answer(reasoning, str(seen_a - b))
        rows.append(row)
    return _dataset(rows, split)


def make_grounding_dataset(
    num_rows: int,
    split: str = "train",
    *,
    image_cells: tuple[int, int] = (6, 4),
    bias_rate: float = 0.75,
    seed: int = 0,
) -> Dataset:
    """Grounding: "Where is the {colour} {shape}?" on a 3:2 scene of 2–4 shapes; `answer` its box in pixels, as JSON.

    Each shape fills a square of one or two cells aligned to the grid; the one asked for is the only shape of its
    colour and kind. The reply is `[x1, y1, x2, y2]` in 0–1000 coordinates of the image (the Qwen2-VL and
    Qwen3-VL convention, the built-in `iou` reward's `norm1000`). The teacher (`sft` rows) puts `bias_rate` of its
    boxes one cell to the right of the shape (to the left at the right edge): a systematic error, so the SFT policy's
    most likely box is the wrong one (IoU 0 for a one-cell shape, 1/3 for a two-cell one) while the right box stays
    among its samples, for the IoU reward to pick out.
    """
    _check(split, image_cells)
    columns, rows_ = image_cells
    rng = random.Random(f"grounding-{split}-{seed}")
    kinds = [(shape, color) for shape in SHAPES for color in COLORS]
    rows = []
    for _ in range(num_rows):
        image = canvas(image_cells, rng)
        pen = ImageDraw.Draw(image)
        taken: set[tuple[int, int]] = set()
        boxes = []
        for shape, color in rng.sample(kinds, rng.randint(2, 4)):
            for _ in range(20):  # a free spot: one or two cells square, overlapping no other shape
                span = rng.choice((1, 2))
                column, row = rng.randint(0, columns - span), rng.randint(0, rows_ - span)
                cells = {(column + i, row + j) for i in range(span) for j in range(span)}
                if not cells & taken:
                    taken |= cells
                    box = (column * CELL, row * CELL, (column + span) * CELL - 1, (row + span) * CELL - 1)
                    fill_shape(pen, shape, color, box)
                    boxes.append((shape, color, (column, row, span)))
                    break
        shape, color, (column, row, span) = boxes[0]
        pixels = [column * CELL, row * CELL, (column + span) * CELL - 1, (row + span) * CELL - 1]
        question = f"Where is the {color} {shape}? Answer with its box [x1, y1, x2, y2] in 0-1000 coordinates."
        item = _row(question, [image], json.dumps(pixels), "grounding")
        if split == "sft":
            if rng.random() < bias_rate:
                column += 1 if column + span < columns else -1
            scaled = [column / columns, row / rows_, (column + span) / columns, (row + span) / rows_]
            box = "[" + ", ".join(str(round(1000 * v)) for v in scaled) + "]"
            item["completion"] = think_answer(f"The {color} {shape}.", box)
        rows.append(item)
    return _dataset(rows, split)
