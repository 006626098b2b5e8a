"""The zoom itself, shared by the `zoom_in` tool (`vlm_rl.tools.zoom`) and the zoom task's SFT rows
(`vlm_rl.data.zoom`), which show the model the tool's exact reply: the region cut from the original image within a
pixel budget, and the line the tool says of it. It imports nothing of `vlm_rl`, so the data can use it without
depending on the tools (which depend on the models, which depend on the data)."""

from __future__ import annotations

import math

from PIL import Image

Box = tuple[float, float, float, float]


def crop_region(image: Image.Image, box: Box, max_pixels: int) -> tuple[Image.Image, bool]:
    """The `box` (x1, y1, x2, y2 in original-image pixels, clamped to the image) cut from `image`, resized down with
    its aspect kept when its area is over `max_pixels`, so a zoom never overflows the visual-token budget.

    Returns the crop and whether it was shrunk. Raises `ValueError` for a box with no area inside the image.
    """
    width, height = image.size
    x1, y1 = max(0.0, min(box[0], box[2])), max(0.0, min(box[1], box[3]))
    x2, y2 = min(float(width), max(box[0], box[2])), min(float(height), max(box[1], box[3]))
    # Whole pixels that cover the box; a coordinate within 1e-6 of a pixel edge is on it (0.336 * 750 is
    # 252.00000000000003 in floating point, which must not add a row of the next cell).
    left, top = math.floor(x1 + 1e-6), math.floor(y1 + 1e-6)
    right, bottom = math.ceil(x2 - 1e-6), math.ceil(y2 - 1e-6)
    if right - left < 1 or bottom - top < 1:
        raise ValueError(f"the box {list(box)} has no area inside the {width}x{height} image")
    crop = image.crop((left, top, right, bottom))
    area = crop.width * crop.height
    if area <= max_pixels:
        return crop, False
    scale = math.sqrt(max_pixels / area)
    size = (max(1, math.floor(crop.width * scale)), max(1, math.floor(crop.height * scale)))
    return crop.resize(size, Image.Resampling.BICUBIC), True


def zoom_reply_text(box: Box, image_index: int, shrunk_to: Image.Image | None, max_pixels: int) -> str:
    """The line `zoom_in` replies with beside the crop: the box it cut and, when the crop was shrunk, to what."""
    text = f"Zoomed into {list(box)} of image {image_index}."
    if shrunk_to is not None:
        text += f" The region was shrunk to {shrunk_to.width}x{shrunk_to.height} to fit the {max_pixels}-pixel budget."
    return text
