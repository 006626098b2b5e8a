"""Counting reward: is the number of objects in the answer the count in the `answer` column?"""

from __future__ import annotations

import re

from vlm_rl.rewards.parsing import completion_text, extract_answer, find_numbers, ground_truths, is_hedged
from vlm_rl.rewards.registry import register_reward

_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_WORD_VALUES = {
    "none": 0,
    **{word: value for value, word in enumerate(_UNITS)},
    **{word: 10 + value for value, word in enumerate(_TEENS)},
    **{word: 20 + 10 * value for value, word in enumerate(_TENS)},
}
# "twenty-one" and "twenty one" are one number, not a hedge between 20 and 1.
_NUMBER_WORD = re.compile(
    rf"\b(?:({'|'.join(_TENS)})(?:[\s-]+({'|'.join(_UNITS[1:])}))?|({'|'.join([*_TEENS, *_UNITS, 'none'])}))\b",
    re.IGNORECASE,
)


def counts(text: str) -> set[float]:
    """The distinct numbers the text states, in digits ("3", "1,000") or words up to ninety-nine ("three")."""
    values: set[float] = set()

    def take(match: re.Match) -> str:
        tens, unit, single = match.groups()
        if tens:
            values.add(float(_WORD_VALUES[tens.casefold()] + (_WORD_VALUES[unit.casefold()] if unit else 0)))
        else:
            values.add(float(_WORD_VALUES[single.casefold()]))
        return " "

    rest = _NUMBER_WORD.sub(take, text)
    return values | set(find_numbers(rest))


@register_reward("counting_accuracy", columns=("answer",))
def counting_accuracy(
    completions: list, answer: list | None = None, answer_tag: str = "answer", **kwargs
) -> list[float | None]:
    """1.0 when the answer states exactly the count in the `answer` column ("3", "three", "There are 3 cats").

    The answer must state one count: two different numbers ("3 or 4", "3 cats and 2 dogs", "3-4") or hedging
    words ("maybe 3", "3?") score 0.0. The `answer` column must hold a whole, non-negative number.
    """
    scores: list[float | None] = []
    for completion, truth in zip(completions, ground_truths("counting_accuracy", answer, kwargs), strict=True):
        if truth is None:
            scores.append(None)
            continue
        gold = counts(truth)
        if len(gold) != 1 or not (value := gold.pop()).is_integer() or value < 0:
            raise ValueError(
                f"counting_accuracy needs one whole, non-negative count in the 'answer' column (e.g. '3' or "
                f"'three'), got {truth!r}; use numeric_accuracy for other numbers."
            )
        span = extract_answer(completion_text(completion), answer_tag)
        scores.append(float(not is_hedged(span) and counts(span) == {value}))
    return scores
