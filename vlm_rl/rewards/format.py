"""Format rewards: does the completion follow the `<think>…</think><answer>…</answer>` layout?"""

from __future__ import annotations

import re

from vlm_rl.rewards.parsing import completion_text
from vlm_rl.rewards.registry import register_reward

_THINK_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


@register_reward("think_answer_format")
def think_answer_format(completions, **kwargs) -> list[float]:
    """1.0 when the whole completion is one `<think>…</think>` block followed by one `<answer>…</answer>` block."""
    scores = []
    for completion in completions:
        text = completion_text(completion)
        well_formed = _THINK_ANSWER.match(text) and text.count("<answer>") == 1 and text.count("<think>") == 1
        scores.append(1.0 if well_formed else 0.0)
    return scores
