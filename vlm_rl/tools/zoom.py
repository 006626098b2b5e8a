"""Zooming into an image: the region a `zoom_in` tool returns, cut from the original full-resolution image."""

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
    left, top, right, bottom = math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)
    if right - left < 1 or bottom - top < 1:
        raise ValueError(f"the box {list(box)} has no area inside the {width}x{height} image")
    crop = image.crop((left, top, right, bottom))
    area = crop.width * crop.height
    if area <= max_pixels:
        return crop, False
    scale = math.sqrt(max_pixels / area)
    size = (max(1, math.floor(crop.width * scale)), max(1, math.floor(crop.height * scale)))
    return crop.resize(size, Image.Resampling.BICUBIC), True
