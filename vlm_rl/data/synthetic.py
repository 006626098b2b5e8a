"""A synthetic visual task generated in code: coloured shapes, questions whose answer is only in the image.

Every image row asks for the colour of the one shape drawn on a random light background. The question
text is the same whatever the answer, so a policy that ignores the image can do no better than chance;
`blind` evaluation (images swapped between rows) measures exactly that. Optional text-only rows state
the colour in words, so mixed batches of image and text samples come from the same task.
"""

from __future__ import annotations

import json
import random

from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
QUESTION_TEMPLATES = {
    "image": "What color is the shape? Answer with one word.",
    "text": "The {shape} is {color}. What color is the {shape}? Answer with one word.",
}

SPLITS = ("train", "test")
FEATURES = Features(
    {
        "prompt": List({"role": Value("string"), "content": Value("string")}),
        "images": List(ImageFeature()),
        "answer": Value("string"),
        "task": Value("string"),
    }
)


def place_shape(
    shape: str, color: str, width: int, height: int, rng: random.Random
) -> tuple[Image.Image, list[float]]:
    """One shape of `color` at a random position and scale on a random light-grey background, and its box.

    The box is `[x1, y1, x2, y2]` in pixels of the returned image, edges included.
    """
    grey = rng.randint(200, 255)
    image = Image.new("RGB", (width, height), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    extent = rng.randint(side // 2, side - 4)
    x0, y0 = rng.randint(0, width - extent), rng.randint(0, height - extent)
    box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
    fill_shape(draw, shape, color, box)
    return image, [float(v) for v in box]


def fill_shape(pen: ImageDraw.ImageDraw, shape: str, color: str, box: tuple[int, int, int, int]) -> None:
    """`shape` filling `box` (x1, y1, x2, y2, edges included) in `color`; a triangle points up."""
    x1, y1, x2, y2 = box
    fill = COLORS[color]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x1 + (x2 - x1 + 1) // 2, y1), (x1, y2), (x2, y2)], fill=fill)


def draw_shape(shape: str, color: str, size: int, rng: random.Random) -> Image.Image:
    """A `size`×`size` image with one shape (see `place_shape`)."""
    return place_shape(shape, color, size, size, rng)[0]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r} for a synthetic dataset; use one of {list(SPLITS)}.")


def make_shapes_dataset(
    num_rows: int,
    split: str = "train",
    *,
    image_size: int = 56,
    text_fraction: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """Rows with `prompt` (conversational), `images` (one or none), `answer` and `task` columns.

    `split` picks an independent random stream ("train" or "test"); `text_fraction` of the rows are
    text-only. Deterministic for a given (split, seed).
    """
    _check_split(split)
    if not 0.0 <= text_fraction <= 1.0:
        raise ValueError(f"text_fraction must be between 0 and 1, got {text_fraction}.")
    rng = random.Random(f"shapes-{split}-{seed}")  # independent streams: held-out rows are not training rows
    rows = []
    for _ in range(num_rows):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if rng.random() < text_fraction:
            question, images, task = QUESTION_TEMPLATES["text"].format(shape=shape, color=color), [], "text"
        else:
            question, images, task = QUESTION_TEMPLATES["image"], [draw_shape(shape, color, image_size, rng)], "image"
        rows.append(
            {"prompt": [{"role": "user", "content": question}], "images": images, "answer": color, "task": task}
        )
    return Dataset.from_list(rows, features=FEATURES)


def make_grounding_math_dataset(
    num_rows: int, split: str = "train", *, image_size: int = 56, seed: int = 0
) -> Dataset:
    """A mixed task for reward routing: half grounding rows, half text-only arithmetic rows.

    Grounding rows (`task` "grounding") show one shape on a non-square `1.5·image_size × image_size` image
    and ask for its box; `answer` is `[x1, y1, x2, y2]` in pixels of that image, as JSON. Math rows (`task`
    "math") ask for a sum of two integers; `answer` is the sum.
    """
    _check_split(split)
    rng = random.Random(f"grounding-math-{split}-{seed}")
    rows = []
    for _ in range(num_rows):
        if rng.random() < 0.5:
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            image, box = place_shape(shape, color, image_size * 3 // 2, image_size, rng)
            question = f"Where is the {color} {shape}? Answer with its bounding box [x1, y1, x2, y2] in pixels."
            rows.append({"prompt": [{"role": "user", "content": question}], "images": [image],
                         "answer": json.dumps(box), "task": "grounding"})  # fmt: skip
        else:
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            question = f"What is {a} + {b}? Put the result in <answer></answer>."
            rows.append({"prompt": [{"role": "user", "content": question}], "images": [],
                         "answer": str(a + b), "task": "math"})  # fmt: skip
    return Dataset.from_list(rows, features=FEATURES)
