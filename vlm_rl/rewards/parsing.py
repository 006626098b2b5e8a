"""Reading completions: their text, and the answer inside `<answer>…</answer>` tags."""

from __future__ import annotations

import re
from typing import Any

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def completion_text(completion: Any) -> str:
    """The text of a completion, whether plain (a string) or conversational (a list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(completion_text(message.get("content", "")) for message in completion)
    if isinstance(completion, dict):  # a content block
        return completion.get("text", "") if completion.get("type", "text") == "text" else ""
    raise TypeError(f"Cannot read the text of a completion of type {type(completion).__name__}.")


def extract_answer(text: str) -> str:
    """The content of the last `<answer>…</answer>`, or the whole text when there are no answer tags."""
    matches = _ANSWER.findall(text)
    return (matches[-1] if matches else text).strip()


def normalize(answer: str) -> str:
    """Case- and whitespace-insensitive form for exact matching; trailing full stops are dropped."""
    return " ".join(answer.casefold().split()).rstrip(".")
