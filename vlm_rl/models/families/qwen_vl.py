"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic resolution, one `pixel_values` row per patch, M-RoPE."""

from __future__ import annotations

import json
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch

from vlm_rl.models.adapters import FamilyAdapter
from vlm_rl.models.tiny import TinySpec, TinyTokenizer, attention_sizes, decoder_sizes, save_tiny_model

# Qwen's tool-calling tags: single tokens, not special (decoding that skips special tokens keeps them).
TOOL_TAGS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
# The Qwen-VL special tokens, in the order the real tokenizers list them.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen-VL chat template: images become <|vision_start|><|image_pad|><|vision_end|>, which the processor
# expands to one <|image_pad|> per visual token. DEFAULT_SYSTEM is replaced by a JSON string per family.
CHAT_TEMPLATE = "\n".join(
    [
        "{%- set default_system = DEFAULT_SYSTEM %}",
        "{%- for message in messages %}",
        "{%- if loop.first and message['role'] != 'system' and default_system %}",
        "{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}",
        "{%- endif %}",
        "{{- '<|im_start|>' + message['role'] + '\\n' }}",
        "{%- if message['content'] is string %}{{- message['content'] }}",
        "{%- else %}{%- for part in message['content'] %}",
        "{%- if part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}",
        "{%- elif part['type'] == 'video' %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}",
        "{%- elif part['type'] == 'text' %}{{- part['text'] }}",
        "{%- endif %}{%- endfor %}{%- endif %}",
        "{{- '<|im_end|>\\n' }}",
        "{%- endfor %}",
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    ]
)


class GridAdapter(FamilyAdapter):
    """Qwen-VL layout: `pixel_values` holds one row per patch, `image_grid_thw` one (t, h, w) per image.

    The base of a family with Qwen-VL's layout (e.g. a fine-tune with its own model type).
    """

    image_keys = ("pixel_values", "image_grid_thw")
    # `second_per_grid_ts`: Qwen2.5-VL's time between temporal patches, one per video.
    video_keys = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    image_size_bounds = ("min_pixels", "max_pixels")
    shares_prompts = True
    shares_video_prompts = True
    vllm_video = True
    preprocesses_per_image = True
    image_feature_fields = ("pooler_output",)

    def position_ids(
        self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: dict[str, Any]
    ) -> torch.Tensor:
        # M-RoPE: image and video tokens get grid positions (a video's temporal ones from its timing: Qwen2.5-VL's
        # `second_per_grid_ts`), and the text after them continues from their largest one.
        if inputs.get("image_grid_thw") is None and inputs.get("video_grid_thw") is None:
            return super().position_ids(model, input_ids, attention_mask, inputs)  # no vision: numbered columns
        timing = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
        positions, _ = model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            attention_mask=attention_mask,
            **timing,
        )
        return positions

    def select_generation_rows(self, model, index: torch.Tensor) -> None:
        # The prefill leaves each prompt's M-RoPE offset (image positions run ahead of the token count) on the model.
        if model.model.rope_deltas is not None:
            model.model.rope_deltas = model.model.rope_deltas[index]

    def split_vision_inputs(self, inputs: dict[str, Any], num_images: list[int]) -> dict[str, Any]:
        split = dict(inputs)
        if inputs.get("pixel_values_videos") is not None:
            split |= self._split_grid(inputs, "pixel_values_videos", "video_grid_thw", inputs["num_videos"])
            if inputs.get("second_per_grid_ts") is not None:
                timing = torch.as_tensor(inputs["second_per_grid_ts"])
                split["second_per_grid_ts"] = self._split_by_counts("second_per_grid_ts", timing, inputs["num_videos"])
        if inputs.get("pixel_values") is None:
            return split
        return split | self._split_grid(inputs, "pixel_values", "image_grid_thw", num_images)

    def _split_grid(self, inputs: dict[str, Any], pixels: str, grid_key: str, counts: list[int]) -> dict[str, Any]:
        """`pixels` (one row per patch) and `grid_key` (one (t, h, w) per image or video) split per sample."""
        grid = inputs[grid_key]
        patches = grid.prod(dim=-1).tolist()
        bounds = [0, *accumulate(counts)]
        per_sample = [sum(patches[bounds[i] : bounds[i + 1]]) for i in range(len(counts))]
        return {
            pixels: self._split_by_counts(pixels, inputs[pixels], per_sample),
            grid_key: self._split_by_counts(grid_key, grid, counts),
        }

    def set_image_size_bounds(self, processor, min_pixels: int | None, max_pixels: int | None) -> None:
        image_processor = processor.image_processor
        size = dict(image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
        if size["shortest_edge"] > size["longest_edge"]:
            raise ValueError(f"min_pixels ({size['shortest_edge']}) exceeds max_pixels ({size['longest_edge']}).")
        unit = (image_processor.patch_size * image_processor.merge_size) ** 2
        if size["longest_edge"] < unit:
            raise ValueError(f"max_pixels must be at least {unit} for {self.label} (one merged patch).")
        # Qwen processors read the pixel bounds from `size` (`shortest_edge` = min, `longest_edge` = max).
        image_processor.size = {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]}

    def engine_processor_kwargs(self, processor) -> dict[str, Any]:
        return {"size": dict(processor.image_processor.size)}


