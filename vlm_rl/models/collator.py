"""The batches of `vlm-rl sft`: prompt-completion rows with zero, one or several images each.

TRL's `DataCollatorForVisionLanguageModeling` trains on other prompt tokens than GRPO and `vlm-rl eval` generate
from (`vlm_rl.models.inputs.prompt_inputs`: one `apply_chat_template` call with the images), so `vlm-rl sft` uses
this one. TRL renders the chat template to text and tokenizes it again without special tokens, which drops the BOS
token of LLaVA and InstructBLIP prompts; it takes the completion as the stored assistant turn renders it, which for
LLaVA-OneVision opens with "assistant \n" where the generation prompt is "assistant\n" (and trains on the extra
" \n"); it leaves out the family adapter's repadding (InstructBLIP's Q-Former text pads on the right); and a prompt
that ends with an assistant message (a prefill) gets a new assistant turn instead of being continued. Here the
prompt is built exactly as GRPO builds it, and the completion is what the template puts after the generation prompt
(the reply and its end-of-turn tokens), tokenized on its own as GRPO's sampled completions are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import BatchFeature
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.utils import flush_left

from vlm_rl.data.rows import generation_prompt
from vlm_rl.errors import InvalidValueError
from vlm_rl.models.adapters import FamilyAdapter
from vlm_rl.models.inputs import prompt_inputs

IGNORE_INDEX = -100  # labels the loss skips (Hugging Face's convention)
# Inputs with one value per token of the sequence: the completion's tokens get 0 (text) in the type ids.
TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")


def full_conversation(prompt: list[dict], completion: list[dict]) -> list[dict]:
    """The prompt followed by the completion; a prompt that ends with an assistant message (a prefill) has the
    completion's text appended to that message, which the completion continues."""
    if prompt[-1]["role"] != "assistant":
        return [*prompt, *completion]
    prefill = prompt[-1]
    return [*prompt[:-1], {**prefill, "content": prefill["content"] + completion[0]["content"]}, *completion[1:]]


def completion_text(processor, prompt: list[dict], completion: list[dict], images: list) -> str:
    """The completion as the chat template renders it after the generation prompt: the reply and its end-of-turn
    tokens, which the model must learn to generate after the prompt GRPO shows it."""
    rendered_prompt = processor.apply_chat_template(
        prepare_multimodal_messages(prompt, images=images), tokenize=False, **generation_prompt([prompt])
    )
    rendered = processor.apply_chat_template(
        prepare_multimodal_messages(full_conversation(prompt, completion), images=images), tokenize=False
    )
    if rendered.startswith(rendered_prompt):
        return rendered[len(rendered_prompt) :]
    # Some templates open an assistant turn for generation unlike a stored one (LLaVA-OneVision: "assistant\n" and
    # "assistant \n"): the reply and what the template puts after it.
    reply = completion[-1]["content"]
    end = rendered.rfind(reply)
    if len(completion) != 1 or end < 0:
        raise InvalidValueError(
            "The chat template renders the prompt differently inside the whole conversation, so the completion's "
            f"tokens cannot be told apart (prompt {rendered_prompt[-80:]!r}, conversation {rendered[-160:]!r}); "
            "give completions of one assistant message."
        )
    return reply + rendered[end + len(reply) :]


def completion_messages(completion: str | list[dict]) -> list[dict]:
    """A row's `completion`: a conversation (one assistant message), or the assistant's text."""
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    if not completion or not all(
        isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str) for m in completion
    ):
        raise InvalidValueError(
            f"completion {completion!r}: give the assistant's reply as text, or as [{{role: assistant, content: ...}}]"
        )
    return completion


@dataclass
class PromptCompletionCollator:
    """Rows with `prompt`, `completion` (conversations) and `images` → model inputs and `labels`, which are the
    completion's token ids and -100 on the prompt and the padding: the loss is on the completion only."""

    processor: Any
    adapter: FamilyAdapter
    max_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> BatchFeature:
        prompts = [example["prompt"] for example in examples]
        images = [example.get("images") or [] for example in examples]
        inputs = dict(prompt_inputs(self.adapter, self.processor, prompts, images))
        texts = [
            completion_text(self.processor, prompt, completion_messages(example["completion"]), row_images)
            for prompt, example, row_images in zip(prompts, examples, images, strict=True)
        ]
        tokenizer = self.processor.tokenizer
        padding_side, tokenizer.padding_side = tokenizer.padding_side, "right"
        try:
            completions = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        finally:
            tokenizer.padding_side = padding_side
        prompt_mask = inputs["attention_mask"]
        completion_mask = completions["attention_mask"]
        per_token = [key for key in TOKEN_KEYS if key in inputs]
        mask, ids, is_completion, *token_values = flush_left(
            torch.cat((prompt_mask, completion_mask), dim=1),
            torch.cat((inputs["input_ids"], completions["input_ids"]), dim=1),
            torch.cat((torch.zeros_like(prompt_mask), completion_mask), dim=1),
            *(torch.cat((inputs[key], torch.zeros_like(completions["input_ids"])), dim=1) for key in per_token),
        )
        if self.max_length is not None:  # keep the start: the image tokens are in the prompt
            mask, ids, is_completion, *token_values = (
                t[:, : self.max_length] for t in (mask, ids, is_completion, *token_values)
            )
            # A row cut before its completion would train on nothing, silently.
            lengths = prompt_mask.sum(dim=1)
            if (lengths >= self.max_length).any():
                raise InvalidValueError(
                    f"A prompt of {int(lengths.max())} tokens (image tokens included) leaves its completion no room "
                    f"within max_length={self.max_length}: raise max_length, or shorten the prompt or its images "
                    "(max_pixels)."
                )
        labels = ids.masked_fill((mask == 0) | (is_completion == 0), IGNORE_INDEX)
        inputs |= {"input_ids": ids, "attention_mask": mask, "labels": labels}
        inputs |= dict(zip(per_token, token_values, strict=True))
        return BatchFeature(inputs)
