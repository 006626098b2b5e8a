"""`synthetic:zoom`: a task that needs the `zoom_in` tool ("thinking with images").

A large image is a grid of `grid`×`grid` cells (16×16 cells of 42 pixels in a 672-pixel image), each with its own
pale tint and one saturated dot, a third of the cell wide, of one of six colours. The question names a cell by its box
in 0–1000 coordinates (Qwen2-VL's and Qwen3-VL's convention: "the cell [312, 125, 375, 188]"), so where to zoom is in
the text, and asks for its dot's colour. At a small visual budget (`max_pixels`
112² or 128²: 16 visual tokens for the whole image) a dot is two or three pixels, beside 255 other dots of every
colour; the cell cut from the original image (`vlm_rl.zooming.crop_region`) and brought to the same budget shows
it 16 times larger, a third of the crop. The tiny models learn to read the crop in a few hundred SFT steps and do
not learn to read the whole image in the same budget, though a linear probe on its raw pixels can: the information
is there, too small for them (docs/tools.md has the probes and the runs).

Rows carry `box` (the dot) and `region` (the named cell), both `[x1, y1, x2, y2]` in original pixels as JSON, so a
reward or a test can check a call. `split: sft` rows add a `completion` from a *reluctant teacher*, with the tool
schema in a `tools` column: on `call_rate` of the rows it calls `zoom_in` on the named cell (assistant call → tool
turn, the crop and a line of text → assistant answer), and on the others it answers at once. It always answers the
right colour, which the image alone does not show: the SFT policy learns the call format and to read a crop, calls
on about `call_rate` of the questions and guesses on the rest, and GRPO with the accuracy reward has to find that
calling pays. (`bias_rate`: the fraction of calls that zoom one cell to the right, left at the right edge, and then
answer what that crop shows.) `sft_no_tools` rows are the same questions with the same answers, never a call.
"""

from __future__ import annotations

import json
import random
from typing import Any

from datasets import Dataset, Features, List, Value
from PIL import Image, ImageDraw

from vlm_rl.data.scenes import FEATURES, SPLITS, think_answer
from vlm_rl.data.synthetic import COLORS
from vlm_rl.zooming import crop_region, zoom_reply_text

ZOOM_COLORS: dict[str, tuple[int, int, int]] = {**COLORS, "purple": (150, 40, 190), "cyan": (20, 190, 200)}
GRID = 16
MIN_CELL = 12  # pixels: a dot of at least one pixel, away from the cell's edges
TOOL_NAME = "zoom_in"
# The built-in `zoom_in`'s schema as TRL renders it into prompts (transformers' `get_json_schema` of its signature and
# docstring; tests/test_zoom.py checks that they agree), for the SFT rows' `tools` column.
ZOOM_IN_SCHEMA = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "Zoom in on a region of an image, to see its details at a higher resolution.",
        "parameters": {
            "type": "object",
            "properties": {
                "bbox_2d": {
                    "type": "array",
                    "items": {"type": "number"},
                    "description": "The region to zoom into, as [x1, y1, x2, y2], in the coordinates you use for "
                    "boxes in answers.",
                },
                "image_index": {
                    "type": "integer",
                    "description": "Which image of the question to zoom into, counting from 0.",
                },
            },
            "required": ["bbox_2d"],
        },
        "return": {
            "anyOf": [{"type": "array", "items": {"type": "object", "additionalProperties": {}}}, {"type": "string"}],
            "description": "The region as an image, and a line saying what was cut.",
        },
    },
}
ZOOM_FEATURES = Features({**FEATURES, "box": Value("string"), "region": Value("string")})
_CONTENT = List({"type": Value("string"), "text": Value("string")})
_TOOL_CALLS = List({"type": Value("string"), "function": {"name": Value("string"), "arguments": Value("string")}})
ZOOM_SFT_FEATURES = Features(
    {
        **ZOOM_FEATURES,
        "completion": List(
            {"role": Value("string"), "content": _CONTENT, "name": Value("string"), "tool_calls": _TOOL_CALLS}
        ),
        "tools": Value("string"),
    }
)


ZOOM_NO_TOOLS_FEATURES = Features(
    {**ZOOM_FEATURES, "completion": List({"role": Value("string"), "content": Value("string")})}
)
NO_TOOLS_SPLIT = "sft_no_tools"
"""SFT rows for the same budget without the tool (the benchmark's `no_tools` arm): the biased teacher answers."""
ZOOM_SPLITS = (*SPLITS, NO_TOOLS_SPLIT)


def cell_box(column: int, row: int, cell: int) -> list[int]:
    """A cell's box in pixels, `[x1, y1, x2, y2]` with x2, y2 exclusive (as `crop_region` takes it)."""
    return [column * cell, row * cell, (column + 1) * cell, (row + 1) * cell]


def norm1000(box: list[int], size: int) -> list[int]:
    """A pixel box of a `size`-pixel square image in 0–1000 relative coordinates (Qwen2-VL and Qwen3-VL)."""
    return [round(1000 * v / size) for v in box]


