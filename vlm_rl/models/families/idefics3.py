"""Idefics3 and SmolVLM (the nanoVLM lineage): image splitting, a pixel-shuffle connector, per-sample padding.

The processor resizes every image so that its longest edge is `size["longest_edge"]`, cuts it into square tiles
of `max_image_size["longest_edge"]` (the vision tower's input) plus one downscaled global image, and writes each
tile as `<fake_token_around_image><row_i_col_j><image>*image_seq_len` (the global one as `<global-img>`).
`pixel_values` is [rows, most tiles of any row, C, H, W]: PER SAMPLE, each row's tiles followed by all-zero
padding tiles (`pixel_attention_mask` [rows, tiles, H, W] is zero there too), and a row without images holds
only padding. The model drops all-zero tiles before the vision tower and fills the `<image>` tokens of the
whole batch in order with the remaining tiles' features.

TRL 1.16 tells this layout from the per-image one (LLaVA) by comparing `pixel_values.size(0)` with the batch's
image count; when they are equal it splits the per-sample tensor by image counts and so hands one row's tiles
to another. The adapter splits by rows and drops the padding tiles instead.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch

from vlm_rl.models.adapters import FamilyAdapter
from vlm_rl.models.tiny import TinySpec, TinyTokenizer, attention_sizes, decoder_sizes, save_tiny_model, vision_sizes
from vlm_rl.models.video import VIDEO_NAMES, merged_frames

# `<row_i_col_j>` for the tile grid (the processors know up to 6×6), `<global-img>` for the global image.
TILE_TOKENS = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *TILE_TOKENS]


def chat_template(prefix: str) -> str:
    """The Idefics3 / SmolVLM template ("User:<image>text<end_of_utterance>\\nAssistant:") after `prefix`.

    Plain-string message content counts as one text part (the real templates index `content[0]['type']`).
    """
    return "".join(
        [
            prefix,
            "{%- for message in messages %}",
            "{%- set content = [{'type': 'text', 'text': message['content']}] if message['content'] is string "
            "else message['content'] %}",
            "{{- message['role'] | capitalize }}",
            "{{- ':' if content[0]['type'] == 'image' else ': ' }}",
            "{%- for part in content %}",
            "{%- if part['type'] == 'text' %}{{- part['text'] }}",
            "{%- elif part['type'] == 'image' %}{{- '<image>' }}",
            "{%- elif part['type'] == 'video' %}{{- '<video>' }}{%- endif %}",
            "{%- endfor %}",
            "{{- '<end_of_utterance>\\n' }}",
            "{%- endfor %}",
            "{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}",
        ]
    )


class Idefics3Adapter(FamilyAdapter):
    """Idefics3: `pixel_values` / `pixel_attention_mask` padded per sample with all-zero tiles."""

    name = "idefics3"
    label = "Idefics3"
    shares_prompts = True
    model_types = ("idefics3",)
    vision_modules = ("model.vision_model",)
    projector_modules = ("model.connector",)
    language_modules = ("model.text_model", "lm_head")
    image_keys = ("pixel_values", "pixel_attention_mask")
    image_size_bounds = ("max_pixels",)
    notes = (
        "Images are resized to longest edge `size['longest_edge']` and cut into tower-sized tiles plus a global "
        "tile: `max_pixels` sets that edge in whole tiles, `min_pixels` does not apply. `pixel_values` is padded "
        "per sample, which stock TRL can hand from one row to another; vlm-rl splits it by row."
    )

    # ----- vision inputs -----------------------------------------------------------------------------------

    def split_vision_inputs(self, inputs: dict[str, Any], num_images: list[int]) -> dict[str, Any]:
        """Per row: its own tiles, padding tiles dropped (a row without images gets empty tensors).

        A tile is padding where its `pixel_attention_mask` is all zero (the processor marks every real tile's
        pixels), or, without a mask, where its pixels are all zero, the rule the model itself applies.
        """
        split = dict(inputs) | self._split_videos(inputs)
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            return split
        if pixel_values.dim() != 5 or pixel_values.size(0) != len(num_images):
            raise ValueError(
                f"{self.label} expects `pixel_values` padded per sample ([rows, tiles, C, H, W]) for "
                f"{len(num_images)} rows; got shape {tuple(pixel_values.shape)}."
            )
        mask = inputs.get("pixel_attention_mask")
        real = mask.flatten(2).any(-1) if mask is not None else pixel_values.flatten(2).ne(0).any(-1)
        for row, (count, row_real) in enumerate(zip(num_images, real.sum(-1).tolist(), strict=True)):
            if (count == 0) != (row_real == 0) or row_real < count:
                raise ValueError(
                    f"Row {row} has {count} images but {row_real} image tiles in `pixel_values`; the processor "
                    f"output does not match the batch's images."
                )
        for key in self.image_keys:
            if inputs.get(key) is not None:
                split[key] = [value[keep] for value, keep in zip(inputs[key], real, strict=True)]
        return split

    def merge_vision_inputs(self, split: dict[str, Any]) -> dict[str, Any]:
        """Pad each row to the most tiles (and the largest tile) of these rows with zeros, as the processor does."""
        merged = dict(split)
        for key in self.video_keys:  # one entry per video
            if isinstance(split.get(key), list):
                merged[key] = torch.cat(split[key])
        for key in self.image_keys:
            rows = split.get(key)
            if not isinstance(rows, list):
                continue
            shape = [max(sizes) for sizes in zip(*(row.shape for row in rows), strict=True)]
            padded = rows[0].new_zeros((len(rows), *shape))
            for i, row in enumerate(rows):
                padded[(i, *(slice(0, size) for size in row.shape))] = row
            merged[key] = padded
        return merged

    # ----- image size ----------------------------------------------------------------------------------------

    def set_image_size_bounds(self, processor, min_pixels: int | None, max_pixels: int | None) -> None:
        """`max_pixels` sets the resized longest edge: the most whole tiles whose square fits in `max_pixels`.

        The processor rescales every image, small ones up, to exactly that edge, so the resized image (before
        the extra global tile) has at most `max_pixels` pixels; nothing bounds the area from below, so
        `min_pixels` is refused, and without image splitting every image becomes one fixed tile.
        """
        if min_pixels is None and max_pixels is None:
            return
        image_processor = processor.image_processor
        tile = image_processor.max_image_size["longest_edge"]
        if not image_processor.do_image_splitting:
            raise ValueError(
                f"This {self.label} processor does not split images: every image is resized to one {tile}×{tile} "
                "tile, so `min_pixels` / `max_pixels` do not apply; remove them from the recipe."
            )
        if min_pixels is not None:
            raise ValueError(
                f"{self.label} rescales every image so that its longest edge is `size['longest_edge']` (small images "
                "are enlarged too), so `min_pixels` has no counterpart; remove it (`max_pixels` sets that edge)."
            )
        edge = math.isqrt(int(max_pixels)) // tile * tile
        if edge < tile:
            raise ValueError(
                f"max_pixels must be at least {tile * tile} for {self.label} (one {tile}×{tile} tile, the vision "
                "tower's input)."
            )
        image_processor.size = {"longest_edge": edge}

    # ----- tiny model ----------------------------------------------------------------------------------------
    config_class: ClassVar[str] = "Idefics3Config"
    model_class: ClassVar[str] = "Idefics3ForConditionalGeneration"
    processor_class: ClassVar[str] = "Idefics3Processor"
    image_processor_class: ClassVar[str] = "Idefics3ImageProcessor"
    video_processor_class: ClassVar[str | None] = None
    text_tokens: ClassVar[tuple[str, ...]] = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>")
    template_prefix: ClassVar[str] = "<|begin_of_text|>"
    bos_token: ClassVar[str] = "<|begin_of_text|>"
    pad_token: ClassVar[str] = "<|reserved_special_token_0|>"
    tile_size: ClassVar[int] = 32
    """Side of a tile, the vision tower's input (real: 364 for Idefics3, 512 / 384 for SmolVLM)."""
    patch_size: ClassVar[int] = 8
    scale_factor: ClassVar[int] = 2
    """Pixel-shuffle factor: (32 / 8)² = 16 patches become 4 tokens per tile."""
    longest_edge: ClassVar[int] = 64
    """Resized longest edge: a square image becomes 2×2 tiles plus the global tile (real: 4 × the tile side)."""

    def build_tiny(self, output_dir: Path, *, hidden_size: int, num_hidden_layers: int, seed: int) -> None:
        num_heads, head_dim = attention_sizes(hidden_size)
        spec = TinySpec(
            tokenizer=TinyTokenizer(
                (*self.text_tokens, *IMAGE_TOKENS),
                chat_template(self.template_prefix),
                eos_token="<end_of_utterance>",
                pad_token=self.pad_token,
                bos_token=self.bos_token,
            ),
            config_class=self.config_class,
            model_class=self.model_class,
            config=lambda ids, vocab_size: {
                "text_config": {
                    "model_type": "llama",
                    **decoder_sizes(vocab_size, hidden_size, num_hidden_layers),
                    "head_dim": head_dim,
                    "max_position_embeddings": 4096,
                    "bos_token_id": ids[self.bos_token],
                    "eos_token_id": ids["<end_of_utterance>"],
                    "pad_token_id": ids[self.pad_token],
                },
                "vision_config": vision_sizes(self.tile_size, self.patch_size),
                "scale_factor": self.scale_factor,
                "image_token_id": ids["<image>"],
                "pad_token_id": ids[self.pad_token],
            },
            image_processor_class=self.image_processor_class,
            image_processor={
                "size": {"longest_edge": self.longest_edge},
                "max_image_size": {"longest_edge": self.tile_size},
                "do_image_splitting": True,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
            },
            processor_class=self.processor_class,
            processor={"image_seq_len": (self.tile_size // self.patch_size) ** 2 // self.scale_factor**2},
            video_processor_class=self.video_processor_class,
            video_processor={
                "size": {"longest_edge": self.longest_edge},
                "max_image_size": {"longest_edge": self.tile_size},
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
            },
        )
        save_tiny_model(spec, output_dir, seed=seed)


class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM: Idefics3's layout and connector, SmolLM2 tokens and template."""

    name = "smolvlm"
    label = "SmolVLM"
    model_types = ("smolvlm",)
    # Each frame is one tower-sized tile of `<image>` tokens after a timestamp; [videos, frames, C, H, W] and its mask.
    video_keys = tuple(VIDEO_NAMES.values())
    uniform_frames = True  # the processor's text for each video names the batch's most frames
    notes = Idefics3Adapter.notes + (
        " Its processor needs the `num2words` package. Each video frame becomes one tile-sized image (after the "
        "row's images; `video_max_pixels` does not apply). Videos need one frame count per batch "
        "(`video_num_frames`): the processor pads a call's videos to its most frames and writes that count into "
        "every video's introduction. Called with images and videos, transformers' processor drops the images' "
        "pixels; vlm-rl's processors (`load_processor`, and any the trainer is given) keep both."
    )
    config_class = "SmolVLMConfig"
    model_class = "SmolVLMForConditionalGeneration"
    processor_class = "SmolVLMProcessor"
    image_processor_class = "SmolVLMImageProcessor"
    video_processor_class = "SmolVLMVideoProcessor"
    text_tokens = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    template_prefix = "<|im_start|>"
    bos_token = "<|im_start|>"
    pad_token = "<|im_end|>"

    def video_inputs(self, fields: dict[str, Any], processor, videos: list) -> dict[str, Any]:
        """The frames, processed as the processor call did (its output holds them merged with the image tiles)."""
        frames = processor.video_processor(videos=videos, return_tensors="pt")
        return {VIDEO_NAMES[key]: frames[key] for key in VIDEO_NAMES}

    def video_forward_inputs(self, inputs: dict[str, Any], num_videos: list[int]) -> dict[str, Any]:
        inputs = merged_frames(inputs, num_videos)
        # TRL's log-prob method compares `pixel_values` with the image count, which a chunk without images lacks.
        inputs.setdefault("num_images", [0] * len(num_videos))
        return inputs
