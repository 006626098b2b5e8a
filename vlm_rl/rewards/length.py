"""Length penalties: scores <= 0 that discourage completions running into the length limit or looping."""

from __future__ import annotations

from vlm_rl.rewards.parsing import completion_text
from vlm_rl.rewards.registry import register_reward


@register_reward("overlong_penalty")
def overlong_penalty(
    completions: list,
    completion_ids: list[list[int]] | None = None,
    max_length: int | None = None,
    cache_length: int | None = None,
    max_completion_length: int | None = None,
    **kwargs,
) -> list[float]:
    """DAPO's soft overlong punishment over the completion's token count L.

    0 while L <= max_length - cache_length, then falling linearly to -1 at L = max_length (and -1 beyond).
    `max_length` defaults to the trainer's `max_completion_length`, which `VLMGRPOTrainer` passes to every
    reward (guessing it from the batch would punish whichever completion is longest). `cache_length`
    defaults to a fifth of `max_length`, DAPO's ratio (4096 of 20480).
    """
    if max_length is None:
        max_length = max_completion_length
    if max_length is None:
        raise ValueError(
            "overlong_penalty needs `max_length`: outside VLMGRPOTrainer, set it in the reward's kwargs, e.g. "
            "{reward: overlong_penalty, kwargs: {max_length: 1024}}."
        )
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"overlong_penalty: max_length must be a positive number of tokens, got {max_length!r}.")
    if cache_length is None:
        cache_length = max(max_length // 5, 1)
    if not isinstance(cache_length, int) or not 0 < cache_length <= max_length:
        raise ValueError(
            f"overlong_penalty: cache_length must be a whole number of tokens in [1, max_length={max_length}], "
            f"got {cache_length!r}."
        )
    if completion_ids is None:
        raise ValueError(
            "overlong_penalty counts tokens and needs `completion_ids`, which TRL's GRPOTrainer passes to every "
            "reward; pass completion_ids=[[token ids], ...] when calling it directly."
        )
    start = max_length - cache_length
    return [
        min(0.0, (start - len(ids)) / cache_length) if len(ids) <= max_length else -1.0
        for _, ids in zip(completions, completion_ids, strict=True)
    ]


@register_reward("repetition_penalty")
def repetition_penalty(
    completions: list,
    completion_ids: list[list[int]] | None = None,
    ngram_size: int = 3,
    max_penalty: float = -1.0,
    **kwargs,
) -> list[float]:
    """`max_penalty` times the fraction of the completion's n-grams that repeat an earlier one (0 when none do).

    N-grams are over token ids when the trainer passes `completion_ids`, else over whitespace-separated words.
    A completion shorter than `ngram_size` is not penalised.
    """
    if not isinstance(ngram_size, int) or ngram_size < 1:
        raise ValueError(f"repetition_penalty: ngram_size must be a positive whole number, got {ngram_size!r}.")
    if not (isinstance(max_penalty, int | float) and -float("inf") < max_penalty <= 0):
        raise ValueError(
            f"repetition_penalty: max_penalty must be a finite number <= 0 (the score of pure repetition), got "
            f"{max_penalty!r}."
        )
    if completion_ids is None:
        sequences = [completion_text(completion).split() for completion in completions]
    else:
        sequences = [list(ids) for _, ids in zip(completions, completion_ids, strict=True)]
    scores = []
    for units in sequences:
        total = len(units) - ngram_size + 1
        if total < 1:
            scores.append(0.0)
            continue
        # The shifted copies are shorter by design: zip stops at the last complete n-gram.
        distinct = len(set(zip(*(units[i:] for i in range(ngram_size)), strict=False)))
        scores.append(max_penalty * (total - distinct) / total if distinct < total else 0.0)
    return scores
