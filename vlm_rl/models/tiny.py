"""Tiny random-weight VLMs of real architectures, built offline.

They are the embedded default for the demo and the tests: the real model class, the real processor
class and a family-shaped tokenizer (special tokens, chat template), small enough to train on a CPU.
Nothing is downloaded; the tokenizer is trained on a small local corpus with the `tokenizers` library.
Every family builds through one template, `save_tiny_model`; what differs (tokens, config sizes, processor
settings) is a `TinySpec` that the family's `build_tiny` writes next to its adapter in `vlm_rl/models/families/`,
which also holds `build_tiny_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast
from transformers.utils import is_torchvision_available

from vlm_rl.data.synthetic import COLORS, QUESTION_TEMPLATES, SHAPES
from vlm_rl.models.processing import image_only_processor_class


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


def build_tokenizer(
    special_tokens: list[str],
    chat_template: str,
    *,
    eos_token: str,
    pad_token: str,
    bos_token: str | None = None,
    vocab_size: int = 384,
    padding_side: str = "right",
    corpus: tuple[str, ...] = (),
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the family's special tokens (ids 0.. in the given order) and template, trained
    on `tokenizer_corpus()` and the family's own `corpus` lines."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus() + list(corpus) * 8, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=None,
        chat_template=chat_template,
        model_max_length=4096,
        padding_side=padding_side,
    )


def name_special_tokens(
    tokenizer: PreTrainedTokenizerFast, names: dict[str, str], **settings
) -> PreTrainedTokenizerFast:
    """`tokenizer` with model-specific named special tokens (e.g. `image_token`) and changed init `settings`.

    Multimodal processors read their placeholder tokens by name (`tokenizer.image_token`, `..._id`); transformers
    saves such names in the tokenizer config (`extra_special_tokens`) and restores them on load.
    """
    kwargs = {**tokenizer.init_kwargs, **settings}
    kwargs.pop("backend", None)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, extra_special_tokens=names, **kwargs)


def attention_sizes(hidden_size: int) -> tuple[int, int]:
    """(heads, head_dim) for a tiny width: CPU attention kernels (vLLM's too) need head_dim >= 32."""
    num_heads = max(1, hidden_size // 32)
    return num_heads, hidden_size // num_heads


def decoder_sizes(vocab_size: int, hidden_size: int, num_hidden_layers: int) -> dict[str, int]:
    """The sizes every tiny decoder config shares: `attention_sizes` heads (no grouping) and a 2× MLP."""
    num_heads, _ = attention_sizes(hidden_size)
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
    }


def vision_sizes(image_size: int, patch_size: int, num_hidden_layers: int = 2) -> dict[str, int]:
    """The sizes every tiny ViT config shares: width 32, two heads, a 2× MLP, at the family's input size."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
    }


@dataclass(frozen=True)
class TinyTokenizer:
    """A family-shaped tokenizer: its special tokens (ids 0.. in this order), chat template and token roles."""

    special_tokens: tuple[str, ...]
    chat_template: str | None
    eos_token: str
    pad_token: str
    bos_token: str | None = None
    named_tokens: dict[str, str] = field(default_factory=dict)
    """Tokens the processor reads by name (`image_token`, ...): see `name_special_tokens`."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Tokenizer settings beyond `build_tokenizer`'s (`padding_side`, `add_bos_token`, `cls_token`, ...)."""
    single: str | None = None
    """How the tokenizer wraps one text (`TemplateProcessing`, e.g. "<s> $A" to prepend BOS); None: as trained."""
    pair: str | None = None
    """How it wraps a pair of texts, with `single`."""
    corpus: tuple[str, ...] = ()
    """Text of the family's own beyond the shared corpus (e.g. its tool-calling scaffolding), so that it is a few
    tokens as in the real tokenizer, not one per character."""
    vocab_size: int = 384
    added_tokens: tuple[str, ...] = ()
    """Tokens the real tokenizer adds as single, non-special tokens (kept when decoding skips special tokens)."""

    def build(self) -> PreTrainedTokenizerFast:
        """Train the tokenizer (`build_tokenizer`), then name its tokens and set how it wraps texts."""
        tokenizer = build_tokenizer(
            list(self.special_tokens),
            self.chat_template,
            eos_token=self.eos_token,
            pad_token=self.pad_token,
            bos_token=self.bos_token,
            vocab_size=self.vocab_size,
            corpus=self.corpus,
        )
        tokenizer.add_tokens(list(self.added_tokens))
        if self.named_tokens or self.settings:
            tokenizer = name_special_tokens(tokenizer, self.named_tokens, **self.settings)
        if self.single is not None:
            words = {*self.single.split(), *(self.pair or "").split()}
            tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
                single=self.single,
                pair=self.pair,
                special_tokens=[(t, tokenizer.convert_tokens_to_ids(t)) for t in self.special_tokens if t in words],
            )
        return tokenizer


@dataclass(frozen=True)
class TinySpec:
    """What a family's tiny model is made of; `save_tiny_model` builds and saves it. Classes are transformers names."""

    tokenizer: TinyTokenizer
    config_class: str
    model_class: str
    config: Callable[[dict[str, int], int], dict[str, Any]]
    """The config's arguments from the special tokens' ids and the vocabulary size."""
    image_processor_class: str
    """The torchvision-backed class; its `...Pil` twin stands in where torchvision is missing."""
    image_processor: dict[str, Any]
    processor_class: str
    processor: dict[str, Any] = field(default_factory=dict)
    """Processor arguments beyond the image processor, the tokenizer and the chat template."""
    video_processor_class: str | None = None
    """Saved with the processor where torchvision is installed (vLLM builds the full processor from the files)."""
    video_processor: dict[str, Any] = field(default_factory=dict)
    init_weights: Callable[[PreTrainedModel], None] | None = None
    """Changes to transformers' random init (run under `torch.no_grad`), e.g. where it initialises to zeros."""


def save_tiny_model(spec: TinySpec, output_dir: Path, *, seed: int) -> None:
    """Build `spec`'s tokenizer, config, seeded random-weight model and processor; save them to `output_dir`."""
    tokenizer = spec.tokenizer.build()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in spec.tokenizer.special_tokens}
    config = getattr(transformers, spec.config_class)(**spec.config(ids, len(tokenizer)))
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config)
    if spec.init_weights is not None:
        with torch.no_grad():
            spec.init_weights(model)
    # Generation stops at, pads with and starts from the language model's own tokens.
    text_config = config.get_text_config()
    model.generation_config.eos_token_id = text_config.eos_token_id
    model.generation_config.pad_token_id = text_config.pad_token_id
    model.generation_config.bos_token_id = text_config.bos_token_id

    # Without torchvision transformers would fall back to the PIL backend anyway (with a warning).
    backend = "" if is_torchvision_available() else "Pil"
    parts = {
        "image_processor": getattr(transformers, spec.image_processor_class + backend)(**spec.image_processor),
        "tokenizer": tokenizer,
    }
    processor_class = getattr(transformers, spec.processor_class)
    if spec.video_processor_class is not None and is_torchvision_available():
        parts["video_processor"] = getattr(transformers, spec.video_processor_class)(**spec.video_processor)
    else:
        processor_class = image_only_processor_class(processor_class)
    processor = processor_class(**parts, chat_template=tokenizer.chat_template, **spec.processor)
    # BLIP-2's and InstructBLIP's processors drop `chat_template` in `__init__` (transformers 5.19).
    processor.chat_template = tokenizer.chat_template
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
