"""Video settings on the processor, and decoded clips that carry their timing into it.

Clips are decoded (and their frames sampled) by the data loader, with transformers' `load_video` (PyAV), at the
processor's `fps` / `num_frames`; the processor then takes the frames as they are (`do_sample_frames=False`). The
settings live on the processor's video processor, so generation, the training forward, evaluation and a saved
checkpoint all apply the same ones.

A processor given bare frames knows nothing of their timing: Qwen2.5-VL's `second_per_grid_ts` and Qwen3-VL's
timestamps then assume 24 frames per second. `Clip` carries the metadata `load_video` returned, and the video
processor reads it (`clip_metadata_class`): transformers' chat template passes only the frames on.

`prepare_video` also fixes the processors whose calls with videos transformers 5.19 gets wrong (`VIDEO_FIXES`):
SmolVLM's drops a call's image pixels when it also has videos, InternVL's fails on calls the trainer makes.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

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


# SmolVLM's video processor returns its frames under the image inputs' names; the processor call keeps them apart.
VIDEO_NAMES = {"pixel_values": "pixel_values_videos", "pixel_attention_mask": "pixel_attention_mask_videos"}


def _per_row(videos: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """`videos` ([videos, frames, ...]) as one row per sample ([rows, frames × most videos, ...]), zeros elsewhere."""
    rows = videos.new_zeros((len(counts), max(counts) * videos.size(1), *videos.shape[2:]))
    for row, group in enumerate(torch.split(videos, counts)):
        rows[row, : group.size(0) * group.size(1)] = group.flatten(0, 1)
    return rows


def merged_frames(inputs: dict[str, Any], counts: list[int]) -> dict[str, Any]:
    """SmolVLM's `inputs` with each row's video frames (`VIDEO_NAMES`' keys, [videos, frames, ...], `counts` per
    row) after the row's image tiles in `pixel_values` / `pixel_attention_mask` ([rows, tiles, ...]): the model drops
    all-zero padding tiles and fills the batch's `<image>` tokens with the rest in order; a row's video follows its
    images."""
    merged = dict(inputs)
    for key, video_key in VIDEO_NAMES.items():
        frames = _per_row(torch.as_tensor(merged.pop(video_key)), counts)
        images = merged.get(key)
        if images is not None:
            images = torch.stack([torch.as_tensor(row) for row in images]) if isinstance(images, list) else images
            height, width = (max(a, b) for a, b in zip(images.shape[-2:], frames.shape[-2:], strict=True))
            # Zero padding on the bottom and right, where the pixel mask is zero: as the processor pads tiles.
            images, frames = (F.pad(t, (0, width - t.size(-1), 0, height - t.size(-2))) for t in (images, frames))
            frames = torch.cat([images.to(frames.dtype), frames], dim=1)
        merged[key] = frames
    return merged


@functools.cache
def _smolvlm_video_class(processor_class: type) -> type:
    """`processor_class` (SmolVLM's) able to take images and videos in one call (same name: saved files are
    unchanged). Overrides `ProcessorMixin._process_videos` and `__call__` (transformers 5.19), whose output keeps the
    videos' `pixel_values` and drops the images' when a call has both (the video processor names its frames as the
    image processor does): the frames are kept apart, then put after each row's image tiles (`merged_frames`). A call
    without `return_tensors` (TRL's prompt tokenization) gets the frames as tensors: `replace_video_token` reads their
    shape."""

    def _process_videos(self, videos, **kwargs):
        processed, replacements = processor_class._process_videos(self, videos, **kwargs)
        return {VIDEO_NAMES.get(key, key): value for key, value in processed.items()}, replacements

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None and kwargs.get("return_tensors") is None:  # it reads the frames' shape
            kwargs.setdefault("videos_kwargs", {"return_tensors": "pt"})
        output = processor_class.__call__(self, images=images, text=text, videos=videos, **kwargs)
        if "pixel_values_videos" not in output:
            return output
        texts = [text] if isinstance(text, str) else text
        counts = [sample.count(self.video_token) for sample in texts]
        return type(output)(merged_frames(dict(output), counts), tensor_type=kwargs.get("return_tensors"))

    methods = {"_process_videos": _process_videos, "__call__": __call__, "video_ready": True}
    return type(processor_class.__name__, (processor_class,), methods)


@functools.cache
def _internvl_video_class(processor_class: type) -> type:
    """`processor_class` (InternVL's) made to take the trainer's calls of a batch with videos (same name: saved files
    are unchanged). Overrides `InternVLProcessor.__call__` (transformers 5.19), which merges image tiles and video
    frames in the order of the prompt's placeholders: it fails on a `<video>` placeholder when called without videos
    (TRL's scoring call passes the images alone; the frames come from the prompt tokenization, `video_inputs`), and
    on images with videos when the images come back as a list (no `return_tensors`, as in TRL's prompt tokenization).
    """

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is None:  # a `<video>` placeholder stays one token
            pattern, self.multimodal_pattern = (
                self.multimodal_pattern,
                re.compile(f"(?P<image>{re.escape(self.image_token)})"),
            )
            try:
                return processor_class.__call__(self, images, text, videos, **kwargs)
            finally:
                self.multimodal_pattern = pattern
        if images is not None and kwargs.get("return_tensors") is None:
            kwargs.setdefault("images_kwargs", {"return_tensors": "pt"})
        return processor_class.__call__(self, images, text, videos, **kwargs)

    return type(processor_class.__name__, (processor_class,), {"__call__": __call__, "video_ready": True})


# Processors whose calls with videos transformers 5.19 gets wrong, by class name, and their fixed subclass.
VIDEO_FIXES = {"SmolVLMProcessor": _smolvlm_video_class, "InternVLProcessor": _internvl_video_class}


def prepare_video(processor) -> None:
    """Make `processor` take decoded clips: its video processor reads `Clip` metadata, and a processor that mishandles
    some calls with videos (`VIDEO_FIXES`) gets its fixed subclass; idempotent."""
    video_processor = getattr(processor, "video_processor", None)
    if video_processor is None:
        return
    if not getattr(video_processor, "reads_clip_metadata", False):
        video_processor.__class__ = clip_metadata_class(type(video_processor))
    fix = VIDEO_FIXES.get(type(processor).__name__)
    if fix is not None and not getattr(processor, "video_ready", False):
        processor.__class__ = fix(type(processor))


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
    prepare_video(processor)
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


def configure_video_from(processor, settings: Any) -> None:
    """`configure_video` with a recipe's `video_fps`, `video_num_frames`, `video_max_pixels` and `video_total_pixels`
    (from `VLMGRPOConfig`, `VLMSFTConfig` or `VLMOptions`), so that training, generation and serving agree."""
    configure_video(
        processor,
        fps=settings.video_fps,
        num_frames=settings.video_num_frames,
        max_pixels=settings.video_max_pixels,
        total_pixels=settings.video_total_pixels,
    )
