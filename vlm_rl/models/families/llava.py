"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: a CLIP / SigLIP tower, an MLP projector and a causal LM.

LLaVA-1.5 resizes every image to one square (`pixel_values` [images, C, H, W]). NeXT and OneVision tile each
image along the best of a fixed list of resolutions (`image_grid_pinpoints`) plus one downscaled base tile:
`pixel_values` is [images, tiles, C, H, W], zero-padded to the most tiles of the processor call, and
`image_sizes` [images, 2] holds each original (height, width), from which the model counts each image's real
tiles. OneVision also takes `batch_num_images` (images per row, rows without images left out): a row with one
image is tiled, a row with several images gets one square tile per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from vlm_rl.models.adapters import FamilyAdapter
from vlm_rl.models.tiny import TinySpec, TinyTokenizer, attention_sizes, decoder_sizes, save_tiny_model, vision_sizes

PATCH_SIZE = 14


# The llava-hf templates, which take list content only (TRL turns plain-string prompts into lists for VLMs).
# llava-hf/llava-1.5-*-hf: "USER: <image>\n<text> ASSISTANT:".
VICUNA_TEMPLATE = (
    "{%- for message in messages %}{%- set parts = message['content'] %}"
    "{%- if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{%- endif %}"
    "{%- for part in parts | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{%- endfor %}"
    "{%- for part in parts | selectattr('type', 'equalto', 'text') %}{{ part['text'] + ' ' }}{%- endfor %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'ASSISTANT:' }}{%- endif %}"
)

