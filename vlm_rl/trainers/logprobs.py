"""Per-row selection of vision inputs for the per-token log-prob forward.

The log-prob pass runs in chunks of rows. Each chunk must get exactly the vision inputs of its own rows:
all of them when some rows have images, none at all when no row has one. A text-only chunk is then an
ordinary language-model forward instead of a vision forward on an empty `pixel_values`, which is what
breaks TRL 1.16 on mixed batches.
"""

from __future__ import annotations

from typing import Any

import torch
from trl.trainer.utils import split_pixel_values_by_grid

# Inputs that describe tokens (one row per sample, one column per token) rather than images: they stay
# meaningful, and are kept, for rows without images.
PER_TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")


def split_vision_inputs(vision_inputs: dict[str, Any], num_images: list[int]) -> dict[str, Any]:
    """Split image-indexed tensors into one entry per sample, using TRL's knowledge of each layout.

    Afterwards every value is either a per-sample list or a tensor with one row per sample.
    """
    split = split_pixel_values_by_grid({**vision_inputs, "num_images": list(num_images)})
    split.pop("num_images")
    for key, value in split.items():
        if isinstance(value, torch.Tensor) and value.size(0) != len(num_images):
            raise ValueError(
                f"Cannot split the vision input {key!r} (shape {tuple(value.shape)}) into {len(num_images)} samples: "
                "this model's image layout is not supported by vlm_rl's log-prob pass."
            )
    return split


def select_rows(split_inputs: dict[str, Any], num_images: list[int], start: int, end: int) -> dict[str, Any]:
    """The model inputs of rows `start:end` from the output of `split_vision_inputs`.

    Image inputs are left out entirely when none of these rows has an image.
    """
    has_images = sum(num_images[start:end]) > 0
    selected: dict[str, Any] = {"num_images": list(num_images[start:end])} if has_images else {}
    for key, value in split_inputs.items():
        if not has_images and key not in PER_TOKEN_KEYS:
            continue
        rows = value[start:end]
        if isinstance(rows, list) and rows and isinstance(rows[0], torch.Tensor):
            rows = torch.cat(rows, dim=0)
        selected[key] = rows
    return selected
