"""Tiny random-weight VLMs of real architectures, built offline.

They are the embedded default for the demo and the tests: the real model class, the real processor
class and a family-shaped tokenizer (special tokens, chat template), small enough to train on a CPU.
Nothing is downloaded; the tokenizer is trained on a small local corpus with the `tokenizers` library.
Each family's builder lives with its adapter in `vlm_rl/models/families/`, which also holds `build_tiny_model`;
this module holds the helpers the builders share.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlm_rl.data.synthetic import COLORS, QUESTION_TEMPLATES, SHAPES


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
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the family's special tokens (ids 0.. in the given order) and template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer)
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
