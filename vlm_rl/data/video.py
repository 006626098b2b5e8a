"""Decoding a row's video: a file (mp4, webm, gif...) through transformers' `load_video` with PyAV, or frames.

One video per row for now. The frames are sampled while decoding, at the processor's settings
(`vlm_rl.models.video.decode_settings`), and come back as a `Clip` that carries its timing to the processor.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from transformers.video_utils import VideoMetadata, default_sample_indices_fn, load_video

VIDEO_COLUMNS = ("video", "videos")
VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".avi", ".mov", ".mkv", ".m4v", ".mpeg", ".mpg", ".ogv")
FRAMES_FPS = 2.0  # the rate of a video given as frames when no `video_fps` says otherwise (Qwen-VL's default)
STRIP_FRAMES, STRIP_HEIGHT = 8, 96  # a frame strip's most frames and height: small enough for a table cell


class Clip(np.ndarray):
    """A decoded video's sampled frames, `(frames, height, width, 3)` uint8 RGB, with its `VideoMetadata`."""

    metadata: VideoMetadata | None

    def __new__(cls, frames: np.ndarray, metadata: VideoMetadata) -> Clip:
        clip = np.asarray(frames).view(cls)
        clip.metadata = metadata
        return clip

    def __array_finalize__(self, source) -> None:
        self.metadata = getattr(source, "metadata", None)

    def __reduce__(self):
        # ndarray pickles its data only: data-loader workers and gathers between processes would drop the timing.
        reconstruct, arguments, state = super().__reduce__()
        return reconstruct, arguments, (state, self.metadata)

    def __setstate__(self, state) -> None:
        array_state, self.metadata = state
        super().__setstate__(array_state)


def decode_settings(processor) -> dict[str, Any]:
    """How the loader samples a clip's frames for `processor` (set by `vlm_rl.models.video.configure_video`): `fps`
    or `num_frames` (neither: every frame)."""
    video_processor = getattr(processor, "video_processor", None)
    fps = getattr(video_processor, "fps", None)
    num_frames = getattr(video_processor, "num_frames", None)
    return {"num_frames": num_frames} if num_frames is not None else {"fps": fps} if fps is not None else {}


