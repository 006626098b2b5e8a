"""Tiny random-weight VLMs of real architectures, built offline.

They are the embedded default for the demo and the tests: the real model class, the real processor
class and a family-shaped tokenizer (special tokens, chat template), small enough to train on a CPU.
Nothing is downloaded; the tokenizer is trained on a small local corpus with the `tokenizers` library.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.utils import is_torchvision_available

from vlm_rl.data.synthetic import COLORS, QUESTION_TEMPLATES, SHAPES
from vlm_rl.models.processing import image_only_processor_class

# The Qwen-VL special tokens, in the order the real tokenizers list them.
QWEN_VL_SPECIAL_TOKENS = [
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
_QWEN_VL_TEMPLATE = "\n".join(
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


@dataclass(frozen=True)
class TinyFamily:
    """How to build one family's tiny model: its real classes and the few sizes that differ."""

    config_class: str
    model_class: str
    processor_class: str
    patch_size: int
    vision_config: dict
    default_system: str = "You are a helpful assistant."
    extra_tokens: tuple[str, ...] = ()
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    text_config: dict = field(default_factory=dict)


FAMILIES: dict[str, TinyFamily] = {
    "qwen2_vl": TinyFamily(
        config_class="Qwen2VLConfig",
        model_class="Qwen2VLForConditionalGeneration",
        processor_class="Qwen2VLProcessor",
        patch_size=14,
        vision_config={"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2},
    ),
    "qwen2_5_vl": TinyFamily(
        config_class="Qwen2_5_VLConfig",
        model_class="Qwen2_5_VLForConditionalGeneration",
        processor_class="Qwen2_5_VLProcessor",
        patch_size=14,
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
    ),
    "qwen3_vl": TinyFamily(
        config_class="Qwen3VLConfig",
        model_class="Qwen3VLForConditionalGeneration",
        processor_class="Qwen3VLProcessor",
        patch_size=16,
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        default_system="",
        extra_tokens=("<think>", "</think>"),
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        text_config={"head_dim": 32},
    ),
}


def tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: chat scaffolding, the synthetic task and answer tags."""
    lines = [
        "system user assistant You are a helpful assistant.",
        "Answer with one word. Think step by step, then give the answer.",
        "<think>I see the image.</think><answer>yes</answer> no yes",
        "0 1 2 3 4 5 6 7 8 9 10 the a an is of in on and or what which how many color shape",
    ]
    for template in QUESTION_TEMPLATES.values():
        lines.append(template)
    for word in (*COLORS, *SHAPES):
        lines += [word, f" {word}", f"<answer>{word}</answer>", f"The answer is {word}."]
    return lines * 8


def build_tokenizer(family: TinyFamily, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (like Qwen's) with the family's special tokens and chat template."""
    specials = [*QWEN_VL_SPECIAL_TOKENS, *family.extra_tokens]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer)
    template = _QWEN_VL_TEMPLATE.replace("DEFAULT_SYSTEM", json.dumps(family.default_system))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=template,
        model_max_length=4096,
        # Real Qwen tokenizers pad on the right; keep it so the trainer's left-padding is exercised.
        padding_side="right",
    )


def build_tiny_model(
    family_name: str,
    output_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    seed: int = 0,
    min_pixels: int = 28 * 28,
    max_pixels: int = 28 * 28 * 64,
) -> Path:
    """Build, save and return the directory of a tiny random model of `family_name`."""
    import transformers

    if family_name not in FAMILIES:
        raise ValueError(f"Unknown tiny-model family {family_name!r}; choose one of {sorted(FAMILIES)}.")
    family = FAMILIES[family_name]
    output_dir = Path(output_dir)
    tokenizer = build_tokenizer(family)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_VL_SPECIAL_TOKENS}

    num_heads = max(1, hidden_size // 32)  # CPU attention kernels (vLLM's too) need head_dim >= 32
    head_dim = hidden_size // num_heads
    half = head_dim // 2  # M-RoPE splits the rotary half-dimension over (temporal, height, width)
    mrope_section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        **family.text_config,
    }
    vision_config = {
        **family.vision_config,
        "patch_size": family.patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    # The vision output width is named differently per family; all must equal the LM width.
    vision_config["hidden_size" if family_name == "qwen2_vl" else "out_hidden_size"] = hidden_size
    config = getattr(transformers, family.config_class)(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = ids["<|endoftext|>"]

    # Without torchvision transformers would fall back to the PIL backend anyway (with a warning).
    image_processor_class = "Qwen2VLImageProcessor" if is_torchvision_available() else "Qwen2VLImageProcessorPil"
    image_processor = getattr(transformers, image_processor_class)(
        patch_size=family.patch_size,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        image_mean=list(family.image_mean),
        image_std=list(family.image_std),
    )
    processor_class = image_only_processor_class(getattr(transformers, family.processor_class))
    processor = processor_class(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    (output_dir / "vlm_rl_tiny.json").write_text(json.dumps({"family": family_name, "seed": seed}, indent=2) + "\n")
    return output_dir
