"""Gemma 3: a SigLIP tower at a fixed size, pooled to `mm_tokens_per_image` soft tokens per image.

The processor expands each `<start_of_image>` of the prompt into `<start_of_image>`, the image's soft tokens
and `<end_of_image>`, and marks the soft tokens with `token_type_ids` = 1: the language model attends
bidirectionally inside each such block, so `token_type_ids` must stay aligned with `input_ids` (left-padded,
zero over the completion) in every forward.
"""

from __future__ import annotations

from pathlib import Path

from vlm_rl.models.adapters import FamilyAdapter
from vlm_rl.models.tiny import TinySpec, TinyTokenizer, attention_sizes, decoder_sizes, save_tiny_model, vision_sizes

# Gemma's own order for the first ids (pad 0, eos 1, bos 2, unk 3, mask 4), then the chat and image tokens.
SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

# Gemma 3's chat template (google/gemma-3-4b-it): a system message becomes a prefix of the first user turn and
# an image part becomes `<start_of_image>`, which the processor expands.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

# Tiny sizes: a 28-pixel SigLIP with 7-pixel patches (4×4 patches), pooled 2×2 to 4 soft tokens per image.
IMAGE_SIZE = 28
PATCH_SIZE = 7
MM_TOKENS_PER_IMAGE = 4
SLIDING_WINDOW = 16  # shorter than a prompt, so the local layers' window and the image blocks interact


class Gemma3Adapter(FamilyAdapter):
    """One `pixel_values` entry per image (pan-and-scan off), per-token `token_type_ids` marking image tokens."""

    name = "gemma3"
    label = "Gemma 3"
    image_feature_fields = ("pooler_output",)
    model_types = ("gemma3",)
    vision_modules = ("model.vision_tower",)
    projector_modules = ("model.multi_modal_projector",)
    language_modules = ("model.language_model", "lm_head")
    notes = (
        "Every image is resized to the tower's square (896×896 on the released models); pan-and-scan stays off "
        "(TRL never turns it on). `token_type_ids` mark the image tokens, which attend to each other bidirectionally."
    )

    def build_tiny(self, output_dir: Path, *, hidden_size: int, num_hidden_layers: int, seed: int) -> None:
        num_heads, head_dim = attention_sizes(hidden_size)
        spec = TinySpec(
            # The processor reads the image tokens by name; Gemma's tokenizer prepends <bos> and pads on the left.
            tokenizer=TinyTokenizer(
                tuple(SPECIAL_TOKENS),
                CHAT_TEMPLATE,
                eos_token="<end_of_turn>",
                pad_token="<pad>",
                bos_token="<bos>",
                named_tokens={
                    "boi_token": "<start_of_image>",
                    "eoi_token": "<end_of_image>",
                    "image_token": "<image_soft_token>",
                },
                settings={"add_bos_token": True, "padding_side": "left"},
            ),
            config_class="Gemma3Config",
            model_class="Gemma3ForConditionalGeneration",
            config=lambda ids, vocab_size: {
                "text_config": {
                    **decoder_sizes(vocab_size, hidden_size, num_hidden_layers),
                    "head_dim": head_dim,
                    "query_pre_attn_scalar": head_dim,
                    "sliding_window": SLIDING_WINDOW,
                    # Gemma 3 interleaves local (sliding) and global layers; the tiny model has both kinds.
                    "layer_types": [
                        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_hidden_layers)
                    ],
                    "max_position_embeddings": 4096,
                    "bos_token_id": ids["<bos>"],
                    "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]],
                    "pad_token_id": ids["<pad>"],
                },
                "vision_config": {**vision_sizes(IMAGE_SIZE, PATCH_SIZE), "vision_use_head": False},
                "mm_tokens_per_image": MM_TOKENS_PER_IMAGE,
                "boi_token_index": ids["<start_of_image>"],
                "eoi_token_index": ids["<end_of_image>"],
                "image_token_index": ids["<image_soft_token>"],
            },
            image_processor_class="Gemma3ImageProcessor",
            image_processor={
                "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "do_pan_and_scan": False,
            },
            processor_class="Gemma3Processor",
            processor={"image_seq_length": MM_TOKENS_PER_IMAGE},
            # transformers initialises the projection to zeros, which would cut the vision tower off from every
            # gradient; released checkpoints have a trained one.
            init_weights=lambda model: model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.02),
        )
        save_tiny_model(spec, output_dir, seed=seed)
