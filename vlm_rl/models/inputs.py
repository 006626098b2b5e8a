"""Prompts and model inputs, as the trainer, the evaluation and the rollouts all build and cut them.

These sit with the models, below every package that uses them, so that `vlm_rl.trainers`, `vlm_rl.rollout` and
`vlm_rl.evaluation` each import them downward and none imports another to reach them (`tests/test_imports.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import BatchFeature
from trl.data_utils import prepare_multimodal_messages

from vlm_rl.data.rows import IMAGE_MARKER, generation_prompt
from vlm_rl.models.adapters import FamilyAdapter

VIDEO_MARKER = "<video>"  # where `conversation_text` shows a video

# Inputs that tell which vision inputs belong to which row, for TRL and the adapters; the model takes none of them.
BOOKKEEPING_KEYS = ("num_images", "num_tiles", "num_videos")


def media_token_ids(config) -> list[int]:
    """Token ids that mark images or videos in the prompt; a completion must never contain them."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "image_token_index")
    return sorted({getattr(config, name) for name in names if isinstance(getattr(config, name, None), int)})


def prompt_inputs(adapter: FamilyAdapter, processor, prompts: list, images: list[list], tools: list | None = None):
    """The padded model inputs of a batch of prompts, built the way the trainer builds them; `tools` (JSON schemas)
    are rendered into the prompts as TRL's tool loop renders them.

    Like TRL, one `apply_chat_template` call renders and tokenizes the conversations with their images: a
    second tokenization of rendered text would add BOS again (Gemma 3), and a flat image list would tile a
    multi-image row differently (LLaVA-OneVision). Text inputs are left-padded, then the family adapter moves
    any that must pad on the right (InstructBLIP's Q-Former text has absolute positions).
    """
    conversations = [prepare_multimodal_messages(p, images=i) for p, i in zip(prompts, images, strict=True)]
    tokenizer = processor.tokenizer
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = processor.apply_chat_template(
            conversations, **generation_prompt(prompts), tools=tools or None, tokenize=True, return_dict=True,
            processor_kwargs={"padding": True, "return_tensors": "pt"},
        )  # fmt: skip
    finally:
        tokenizer.padding_side = padding_side
    return BatchFeature(adapter.repad_prompt_inputs(dict(inputs)))


def select_rows(
    adapter: FamilyAdapter, split_inputs: dict[str, Any], num_images: list[int], rows: Sequence[int]
) -> dict[str, Any]:
    """The model inputs of `rows` (in that order) from the output of `adapter.split_vision_inputs`.

    Image inputs are left out entirely when none of these rows has an image; inputs with one row per sample
    (per-token inputs, the adapter's `row_keys`) are kept either way. So a chunk of the log-prob pass gets exactly
    its own rows' vision inputs, and a text-only chunk is an ordinary language-model forward instead of a vision
    forward on an empty `pixel_values`, which is what breaks TRL 1.16 on mixed batches.
    """
    rows = list(rows)
    has_images = any(num_images[row] for row in rows)
    num_videos = split_inputs.get("num_videos")
    has_videos = num_videos is not None and any(num_videos[row] for row in rows)
    row_keys = adapter.row_keys
    selected: dict[str, Any] = {}
    for key, value in split_inputs.items():
        wanted = has_videos if key in adapter.video_keys else has_images and key != "num_videos"
        if key in row_keys or (wanted and isinstance(value, list | torch.Tensor)):
            selected[key] = [value[row] for row in rows] if isinstance(value, list) else value[rows]
    if has_images:
        selected["num_images"] = [num_images[row] for row in rows]
    if has_videos:
        selected["num_videos"] = [num_videos[row] for row in rows]
    return adapter.merge_vision_inputs(selected) if has_images or has_videos else selected


def group_rows(prompt_ids: torch.Tensor, images: Sequence[Sequence[torch.Tensor]] = ()) -> list[list[int]]:
    """Rows with the same prompt: equal (left-padded) prompt ids and equal vision inputs.

    `images` holds, per image input (e.g. `pixel_values`, `image_grid_thw`), one tensor per row. Each group lists its
    rows in batch order; groups are ordered by their first row.
    """

    def same_images(a: int, b: int) -> bool:
        return all(rows[a].shape == rows[b].shape and torch.equal(rows[a], rows[b]) for rows in images)

    groups: list[list[int]] = []
    by_prompt: dict[bytes, list[list[int]]] = {}
    for row, ids in enumerate(prompt_ids.cpu().numpy()):
        candidates = by_prompt.setdefault(ids.tobytes(), [])
        for group in candidates:
            if same_images(group[0], row):
                group.append(row)
                break
        else:
            candidates.append([row])
            groups.append(candidates[-1])
    return groups


def conversation_text(messages: str | Sequence[dict]) -> str:
    """A prompt or completion as readable text: one `role: content` line per message, images as `<image>`, videos as
    `<video>`."""
    if isinstance(messages, str):
        return messages
    lines = []
    for message in messages:
        content = message.get("content", "")
        if not isinstance(content, str):
            content = "".join(
                part.get("text") or ""
                if part.get("type") == "text"
                else (VIDEO_MARKER if part.get("type") == "video" else IMAGE_MARKER)
                for part in content
                if isinstance(part, dict)
            )
        lines.append(f"{message.get('role', 'user')}: {content}")
    return "\n".join(lines)