class QwenVLAdapter(GridAdapter):
    """The Qwen-VL generations share a layout; they differ in class names and a few vision sizes."""

    vision_modules = ("model.visual",)
    projector_modules = ("model.visual.merger", "model.visual.deepstack_merger_list")
    language_modules = ("model.language_model", "lm_head")
    notes = "`min_pixels` / `max_pixels` bound the dynamic resolution."
    box_format = "norm1000"  # Qwen2-VL and Qwen3-VL answer in 0–1000 relative coordinates

    config_class: str
    model_class: str
    processor_class: str
    video_processor_class: str
    patch_size: int
    vision_config: dict
    default_system = "You are a helpful assistant."
    extra_tokens: tuple[str, ...] = ()
    image_mean = (0.48145466, 0.4578275, 0.40821073)
    image_std = (0.26862954, 0.26130258, 0.27577711)
    text_config: dict = {}

    def tiny_chat_template(self) -> str:
        """The tiny model's chat template: the generations' shared one, with the family's default system prompt."""
        return CHAT_TEMPLATE.replace("DEFAULT_SYSTEM", json.dumps(self.default_system))

    def tiny_tokenizer_fields(self) -> dict[str, Any]:
        """`TinyTokenizer` fields beyond the shared ones (none: the template cannot render tools)."""
        return {}

    def build_tiny(self, output_dir: Path, *, hidden_size: int, num_hidden_layers: int, seed: int) -> None:
        num_heads, head_dim = attention_sizes(hidden_size)
        half = head_dim // 2  # M-RoPE splits the rotary half-dimension over (temporal, height, width)
        mrope_section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
        vision_config = {
            **self.vision_config,
            "patch_size": self.patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
        # The vision output width is named differently per generation; all must equal the LM width.
        vision_config["hidden_size" if self.name == "qwen2_vl" else "out_hidden_size"] = hidden_size
        spec = TinySpec(
            tokenizer=TinyTokenizer(
                (*SPECIAL_TOKENS, *self.extra_tokens),
                self.tiny_chat_template(),
                eos_token="<|im_end|>",
                pad_token="<|endoftext|>",
                **self.tiny_tokenizer_fields(),
            ),
            config_class=self.config_class,
            model_class=self.model_class,
            config=lambda ids, vocab_size: {
                "text_config": {
                    **decoder_sizes(vocab_size, hidden_size, num_hidden_layers),
                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
                    "max_position_embeddings": 4096,
                    "bos_token_id": ids["<|endoftext|>"],
                    "eos_token_id": ids["<|im_end|>"],
                    "pad_token_id": ids["<|endoftext|>"],
                    **self.text_config,
                },
                "vision_config": vision_config,
                "image_token_id": ids["<|image_pad|>"],
                "video_token_id": ids["<|video_pad|>"],
                "vision_start_token_id": ids["<|vision_start|>"],
                "vision_end_token_id": ids["<|vision_end|>"],
            },
            image_processor_class="Qwen2VLImageProcessor",
            image_processor={
                "patch_size": self.patch_size,
                "merge_size": 2,
                "temporal_patch_size": 2,
                "min_pixels": 28 * 28,
                "max_pixels": 28 * 28 * 64,
                "image_mean": list(self.image_mean),
                "image_std": list(self.image_std),
            },
            processor_class=self.processor_class,
            video_processor_class=self.video_processor_class,
            video_processor={"patch_size": self.patch_size, "merge_size": 2, "temporal_patch_size": 2},
        )
        save_tiny_model(spec, output_dir, seed=seed)


class Qwen2VLAdapter(QwenVLAdapter):
    name = "qwen2_vl"
    label = "Qwen2-VL"
    model_types = ("qwen2_vl",)
    config_class = "Qwen2VLConfig"
    model_class = "Qwen2VLForConditionalGeneration"
    processor_class = "Qwen2VLProcessor"
    video_processor_class = "Qwen2VLVideoProcessor"
    patch_size = 14
    vision_config = {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2}


class Qwen2_5_VLAdapter(QwenVLAdapter):
    name = "qwen2_5_vl"
    label = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)
    box_format = "resized"  # pixels of the image as its processor resized it
    config_class = "Qwen2_5_VLConfig"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    processor_class = "Qwen2_5_VLProcessor"
    video_processor_class = "Qwen2VLVideoProcessor"
    patch_size = 14
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }


