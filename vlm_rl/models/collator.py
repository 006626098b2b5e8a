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

import json
from dataclasses import dataclass
from typing import Any

import torch
from transformers import BatchFeature
from trl.chat_template_utils import supports_tool_calling
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.utils import flush_left

from vlm_rl.data.rows import generation_prompt
from vlm_rl.data.video import Clip, with_video
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
    """A row's `completion`: the assistant's text, or a conversation: one assistant message, or assistant turns that
    call tools and the `tool` turns that answer them, ending with an assistant turn."""
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    if (
        len(completion) == 1
        and completion[0].get("role") == "assistant"
        and _text_blocks(completion[0].get("content"))
    ):
        return [{"role": "assistant", "content": "".join(part["text"] for part in completion[0]["content"])}]
    if (
        not completion
        or not all(isinstance(m, dict) and isinstance(m.get("content"), str | list) for m in completion)
        or completion[-1].get("role") != "assistant"
        or any(m.get("role") not in ("assistant", "tool") for m in completion)
        or (len(completion) == 1 and not isinstance(completion[0]["content"], str))
    ):
        raise InvalidValueError(
            f"completion {completion!r}: give the assistant's reply as text, as [{{role: assistant, content: ...}}], "
            "or as assistant turns with tool_calls and the tool turns that answer them, ending with an assistant turn"
        )
    return completion


def _text_blocks(content: Any) -> bool:
    """Whether a message's content is text only, as content blocks (`[{type: text, text: ...}, ...]`)."""
    return (
        isinstance(content, list)
        and bool(content)
        and all(isinstance(part, dict) and part.get("type") == "text" for part in content)
    )


