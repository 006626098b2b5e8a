"""Accuracy rewards: does the answer match the dataset's `answer` column?

Every reward here reads the answer from the last `<answer>…</answer>` block (the tag is the `answer_tag`
keyword), or from the whole completion when there is none; pair them with `think_answer_format` to require
the tags. A row whose `answer` is None or blank is not scored (None). An answer that hedges, offering several
answers or doubt ("2 or 3", "maybe B", "yes?"), scores 0.0, so a policy cannot collect the reward by listing
alternatives.
"""

from __future__ import annotations

import functools
import math
import re
import time
import unicodedata
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

import math_verify.grader
import math_verify.parser
from math_verify import LatexExtractionConfig, parse, verify
from sympy import Basic, Float, Pow, Product, Rational, Symbol, factorial
from sympy.matrices import MatrixBase

from vlm_rl.rewards.parsing import (
    completion_text,
    extract_answer,
    find_numbers,
    ground_truths,
    is_hedged,
    normalize,
    tagged_blocks,
)
from vlm_rl.rewards.registry import register_reward
from vlm_rl.rewards.timeout import RewardTimeout, time_limit

# We call math-verify with its own timeouts off (its signal.alarm would cancel the trainer's time limit) and
# bound each step with `time_limit` instead; its one-time warning that no timeout is set would be misleading.
math_verify.parser.TIMEOUT_WARNING_SHOWN = True
math_verify.grader.TIMEOUT_WARNING_SHOWN = True

_T = TypeVar("_T")


@register_reward("accuracy", columns=("answer",))
def accuracy(
    completions: list, answer: list | None = None, answer_tag: str = "answer", **kwargs
) -> list[float | None]:
    """1.0 when the answer equals the `answer` column, ignoring case, spacing and a trailing full stop.

    Exact matching already rejects hedges such as "red or blue" (unless that is the ground truth itself).
    """
    return [
        None
        if truth is None
        else float(normalize(extract_answer(completion_text(completion), answer_tag)) == normalize(truth))
        for completion, truth in zip(completions, ground_truths("accuracy", answer, kwargs), strict=True)
    ]


# --- math_accuracy ---------------------------------------------------------------------------------------------

_LATEX_DELIMITER = re.compile(r"\$|\\\(|\\\[|\\boxed")
_BOX_TOKEN = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")
_MATH_HEDGE = re.compile(r"\\(?:lor|vee)(?![A-Za-z])")
# sympy builds integer powers and factorials in one C call that no signal can interrupt: `10^{10^{10}}` would hang
# the run whatever the time limit, so an answer whose value needs more digits than this scores 0.0 unevaluated.
_MAX_DIGITS = 10_000
_ANSWER_TAIL = 1_000  # characters of an answer block or of free text (boxes aside) that math-verify reads


class _SampleTimedOut(Exception):
    """One sample used up its `timeout`."""


def _limited(step: Callable[[], _T], deadline: float | None) -> _T:
    """Run one math-verify call within what is left of the sample's time (math-verify's own timeouts are off)."""
    if deadline is None:
        return step()
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _SampleTimedOut
    try:
        with time_limit(remaining, what="math_accuracy on one sample"):
            return step()
    except RewardTimeout:
        if time.monotonic() < deadline:
            raise  # the reward call's own, shorter limit: the whole call is over
        raise _SampleTimedOut from None


def _parse_math(text: str, bare: bool, deadline: float | None) -> list:
    """math-verify's `parse`; `bare` text (a ground truth, an answer block) without LaTeX delimiters is read as
    one expression first, so "x^2 + 2x + 1" is not read as its last number."""
    if bare and not _LATEX_DELIMITER.search(text):
        parsed = _limited(functools.partial(parse, f"${text}$", parsing_timeout=None), deadline)
        if parsed:
            return parsed
    return _limited(functools.partial(parse, text, parsing_timeout=None), deadline)


def _parse_box(content: str, deadline: float | None) -> list:
    """math-verify's reading of `\\boxed{content}`: LaTeX only, first match only, so that a parse interrupted
    by the time limit stops there instead of going on to scan the text again with other patterns."""
    text = f"\\boxed{{{content}}}"
    step = functools.partial(
        parse, text, [LatexExtractionConfig()], extraction_mode="first_match", parsing_timeout=None
    )
    return _limited(step, deadline)


