"""Video rows in a GRPO batch: their prompts carry the clip, and their video inputs reach every forward.

TRL 1.16 knows only images: it builds the training forward's vision inputs with a second processor call that passes
`images` alone (and makes none for a batch without images), and returns a fixed list of vision inputs. The processor
call that tokenizes the prompts for generation (`_tokenize_prompts`, through the chat template) does take the
videos in the prompts; its video inputs, and its per-token `mm_token_type_ids`, which mark the video tokens the
second call does not expand, are kept (`VideoFields`) and given to every log-prob forward of the batch.

Prompt sharing and encode-once cover images only: a forward with video inputs takes the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.utils import pad

from vlm_rl.data.video import Clip, clip_from_frames, decode_file, decode_settings, is_video_file, with_video
from vlm_rl.models.adapters import FamilyAdapter

VIDEOS = "videos"
NUM_VIDEOS = "num_videos"  # bookkeeping, like `num_images`: each row's video count


def prompts_with_videos(rows: list[dict], adapter: FamilyAdapter, processor, *, uses_tools: bool, use_vllm: bool):
    """`rows` with each video row's clip in its prompt (None when no row has a video); refuses what cannot train.

    Rows built by vlm-rl's data loading hold decoded `Clip`s; a `videos` value given directly (a file path, or a
    list of frames) is decoded here, at the processor's settings.
    """
    first = next((i for i, row in enumerate(rows) if row.get(VIDEOS)), None)
    if first is None:
        return None
    adapter.check_videos_per_row([len(row.get(VIDEOS) or []) for row in rows])
    if uses_tools or use_vllm:
        what = "tools" if uses_tools else "vLLM generation"
        raise ValueError(f"Video rows (row {first} of this batch) do not work with {what} yet; see docs/data.md.")
    converted = []
    for index, row in enumerate(rows):
        videos = [_clip(value, processor, index) for value in row.get(VIDEOS) or []]
        prompt = with_video(row["prompt"], videos, len(row.get("images") or []))
        converted.append({**row, "prompt": prompt, VIDEOS: videos})
    return converted


def _clip(value: Any, processor, row: int) -> Clip:
    if isinstance(value, Clip):
        return value
    settings = decode_settings(processor)
    if is_video_file(value):
        return decode_file(value, repr(value), **settings)
    if isinstance(value, list):
        return clip_from_frames(value, f"of row {row}", fps=settings.get("fps"))
    raise ValueError(f"row {row}'s video is {type(value).__name__}; give a video file path or a list of frames.")


def count_videos(prompts: list) -> list[int]:
    """Each prompt's video blocks."""
    return [
        sum(1 for message in prompt if isinstance(message["content"], list) for part in message["content"]
            if part.get("type") == "video")
        for prompt in prompts
    ]  # fmt: skip


@dataclass
class VideoFields:
    """A batch's video inputs from the prompt tokenization (one processor call, the generation's)."""

    inputs: dict[str, torch.Tensor]  # the adapter's video keys, batched
    num_videos: list[int]
    mm_token_type_ids: list[list[int]] | None  # per prompt, unpadded

    @classmethod
    def from_processor_output(cls, fields: dict[str, Any], adapter: FamilyAdapter, prompts: list) -> VideoFields:
        inputs = {key: torch.as_tensor(fields[key]) for key in adapter.video_keys if key in fields}
        types = fields.get("mm_token_type_ids")
        types = [list(map(int, row)) for row in types] if types is not None else None
        return cls(inputs, count_videos(prompts), types)

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
    """A prompt for the completion logs: video blocks without their frames."""
    if not isinstance(prompt, list):
        return prompt
    return [
        {**message, "content": [{"type": "video"} if part.get("type") == "video" else part
                                for part in message["content"]]}
        if isinstance(message.get("content"), list) else message
        for message in prompt
    ]  # fmt: skip
