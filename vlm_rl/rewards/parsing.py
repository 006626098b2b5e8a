"""Reading completions: their text, the answer inside answer tags, numbers, and hedged answers."""

from __future__ import annotations

import re
from typing import Any

# "A or B", "either 3 or 4", "3/4?" style alternatives; a hedged answer must not collect the reward.
_HEDGE = re.compile(r"(?i)(?:\bor\b|\beither\b|\bmaybe\b|\bperhaps\b|\bpossibly\b|\bunsure\b|\bnot sure\b|\?)")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def completion_text(completion: Any) -> str:
    """The text of a completion, whether plain (a string) or conversational (a list of messages). In a multi-turn
    completion only the model's own turns count: a tool's reply is not the model's answer. A message's
    `reasoning_content` is put back in its `<think>` block: when the run has tools, TRL parses completions with the
    template's response schema, and Qwen3's moves `<think>…</think>` out of `content` (a format reward would then
    never see the block the model wrote)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(_message_text(message) for message in completion if message.get("role") != "tool")
    if isinstance(completion, dict):  # a content block
        return completion.get("text", "") if completion.get("type", "text") == "text" else ""
    raise TypeError(f"Cannot read the text of a completion of type {type(completion).__name__}.")


def _message_text(message: dict) -> str:
    text = completion_text(message.get("content") or "")
    reasoning = message.get("reasoning_content")
    return f"<think>{reasoning}</think>{text}" if isinstance(reasoning, str) else text


def tagged_blocks(text: str, tag: str) -> list[str]:
    """The contents of every `<tag>…</tag>` block, in order (each runs to the first closing tag after it).

    A scan, not a lazy regular expression: that would retry from every unclosed `<tag>`, which is quadratic
    on a completion that repeats the opening tag.
    """
    opening, closing = f"<{tag}>", f"</{tag}>"
    blocks = []
    start = text.find(opening)
    while start != -1:
        end = text.find(closing, start + len(opening))
        if end == -1:
            break
        blocks.append(text[start + len(opening) : end])
        start = text.find(opening, end + len(closing))
    return blocks


def extract_answer(text: str, tag: str = "answer") -> str:
    """The content of the last `<tag>…</tag>`, or the whole text when there is no such block."""
    blocks = tagged_blocks(text, tag)
    return (blocks[-1] if blocks else text).strip()


def normalize(answer: str) -> str:
    """Case- and whitespace-insensitive form for exact matching; trailing full stops are dropped."""
    return " ".join(answer.casefold().split()).rstrip(".")


def is_hedged(answer: str) -> bool:
    """Whether an answer offers alternatives or doubt ("A or B", "maybe 3", "4?") instead of committing."""
    return bool(_HEDGE.search(answer))


def find_numbers(text: str) -> list[float]:
    """Every number written in `text` (thousands separators allowed), in order."""
    return [float(match.replace(",", "")) for match in _NUMBER.findall(text)]


def ground_truths(reward: str, answer: list | None, columns: dict[str, Any]) -> list[str | None]:
    """The `answer` column as stripped strings; `None` for a row without one (None or blank), which is not scored.

    A dataset with no `answer` column at all is a set-up mistake: that raises, naming the batch's columns.
    """
    if answer is None:
        raise KeyError(
            f"The {reward!r} reward needs an 'answer' column in the dataset; the batch has: {sorted(columns)}."
        )
    return [None if truth is None or not str(truth).strip() else str(truth).strip() for truth in answer]
