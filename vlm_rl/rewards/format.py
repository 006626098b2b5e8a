"""Format rewards: does the completion follow the `<think>…</think><answer>…</answer>` layout?"""

from __future__ import annotations

import re
from functools import lru_cache

from vlm_rl.rewards.parsing import completion_text, tagged_blocks
from vlm_rl.rewards.registry import register_reward

FORMAT_MODES = ("strict", "lenient")
_TAG_NAME = re.compile(r"[A-Za-z_][\w.-]*")


@lru_cache(maxsize=8)
def _strict_layout(think_tag: str, answer_tag: str) -> re.Pattern:
    think, answer = re.escape(think_tag), re.escape(answer_tag)
    return re.compile(rf"\s*<{think}>.*?</{think}>\s*<{answer}>.*?</{answer}>\s*", re.DOTALL)


def _has_one_block(text: str, tag: str) -> bool:
    # Counting the tags themselves also rejects nested or stray ones ("<think><think>…</think>").
    return text.count(f"<{tag}>") == 1 and text.count(f"</{tag}>") == 1


def _well_formed(text: str, think_tag: str, answer_tag: str, strict: bool) -> bool:
    if not _has_one_block(text, answer_tag):
        return False
    answers = tagged_blocks(text, answer_tag)
    if len(answers) != 1 or not answers[0].strip():
        return False
    if not strict:
        return True
    return _has_one_block(text, think_tag) and _strict_layout(think_tag, answer_tag).fullmatch(text) is not None


@register_reward("think_answer_format")
def think_answer_format(
    completions: list, think_tag: str = "think", answer_tag: str = "answer", mode: str = "strict", **kwargs
) -> list[float]:
    """1.0 when the completion has the think/answer layout, else 0.0.

    `strict`: exactly one think block followed by exactly one non-empty answer block, nothing else outside
    them (whitespace aside). `lenient`: exactly one non-empty answer block anywhere; a think block is optional
    and text around it is allowed (for models whose chat template opens the think block in the prompt).
    """
    for keyword, tag in (("think_tag", think_tag), ("answer_tag", answer_tag)):
        if not isinstance(tag, str) or not _TAG_NAME.fullmatch(tag):
            raise ValueError(f"think_answer_format: {keyword} must be a bare tag name such as 'think', got {tag!r}.")
    if think_tag == answer_tag:
        raise ValueError(f"think_answer_format: think_tag and answer_tag must differ, both are {think_tag!r}.")
    if mode not in FORMAT_MODES:
        raise ValueError(f"think_answer_format: mode must be one of {FORMAT_MODES}, got {mode!r}.")
    strict = mode == "strict"
    return [
        1.0 if _well_formed(completion_text(completion), think_tag, answer_tag, strict) else 0.0
        for completion in completions
    ]
