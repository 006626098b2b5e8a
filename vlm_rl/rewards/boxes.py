"""Bounding boxes in completions and datasets: parsing, validity, IoU and coordinate conventions.

Parsing never raises. It reads JSON when the answer (or each fenced ```json block) is JSON, and otherwise
scans the text for `{"bbox_2d": [...], "label": ...}` objects (also `bbox`/`box` keys, Python quoting),
`[x1, y1, x2, y2]` lists and Qwen2-VL's `<|box_start|>(x1,y1),(x2,y2)<|box_end|>` / `(x1,y1),(x2,y2)`. When
the text has ``` fenced blocks, only their contents are read. All scans are linear regular expressions, JSON is
searched at most `_MAX_DEPTH` levels deep, and text longer than `MAX_ANSWER_CHARS` is not read at all (no boxes),
so a runaway generation costs a bounded amount of work.

Coordinates convert to original-image pixels from one of `BOX_FORMATS`:

| format     | a coordinate is                                          | to pixels                     |
| ---------- | -------------------------------------------------------- | ----------------------------- |
| `pixel`    | a pixel of the original image                            | as is                         |
| `resized`  | a pixel of the image as the processor resized it         | × original / resized size     |
| `norm1000` | relative, 0–1000                                         | × size / 1000                 |
| `norm1`    | relative, 0–1                                            | × size                        |

`auto` picks the model family's convention, which its adapter declares (`FamilyAdapter.box_format`): Qwen2-VL and
Qwen3-VL answer in 0–1000 relative coordinates, Qwen2.5-VL in pixels of its resized input; any other family, and a
model type no adapter knows, in original pixels.
"""

from __future__ import annotations

import json
import math
import re
from bisect import bisect_right
from dataclasses import dataclass, replace
from typing import Any

from vlm_rl.models.families import family_adapter
from vlm_rl.models.processing import resized_image_size

# No box answer is this long; longer text yields no boxes, so parsing a runaway generation stays cheap.
MAX_ANSWER_CHARS = 50_000
# JSON nested deeper than this is not searched for boxes.
_MAX_DEPTH = 8

BOX_FORMATS = ("pixel", "resized", "norm1000", "norm1")
ANSWER_BOX_FORMATS = ("pixel", "norm1000", "norm1")

_BOX_KEYS = ("bbox_2d", "bbox", "box")
_SCORE_KEYS = ("score", "confidence")
_NUM = r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
_FOUR = rf"\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*"
_OBJECT = re.compile(r"\{[^{}]*\}")
_OBJECT_BOX = re.compile(rf"""(?<!\w)["']?(?:bbox_2d|bbox|box)["']?\s*:\s*[\[(]{_FOUR}[\])]""")
_OBJECT_LABEL = re.compile(r"""(?<!\w)["']?label["']?\s*:\s*(?:"([^"]*)"|'([^']*)')""")
_OBJECT_SCORE = re.compile(rf"""(?<!\w)["']?(?:score|confidence)["']?\s*:\s*({_NUM})""")
_LIST = re.compile(rf"\[{_FOUR}\]")
_CORNERS = re.compile(
    r"(?:<\|object_ref_start\|>([^<]*)<\|object_ref_end\|>\s*)?(?:<\|box_start\|>\s*)?"
    rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)"
)


@dataclass(frozen=True)
class Box:
    """An axis-aligned box (x1, y1) top-left to (x2, y2) bottom-right, with an optional label and score."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None
    score: float | None = None

    @property
    def coords(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)

    def is_valid(self) -> bool:
        """Finite corners with x2 > x1 and y2 > y1: anything else has no area and is never a prediction."""
        return all(math.isfinite(c) for c in self.coords) and self.x2 > self.x1 and self.y2 > self.y1

    def scaled(self, sx: float, sy: float) -> Box:
        return replace(self, x1=self.x1 * sx, y1=self.y1 * sy, x2=self.x2 * sx, y2=self.y2 * sy)

    def clipped(self, width: float, height: float) -> Box:
        """The part inside a `width`×`height` image (zero area, so invalid, when the box lies entirely outside)."""
        return replace(
            self,
            x1=min(max(self.x1, 0.0), width),
            y1=min(max(self.y1, 0.0), height),
            x2=min(max(self.x2, 0.0), width),
            y2=min(max(self.y2, 0.0), height),
        )


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0.0 when either has no area)."""
    width = min(a.x2, b.x2) - max(a.x1, b.x1)
    height = min(a.y2, b.y2) - max(a.y1, b.y1)
    if width <= 0 or height <= 0:
        return 0.0
    intersection = width * height
    union = a.area + b.area - intersection
    return intersection / union if union > 0 else 0.0


