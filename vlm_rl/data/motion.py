"""`synthetic:motion`: a task that needs the ORDER of a clip's frames ("which way does the red circle move?").

Each row is a short clip (`num_frames` frames, 4 by default, `image_size` pixels square, on the 28-pixel grid of the
Qwen-VL families) of one coloured shape crossing a light background in a straight line, left, right, up or down,
from near one edge to near the other. The `videos` column holds the frames (images, in memory); the question names
the shape and its colour and never the direction, and the `answer` is the direction's word. Every frame holds the
same shape, and the set of positions is the same for a clip and its reverse: without the order of the frames only
the axis (horizontal or vertical) shows, never the direction along it, so a policy that ignores order scores at most
0.5 and one shown the frames shuffled (`vlm-rl eval --ablate-frames`) about chance or below. Qwen2-VL's video
processor merges two consecutive frames into one temporal patch: with 4 frames the first patch holds the first half
of the path and the second patch the second half, so the order is still there after merging.

`train` and `test` rows (prompt, `videos`, `answer`) come from independent random streams, so held-out clips are
not training clips. `sft` rows add a `completion` from a *biased teacher*: it sees the clip, but on `bias_rate` of
the vertical clips it reads the image's y axis upside down (as if y grew upwards) and says "up" for "down" and the
reverse, with reasoning to match ("From the bottom to the top."); horizontal clips it always gets right. SFT on it
gives a policy that reads the clip and the format and keeps the teacher's error: greedily, it swaps up and down on
every vertical clip (about 0.4 held-out), which GRPO with the true `answer` can remove.
"""

from __future__ import annotations

import random

from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw

from vlm_rl.data.scenes import CELL, SPLITS, canvas, think_answer
from vlm_rl.data.synthetic import COLORS, SHAPES, fill_shape

DIRECTIONS = ("left", "right", "up", "down")
# (start side, end side) of each direction's path, for the teacher's reasoning.
SIDES = {"left": ("right", "left"), "right": ("left", "right"), "up": ("bottom", "top"), "down": ("top", "bottom")}
FLIPPED = {"up": "down", "down": "up"}  # the teacher's y axis upside down
MIN_FRAMES = 2
MIN_CELLS = 2  # the shape moves at least a cell
SHAPE_SIZE = (16, 20)  # pixels
FEATURES = Features(
    {
        "prompt": List({"role": Value("string"), "content": Value("string")}),
        "videos": List(ImageFeature()),
        "answer": Value("string"),
        "task": Value("string"),
    }
)
SFT_FEATURES = Features({**FEATURES, "completion": List({"role": Value("string"), "content": Value("string")})})


def check_motion(split: str, image_size: int, num_frames: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r} for synthetic:motion; use one of {list(SPLITS)}.")
    if image_size % CELL or image_size < MIN_CELLS * CELL:
        raise ValueError(
            f"image_size: synthetic:motion needs a multiple of {CELL} pixels, at least {MIN_CELLS * CELL}; "
            f"got {image_size}."
        )
    if num_frames < MIN_FRAMES:
        raise ValueError(f"num_frames: a motion clip needs at least {MIN_FRAMES} frames, got {num_frames}.")


def motion_clip(
    shape: str, color: str, direction: str, image_size: int, num_frames: int, rng: random.Random
) -> list[Image.Image]:
    """`num_frames` frames of `shape` in `color` moving in `direction` at a steady pace, from about one edge of the
    frame to the other (a random margin), at a random height (or column) across the path."""
    size = rng.randint(*SHAPE_SIZE)
    travel = image_size - size
    start, end = rng.randint(0, travel // 6), travel - rng.randint(0, travel // 6)
    across = rng.randint(0, travel)
    if direction in ("left", "up"):
        start, end = end, start
    background = canvas((image_size // CELL, image_size // CELL), rng)
    frames = []
    for index in range(num_frames):
        along = round(start + (end - start) * index / (num_frames - 1))
        x, y = (along, across) if direction in ("left", "right") else (across, along)
        frame = background.copy()
        fill_shape(ImageDraw.Draw(frame), shape, color, (x, y, x + size - 1, y + size - 1))
        frames.append(frame)
    return frames


def make_motion_dataset(
    num_rows: int,
    split: str = "train",
    *,
    image_size: int = 84,
    num_frames: int = 4,
    bias_rate: float = 0.8,
    seed: int = 0,
) -> Dataset:
    """Motion: "Which way does the {colour} {shape} move?" over a clip of `num_frames` frames; `answer` one of
    left, right, up, down (uniformly). The teacher (`sft` rows) flips up and down on `bias_rate` of vertical clips."""
    check_motion(split, image_size, num_frames)
    rng = random.Random(f"motion-{split}-{seed}")
    rows = []
    for _ in range(num_rows):
        shape, color, direction = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(DIRECTIONS)
        question = f"Which way does the {color} {shape} move: left, right, up or down?"
        row = {
            "prompt": [{"role": "user", "content": question}],
            "videos": motion_clip(shape, color, direction, image_size, num_frames, rng),
            "answer": direction,
            "task": "motion",
        }
        if split == "sft":
            seen = FLIPPED[direction] if direction in FLIPPED and rng.random() < bias_rate else direction
            start, end = SIDES[seen]
            row["completion"] = think_answer(f"From the {start} to the {end}.", seen)
        rows.append(row)
    return Dataset.from_list(rows, features=SFT_FEATURES if split == "sft" else FEATURES)