# llava-hf/llava-v1.6-mistral-7b-hf: "[INST] <image>\n<text> [/INST]"; the answer follows directly.
MISTRAL_TEMPLATE = (
    "{%- for message in messages %}{%- set parts = message['content'] %}"
    "{%- if message['role'] == 'system' %}{{ '<<SYS>>\\n' + parts[0]['text'] + '\\n<</SYS>>\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{%- for part in parts | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{%- endfor %}"
    "{%- for part in parts | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{%- endfor %}"
    "{{ ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{ ' ' + parts[0]['text'] + '</s> ' }}"
    "{%- else %}{{ raise_exception('Only system, user and assistant roles are supported!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# llava-hf/llava-onevision-qwen2-*-hf: "<|im_start|>user <image>\n<text><|im_end|><|im_start|>assistant\n".
CHATML_TEMPLATE = (
    "{%- for message in messages %}{%- set parts = message['content'] %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{%- for part in parts | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{%- endfor %}"
    "{%- for part in parts | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{%- endfor %}"
    "{%- for part in parts | selectattr('type', 'equalto', 'text') %}{{ '\\n' + part['text'] }}{%- endfor %}"
    "{{ '<|im_end|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


class LlavaAdapter(FamilyAdapter):
    """LLaVA-1.5: one fixed-size `pixel_values` entry per image; the base of the NeXT and OneVision adapters."""

    name = "llava"
    label = "LLaVA-1.5"
    image_feature_fields = ("pooler_output",)
    shares_prompts = True
    model_types = ("llava",)
    # `image_sizes`: one (height, width) per image, from NeXT's processors and Pixtral-based `llava` checkpoints.
    image_keys = ("pixel_values", "image_sizes")
    vision_modules = ("model.vision_tower",)
    projector_modules = ("model.multi_modal_projector",)
    language_modules = ("model.language_model", "lm_head")
    notes = (
        "Every image is resized to the vision tower's square (336×336). Features come from the second-to-last CLIP "
        "layer, so its last layer and post-layernorm never train."
    )

    # ----- tiny model: real classes, family-shaped sizes, tokens and template ------------------------------------
    config_class: ClassVar[str] = "LlavaConfig"
    model_class: ClassVar[str] = "LlavaForConditionalGeneration"
    processor_class: ClassVar[str] = "LlavaProcessor"
    image_processor_class: ClassVar[str] = "CLIPImageProcessor"
    video_processor_class: ClassVar[str | None] = None
    """Saved with the processor where the family takes video."""
    image_size: ClassVar[int] = 56
    """Side of the vision tower's square input (real checkpoints: 336 for CLIP, 384 for SigLIP)."""
    vision_model_type: ClassVar[str] = "clip_vision_model"
    vision_feature_layer: ClassVar[int] = -2
    vision_feature_select_strategy: ClassVar[str] = "default"  # drops CLIP's CLS token
    text_model_type: ClassVar[str] = "llama"
    template: ClassVar[str] = VICUNA_TEMPLATE
    special_tokens: ClassVar[tuple[str, ...]] = ("<unk>", "<s>", "</s>", "<image>", "<pad>")
    bos_token: ClassVar[str | None] = "<s>"
    """Prepended by the tokenizer (Llama / Mistral tokenizers do); None: no BOS (Qwen2)."""
    eos_token: ClassVar[str] = "</s>"
    pad_token: ClassVar[str] = "<pad>"
    image_mean: ClassVar[tuple[float, ...]] = (0.48145466, 0.4578275, 0.40821073)
    image_std: ClassVar[tuple[float, ...]] = (0.26862954, 0.26130258, 0.27577711)

    def build_tiny(self, output_dir: Path, *, hidden_size: int, num_hidden_layers: int, seed: int) -> None:
        num_heads, head_dim = attention_sizes(hidden_size)
        bos = self.bos_token
        spec = TinySpec(
            tokenizer=TinyTokenizer(
                self.special_tokens,
                self.template,
                eos_token=self.eos_token,
                pad_token=self.pad_token,
                bos_token=bos,
                single=None if bos is None else f"{bos} $A",
                pair=None if bos is None else f"{bos} $A {bos} $B",
            ),
            config_class=self.config_class,
            model_class=self.model_class,
            config=lambda ids, vocab_size: {
                "text_config": {
                    "model_type": self.text_model_type,
                    **decoder_sizes(vocab_size, hidden_size, num_hidden_layers),
                    "head_dim": head_dim,
                    "max_position_embeddings": 4096,
                    "bos_token_id": ids[bos or self.pad_token],  # Qwen2 configs name <|endoftext|>
                    "eos_token_id": ids[self.eos_token],
                    "pad_token_id": ids[self.pad_token],
                },
                "vision_config": {
                    "model_type": self.vision_model_type,
                    **vision_sizes(self.image_size, PATCH_SIZE),
                    **self._vision_config(),
                },
                "image_token_index": ids["<image>"],
                "vision_feature_layer": self.vision_feature_layer,
                "vision_feature_select_strategy": self.vision_feature_select_strategy,
                **self._config(ids),
            },
            image_processor_class=self.image_processor_class,
            image_processor={
                "image_mean": list(self.image_mean),
                "image_std": list(self.image_std),
                **self._image_processor(),
            },
            processor_class=self.processor_class,
            processor=self._processor(),
            video_processor_class=self.video_processor_class,
            video_processor=self._video_processor(),
        )
        save_tiny_model(spec, output_dir, seed=seed)

    def _vision_config(self) -> dict[str, Any]:
        """Vision-config entries beyond the shared tiny sizes."""
        return {"projection_dim": 32}

    def _config(self, ids: dict[str, int]) -> dict[str, Any]:
        """Model-config entries beyond the shared ones (`ids`: special token ids)."""
        return {"image_seq_length": (self.image_size // PATCH_SIZE) ** 2}

    def _image_processor(self) -> dict[str, Any]:
        """Image-processor settings: resize the short side to the tower's size, then crop the centre square."""
        return {
            "size": {"shortest_edge": self.image_size},
            "crop_size": {"height": self.image_size, "width": self.image_size},
        }

    def _video_processor(self) -> dict[str, Any]:
        """Video-processor settings (for a family with `video_processor_class`)."""
        return {}

    def _processor(self) -> dict[str, Any]:
        """Processor settings that count an image's tokens: CLIP adds a CLS token, the `default` strategy drops it."""
        return {
            "patch_size": PATCH_SIZE,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "num_additional_image_tokens": 1,
        }


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: `pixel_values` [images, tiles, C, H, W] and `image_sizes` [images, 2], both per image."""

    name = "llava_next"
    label = "LLaVA-NeXT"
    image_feature_fields = ()  # its image features are tiles packed per image size, not one entry per image
    model_types = ("llava_next",)
    projector_modules = ("model.multi_modal_projector", "model.image_newline")
    notes = (
        "Each image becomes a base tile plus tiles along the best of `image_grid_pinpoints`: no pixel budget, so "
        "shorten the pinpoints (model and image-processor configs) instead of `min_pixels` / `max_pixels`. Features "
        "come from the second-to-last CLIP layer."
    )

    config_class = "LlavaNextConfig"
    model_class = "LlavaNextForConditionalGeneration"
    processor_class = "LlavaNextProcessor"
    image_processor_class = "LlavaNextImageProcessor"
    image_size = 28
    text_model_type = "mistral"
    template = MISTRAL_TEMPLATE
    grid_pinpoints: ClassVar[tuple[tuple[int, int], ...]] = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
    """`image_grid_pinpoints` in tiles (height, width); llava-v1.6 uses these with 336-pixel tiles."""

    def merge_vision_inputs(self, split: dict[str, Any]) -> dict[str, Any]:
        # The processor pads every image to the most tiles of its own call; rows from different calls (or a
        # cached single-sample encoding) may differ, so pad to the most of these rows. The model reads only each
        # image's real tiles (counted from `image_sizes`), so the padding changes nothing.
        values = split.get("pixel_values")
        if isinstance(values, list) and values:
            most = max(value.size(1) for value in values)
            split = {**split, "pixel_values": [self._pad_tiles(value, most) for value in values]}
        return super().merge_vision_inputs(split)

    @staticmethod
    def _pad_tiles(value: torch.Tensor, tiles: int) -> torch.Tensor:
        missing = tiles - value.size(1)
        if missing == 0:
            return value
        return torch.cat([value, value.new_zeros(value.size(0), missing, *value.shape[2:])], dim=1)

    def set_image_size_bounds(self, processor, min_pixels: int | None, max_pixels: int | None) -> None:
        if min_pixels is None and max_pixels is None:
            return
        pinpoints = processor.image_processor.image_grid_pinpoints
        height, width = max(pinpoints, key=lambda pinpoint: pinpoint[0] * pinpoint[1])
        raise ValueError(
            f"{self.label} has no pixel budget to bound: it tiles each image along the best of a fixed list of "
            f"resolutions, `image_grid_pinpoints` (here {len(pinpoints)} resolutions, up to {width}×{height}), plus "
            "one base tile. Remove `min_pixels` / `max_pixels`; to cap the tiles per image, shorten "
            "`image_grid_pinpoints` in both the checkpoint's model config and its image processor config."
        )

    def _pinpoints(self) -> list[list[int]]:
        return [[rows * self.image_size, cols * self.image_size] for rows, cols in self.grid_pinpoints]

    def _config(self, ids: dict[str, int]) -> dict[str, Any]:
        return {**super()._config(ids), "image_grid_pinpoints": self._pinpoints()}

    def _image_processor(self) -> dict[str, Any]:
        return {**super()._image_processor(), "image_grid_pinpoints": self._pinpoints()}


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: NeXT's per-image layout plus `batch_num_images`, one count per row that has images."""

    name = "llava_onevision"
    label = "LLaVA-OneVision"
    model_types = ("llava_onevision",)
    image_keys = ("pixel_values", "image_sizes", "batch_num_images")
    video_keys = ("pixel_values_videos",)  # [videos, frames, C, H, W]: every frame one square, pooled 2×2
    uniform_frames = True
    notes = (
        "A row with one image is tiled as in NeXT (no pixel budget), a row with several gets one square tile per "
        "image, so the processor needs one image list per text (a flat list tiles each image). Video frames are "
        "resized to the tower's square (`video_max_pixels` does not apply), and the processor stacks a batch's "
        "videos, so they need one frame count (`video_num_frames`, not `video_fps`)."
    )

    config_class = "LlavaOnevisionConfig"
    model_class = "LlavaOnevisionForConditionalGeneration"
    processor_class = "LlavaOnevisionProcessor"
    image_processor_class = "LlavaOnevisionImageProcessor"
    video_processor_class = "LlavaOnevisionVideoProcessor"
    vision_model_type = "siglip_vision_model"
    vision_feature_layer = -1
    vision_feature_select_strategy = "full"  # SigLIP has no CLS token
    text_model_type = "qwen2"
    template = CHATML_TEMPLATE
    special_tokens = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
    bos_token = None
    eos_token = "<|im_end|>"
    pad_token = "<|endoftext|>"
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    grid_pinpoints = tuple((rows, cols) for rows in (1, 2, 3) for cols in (1, 2, 3))
    vision_aspect_ratio: ClassVar[str] = "anyres_max_9"

    def split_vision_inputs(self, inputs: dict[str, Any], num_images: list[int]) -> dict[str, Any]:
        # `batch_num_images` counts the images of each row that has any, so it is rebuilt per sample from
        # `num_images` (TRL keeps it for generation but drops it from the batch it trains on).
        given = inputs.get("batch_num_images")
        split = super().split_vision_inputs({k: v for k, v in inputs.items() if k != "batch_num_images"}, num_images)
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            return split
        if given is not None and torch.as_tensor(given).tolist() != [n for n in num_images if n]:
            raise ValueError(
                f"`batch_num_images` {torch.as_tensor(given).tolist()} does not match the images per sample "
                f"{num_images}."
            )
        split["batch_num_images"] = [
            torch.tensor([n] if n else [], dtype=torch.long, device=pixel_values.device) for n in num_images
        ]
        return split

    def _vision_config(self) -> dict[str, Any]:
        return {"vision_use_head": False}

    def _config(self, ids: dict[str, int]) -> dict[str, Any]:
        return {
            "image_grid_pinpoints": self._pinpoints(),
            "video_token_index": ids["<video>"],
            "vision_aspect_ratio": self.vision_aspect_ratio,
        }

    def _image_processor(self) -> dict[str, Any]:
        return {
            "size": {"height": self.image_size, "width": self.image_size},
            "image_grid_pinpoints": self._pinpoints(),
        }

    def _video_processor(self) -> dict[str, Any]:
        return {"size": {"height": self.image_size, "width": self.image_size}, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std)}  # fmt: skip

    def _processor(self) -> dict[str, Any]:
        return {
            "num_image_tokens": (self.image_size // PATCH_SIZE) ** 2,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "vision_aspect_ratio": self.vision_aspect_ratio,
        }
