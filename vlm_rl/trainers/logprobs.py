"""Per-row selection of vision inputs for the per-token log-prob forward.

The log-prob pass runs in chunks of rows. Each chunk must get exactly the vision inputs of its own rows:
all of them when some rows have images, none at all when no row has one. A text-only chunk is then an
ordinary language-model forward instead of a vision forward on an empty `pixel_values`, which is what
breaks TRL 1.16 on mixed batches. Which inputs belong to which row is the family adapter's knowledge.
"""

from __future__ import annotations

from typing import Any

import torch

from vlm_rl.models.adapters import FamilyAdapter


def select_rows(
    adapter: FamilyAdapter, split_inputs: dict[str, Any], num_images: list[int], start: int, end: int
) -> dict[str, Any]:
    """The model inputs of rows `start:end` from the output of `adapter.split_vision_inputs`.

    Image inputs are left out entirely when none of these rows has an image; inputs with one row per sample
    (per-token inputs, the adapter's `row_keys`) are kept either way.
    """
    has_images = sum(num_images[start:end]) > 0
    row_keys = adapter.row_keys
    selected: dict[str, Any] = {}
    for key, value in split_inputs.items():
        if key in row_keys or (has_images and isinstance(value, list | torch.Tensor)):
            selected[key] = value[start:end]
    if not has_images:
        return selected
    selected["num_images"] = list(num_images[start:end])
    return adapter.merge_vision_inputs(selected)
