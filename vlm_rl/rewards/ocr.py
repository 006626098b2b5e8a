"""OCR reward: how close is the transcribed text to the `answer` column, character by character?"""

from __future__ import annotations

import unicodedata

from rapidfuzz.distance import Levenshtein

from vlm_rl.rewards.parsing import completion_text, extract_answer, ground_truths
from vlm_rl.rewards.registry import register_reward


def _canonical(text: str, ignore_case: bool, ignore_whitespace: bool) -> str:
    # NFKC, so that ligatures, full-width forms and composed accents compare equal to their plain spelling.
    text = unicodedata.normalize("NFKC", text)
    if ignore_case:
        text = text.casefold()
    if ignore_whitespace:
        text = " ".join(text.split())
    return text


@register_reward("ocr_similarity", columns=("answer",))
def ocr_similarity(
    completions: list,
    answer: list | None = None,
    ignore_case: bool = False,
    ignore_whitespace: bool = False,
    answer_tag: str = "answer",
    **kwargs,
) -> list[float | None]:
    """1 - normalised Levenshtein distance between the answer and the `answer` column, in [0, 1].

    Partial transcriptions earn partial credit; padding or repeating text lowers the score, since the distance
    is divided by the longer of the two. `ignore_whitespace` collapses runs of whitespace to one space.
    Rapidfuzz's bit-parallel distance keeps even 100k-character texts well under a second.
    """
    return [
        None
        if truth is None
        else Levenshtein.normalized_similarity(
            _canonical(extract_answer(completion_text(completion), answer_tag), ignore_case, ignore_whitespace),
            _canonical(truth, ignore_case, ignore_whitespace),
        )
        for completion, truth in zip(completions, ground_truths("ocr_similarity", answer, kwargs), strict=True)
    ]