class Qwen3VLAdapter(QwenVLAdapter):
    name = "qwen3_vl"
    label = "Qwen3-VL"
    image_feature_fields = ("pooler_output", "deepstack_features")
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    config_class = "Qwen3VLConfig"
    model_class = "Qwen3VLForConditionalGeneration"
    processor_class = "Qwen3VLProcessor"
    video_processor_class = "Qwen3VLVideoProcessor"
    patch_size = 16
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
    }
    default_system = ""
    extra_tokens = ("<think>", "</think>")

    def tiny_chat_template(self) -> str:
        """Qwen3-VL's real template (as TRL ships it): it renders tool calls and their results, so that a tiny
        Qwen3-VL can train with `tools` (TRL's Qwen2.5-VL template cannot render them)."""
        from trl.chat_template_utils import qwen3_vl_chat_template  # lazy: TRL is slow to import

        return qwen3_vl_chat_template

    def tiny_tokenizer_fields(self) -> dict[str, Any]:
        """Qwen's tool tags as single added tokens, as in the real tokenizer, and the tool-calling scaffolding in the
        corpus: the template's tool preamble with the built-in `zoom_in`'s schema, a call and a tool reply. A tool
        prompt is then ~300 tokens and a call ~35, not ~630 and ~85 at one token per character."""
        from transformers.utils.chat_template_utils import render_jinja_template  # lazy: only to build a tiny model

        from vlm_rl.data.zoom import TOOL_NAME, ZOOM_IN_SCHEMA  # lazy: the data package is not the models' concern

        # No numbers: they stay split as the shared corpus splits them (a box is copied or written digit by digit).
        call = {"type": "function", "function": {"name": TOOL_NAME, "arguments": {"bbox_2d": []}}}
        conversation = [
            {"role": "user", "content": "What color is the dot in the cell of the grid? Answer with one word."},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "Zoomed into the region of image. The region was shrunk to fit the budget."},
            {"role": "assistant", "content": "<think>The dot is red.</think><answer>red</answer>"},
        ]
        rendered, _ = render_jinja_template(
            [conversation], tools=[ZOOM_IN_SCHEMA], chat_template=self.tiny_chat_template()
        )
        return {"corpus": tuple(rendered[0].splitlines()), "vocab_size": 768, "added_tokens": TOOL_TAGS}

    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    text_config = {"head_dim": 32}
