"""Completion logs: each logging step's prompts, images, completions, rewards and advantages, as a table.

TRL 1.16 puts the prompt into its table as a conversation (a list of dicts) whose image parts have no text;
wandb infers a column type from the first row and refuses the table when a later row's parts differ (an image
part next to a text part), so `report_to: wandb` with `log_completions: true` crashes on the first image prompt.
Here prompts and completions are plain text with an `<image>` marker where each image goes, and each image of a
row has a column of its own (`image_1`, `image_2`, ...; empty for rows with fewer images), so every cell has one
type and the tracker shows the images next to the text.

A multi-turn completion (TRL's tool loop) shows one line per turn: the assistant's text and tool calls, each tool's
reply (an `<image>` marker where it returned an image); the images a tool returned follow the prompt's in the image
columns, in the order the tools returned them.

A video row's video is a frame strip (its sampled frames side by side, `vlm_rl.data.video.frame_strip`, made when
the batch's prompts are logged) in the image column after the row's images, and a `<video>` marker in the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from vlm_rl.models.inputs import conversation_text


def completion_text(completion: str | Sequence[dict]) -> str:
    """A completion as `conversation_text`, with each assistant turn's tool calls written out as the model wrote them
    (TRL's parsed message keeps them apart from the text)."""
    if isinstance(completion, str):
        return completion
    turns = []
    for message in completion:
        calls = "".join(
            f"<tool_call>{json.dumps(call.get('function', call))}</tool_call>"
            for call in message.get("tool_calls") or []
        )
        if calls:
            content = message.get("content") or ""
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            message = {**message, "content": [*parts, {"type": "text", "text": calls}]}
        turns.append(message)
    return conversation_text(turns)


def tool_images(completion: str | Sequence[dict]) -> list[Any]:
    """The images the tools returned in a multi-turn completion, in order."""
    if isinstance(completion, str):
        return []
    return [
        part["image"]
        for message in completion
        if message.get("role") == "tool" and isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") == "image"
    ]


def video_strips(prompt: str | Sequence[dict]) -> list[Any]:
    """The frame strips of a logged prompt's videos, in order."""
    if isinstance(prompt, str):
        return []
    return [
        part["strip"]
        for message in prompt
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") == "video" and part.get("strip") is not None
    ]


def media_of_rows(logs: dict[str, Any]) -> list[list[Any]]:
    """Each logged row's images, then its videos' frame strips: what its `image_k` columns show."""
    prompts = list(logs["prompt"])
    images = list(logs["images"]) or [[] for _ in prompts]
    return [list(row or []) + video_strips(prompt) for row, prompt in zip(images, prompts, strict=True)]


def completion_frame(logs: dict[str, Any], step: int) -> pd.DataFrame:
    """The text columns of one logging step's table: step, prompt, completion, number of images and of videos, each
    reward, each extra column a reward logged, and the advantage."""
    prompts = list(logs["prompt"])
    images = list(logs["images"]) or [[] for _ in prompts]
    return pd.DataFrame(
        {
            "step": [step] * len(prompts),
            "prompt": [conversation_text(p) for p in prompts],
            "completion": [completion_text(c) for c in logs["completion"]],
            "num_images": [len(row or []) for row in images],
            "num_videos": [len(video_strips(prompt)) for prompt in prompts],
            **{name: list(values) for name, values in logs["rewards"].items()},
            **{name: list(values) for name, values in logs["extra"].items()},
            "advantage": list(logs["advantages"]),
        }
    )


def with_image_columns(frame: pd.DataFrame, images: Sequence[Sequence[Any] | None], to_media) -> pd.DataFrame:
    """`frame` plus `image_1` .. `image_K` (K: the most images in a row), each image converted by `to_media`.

    `images`: each row's images and video frame strips (`media_of_rows`)."""
    most = max((len(row or []) for row in images), default=0)
    columns = {
        f"image_{k + 1}": [to_media(row[k]) if row is not None and k < len(row) else None for row in images]
        for k in range(most)
    }
    return pd.concat([frame, pd.DataFrame(columns, index=frame.index)], axis=1)


def write_completion_logs(
    logs: dict[str, Any], step: int, output_dir: str | Path, backends: Iterable[Any], unique_prompts: bool = False
) -> pd.DataFrame:
    """Write `completions/completions_<step>.parquet` (text) and log one table per backend (wandb, trackio).

    Each backend gets the table under the key `completions` at this step: wandb keeps every step's table as a
    file of its own (`media/table/completions_<step>_*.table.json` in the run directory) and in the UI's step
    slider, so a step never overwrites an earlier one.
    """
    frame = completion_frame(logs, step)
    directory = Path(output_dir) / "completions"
    directory.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(directory / f"completions_{step:05d}.parquet")
    images = media_of_rows(logs)
    keep = ~frame["prompt"].duplicated() if unique_prompts else pd.Series(True, index=frame.index)
    for backend in backends:
        table = with_image_columns(frame, images, backend.Image)[keep]
        backend.log({"completions": backend.Table(dataframe=table.reset_index(drop=True))})
    return frame