class ClipError(Exception):
    """A clip that cannot be used; `reason` is its kind, as in `data/skipped_rows_<reason>`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def is_video_file(ref: object) -> bool:
    return isinstance(ref, str) and ref.lower().endswith(VIDEO_SUFFIXES)


def decode_file(path: str, name: str, *, fps: float | None = None, num_frames: int | None = None) -> Clip:
    """The frames of the video file at `path` (named `name` in errors), sampled at `fps` or as `num_frames`."""
    import av  # lazy: only video rows need PyAV

    if not os.path.isfile(path):
        raise ClipError("missing_video", f"video {name} not found (looked for {path})")
    try:
        # Some containers (webm) do not record their frame count, and `load_video`'s PyAV reader then samples
        # nothing: count from the duration instead.
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 0)
            total = stream.frames or int(round((container.duration or 0) / av.time_base * rate))

        def sample(metadata: VideoMetadata, **kwargs) -> np.ndarray:
            metadata.total_num_frames = metadata.total_num_frames or total
            wanted = min(num_frames, metadata.total_num_frames) if num_frames is not None else None
            return default_sample_indices_fn(metadata, num_frames=wanted, fps=fps if wanted is None else None)

        frames, metadata = load_video(path, backend="pyav", sample_indices_fn=sample)
    except Exception as error:  # decoders raise many types on a damaged or foreign file
        problem = f"{type(error).__name__}: {error}"
        raise ClipError("corrupt_video", f"video {name} cannot be decoded ({problem})") from error
    if len(frames) == 0:
        raise ClipError("corrupt_video", f"video {name} has no frames")
    metadata.total_num_frames = metadata.total_num_frames or total
    metadata.duration = metadata.total_num_frames / metadata.fps if metadata.fps else None
    metadata.frames_indices = list(metadata.frames_indices)[: len(frames)]
    return Clip(frames, metadata)


def clip_from_frames(frames: list, name: str, *, fps: float | None = None) -> Clip:
    """A clip of decoded RGB frames (PIL images), all of one size, played at `fps` (default `FRAMES_FPS`)."""
    if not frames:
        raise ClipError("corrupt_video", f"video {name} has no frames")
    sizes = {frame.size for frame in frames}
    if len(sizes) > 1:
        raise ClipError("corrupt_video", f"the frames of video {name} differ in size ({sorted(sizes)}); resize them")
    rate = float(fps or FRAMES_FPS)
    metadata = VideoMetadata(
        total_num_frames=len(frames),
        fps=rate,
        width=frames[0].width,
        height=frames[0].height,
        duration=len(frames) / rate,
        video_backend="frames",
        frames_indices=list(range(len(frames))),
    )
    return Clip(np.stack([np.asarray(frame) for frame in frames]), metadata)


def frame_strip(clip: np.ndarray, max_frames: int = STRIP_FRAMES, height: int = STRIP_HEIGHT) -> Image.Image:
    """A clip's frames side by side in one image, so that a completion table shows a video in an image cell: at most
    `max_frames` of them, evenly spaced, first to last, each scaled down (never up) to at most `height` pixels."""
    frames = np.asarray(clip)
    picked = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
    first = Image.fromarray(frames[0])
    scale = min(1.0, height / first.height)
    size = (max(1, round(first.width * scale)), max(1, round(first.height * scale)))
    strip = Image.new("RGB", (size[0] * len(picked), size[1]))
    for position, index in enumerate(picked):
        strip.paste(Image.fromarray(frames[index]).resize(size, Image.Resampling.BILINEAR), (position * size[0], 0))
    return strip


def with_video(prompt: list[dict], videos: list, num_images: int) -> list[dict]:
    """`prompt` with its row's video (if any) at the start of the first user message, after the row's images.

    The images stay placeholders that TRL's `prepare_multimodal_messages` fills (it places them the same way only in
    a message whose content is still text, so they are placed here too).
    """
    if not videos:
        return prompt
    messages = list(prompt)
    for index, message in enumerate(messages):
        if message["role"] != "user":
            continue
        content = message["content"]
        video = [{"type": "video", "video": clip} for clip in videos]
        if isinstance(content, str):
            content = [*({"type": "image"} for _ in range(num_images)), *video, {"type": "text", "text": content}]
        else:  # after the images already placed (InternVL and SmolVLM take a row's tiles and frames in this order)
            after = max((i + 1 for i, part in enumerate(content) if part.get("type") == "image"), default=0)
            content = [*content[:after], *video, *content[after:]]
        messages[index] = {**message, "content": content}
        return messages
    raise ClipError("bad_prompt", "the row has a video but its prompt has no user message to put it in")


def derangement(items: Sequence[int], rng: random.Random) -> dict[int, int]:
    """A random map of `items` onto themselves in which none maps to itself (one cycle through all of them)."""
    order = list(items)
    rng.shuffle(order)
    return {item: order[(position + 1) % len(order)] for position, item in enumerate(order)}


def shuffled_frame_order(num_frames: int, row: int | str, seed: int = 0) -> list[int]:
    """The order in which row `row`'s clip shows its frames with its frames shuffled (the evaluation's
    `--ablate-frames`, T-GRPO's shuffled rollouts): position k shows frame `order[k]`, no frame in its own place (one
    frame: unchanged). Seeded by `row` (the evaluation's row index; training's step and group), so a rerun shows the
    same order."""
    if num_frames < 2:
        return list(range(num_frames))
    moved = derangement(range(num_frames), random.Random(f"frames:{seed}:{row}"))
    return [moved[position] for position in range(num_frames)]