def _boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{…}` (and `\\fbox{…}`), braces balanced, in one linear pass."""
    contents, stack = [], []
    for token in _BOX_TOKEN.finditer(text):
        if token[0] in ("\\{", "\\}"):  # escaped braces, as in `\{1, 2\}`, are content
            continue
        if token[0] == "{":
            stack.append(None)
        elif token[0] == "}":
            if stack and (start := stack.pop()) is not None:
                contents.append(text[start : token.start()].strip())
        else:
            stack.append(token.end())
    return [content for content in contents if content]


def _log10_size(expr: Any) -> float:
    """A rough upper bound on the digits needed to write `expr`'s numbers once sympy evaluates it."""
    if isinstance(expr, MatrixBase):
        return sum(_log10_size(element) for element in expr)
    if not isinstance(expr, Basic):
        return 0.0
    if isinstance(expr, Rational):  # integers included
        return max(math.log10(abs(expr.p)) if expr.p else 0.0, math.log10(expr.q))
    if isinstance(expr, Float):
        value = abs(float(expr))
        return abs(math.log10(value)) if value else 0.0
    if isinstance(expr, Symbol):
        return 1.0
    if isinstance(expr, Pow | factorial | Product):
        if isinstance(expr, Pow):
            unit, count = _log10_size(expr.base), _log10_size(expr.exp)  # |b^e| has about |e|·log10|b| digits
        elif isinstance(expr, factorial):
            unit = count = _log10_size(expr.args[0])  # n! has about n·log10(n) digits
        else:
            unit, count = max(_log10_size(expr.function), 1.0), sum(_log10_size(limit[-1]) for limit in expr.limits)
        if not unit:
            return 0.0
        return unit * 10**count if count < 300 else math.inf
    return sum(_log10_size(arg) for arg in expr.args)


def _too_large(parsed: list) -> bool:
    try:
        return any(_log10_size(expr) > _MAX_DIGITS for expr in parsed)
    except RecursionError:
        return True


def _math_hedged(span: str, boxes: list[str], tagged: bool) -> bool:
    """Hedging in the final answer: the answer block, every box, or (untagged, unboxed) the last line."""
    if tagged:
        finals = [span]  # boxes inside it included
    elif boxes:
        finals = boxes
    else:
        finals = [next((line for line in reversed(span.splitlines()) if line.strip()), "")]
    return any(is_hedged(final) or _MATH_HEDGE.search(final) for final in finals)


def _equivalent(gold: list, pred: list, deadline: float | None) -> bool:
    return any(_limited(functools.partial(verify, g, p, timeout_seconds=None), deadline) for g in gold for p in pred)


def _math_score(text: str, gold: list, answer_tag: str, deadline: float | None) -> float:
    tagged = bool(tagged_blocks(text, answer_tag))
    span = extract_answer(text, answer_tag)
    boxes = _boxed_contents(span)
    if _math_hedged(span, boxes, tagged):
        return 0.0
    if boxes:
        final = _parse_box(boxes[-1], deadline)
        others = {"".join(box.split()): box for box in boxes}  # other boxes, each spelling once
        others.pop("".join(boxes[-1].split()))
    else:  # only the end, where the answer is: math-verify's regexes slow down quadratically with length
        final = _parse_math(span[-_ANSWER_TAIL:], bare=tagged, deadline=deadline)
        others = {}
    if not final or _too_large(final):
        return 0.0
    # Several boxes are fine only when they hold the same value as the last one, which is graded.
    for other in others.values():
        parsed = _parse_box(other, deadline)
        if not parsed or _too_large(parsed) or not _equivalent(final, parsed, deadline):
            return 0.0
    return float(_equivalent(gold, final, deadline))


@register_reward("math_accuracy", columns=("answer",))
def math_accuracy(
    completions: list,
    answer: list | None = None,
    timeout: float | None = 5.0,
    answer_tag: str = "answer",
    **kwargs,
) -> list[float | None]:
    """1.0 when the answer is mathematically equivalent to the `answer` column (math-verify: LaTeX, `\\boxed{}`,
    fractions, sets, symbolic equality), else 0.0.

    Hedges score 0.0: "or", `\\lor`, doubt words or "?" in the answer block, in a box, or in the last line of an
    untagged completion, and boxes holding different values (`\\boxed{2} \\boxed{3}`); several boxes with the
    same value are graded once, by the last. Without a box, math-verify reads the last 1000 characters of the
    answer block (or of the completion, when it has none). Each sample gets `timeout` seconds (None: no limit)
    and scores 0.0 past it, as does an answer too large to evaluate (such as `10^{10^{10}}`). A ground truth in
    which math-verify finds nothing (e.g. `\\boxed{}`) is not scored (None).
    """
    if timeout is not None and not timeout > 0:
        raise ValueError(f"math_accuracy: timeout must be a positive number of seconds or None, got {timeout!r}.")
    golds: dict[str, list] = {}  # GRPO scores each ground truth once per generation of the group
    scores: list[float | None] = []
    for completion, truth in zip(completions, ground_truths("math_accuracy", answer, kwargs), strict=True):
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            if truth is not None and truth not in golds:
                golds[truth] = _parse_math(truth, bare=True, deadline=deadline)
            if truth is None or not golds[truth] or _too_large(golds[truth]):
                scores.append(None)
            else:
                scores.append(_math_score(completion_text(completion), golds[truth], answer_tag, deadline))
        except _SampleTimedOut:
            scores.append(0.0)
    return scores


# --- numeric_accuracy ------------------------------------------------------------------------------------------

_FRACTION = re.compile(r"(?<![\w/])(?<!\d[.,])([-+]?\d+)\s*/\s*(\d+)(?![\w/]|[.,]\d)")


def _numbers(text: str) -> set[float]:
    """The distinct numbers written in `text`; "3/4" is one number, 0.75."""
    fractions: list[float] = []

    def take(match: re.Match) -> str:
        if float(match[2]) == 0:
            return match[0]
        fractions.append(float(match[1]) / float(match[2]))
        return " "

    rest = _FRACTION.sub(take, text)
    return {*fractions, *find_numbers(rest)}


@register_reward("numeric_accuracy", columns=("answer",))
def numeric_accuracy(
    completions: list,
    answer: list | None = None,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
    answer_tag: str = "answer",
    **kwargs,
) -> list[float | None]:
    """1.0 when the answer's number is within `rel_tol` (relative) or `abs_tol` (absolute) of the `answer` column.

    The answer must hold exactly one distinct number: units, words and thousands separators around it are
    ignored ("1,200 m" is 1200, "3/4" is 0.75, "50%" is 50), but two different numbers ("3 or 4", "3-4",
    "12 (from 3 x 4)") are a hedge and score 0.0. Use `math_accuracy` for expressions.
    """
    for keyword, value in (("rel_tol", rel_tol), ("abs_tol", abs_tol)):
        if not (isinstance(value, int | float) and 0 <= value < math.inf):
            raise ValueError(f"numeric_accuracy: {keyword} must be a finite number >= 0, got {value!r}.")
    scores: list[float | None] = []
    for completion, truth in zip(completions, ground_truths("numeric_accuracy", answer, kwargs), strict=True):
        if truth is None:
            scores.append(None)
            continue
        gold = _numbers(truth)
        if len(gold) != 1:
            raise ValueError(
                f"numeric_accuracy needs exactly one number in the 'answer' column, got {truth!r}; use "
                "math_accuracy for expressions and accuracy for text."
            )
        span = extract_answer(completion_text(completion), answer_tag)
        found = _numbers(span)
        correct = not is_hedged(span) and len(found) == 1
        scores.append(float(correct and math.isclose(found.pop(), gold.pop(), rel_tol=rel_tol, abs_tol=abs_tol)))
    return scores


# --- choice_accuracy -------------------------------------------------------------------------------------------

_ANSWER_PREFIX = re.compile(r"(?i)^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)(?:\s+is)?\s*:?\s*")
_WRAPPING = " \t\n()[]{}*.:"


@lru_cache(maxsize=8)
def _choice_patterns(choices: str) -> tuple[re.Pattern, re.Pattern]:
    letters = f"[{re.escape(choices)}{re.escape(choices.lower())}]"
    upper = f"[{re.escape(choices)}]"
    marked = re.compile(
        rf"[(\[]\s*({letters})\s*[)\]]"  # (B), [b]
        rf"|(?<![\w(\[])({letters})\)"  # B) cat
        rf"|\b({upper})[.:](?!\w)"  # B. cat, B:
        rf"|(?i:\b(?:answer|option|choice)\b(?:\s+is)?\s*:?\s*)({upper})\b"  # the answer is B, option C
    )
    standalone = re.compile(rf"(?<![\w'’-])({upper})(?![\w'’-])")  # a capital letter on its own
    return marked, standalone


def _choice_letters(text: str, choices: str) -> set[str]:
    """Every choice the text names: the whole text when it is one letter, else the marked letters ("(B)",
    "B)", "B.", "answer is B"), else the capital letters standing alone ("A or B")."""
    text = unicodedata.normalize("NFKC", text)
    bare = _ANSWER_PREFIX.sub("", text.strip(_WRAPPING)).strip(_WRAPPING)
    if len(bare) == 1 and bare.upper() in choices:
        return {bare.upper()}
    marked, standalone = _choice_patterns(choices)
    letters = {next(group for group in match.groups() if group).upper() for match in marked.finditer(text)}
    return letters or set(standalone.findall(text))


@register_reward("choice_accuracy", columns=("answer",))
def choice_accuracy(
    completions: list, answer: list | None = None, letters: str = "ABCDE", answer_tag: str = "answer", **kwargs
) -> list[float | None]:
    """1.0 when the answer picks the multiple-choice letter in the `answer` column.

    Read: "B", "(B)", "B.", "B) cat", "The answer is B". Naming more than one letter ("A or B", "A, B",
    "(A) (C)") or hedging ("maybe B", "B?") scores 0.0. A capital letter on its own counts as a choice, so
    "A cat" reads as A when A is a choice. (`letters`, not `choices`: datasets often have a `choices` column.)
    """
    if not isinstance(letters, str) or not letters.isalnum() or len(set(letters.upper())) != len(letters):
        raise ValueError(
            f"choice_accuracy: letters must be distinct letters or digits such as 'ABCD', got {letters!r}."
        )
    letters = letters.upper()
    scores: list[float | None] = []
    for completion, truth in zip(completions, ground_truths("choice_accuracy", answer, kwargs), strict=True):
        if truth is None:
            scores.append(None)
            continue
        gold = _choice_letters(truth, letters)
        if len(gold) != 1:
            raise ValueError(
                f"choice_accuracy: the 'answer' column must name one of the letters {letters!r} (e.g. "
                f"{letters[0]!r}), got {truth!r}. Set the `letters` keyword if the options use other letters."
            )
        span = extract_answer(completion_text(completion), answer_tag)
        scores.append(float(not is_hedged(span) and _choice_letters(span, letters) == gold))
    return scores


# --- yes_no_accuracy -------------------------------------------------------------------------------------------

_YES_NO = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)
_POLARITY = {"yes": True, "true": True, "no": False, "false": False}


def _polarities(text: str) -> set[bool]:
    return {_POLARITY[word.casefold()] for word in _YES_NO.findall(unicodedata.normalize("NFKC", text))}


@register_reward("yes_no_accuracy", columns=("answer",))
def yes_no_accuracy(
    completions: list, answer: list | None = None, answer_tag: str = "answer", **kwargs
) -> list[float | None]:
    """1.0 when the answer says yes/true or no/false as the `answer` column does.

    An answer that says both ("yes or no", "Yes. No.") or hedges ("maybe yes", "yes?") scores 0.0.
    """
    scores: list[float | None] = []
    for completion, truth in zip(completions, ground_truths("yes_no_accuracy", answer, kwargs), strict=True):
        if truth is None:
            scores.append(None)
            continue
        gold = _polarities(truth)
        if len(gold) != 1:
            raise ValueError(f"yes_no_accuracy: the 'answer' column must say yes/true or no/false, got {truth!r}.")
        span = extract_answer(completion_text(completion), answer_tag)
        scores.append(float(not is_hedged(span) and _polarities(span) == gold))
    return scores
