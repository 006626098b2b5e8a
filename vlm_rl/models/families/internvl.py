"""InternVL 3 (transformers-native `InternVLForConditionalGeneration`, the `-hf` checkpoints): dynamic tiling.

The processor resizes each image to the grid of square tiles (between `min_patches` and `max_patches` of them)
whose aspect ratio is closest to the image's, and adds a downscaled thumbnail tile when the grid has more than
one. `pixel_values` is tile-indexed, [total tiles, C, H, W], and each tile becomes `image_seq_length`
`<IMG_CONTEXT>` tokens between `<img>` and `</img>`. How many tiles an image got is not in the model inputs:
TRL 1.16 recomputes it (`num_tiles`, per sample) when some image has more than one tile.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from vlm_rl.models.adapters import FamilyAdapter
from vlm_rl.models.tiny import TinySpec, TinyTokenizer, decoder_sizes, save_tiny_model, vision_sizes

# Qwen2.5's chat tokens, then InternVL's image and grounding tokens (OpenGVLab/InternVL3-*-hf).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<video>",
]

# The chat template transformers' InternVL conversion writes: an image part becomes `<IMG_CONTEXT>\n`, which the
# processor expands to `<img>` + `<IMG_CONTEXT>` × (tiles × image_seq_length) + `</img>`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)

# Tiny sizes: 28-pixel tiles of 7-pixel patches (4×4), pixel-shuffled by 0.5 to 4 tokens per tile; at most 4
# tiles per grid, so an image is 1 tile (small or square-ish) up to 4 + thumbnail.
TILE_SIZE = 28
PATCH_SIZE = 7
DOWNSAMPLE_RATIO = 0.5
TOKENS_PER_TILE = int((TILE_SIZE // PATCH_SIZE) ** 2 * DOWNSAMPLE_RATIO**2)
MAX_TILES = 4


class InternVLAdapter(FamilyAdapter):
    """Tile-indexed `pixel_values`: each sample owns as many consecutive tiles as its images were cut into."""

    name = "internvl"
    label = "InternVL 3"
    model_types = ("internvl",)
    vision_modules = ("model.vision_tower",)
    projector_modules = ("model.multi_modal_projector",)
    language_modules = ("model.language_model", "lm_head")
    image_size_bounds = ("min_pixels", "max_pixels")
    notes = (
        "Images are cut into a grid of square tiles (448×448 on the released models), plus a thumbnail if several: "
        "`min_pixels` / `max_pixels` ÷ tile area set the grid's `min_patches` / `max_patches`. Transformers-native "
        "`-hf` checkpoints only (not the remote-code ones)."
    )
    shares_prompts = True
    # Each frame is one tile of `image_seq_length` image tokens ("Frame1: <img>...</img>"): the processor merges the
    # frames into `pixel_values` in prompt order, and the adapter keeps them apart, [videos, frames, C, H, W].
    video_keys = ("pixel_values_videos",)
    uniform_frames = True

    def video_inputs(self, fields: dict[str, Any], processor, videos: list) -> dict[str, Any]:
        """The frames, processed as the processor call did (its own output holds them only merged with the images)."""
        return {
            "pixel_values_videos": processor.video_processor(videos=videos, return_tensors="pt")["pixel_values_videos"]
        }

    def video_forward_inputs(self, inputs: dict[str, Any], num_videos: list[int]) -> dict[str, Any]:
        """`pixel_values` as the processor merges it: each row's image tiles, then its video's frames, row by row
        (the prompt puts a row's video after its images), and `num_tiles` counting both (TRL's log-prob method slices
        by it)."""
        videos = inputs.pop("pixel_values_videos")
        images = inputs.get("pixel_values")
        image_tiles = list(inputs.get("num_tiles") or inputs.get("num_images") or [0] * len(num_videos))
        image_rows = torch.split(images, image_tiles) if images is not None else [videos[:0, 0]] * len(num_videos)
        frame_rows = torch.split(videos.flatten(0, 1), [n * videos.size(1) for n in num_videos])
        rows = list(zip(image_rows, frame_rows, strict=True))
        inputs["pixel_values"] = torch.cat([tiles for row in rows for tiles in row])
        inputs["num_tiles"] = [len(image) + len(frames) for image, frames in rows]
        return inputs

    def tiles_per_row(self, processor, images: list[list]) -> list[int] | None:
        """Each row's tile count, as TRL computes it for the training batch (the processor's `num_patches`)."""
        flat = [image for row in images for image in row]
        if not flat:
            return None
        num_patches = processor.image_processor(images=flat, crop_to_patches=True, return_tensors="pt")["num_patches"]
        counts = [len(row) for row in images]
        return [int(group.sum()) for group in torch.split(torch.as_tensor(num_patches), counts)]

    def split_vision_inputs(self, inputs: dict[str, Any], num_images: list[int]) -> dict[str, Any]:
        """Split `pixel_values` by tiles per sample: TRL's `num_tiles` when present, else one tile per image.

        TRL computes `num_tiles` only when the tile count differs from the image count; every image has at
        least one tile, so equal counts mean exactly one tile per image and `num_images` is then exact.
        """
        split = dict(inputs) | self._split_videos(inputs)
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            return split
        num_tiles = inputs.get("num_tiles")
        if num_tiles is None:
            if pixel_values.size(0) != sum(num_images):
                raise ValueError(
                    f"{self.label} `pixel_values` holds {pixel_values.size(0)} tiles for {sum(num_images)} images "
                    "but no `num_tiles` says which sample owns which tiles."
                )
            num_tiles = list(num_images)
        split["pixel_values"] = self._split_by_counts("pixel_values", pixel_values, list(num_tiles))
        return split

    def set_image_size_bounds(self, processor, min_pixels: int | None, max_pixels: int | None) -> None:
        """Bound the tile grid: the resized image is `tiles × tile area` pixels, so pixels map to tile counts.

        `min_pixels` rounds up and `max_pixels` down to whole tiles; the thumbnail tile added to a grid of
        several tiles is not counted (it is a downscaled copy, not part of the resized image).
        """
        if min_pixels is None and max_pixels is None:
            return
        image_processor = processor.image_processor
        if not isinstance(getattr(image_processor, "max_patches", None), int):
            raise ValueError(
                f"{type(image_processor).__name__} has no tile-count bounds (`min_patches` / `max_patches`), so "
                f"`min_pixels` / `max_pixels` do not apply to this {self.label} model; remove them from the recipe."
            )
        tile_area = image_processor.size["height"] * image_processor.size["width"]
        tile = f"{image_processor.size['width']}×{image_processor.size['height']}"
        min_tiles = image_processor.min_patches if min_pixels is None else max(1, math.ceil(min_pixels / tile_area))
        max_tiles = image_processor.max_patches if max_pixels is None else int(max_pixels) // tile_area
        if max_tiles < 1:
            raise ValueError(f"max_pixels must be at least {tile_area} for {self.label} (one {tile} tile).")
        if min_tiles > max_tiles:
            raise ValueError(
                f"min_pixels / max_pixels allow no whole number of {tile} tiles for {self.label}: at least "
                f"{min_tiles} and at most {max_tiles} tiles."
            )
        image_processor.min_patches = min_tiles
        image_processor.max_patches = max_tiles

    def build_tiny(self, output_dir: Path, *, hidden_size: int, num_hidden_layers: int, seed: int) -> None:
        spec = TinySpec(
            # The processor finds its image tokens by name, as in the converted tokenizers.
            tokenizer=TinyTokenizer(
                tuple(SPECIAL_TOKENS),
                CHAT_TEMPLATE,
                eos_token="<|im_end|>",
                pad_token="<|endoftext|>",
                named_tokens={
                    "start_image_token": "<img>",
                    "end_image_token": "</img>",
                    "context_image_token": "<IMG_CONTEXT>",
                    "video_token": "<video>",
                },
            ),
            config_class="InternVLConfig",
            model_class="InternVLForConditionalGeneration",
            config=lambda ids, vocab_size: {
                "text_config": {
                    "model_type": "qwen2",
                    **decoder_sizes(vocab_size, hidden_size, num_hidden_layers),
                    "max_position_embeddings": 4096,
                    "bos_token_id": ids["<|endoftext|>"],
                    "eos_token_id": ids["<|im_end|>"],
                    "pad_token_id": ids["<|endoftext|>"],
                },
                "vision_config": vision_sizes(TILE_SIZE, PATCH_SIZE),
                "image_token_id": ids["<IMG_CONTEXT>"],
                "image_seq_length": TOKENS_PER_TILE,
                "downsample_ratio": DOWNSAMPLE_RATIO,
            },
            image_processor_class="GotOcr2ImageProcessor",
            image_processor={
                "size": {"height": TILE_SIZE, "width": TILE_SIZE},
                "crop_to_patches": True,
                "min_patches": 1,
                "max_patches": MAX_TILES,
                "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225],
            },
            processor_class="InternVLProcessor",
            processor={"image_seq_length": TOKENS_PER_TILE},
            video_processor_class="InternVLVideoProcessor",
            video_processor={
                "size": {"height": TILE_SIZE, "width": TILE_SIZE},
                "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225],
            },
        )
        save_tiny_model(spec, output_dir, seed=seed)
