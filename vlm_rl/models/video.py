"""Video settings on the processor, and decoded clips that carry their timing into it.

Clips are decoded (and their frames sampled) by the data loader, with transformers' `load_video` (PyAV), at the
processor's `fps` / `num_frames`; the processor then takes the frames as they are (`do_sample_frames=False`). The
settings live on the processor's video processor, so generation, the training forward, evaluation and a saved
checkpoint all apply the same ones.

A processor given bare frames knows nothing of their timing: Qwen2.5-VL's `second_per_grid_ts` and Qwen3-VL's
timestamps then assume 24 frames per second. `Clip` carries the metadata `load_video` returned, and the video
processor reads it (`clip_metadata_class`): transformers' chat template passes only the frames on.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import numpy as np

from vlm_rl.data.video import Clip


def _flat_clips(videos: Any) -> list:
    if isinstance(videos, np.ndarray) and videos.ndim == 4:
        return [videos]
    if isinstance(videos, list | tuple):
        return [clip for video in videos for clip in _flat_clips(video)]
    return [videos]


@functools.cache
def clip_metadata_class(video_processor_class: type) -> type:
    """`video_processor_class` reading each `Clip`'s metadata when the caller passes none (same name: saved files
    are unchanged). Overrides `BaseVideoProcessor.preprocess` (transformers 5.19), which otherwise builds metadata
    with no frame rate for frames it was handed."""

    def preprocess(self, videos, **kwargs):
        clips = _flat_clips(videos)
        if kwargs.get("video_metadata") is None and clips and all(isinstance(c, Clip) and c.metadata for c in clips):
            # Copies: the processors write sampled frame indices into the metadata they are given. The frames are
            # already sampled (by the loader), whatever the processor's default.
            kwargs["video_metadata"] = [copy.deepcopy(clip.metadata) for clip in clips]
            kwargs["do_sample_frames"] = False
            videos = [np.asarray(clip) for clip in clips]
        return video_processor_class.preprocess(self, videos, **kwargs)

    methods = {"preprocess": preprocess, "reads_clip_metadata": True}
    return type(video_processor_class.__name__, (video_processor_class,), methods)


def read_clip_metadata(processor) -> None:
    """Make `processor`'s video processor (if it has one) read `Clip` metadata; idempotent."""
    video_processor = getattr(processor, "video_processor", None)
    if video_processor is not None and not getattr(video_processor, "reads_clip_metadata", False):
        video_processor.__class__ = clip_metadata_class(type(video_processor))


def configure_video(
    processor,
    *,
    fps: float | None = None,
    num_frames: int | None = None,
    max_pixels: int | None = None,
    total_pixels: int | None = None,
) -> None:
    """Set the video settings on `processor`'s video processor (None keeps the processor's own).

    `fps` / `num_frames` say how the loader samples frames (one of them); `max_pixels` bounds each frame's area
    (its smallest area is lowered to it when above); `total_pixels` bounds the pixels of a whole clip as Qwen-VL's
    reference video code counts them, frame area times temporal patches (`cap_pixels_per_frame`, which spends 90% of
    a token budget).
    """
    video_processor = getattr(processor, "video_processor", None)
    wanted = {"video_fps": fps, "video_num_frames": num_frames, "video_max_pixels": max_pixels,
              "video_total_pixels": total_pixels}  # fmt: skip
    if video_processor is None:
        given = [name for name, value in wanted.items() if value is not None]
        if given:
            raise ValueError(
                f"{type(processor).__name__} has no video processor, so {', '.join(given)} cannot apply; remove "
                "them, or use a model whose processor takes video (docs/models.md)."
            )
        return
    if fps is not None and num_frames is not None:
        raise ValueError("video_fps and video_num_frames both say how to sample frames; set one of them.")
    read_clip_metadata(processor)
    video_processor.do_sample_frames = False  # the loader samples (`decode_settings`)
    if fps is not None or num_frames is not None:
        video_processor.fps, video_processor.num_frames = fps, num_frames
    if max_pixels is not None:
        if not hasattr(video_processor, "merge_size"):  # Qwen-VL's video processors read `size` as a pixel budget
            raise ValueError(
                f"video_max_pixels: {type(video_processor).__name__} resizes every frame to one fixed size "
                f"({_frame_size(video_processor)}), so it does not apply; remove it from the recipe."
            )
        size = dict(video_processor.size)
        size["longest_edge"] = int(max_pixels)
        size["shortest_edge"] = min(size.get("shortest_edge") or 0, int(max_pixels))
        video_processor.size = {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]}
    if total_pixels is None and getattr(video_processor, "cap_pixels_per_frame", False) is None:
        # transformers 5.19 warns on every call while unset, and its default changes in 5.22: keep today's.
        video_processor.cap_pixels_per_frame = False
    if total_pixels is not None:
        if not hasattr(video_processor, "max_video_tokens"):
            raise ValueError(f"video_total_pixels: {type(video_processor).__name__} has no per-clip pixel budget.")
        unit = (video_processor.patch_size * video_processor.merge_size) ** 2
        video_processor.cap_pixels_per_frame = True
        video_processor.max_video_tokens = max(1, round(int(total_pixels) / (0.9 * unit)))


def _frame_size(video_processor) -> str:
    """The fixed frame size of a video processor, for messages: SmolVLM's tile edge, else `size`'s height × width."""
    tile = getattr(video_processor, "max_image_size", None) or {}
    if tile.get("longest_edge"):
        return f"{tile['longest_edge']}×{tile['longest_edge']}"
    size = video_processor.size
    return f"{size['width']}×{size['height']}" if size.get("width") else str(dict(size))