def tool_images(completion: list[dict]) -> int:
    """How many images the completion's tool turns return: the last images of the row, in conversation order."""
    return sum(
        1
        for message in completion
        if message["role"] == "tool" and isinstance(message["content"], list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") == "image"
    )


def turn_texts(processor, prompt: list[dict], completion: list[dict], images: list, tools: list | None) -> list:
    """A multi-turn completion as the template renders it after the generation prompt, cut into (text, trained)
    pieces: TRL's tool loop samples each assistant turn up to its end-of-turn token and appends the rest (the tool
    turn and the next assistant opener) as tool output, masked from the loss; the last turn keeps what the template
    puts after it, as a single-turn completion does."""
    if prompt[-1]["role"] == "assistant":
        raise InvalidValueError("A completion with tool turns cannot continue a prefilled assistant message.")

    def render(messages: list[dict], generate: bool) -> str:
        conversation = prepare_multimodal_messages(messages, images=images)
        return processor.apply_chat_template(conversation, tools=tools, tokenize=False, add_generation_prompt=generate)

    full = render([*prompt, *completion], False)
    eos = processor.tokenizer.eos_token
    start, pieces = len(render(prompt, True)), []
    for index, message in enumerate(completion[:-1]):
        if message["role"] == "assistant":
            rendered = render([*prompt, *completion[: index + 1]], False)
            end = rendered.rindex(eos) + len(eos)
        elif completion[index + 1]["role"] == "assistant":
            end = len(rendered := render([*prompt, *completion[: index + 1]], True))
        else:
            continue
        if not full.startswith(rendered[:end]) or end <= start:
            raise InvalidValueError(
                "The chat template renders a conversation's turns differently once later turns follow, so a "
                f"multi-turn completion's turns cannot be told apart (at {rendered[max(0, end - 80) : end]!r})."
            )
        pieces.append((full[start:end], message["role"] == "assistant"))
        start = end
    return [*pieces, (full[start:], True)]


@dataclass
class PromptCompletionCollator:
    """Rows with `prompt`, `completion` (conversations) and `images` → model inputs and `labels`, which are the
    completion's token ids and -100 on the prompt and the padding: the loss is on the completion only.

    A completion with tool turns (an assistant turn with `tool_calls`, the `tool` turn answering it, the next
    assistant turn) trains on the assistant turns only; the tool turns' images are the row's last images, and go in
    place. A `tools` column (JSON schemas, as TRL's SFT reads it) is rendered into the prompt."""

    processor: Any
    adapter: FamilyAdapter
    max_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> BatchFeature:
        completions = [completion_messages(example["completion"]) for example in examples]
        row_images = [list(example.get("images") or []) for example in examples]
        prompts = [
            self._with_video(example, len(images), row)
            for row, (example, images) in enumerate(zip(examples, row_images, strict=True))
        ]
        self.adapter.check_videos_per_row([len(example.get("videos") or []) for example in examples])
        tools = self._tools(examples)
        returned = [row[len(row) - tool_images(c) :] for row, c in zip(row_images, completions, strict=True)]
        images = [row[: len(row) - len(r)] for row, r in zip(row_images, returned, strict=True)]
        inputs = dict(prompt_inputs(self.adapter, self.processor, prompts, images, tools))
        rows = [
            self._completion(prompt, completion, row, tool_row, tools)
            for prompt, completion, row, tool_row in zip(prompts, completions, images, returned, strict=True)
        ]
        if any(returned):
            inputs = self._with_tool_images(inputs, images, returned, rows)
        pad = self.processor.tokenizer.pad_token_id
        width = max(len(row["ids"]) for row in rows)

        def padded(key: str, value: int) -> torch.Tensor:
            return torch.tensor([row[key] + [value] * (width - len(row[key])) for row in rows], dtype=torch.long)

        prompt_mask = inputs["attention_mask"]
        per_token = [key for key in TOKEN_KEYS if key in inputs]
        completion_ids = padded("ids", pad)
        completion_mask = torch.tensor([[1] * len(row["ids"]) + [0] * (width - len(row["ids"])) for row in rows])
        mask, ids, is_completion, *token_values = flush_left(
            torch.cat((prompt_mask, completion_mask), dim=1),
            torch.cat((inputs["input_ids"], completion_ids), dim=1),
            torch.cat((torch.zeros_like(prompt_mask), padded("trained", 0)), dim=1),
            *(torch.cat((inputs[key], padded(key, 0).to(inputs[key].dtype)), dim=1) for key in per_token),
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

    def _with_video(self, example: dict[str, Any], num_images: int, row: int) -> list[dict]:
        """The row's prompt with its video (decoded clips, as the data loader gives them) placed as GRPO places it, so
        the video's inputs come out of the same `apply_chat_template` call as the prompt's tokens."""
        videos = list(example.get("videos") or [])
        if not videos:
            return example["prompt"]
        if not all(isinstance(clip, Clip) for clip in videos) or len(completion_messages(example["completion"])) > 1:
            raise InvalidValueError(
                f"vlm-rl sft takes a video row (row {row} of this batch) as decoded clips with a one-message "
                "completion: load the rows through the recipe's data (a `videos` column), without tool turns."
            )
        return with_video(example["prompt"], videos, num_images)

    def _tools(self, examples: list[dict[str, Any]]) -> list | None:
        """The batch's tool schemas (a `tools` column: JSON text or a list), one set for the whole batch."""
        schemas = [example.get("tools") for example in examples]
        schemas = [json.loads(t) if isinstance(t, str) else t for t in schemas]
        if any(t != schemas[0] for t in schemas):
            raise InvalidValueError(
                "The rows of a batch have different `tools`; give every row the same tool schemas."
            )
        if schemas[0] and not supports_tool_calling(self.processor):
            raise InvalidValueError(
                "The rows have `tools` but the model's chat template cannot render tool calls (an assistant turn with "
                "tool_calls and a tool turn): give the processor a template that can (e.g. "
                "trl.chat_template_utils.qwen3_vl_chat_template for Qwen-VL)."
            )
        return schemas[0] or None

    def _completion(self, prompt: list, completion: list, images: list, returned: list, tools: list | None) -> dict:
        """One row's completion tokens: `ids`, `trained` (1 on the assistant's tokens), per-token type ids, and the
        vision inputs of the images its tool turns return (`vision`, in order)."""
        tokenizer = self.processor.tokenizer
        if len(completion) == 1:
            ids = tokenizer(completion_text(self.processor, prompt, completion, images), add_special_tokens=False)
            ids = ids["input_ids"]
            return {"ids": ids, "trained": [1] * len(ids), **dict.fromkeys(TOKEN_KEYS, [0] * len(ids)), "vision": []}
        row: dict[str, Any] = {"ids": [], "trained": [], **{key: [] for key in TOKEN_KEYS}, "vision": []}
        returned = list(returned)
        for text, trained in turn_texts(self.processor, prompt, completion, images, tools):
            count = text.count(self.processor.image_token) if not trained else 0
            piece_images, returned = returned[:count], returned[count:]
            if piece_images:
                piece = self.processor(text=[text], images=piece_images, add_special_tokens=False, return_tensors="pt")
                row["vision"].append({key: piece[key] for key in self.adapter.image_keys if key in piece})
            else:
                piece = tokenizer([text], add_special_tokens=False, return_tensors="pt")
            ids = piece["input_ids"][0].tolist()
            row["ids"] += ids
            row["trained"] += [int(trained)] * len(ids)
            for key in TOKEN_KEYS:
                row[key] += piece[key][0].tolist() if key in piece else [0] * len(ids)
        return row

    def _with_tool_images(self, inputs: dict, images: list[list], returned: list[list], rows: list[dict]) -> dict:
        """The prompts' vision inputs with each row's tool images after its prompt images: the order of the image
        tokens in the sequence, which the model fills in order."""
        split = self.adapter.split_vision_inputs(inputs, [len(row) for row in images])
        for key in self.adapter.image_keys:
            prompt_parts = split[key] if isinstance(split.get(key), list) else [None] * len(rows)
            per_row = [
                [p for p in (part, *(v[key] for v in row["vision"])) if p is not None]
                for part, row in zip(prompt_parts, rows, strict=True)
            ]
            split[key] = [torch.cat(parts) for parts in per_row if parts]
        if "num_images" in inputs:
            split["num_images"] = [len(p) + len(r) for p, r in zip(images, returned, strict=True)]
        return self.adapter.merge_vision_inputs(split)