def draw_zoom_image(
    colors: list[str], grid: int, cell: int, rng: random.Random
) -> tuple[Image.Image, list[list[int]]]:
    """The grid: each cell a pale random tint with a dot of `colors[row * grid + column]` at a random spot, a third of
    the cell wide, clear of its edges. Returns the image and each dot's box (pixels, edges included), in that order.

    The tints (up to ±24 per channel around a light grey) vary a cell's mean colour much more than its dot does, so
    the downsampled cell's colour does not give the answer; zoomed, the saturated dot stands out from any tint.
    """
    image = Image.new("RGB", (grid * cell, grid * cell))
    pen = ImageDraw.Draw(image)
    boxes = []
    for index, color in enumerate(colors):
        row, column = divmod(index, grid)
        grey = rng.randint(196, 228)
        tint = tuple(grey + rng.randint(-24, 24) for _ in range(3))
        x0, y0 = column * cell, row * cell
        pen.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=tint)
        side = rng.randint(max(1, cell // 3), max(1, cell * 3 // 8))
        margin = cell // 8
        x, y = x0 + rng.randint(margin, cell - margin - side), y0 + rng.randint(margin, cell - margin - side)
        pen.rectangle((x, y, x + side - 1, y + side - 1), fill=ZOOM_COLORS[color])
        boxes.append([x, y, x + side - 1, y + side - 1])
    return image, boxes


def zoom_call(box: list[int]) -> list[dict[str, Any]]:
    """The assistant turn that calls `zoom_in` on `box`, as TRL's tool loop stores a parsed call (arguments as JSON
    text, which Qwen's template writes as it is: the same text as the dict it parses back to)."""
    arguments = json.dumps({"bbox_2d": box})
    call = {"type": "function", "function": {"name": TOOL_NAME, "arguments": arguments}}
    return [{"role": "assistant", "content": [], "name": None, "tool_calls": [call]}]


def tool_turn(text: str) -> dict[str, Any]:
    """The tool's reply: its image (filled from the row's `images`, after the prompt's) and a line of text."""
    content = [{"type": "image", "text": None}, {"type": "text", "text": text}]
    return {"role": "tool", "content": content, "name": TOOL_NAME, "tool_calls": None}


def make_zoom_dataset(
    num_rows: int,
    split: str = "train",
    *,
    image_size: int = 672,
    grid: int = GRID,
    max_pixels: int = 128 * 128,
    call_rate: float = 0.5,
    bias_rate: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """Rows of "What color is the dot in the cell [x1, y1, x2, y2] of the grid?" on a `grid`×`grid` image of
    `image_size` pixels, the cell's box in 0–1000 coordinates.

    `answer` is the dot's colour (one of six, uniform: chance 1/6), `box` the dot and `region` its cell (pixels, JSON).
    `sft` rows add the teacher's multi-turn `completion` (see the module docstring); their `images` are the scene and
    then the teacher's crop (`crop_region` within `max_pixels`), in conversation order, and `tools` the tool schema.
    `sft_no_tools` rows have the same teacher's answer alone, for a run without the tool.
    """
    if split not in ZOOM_SPLITS:
        raise ValueError(f"Unknown split {split!r} for synthetic:zoom; use one of {list(ZOOM_SPLITS)}.")
    cell = image_size // grid
    if cell < MIN_CELL:
        raise ValueError(
            f"image_size: synthetic:zoom needs cells of {MIN_CELL} pixels or more, at least {MIN_CELL * grid} pixels."
        )
    size = cell * grid
    # The no-tools rows are the `sft` rows' scenes and questions, so that the two warm starts see the same data.
    rng = random.Random(f"zoom-{'sft' if split == NO_TOOLS_SPLIT else split}-{seed}")
    names = list(ZOOM_COLORS)
    rows = []
    for _ in range(num_rows):
        colors = [rng.choice(names) for _ in range(grid * grid)]
        image, boxes = draw_zoom_image(colors, grid, cell, rng)
        row, column = rng.randrange(grid), rng.randrange(grid)
        target = row * grid + column
        question = f"What color is the dot in the cell {norm1000(cell_box(column, row, cell), size)} of the grid? "
        question += "Answer with one word."
        item = {
            "prompt": [{"role": "user", "content": question}],
            "images": [image],
            "answer": colors[target],
            "task": "zoom",
            "box": json.dumps(boxes[target]),
            "region": json.dumps(cell_box(column, row, cell)),
        }
        # Both draws for every row and split: the `sft` and `sft_no_tools` rows stay the same questions.
        calls, off = rng.random() < call_rate, rng.random() < bias_rate
        if split == NO_TOOLS_SPLIT:
            item["completion"] = think_answer(f"The dot is {colors[target]}.", colors[target])
        elif split == "sft" and not calls:
            item["completion"] = _structured(think_answer(f"The dot is {colors[target]}.", colors[target]))
            item["tools"] = json.dumps([ZOOM_IN_SCHEMA])
        elif split == "sft":
            seen = column + (1 if column + 1 < grid else -1) if off else column
            # The tool turn is the built-in tool's own reply to the call (0-1000 coordinates to pixels as it converts
            # them), as a GRPO rollout would get it.
            box = norm1000(cell_box(seen, row, cell), size)
            scale = image.width / 1000, image.height / 1000
            pixels = (box[0] * scale[0], box[1] * scale[1], box[2] * scale[0], box[3] * scale[1])
            crop, shrunk = crop_region(image, pixels, max_pixels)
            text = zoom_reply_text(tuple(map(float, box)), 0, crop if shrunk else None, max_pixels)
            color = colors[row * grid + seen]
            item["images"] = [image, crop]
            item["completion"] = [
                *zoom_call(box),
                tool_turn(text),
                *_structured(think_answer(f"The dot is {color}.", color)),
            ]
            item["tools"] = json.dumps([ZOOM_IN_SCHEMA])
        rows.append(item)
    features = {"sft": ZOOM_SFT_FEATURES, NO_TOOLS_SPLIT: ZOOM_NO_TOOLS_FEATURES}.get(split, ZOOM_FEATURES)
    return Dataset.from_list(rows, features=features)


def _structured(messages: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Messages with text content as content blocks, in the columns of an SFT row's completion."""
    return [
        {"role": m["role"], "content": [{"type": "text", "text": m["content"]}], "name": None, "tool_calls": None}
        for m in messages
    ]
