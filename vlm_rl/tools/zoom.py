"""Zooming into an image: the region a `zoom_in` tool returns, cut from the original full-resolution image."""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

from vlm_rl.models.families import family_adapter
from vlm_rl.rewards.boxes import pixel_scale, resolve_box_format
from vlm_rl.tools.replies import error_reply
from vlm_rl.zooming import Box, crop_region, zoom_reply_text


def crop_budget(processor: Any, model_type: str | None) -> int:
    """The most pixels a returned crop may have: what the processor shows the model of one image.

    Qwen-VL style processors resize every image to at most `max_pixels` (their `size["longest_edge"]`); the other
    families resize to a fixed size (`crop_size` or `size`: `height` x `width`, or a square of the longest or shortest
    edge; for a family that tiles large images, one tile).
    """
    image_processor = getattr(processor, "image_processor", processor)
    size = {key: value for key, value in dict(getattr(image_processor, "size", None) or {}).items() if value}
    adapter = family_adapter(model_type)
    if adapter is not None and "max_pixels" in adapter.image_size_bounds and "longest_edge" in size:
        return int(size["longest_edge"])
    crop = dict(getattr(image_processor, "crop_size", None) or {})
    if getattr(image_processor, "do_center_crop", False) and crop.get("height") and crop.get("width"):
        return int(crop["height"]) * int(crop["width"])  # CLIP-style: resized, then cut to `crop_size`
    if "height" in size and "width" in size:
        return int(size["height"]) * int(size["width"])
    edge = size.get("longest_edge") or size.get("shortest_edge")
    if edge:
        return int(edge) ** 2
    raise ValueError(
        f"The zoom tool cannot tell how many pixels {type(image_processor).__name__} shows the model (no `size` it "
        "knows): pass max_pixels to ZoomEnvironment."
    )


def _row_images(row: dict[str, Any]) -> list[Image.Image]:
    """A dataset row's images as the trainer gives them (`images`, or a single `image`)."""
    images = row.get("images")
    if images is None and row.get("image") is not None:
        images = [row["image"]]
    return [image for image in images or [] if image is not None]


class ZoomEnvironment:
    """The built-in `zoom_in` tool, as an environment of TRL's `environment_factory` (one instance per rollout).

    `reset` keeps the row's original images, so a zoom cuts the full-resolution pixels, not the downscaled copy the
    model saw. Every mistake the model can make comes back as a one-line `Error: ...` reply instead of an exception:
    the rollout goes on and the model can try again.
    """

    def __init__(
        self,
        processor: Any = None,
        model_type: str | None = None,
        box_format: str = "auto",
        max_pixels: int | None = None,
    ) -> None:
        self.box_format = resolve_box_format(box_format, model_type)
        self.processor = processor
        self.max_pixels = max_pixels if max_pixels is not None else crop_budget(processor, model_type)
        self.images: list[Image.Image] = []

    def reset(self, **row: Any) -> None:
        self.images = _row_images(row)

    def zoom_in(self, bbox_2d: list[float], image_index: int = 0) -> list[dict[str, Any]] | str:
        """Zoom in on a region of an image, to see its details at a higher resolution.

        Args:
            bbox_2d: The region to zoom into, as [x1, y1, x2, y2], in the coordinates you use for boxes in answers.
            image_index: Which image of the question to zoom into, counting from 0.

        Returns:
            The region as an image, and a line saying what was cut.
        """
        if not self.images:
            return error_reply("zoom_in needs an image, and this question has none; answer without it.")
        last = len(self.images) - 1
        if isinstance(image_index, bool) or not isinstance(image_index, int) or not 0 <= image_index <= last:
            return error_reply(f"image_index must be an integer from 0 to {last}, got {image_index!r}.")
        box = _four_numbers(bbox_2d)
        if box is None:
            return error_reply(f"bbox_2d must be [x1, y1, x2, y2] (four numbers), got {bbox_2d!r}.")
        image = self.images[image_index]
        sx, sy = pixel_scale(self.box_format, image.size, self.processor)
        pixels = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        try:
            crop, shrunk = crop_region(image, pixels, self.max_pixels)
        except ValueError:
            return error_reply(f"bbox_2d {list(box)} ({self.box_format} coordinates) is outside image {image_index}.")
        text = zoom_reply_text(box, image_index, crop if shrunk else None, self.max_pixels)
        return [{"type": "image", "image": crop}, {"type": "text", "text": text}]


def _four_numbers(value: Any) -> Box | None:
    """`value` as four finite floats, or None when it is not a list of four numbers."""
    if not isinstance(value, list | tuple) or len(value) != 4:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    return tuple(float(v) for v in value)