def parse_boxes(text: str) -> list[Box]:
    """The valid boxes written in `text`, in the order they appear (see the module docstring for the forms)."""
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return []
    boxes: list[Box] = []
    for block in _fenced_blocks(text) or [text]:
        try:
            value = json.loads(block)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, list | dict):
            boxes += boxes_from_json(value)
        else:
            boxes += _scan_boxes(block)
    return [box for box in boxes if box.is_valid()]


def boxes_from_json(value: Any, depth: int = 0) -> list[Box]:
    """The boxes in decoded JSON: `[x1, y1, x2, y2]`, `[[x1, y1], [x2, y2]]`, objects with a box key, lists."""
    coords = _coords(value)
    if coords is not None:
        return [Box(*coords)]
    if depth >= _MAX_DEPTH:
        return []
    if isinstance(value, dict):
        for key in _BOX_KEYS:
            coords = _coords(value.get(key))
            if coords is not None:
                label = value.get("label")
                scores = [_number(value.get(k)) for k in _SCORE_KEYS]
                score = next((score for score in scores if score is not None), None)
                return [Box(*coords, label=None if label is None else str(label), score=score)]
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [box for item in value for box in boxes_from_json(item, depth + 1)]
    return []


def _number(value: Any) -> float | None:
    """`value` as a finite float, or None (not a number, a bool, NaN, ±inf, or an integer too big for a float)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _coords(value: Any) -> tuple[float, float, float, float] | None:
    if not isinstance(value, list | tuple):
        return None
    if len(value) == 2 and all(isinstance(p, list | tuple) and len(p) == 2 for p in value):
        value = [*value[0], *value[1]]
    numbers = [_number(v) for v in value] if len(value) == 4 else [None]
    return None if None in numbers else tuple(numbers)


def _fenced_blocks(text: str) -> list[str]:
    """The contents of ``` fenced blocks (a leading language name such as `json` dropped), found in linear time."""
    blocks = []
    start = text.find("```")
    while start != -1:
        end = text.find("```", start + 3)
        if end == -1:
            break
        block = text[start + 3 : end]
        first_line, newline, rest = block.partition("\n")
        blocks.append(rest if newline and first_line.strip().isalnum() else block)
        start = text.find("```", end + 3)
    return blocks


def _scan_boxes(text: str) -> list[Box]:
    """Boxes in non-JSON text: box objects first, then bare lists and corner pairs outside those objects."""
    found: list[tuple[int, Box]] = []
    spans: list[tuple[int, int]] = []
    for match in _OBJECT.finditer(text):
        body = match.group()
        box_match = _OBJECT_BOX.search(body)
        if box_match is None:
            continue
        label_match = _OBJECT_LABEL.search(body)
        score_match = _OBJECT_SCORE.search(body)
        label = None if label_match is None else next(g for g in label_match.groups() if g is not None)
        score = None if score_match is None else _number(float(score_match.group(1)))
        found.append((match.start(), Box(*map(float, box_match.groups()), label=label, score=score)))
        spans.append(match.span())
    starts = [start for start, _ in spans]

    def inside_object(position: int) -> bool:
        i = bisect_right(starts, position) - 1
        return i >= 0 and position < spans[i][1]

    for match in _LIST.finditer(text):
        if not inside_object(match.start()):
            found.append((match.start(), Box(*map(float, match.groups()))))
    for match in _CORNERS.finditer(text):
        if not inside_object(match.start()):
            label, *coords = match.groups()
            found.append((match.start(), Box(*map(float, coords), label=label)))
    return [box for _, box in sorted(found, key=lambda item: item[0])]


def resolve_box_format(box_format: str, model_type: str | None) -> str:
    """The convention `box_format` names; `auto`: the one the adapter of `model_type` declares (else `pixel`)."""
    if box_format == "auto":
        adapter = family_adapter(model_type)
        return adapter.box_format if adapter else "pixel"
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be 'auto' or one of {BOX_FORMATS}, got {box_format!r}.")
    return box_format


def pixel_scale(box_format: str, image_size: tuple[int, int] | None, processor: Any = None) -> tuple[float, float]:
    """The (x, y) factors that take `box_format` coordinates to original-image pixels of an image of `image_size`."""
    if box_format == "pixel":
        return 1.0, 1.0
    if image_size is None:
        raise ValueError(
            f"Boxes in {box_format!r} coordinates need the image size, but this row has no image. Use 'pixel' "
            "coordinates for rows without images."
        )
    width, height = image_size
    if box_format == "norm1000":
        return width / 1000, height / 1000
    if box_format == "norm1":
        return float(width), float(height)
    if box_format == "resized":
        if processor is None:
            raise ValueError(
                "box_format 'resized' needs the model's processor (processing_class) to know the resized image "
                "size; none was passed."
            )
        resized_width, resized_height = resized_image_size(processor, width, height)
        return width / resized_width, height / resized_height
    raise ValueError(f"Unknown box format {box_format!r}; choose one of {BOX_FORMATS}.")
