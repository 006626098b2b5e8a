"""The grounding scene task's rows (`make_grounding_dataset`): a unique target inside the image, a biased teacher."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image, ImageDraw

from vlm_rl.data.scenes import CELL, draw, make_grounding_dataset
from vlm_rl.data.synthetic import COLORS
from vlm_rl.rewards.boxes import parse_boxes


def kind_mask(shape: str, color: str, side: int) -> np.ndarray:
    """Where `draw` paints `shape` in a `side`-pixel square."""
    image = Image.new("RGB", (side, side))
    draw(ImageDraw.Draw(image), shape, color, (0, 0, side - 1, side - 1))
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
