"""Video rows in a GRPO batch: their prompts carry the clip, and their video inputs reach every forward.

TRL 1.16 knows only images: it builds the training forward's vision inputs with a second processor call that passes
`images` alone (and makes none for a batch without images), and returns a fixed list of vision inputs. The processor
call that tokenizes the prompts for generation (`_tokenize_prompts`, through the chat template) does take the
videos in the prompts; its video inputs, and its per-token `mm_token_type_ids`, which mark the video tokens the
second call does not expand, are kept (`VideoFields`) and given to every log-prob forward of the batch.

Prompt sharing and encode-once treat a row's video as part of its prompt, like its images (`shared_prefix.py`,
`vision_once.py`), in the families whose adapter says so (`shares_video_prompts`). vLLM generation gets each prompt's
clip from the same prompts (`VideoFields.clips`, `VLMRollout.videos`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from trl.trainer.utils import pad

from vlm_rl.data.video import (
    Clip,
    ClipError,
    clip_from_frames,
    decode_file,
    decode_settings,
    frame_strip,
    is_video_file,
    with_video,
)
from vlm_rl.models.adapters import FamilyAdapter

VIDEOS = "videos"
NUM_VIDEOS = "num_videos"  # bookkeeping, like `num_images`: each row's video count


def prompts_with_videos(rows: list[dict], adapter: FamilyAdapter, processor, *, uses_tools: bool):
    """`rows` with each video row's clip in its prompt (None when no row has a video); refuses what cannot train.

    Rows built by vlm-rl's data loading hold decoded `Clip`s; a `videos` value given directly (a video file path,
    alone or in a one-item list, or a list of PIL frames) is decoded here, at the processor's settings.
    """
    first = next((i for i, row in enumerate(rows) if row.get(VIDEOS)), None)
    if first is None:
        return None
    adapter.check_videos_per_row([int(bool(row.get(VIDEOS))) for row in rows])  # before decoding anything
    if uses_tools:
        raise ValueError(f"Video rows (row {first} of this batch) do not work with tools yet; see docs/data.md.")
    clips = [_clips(row.get(VIDEOS), processor, index) for index, row in enumerate(rows)]
    adapter.check_videos_per_row([len(row_clips) for row_clips in clips])  # one video per row
    adapter.check_video_frames([len(row_clips[0]) if row_clips else None for row_clips in clips])
    converted = []
    for row, videos in zip(rows, clips, strict=True):
        prompt = with_video(row["prompt"], videos, len(row.get("images") or []))
        converted.append({**row, "prompt": prompt, VIDEOS: videos})
    return converted


def _clips(value: Any, processor, row: int) -> list[Clip]:
    """A row's `videos` value as clips, read as the data loader reads the column (`LazyRows._videos`)."""
    if value is None or value == []:
        return []
    values = value if isinstance(value, list) else [value]
    if all(isinstance(clip, Clip) for clip in values):
        return values
    settings = decode_settings(processor)
    try:
        if len(values) == 1 and is_video_file(values[0]):
            return [decode_file(values[0], repr(values[0]), **settings)]
        if all(isinstance(frame, Image.Image) for frame in values):
            frames = [frame.convert("RGB") for frame in values]
            return [clip_from_frames(frames, f"of row {row}", fps=settings.get("fps"))]
    except ClipError as error:
        raise ValueError(f"row {row} of this batch: {error.detail}.") from error
    shown = repr(value)[:80]
    raise ValueError(f"row {row} of this batch: its `videos` value is not a video file or PIL frames ({shown}).")


def _video_parts(prompt: Any) -> list[dict]:
    """A prompt's video blocks, in order (none in a plain-text prompt)."""
    if not isinstance(prompt, list):
        return []
    return [part for message in prompt if isinstance(message.get("content"), list) for part in message["content"]
            if part.get("type") == "video"]  # fmt: skip


def count_videos(prompts: list) -> list[int]:
    """Each prompt's video blocks."""
    return [len(_video_parts(prompt)) for prompt in prompts]


def prompt_videos(prompt: list) -> list:
    """A prompt's clips, from its video blocks."""
    return [part["video"] for part in _video_parts(prompt)]


def _stacked(value: Any) -> torch.Tensor:
    """A processor output as one tensor: without `return_tensors`, per-video outputs (LLaVA-OneVision's frames) come
    back as a list of arrays or tensors."""
    if isinstance(value, list | tuple) and value and not isinstance(value[0], int | float):
        return torch.stack([torch.as_tensor(item) for item in value])
    return torch.as_tensor(value)


@dataclass
class VideoFields:
    """A batch's video inputs from the prompt tokenization (one processor call, the generation's)."""

    inputs: dict[str, torch.Tensor]  # the adapter's video keys, batched
    num_videos: list[int]
    mm_token_type_ids: list[list[int]] | None  # per prompt, unpadded
    clips: list[Clip | None]  # per prompt: its video (one per row), for vLLM generation

    @classmethod
    def from_processor_output(
        cls, fields: dict[str, Any], adapter: FamilyAdapter, prompts: list, processor
    ) -> VideoFields:
        clips = [part["video"] for prompt in prompts for part in _video_parts(prompt)]
        inputs = {key: _stacked(value) for key, value in adapter.video_inputs(fields, processor, clips).items()}
        types = fields.get("mm_token_type_ids")
        types = [list(map(int, row)) for row in types] if types is not None else None
        videos = [prompt_videos(prompt) for prompt in prompts]
        return cls(inputs, [len(row) for row in videos], types, [row[0] if row else None for row in videos])

    def model_inputs(self, width: int, prompt_width: int, device: torch.device) -> dict[str, Any]:
        """The video inputs of a forward over `width` columns whose first `prompt_width` are the (left-padded)
        prompts, with `mm_token_type_ids` marking the video tokens."""
        inputs: dict[str, Any] = {key: value.to(device) for key, value in self.inputs.items()}
        inputs[NUM_VIDEOS] = list(self.num_videos)
        if self.mm_token_type_ids is not None:
            prompt = pad([torch.tensor(row) for row in self.mm_token_type_ids], padding_value=0, padding_side="left")
            prompt = torch.cat([prompt.new_zeros(prompt.size(0), prompt_width - prompt.size(1)), prompt], dim=1)
            inputs["mm_token_type_ids"] = torch.cat(
                [prompt, prompt.new_zeros(prompt.size(0), width - prompt_width)], dim=1
            ).to(device)
        return inputs


def without_clips(prompt: Any) -> Any:
    """A prompt for the completion logs: each video block's frames as one small frame strip (`strip`), so the logs
    hold no clip and the table shows the video (`completion_logs.media_of_rows`)."""
    if not isinstance(prompt, list):
        return prompt
    return [
        {**message, "content": [{"type": "video", "strip": frame_strip(part["video"])} if part.get("type") == "video"
                                else part for part in message["content"]]}
        if isinstance(message.get("content"), list) else message
        for message in prompt
    ]  # fmt: skip
