"""BLIP-2 and InstructBLIP: a ViT, a Q-Former that turns each image into a fixed number of query tokens, and a
causal LM (OPT, Vicuna / Llama) that reads them.

The processors do not place image tokens where the chat template puts the image: when a call has any image,
`Blip2Processor` / `InstructBlipProcessor` prepend `num_query_tokens` `<image>` tokens (before BOS) to every
row of the call, whatever that row's images. So every row must hold exactly one image. InstructBLIP also feeds
the prompt text to its Q-Former (`qformer_input_ids`, `qformer_attention_mask`), one row per image.

Real checkpoints have no chat template; the tiny models use the "Question: ... Answer:" prompt of the BLIP-2
paper, and users of real checkpoints must give one (see `CHAT_TEMPLATE`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from vlm_rl.models.adapters import FamilyAdapter
from vlm_rl.models.tiny import TinySpec, TinyTokenizer, attention_sizes, decoder_sizes, save_tiny_model, vision_sizes

# "Question: <text> Answer:" (the BLIP-2 paper's VQA prompt); images render nothing, since the processor
# prepends the query tokens itself. No BOS: the tokenizers add it, as OPT's and Llama's do, so that the
# processor's Q-Former tokenizer (InstructBLIP) adds its [CLS] ... [SEP] too (a template starting with BOS makes
# `apply_chat_template` turn special tokens off for every tokenizer of the processor).
CHAT_TEMPLATE = "".join(
    [
        "{%- for message in messages %}",
        "{%- if message['content'] is string %}{%- set text = message['content'] %}",
        "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')",
        " | map(attribute='text') | join(' ') %}{%- endif %}",
        "{%- if message['role'] == 'system' %}{{- text + '\\n' }}",
        "{%- elif message['role'] == 'user' %}{{- 'Question: ' + text }}",
        "{%- else %}{{- ' Answer: ' + text + eos_token + '\\n' }}{%- endif %}",
        "{%- endfor %}",
        "{%- if add_generation_prompt %}{{- ' Answer:' }}{%- endif %}",
    ]
)
IMAGE_SIZE = 28  # 2 x 2 patches of 14
NUM_QUERY_TOKENS = 8


class Blip2Adapter(FamilyAdapter):
    """BLIP-2: one fixed-size `pixel_values` entry per image, `num_query_tokens` LM tokens per image."""

    name = "blip2"
    label = "BLIP-2"
    model_types = ("blip-2",)
    vision_modules = ("vision_model",)
    projector_modules = ("query_tokens", "qformer", "language_projection")
    language_modules = ("language_model",)
    multi_image = False
    text_only = False
    notes = (
        "Exactly one image per row: the processor prepends the query tokens to every row of a call, and the model "
        "requires `pixel_values`. Real checkpoints ship no chat template (give one, e.g. the tiny model's "
        '"Question: ... Answer:"); the Q-Former counts as the projector; decoder-only LMs only (not Flan-T5).'
    )

    config_class: ClassVar[str] = "Blip2Config"
    model_class: ClassVar[str] = "Blip2ForConditionalGeneration"
    processor_class: ClassVar[str] = "Blip2Processor"
    # OPT (Salesforce/blip2-opt-*): BOS and EOS are both </s>, and <image> is added after the vocabulary.
    special_tokens: ClassVar[tuple[str, ...]] = ("<s>", "<pad>", "</s>", "<unk>", "<image>")
    bos_token: ClassVar[str] = "</s>"
    pad_token: ClassVar[str] = "<pad>"

    def text_config(self, hidden_size: int, num_hidden_layers: int, vocab_size: int, ids: dict[str, int]) -> dict:
        num_heads, _ = attention_sizes(hidden_size)
        return {
            "model_type": "opt",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "word_embed_proj_dim": hidden_size,
            "ffn_dim": hidden_size * 2,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_heads,
            "max_position_embeddings": 512,
            "dropout": 0.0,  # OPT's default 0.1 would make the trainer's log-probs random
            "bos_token_id": ids[self.bos_token],
            "eos_token_id": ids["</s>"],
            "pad_token_id": ids[self.pad_token],
        }

    def extra_processor_parts(self) -> tuple[dict, dict]:
        """(processor arguments, Q-Former config entries) beyond BLIP-2's."""
        return {}, {}

    def build_tiny(self, output_dir: Path, *, hidden_size: int, num_hidden_layers: int, seed: int) -> None:
        processor_parts, qformer_extra = self.extra_processor_parts()
        qformer_config = {
            "hidden_size": 32,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "cross_attention_frequency": 1,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "max_position_embeddings": 128,
            **qformer_extra,
        }
        vision_config = vision_sizes(IMAGE_SIZE, 14, num_hidden_layers)
        spec = TinySpec(
            # The tokenizers prepend BOS, as OPT's and Llama's do (see `CHAT_TEMPLATE`).
            tokenizer=TinyTokenizer(
                self.special_tokens,
                CHAT_TEMPLATE,
                eos_token="</s>",
                pad_token=self.pad_token,
                bos_token=self.bos_token,
                single=f"{self.bos_token} $A",
            ),
            config_class=self.config_class,
            model_class=self.model_class,
            config=lambda ids, vocab_size: {
                "text_config": self.text_config(hidden_size, num_hidden_layers, vocab_size, ids),
                "vision_config": vision_config,
                "qformer_config": qformer_config,
                "num_query_tokens": NUM_QUERY_TOKENS,
                "image_token_index": ids["<image>"],
            },
            image_processor_class="BlipImageProcessor",
            image_processor={"size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}},
            processor_class=self.processor_class,
            processor={"num_query_tokens": NUM_QUERY_TOKENS, **processor_parts},
        )
        save_tiny_model(spec, output_dir, seed=seed)


class InstructBlipAdapter(Blip2Adapter):
    """InstructBLIP: BLIP-2 whose Q-Former also reads the prompt, one `qformer_input_ids` row per image."""

    name = "instructblip"
    label = "InstructBLIP"
    model_types = ("instructblip",)
    # The Q-Former runs once per image on that image's prompt (the model concatenates the query and the text
    # masks image by image), so its text inputs are image-indexed: split and merged like `pixel_values`.
    image_keys = ("pixel_values", "qformer_input_ids", "qformer_attention_mask")
    notes = (
        "As BLIP-2: exactly one image per row, no chat template in real checkpoints, decoder-only LMs only (Vicuna, "
        "not Flan-T5). The Q-Former also reads the rendered prompt (`qformer_input_ids`, one row per image)."
    )

    def repad_prompt_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        mask = inputs.get("qformer_attention_mask")
        if mask is None:
            return inputs
        # A stable sort of each row's mask, ones first, moves its tokens to the front in order: right padding.
        order = mask.argsort(dim=1, descending=True, stable=True)
        return {**inputs, "qformer_input_ids": inputs["qformer_input_ids"].gather(1, order),
                "qformer_attention_mask": mask.gather(1, order)}  # fmt: skip

    config_class = "InstructBlipConfig"
    model_class = "InstructBlipForConditionalGeneration"
    processor_class = "InstructBlipProcessor"
    # Vicuna / Llama (Salesforce/instructblip-vicuna-*).
    special_tokens = ("<unk>", "<s>", "</s>", "[PAD]", "<image>")
    bos_token = "<s>"
    pad_token = "[PAD]"

    def text_config(self, hidden_size: int, num_hidden_layers: int, vocab_size: int, ids: dict[str, int]) -> dict:
        num_heads, head_dim = attention_sizes(hidden_size)
        return {
            "model_type": "llama",
            **decoder_sizes(vocab_size, hidden_size, num_hidden_layers),
            "head_dim": head_dim,
            "max_position_embeddings": 512,
            "bos_token_id": ids[self.bos_token],
            "eos_token_id": ids["</s>"],
            "pad_token_id": ids[self.pad_token],
        }

    def extra_processor_parts(self) -> tuple[dict, dict]:
        # The Q-Former tokenizer is BERT's: [CLS] text [SEP], padded on the right (its positions are absolute).
        qformer_tokenizer = TinyTokenizer(
            ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
            None,
            eos_token="[SEP]",
            pad_token="[PAD]",
            settings={"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]", "unk_token": "[UNK]"},
            single="[CLS] $A [SEP]",
        ).build()
        return {"qformer_tokenizer": qformer_tokenizer}, {"vocab_size": len(qformer_tokenizer), "pad_token_id": 0}
