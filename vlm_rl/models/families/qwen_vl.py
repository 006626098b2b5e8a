"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic resolution, one `pixel_values` row per patch, M-RoPE."""

from __future__ import annotations

import json
from pathlib import Path

from vlm_rl.models.adapters import GridAdapter, register_adapter
from vlm_rl.models.tiny import TinySpec, TinyTokenizer, attention_sizes, decoder_sizes, save_tiny_model

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


class QwenVLAdapter(GridAdapter):
    """The Qwen-VL generations share a layout; they differ in class names and a few vision sizes."""

    vision_modules = ("model.visual",)
    projector_modules = ("model.visual.merger", "model.visual.deepstack_merger_list")
    language_modules = ("model.language_model", "lm_head")
    notes = "`min_pixels` / `max_pixels` bound the dynamic resolution."

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
                CHAT_TEMPLATE.replace("DEFAULT_SYSTEM", json.dumps(self.default_system)),
                eos_token="<|im_end|>",
                pad_token="<|endoftext|>",
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
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    text_config = {"head_dim": 32}


for _adapter in (Qwen2VLAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter):
    register_adapter(_adapter())
