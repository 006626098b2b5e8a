"""Accuracy rewards: does the answer match the dataset's ground truth?"""

from __future__ import annotations

from vlm_rl.rewards.parsing import completion_text, extract_answer, normalize
from vlm_rl.rewards.registry import register_reward


@register_reward("accuracy")
def accuracy(completions, answer=None, **kwargs) -> list[float]:
    """1.0 when the answer equals the `answer` column, ignoring case, spacing and a trailing full stop.

    The answer is the content of the last `<answer>…</answer>`, or the whole completion if it has no tags
    (pair it with `think_answer_format` to require the tags).
    """
    if answer is None:
        raise KeyError(
            f"The 'accuracy' reward needs an 'answer' column in the dataset; the batch has: {sorted(kwargs)}."
        )
    return [
        1.0 if normalize(extract_answer(completion_text(completion))) == normalize(str(truth)) else 0.0
        for completion, truth in zip(completions, answer, strict=True)
    ]
