"""The built-in rewards on correct, wrong, empty, malformed, unicode, very long and reward-hacking completions."""

import logging
import signal
import threading

import pytest
import sympy
from conftest import no_hang

from vlm_rl.rewards.accuracy import accuracy, choice_accuracy, math_accuracy, numeric_accuracy, yes_no_accuracy
from vlm_rl.rewards.counting import counting_accuracy
from vlm_rl.rewards.format import think_answer_format
from vlm_rl.rewards.length import overlong_penalty, repetition_penalty
from vlm_rl.rewards.ocr import ocr_similarity
from vlm_rl.rewards.registry import REWARD_REGISTRY
from vlm_rl.rewards.timeout import RewardTimeout, time_limit

LONG = "Let me look at the picture once more. " * 7_000  # ~260k characters of reasoning


def score(reward, completion: str, truth: str | None = None, **kwargs) -> float | None:
    """The score of one completion; plain and conversational forms must score the same."""
    columns = {"answer": [truth], "task": ["t"]}
    plain = reward(prompts=["q"], completions=[completion], **columns, **kwargs)
    chat = reward(
        prompts=[[{"role": "user", "content": "q"}]],
        completions=[[{"role": "assistant", "content": completion}]],
        **columns,
        **kwargs,
    )
    assert plain == chat
    return plain[0]


def timed_score(reward, completion: str, truth: str | None = None, **kwargs) -> float | None:
    with no_hang():
        return score(reward, completion, truth, **kwargs)


NAMES = [
    "think_answer_format",
    "accuracy",
    "math_accuracy",
    "numeric_accuracy",
    "choice_accuracy",
    "yes_no_accuracy",
    "counting_accuracy",
    "ocr_similarity",
    "overlong_penalty",
    "repetition_penalty",
]


@pytest.mark.parametrize("name", NAMES)
def test_builtins_are_registered_under_their_own_name(name):
    assert REWARD_REGISTRY[name].__name__ == name  # TRL logs rewards/<__name__>/mean


# --- think_answer_format ---------------------------------------------------------------------------------------

FORMAT_CASES = [
    # completion, strict, lenient
    ("<think>look</think>\n<answer>red</answer>", 1.0, 1.0),
    ("  <think></think> <answer>red</answer>\n", 1.0, 1.0),
    ("<answer>red</answer>", 0.0, 1.0),
    ("Sure. <answer>red</answer> Hope it helps.", 0.0, 1.0),
    ("", 0.0, 0.0),
    ("red", 0.0, 0.0),
    ("<think>a</think><answer>  </answer>", 0.0, 0.0),
    ("<think>a</think><answer>red", 0.0, 0.0),
    ("<think>a</think>red</answer>", 0.0, 0.0),
    ("<answer>red</answer><think>a</think>", 0.0, 1.0),
    ("<think>a<answer>red</answer></think>", 0.0, 1.0),
    ("<think><think>a</think><answer>red</answer>", 0.0, 1.0),
    ("<think>a</think></think><answer>red</answer>", 0.0, 1.0),
    ("<think>a</think><answer>x</answer> actually red", 0.0, 1.0),
    ("red <think>a</think><answer>x</answer>", 0.0, 1.0),
    ("<think>a</think><answer>red</answer><answer>blue</answer>", 0.0, 0.0),
    ("<think>a</think><answer>red</answer></answer>", 0.0, 0.0),
    ("<think>颜色？</think><answer>红色 🎨</answer>", 1.0, 1.0),
    (f"<think>{LONG}</think><answer>red</answer>", 1.0, 1.0),
    (f"<think>{LONG}</think>{LONG}<answer>red</answer>", 0.0, 1.0),
]


@pytest.mark.parametrize(("completion", "strict", "lenient"), FORMAT_CASES)
def test_think_answer_format(completion, strict, lenient):
    assert timed_score(think_answer_format, completion) == strict  # strict is the default
    assert timed_score(think_answer_format, completion, mode="lenient") == lenient


def test_think_answer_format_with_other_tags():
    completion = "<reasoning>hm</reasoning><solution>4</solution>"
    assert score(think_answer_format, completion, think_tag="reasoning", answer_tag="solution") == 1.0
    assert score(think_answer_format, completion) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "loose"}, "mode must be one of"),
        ({"think_tag": "<think>"}, "bare tag name"),
        ({"answer_tag": ""}, "bare tag name"),
        ({"think_tag": "answer"}, "must differ"),
    ],
)
def test_think_answer_format_rejects_bad_keywords(kwargs, message):
    with pytest.raises(ValueError, match=message):
        score(think_answer_format, "<answer>x</answer>", **kwargs)


# --- accuracy --------------------------------------------------------------------------------------------------

ACCURACY_CASES = [
    ("<think>it is red</think><answer> Red. </answer>", "red", 1.0),
    ("blue", "blue", 1.0),
    ("<answer>blue</answer>", "red", 0.0),
    ("", "red", 0.0),
    ("<answer></answer>", "red", 0.0),
    ("<answer>red", "red", 0.0),  # unclosed: the whole text is the answer
    ("<answer>Café au lait</answer>", "café AU lait", 1.0),
    (LONG + "<answer>red</answer>", "red", 1.0),
    (LONG + "red", "red", 0.0),
    ("red or blue", "red", 0.0),
    ("<answer>red</answer> <answer>blue</answer>", "red", 0.0),  # the last answer counts
    ("<answer>red</answer>", None, None),
    ("<answer>red</answer>", "  ", None),
]


@pytest.mark.parametrize(("completion", "truth", "expected"), ACCURACY_CASES)
def test_accuracy(completion, truth, expected):
    assert timed_score(accuracy, completion, truth) == expected


def test_accuracy_rows_without_ground_truth_are_not_scored():
    scores = accuracy(completions=["red", "red"], answer=[None, "red"])
    assert scores == [None, 1.0]


def test_answer_rewards_without_answer_column_name_it():
    for reward in (accuracy, math_accuracy, numeric_accuracy, choice_accuracy, yes_no_accuracy, counting_accuracy):
        with pytest.raises(KeyError, match="'answer' column.*solution"):
            reward(prompts=["q"], completions=["x"], solution=["x"])
    with pytest.raises(KeyError, match="'answer' column"):
        ocr_similarity(prompts=["q"], completions=["x"], solution=["x"])


# --- math_accuracy ---------------------------------------------------------------------------------------------

MATH_CASES = [
    ("\\boxed{\\frac12}", "\\frac{1}{2}", 1.0),
    ("<answer>0.5</answer>", "1/2", 1.0),
    ("The answer is $\\frac{1}{2}$", "0.5", 1.0),
    ("<answer>\\boxed{\\dfrac{1}{2}}</answer>", "$\\frac{1}{2}$", 1.0),
    ("<answer>x^2+2x+1</answer>", "(x+1)^2", 1.0),
    ("<answer>\\{1, 2\\}</answer>", "\\{2, 1\\}", 1.0),
    ("\\boxed{x = 3}", "3", 1.0),
    ("\\boxed{3}", "2", 0.0),
    ("<answer>2</answer>", "(1, 2)", 0.0),  # an interval, not its last number
    ("", "2", 0.0),
    ("<answer></answer>", "2", 0.0),
    ("\\boxed{\\frac{1}{", "1/2", 0.0),
    ("<answer>)(</answer>", "2", 0.0),
    ("Die Antwort ist $\\frac{1}{2}$ — fertig ✓", "1/2", 1.0),
    ("答案：\\boxed{7}", "7", 1.0),
    (LONG + "\\boxed{7}", "7", 1.0),
    ("\\boxed{" * 50_000, "7", 0.0),
    ("\\(" * 50_000, "7", 0.0),
    ("<answer>" + "1 " * 50_000 + "</answer>", "1", 0.0),
    # hedges
    ("<answer>2 or 3</answer>", "3", 0.0),
    ("So x is 2 or 3", "3", 0.0),
    ("First 2.\nMaybe 3", "3", 0.0),
    ("\\boxed{2} \\boxed{3}", "3", 0.0),
    ("\\boxed{3} then \\boxed{2}", "2", 0.0),
    ("\\boxed{2 \\text{ or } 3}", "3", 0.0),
    ("\\boxed{2 \\lor 3}", "3", 0.0),
    ("<answer>\\boxed{3}, or possibly 2</answer>", "3", 0.0),
    ("\\boxed{\\frac12} so \\boxed{0.5}", "1/2", 1.0),  # the same value twice is not a hedge
    # too large to evaluate: scored 0.0 at once instead of hanging in sympy
    ("\\boxed{10^{10^{10}}}", "1", 0.0),
    ("\\boxed{2^{2^{2^{2^{2^{2}}}}}}", "2", 0.0),
    ("\\boxed{100000!}", "1", 0.0),
    ("\\boxed{\\prod_{k=1}^{10^{9}} k}", "1", 0.0),
    ("\\boxed{10^{10^{10}}} then \\boxed{1}", "1", 0.0),
    ("\\boxed{1} then \\boxed{10^{10^{10}}}", "1", 0.0),
    ("\\boxed{2^{100}}", "1267650600228229401496703205376", 1.0),
    # rows math-verify cannot grade are not scored
    ("\\boxed{2}", None, None),
    ("\\boxed{2}", "\\boxed{}", None),
]


@pytest.mark.parametrize(("completion", "truth", "expected"), MATH_CASES)
def test_math_accuracy(completion, truth, expected):
    assert timed_score(math_accuracy, completion, truth) == expected


def test_math_accuracy_reads_the_configured_answer_tag():
    assert score(math_accuracy, "<final>2</final> <answer>3</answer>", "2", answer_tag="final") == 1.0


def _slow_polynomial(power: int) -> str:
    """`(x+y+z)^power` written out term by term: a correct answer that takes seconds to parse at power 12."""
    x, y, z = sympy.symbols("x y z")
    return sympy.latex(sympy.expand((x + y + z) ** power))


def test_math_accuracy_sample_past_its_timeout_scores_zero():
    truth = "(x+y+z)^{12}"
    assert score(math_accuracy, f"\\boxed{{{_slow_polynomial(3)}}}", "(x+y+z)^{3}") == 1.0
    slow = f"\\boxed{{{_slow_polynomial(12)}}}"
    with no_hang(10):  # the slow sample alone takes far longer
        assert math_accuracy(completions=[slow, "\\boxed{2}"], answer=[truth, "2"], timeout=0.2) == [0.0, 1.0]
    assert score(math_accuracy, "\\boxed{\\frac{1}{2}}", "1/2", timeout=1e-6) == 0.0
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no timer left behind


def test_math_accuracy_keeps_the_callers_time_limit():
    slow = f"\\boxed{{{_slow_polynomial(12)}}}"
    # The caller's shorter limit ends the whole call, not just the sample.
    with no_hang(10), pytest.raises(RewardTimeout, match="caller"), time_limit(0.3, what="caller"):
        math_accuracy(completions=[slow], answer=["(x+y+z)^{12}"], timeout=5.0)
    # A per-sample limit nested in a longer one leaves the outer one running.
    with time_limit(30):
        assert math_accuracy(completions=[slow], answer=["(x+y+z)^{12}"], timeout=0.1) == [0.0]
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 20


def test_math_accuracy_huge_box_is_cut_off_by_the_timeout():
    # Unlimited, math-verify spends ~25 s on this box (2 CPU cores); the per-sample limit stops it.
    assert timed_score(math_accuracy, "\\boxed{" + "1 " * 50_000 + "}", "1", timeout=0.5) == 0.0


def test_math_accuracy_off_the_main_thread_runs_without_a_limit():
    scores = []
    worker = threading.Thread(target=lambda: scores.append(score(math_accuracy, "\\boxed{0.5}", "1/2")))
    worker.start()
    worker.join()
    assert scores == [1.0]


def test_math_accuracy_does_not_warn_that_math_verify_has_no_timeout(caplog):
    with caplog.at_level(logging.WARNING):
        score(math_accuracy, "\\boxed{2}", "2")
    assert not [record for record in caplog.records if "Timeout is disabled" in record.getMessage()]


def test_math_accuracy_rejects_a_bad_timeout():
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        score(math_accuracy, "\\boxed{2}", "2", timeout=0)


# --- numeric_accuracy ------------------------------------------------------------------------------------------

NUMERIC_CASES = [
    ("<answer>42</answer>", "42", 1.0),
    ("1,200 m", "1200", 1.0),
    ("<answer>3/4</answer>", "0.75", 1.0),
    ("The answer is 3/4.", "0.75", 1.0),
    ("<answer>$12.50</answer>", "12.5", 1.0),
    ("<answer>-3 °C</answer>", "-3", 1.0),
    ("1e3", "1000", 1.0),
    ("50%", "50%", 1.0),
    ("<answer>4, that is 4.0</answer>", "4", 1.0),  # one value, written twice
    ("41", "42", 0.0),
    ("3.14", "3.14159", 0.0),
    ("", "42", 0.0),
    ("<answer></answer>", "42", 0.0),
    ("<answer>forty-two</answer>", "42", 0.0),
    ("<answer>4 2</answer>", "42", 0.0),
    ("<answer>４２ €</answer>", "42", 1.0),
    (LONG + "<answer>42</answer>", "42", 1.0),
    ("3 or 4", "4", 0.0),
    ("<answer>3, 4</answer>", "4", 0.0),
    ("<answer>3-4</answer>", "4", 0.0),
    ("maybe 4", "4", 0.0),
    ("4?", "4", 0.0),
    ("<answer>12 (3 x 4)</answer>", "12", 0.0),
    ("1" * 5_000 + "/2", "1", 0.0),
    ("42", None, None),
]


@pytest.mark.parametrize(("completion", "truth", "expected"), NUMERIC_CASES)
def test_numeric_accuracy(completion, truth, expected):
    assert timed_score(numeric_accuracy, completion, truth) == expected


def test_numeric_accuracy_tolerances():
    assert score(numeric_accuracy, "3.14", "3.14159", rel_tol=0.01) == 1.0
    assert score(numeric_accuracy, "0.001", "0", abs_tol=0.01) == 1.0
    assert score(numeric_accuracy, "0.001", "0", rel_tol=0.5) == 0.0  # relative tolerance is nothing around 0


@pytest.mark.parametrize(
    ("truth", "kwargs", "message"),
    [
        ("blue", {}, "exactly one number"),
        ("3 or 4", {}, "exactly one number"),
        ("3", {"rel_tol": -0.1}, "rel_tol must be"),
        ("3", {"abs_tol": float("nan")}, "abs_tol must be"),
    ],
)
def test_numeric_accuracy_errors(truth, kwargs, message):
    with pytest.raises(ValueError, match=message):
        score(numeric_accuracy, "3", truth, **kwargs)


# --- choice_accuracy -------------------------------------------------------------------------------------------

CHOICE_CASES = [
    ("B", "B", 1.0),
    ("(B)", "B", 1.0),
    ("B.", "B", 1.0),
    ("The answer is B", "B", 1.0),
    ("B) cat", "B", 1.0),
    ("<answer>b</answer>", "B", 1.0),
    ("Answer: **C**", "C", 1.0),
    ("The answer is (B), not A", "(B)", 1.0),
    ("C", "B", 0.0),
    ("", "B", 0.0),
    ("<answer></answer>", "B", 0.0),
    ("<answer>F</answer>", "B", 0.0),
    ("<answer>ABCDE</answer>", "B", 0.0),
    ("Ｂ", "B", 1.0),
    ("答案是 (B)", "B", 1.0),
    (LONG + "<answer>B</answer>", "B", 1.0),
    ("A or B", "B", 0.0),
    ("A, B", "B", 0.0),
    ("(A) (B)", "B", 0.0),
    ("A B C D E", "B", 0.0),
    ("maybe B", "B", 0.0),
    ("B?", "B", 0.0),
    ("B", None, None),
]


@pytest.mark.parametrize(("completion", "truth", "expected"), CHOICE_CASES)
def test_choice_accuracy(completion, truth, expected):
    assert timed_score(choice_accuracy, completion, truth) == expected


def test_choice_accuracy_with_other_letters():
    assert score(choice_accuracy, "(3)", "3", letters="1234") == 1.0
    assert score(choice_accuracy, "F", "F", letters="ABCDEF") == 1.0
    with pytest.raises(ValueError, match="must name one of the letters 'ABCD'.*Set the `letters` keyword"):
        score(choice_accuracy, "E", "E", letters="ABCD")
    with pytest.raises(ValueError, match="letters must be distinct letters"):
        score(choice_accuracy, "A", "A", letters="AAB")
    # A dataset column named `choices` (common in multiple-choice data) is just another column.
    assert choice_accuracy(completions=["(B) dog"], answer=["B"], choices=[["cat", "dog"]]) == [1.0]


# --- yes_no_accuracy -------------------------------------------------------------------------------------------

YES_NO_CASES = [
    ("Yes", "yes", 1.0),
    ("<answer>no.</answer>", "No", 1.0),
    ("True", "yes", 1.0),
    ("false", "no", 1.0),
    ("Yes, the cup is red.", "yes", 1.0),
    ("no", "yes", 0.0),
    ("", "yes", 0.0),
    ("<answer>yesno</answer>", "yes", 0.0),
    ("ＹＥＳ！", "yes", 1.0),
    (LONG + "<answer>yes</answer>", "yes", 1.0),
    ("yes or no", "yes", 0.0),
    ("Yes. No.", "no", 0.0),
    ("maybe yes", "yes", 0.0),
    ("yes?", "yes", 0.0),
    ("yes", None, None),
]


@pytest.mark.parametrize(("completion", "truth", "expected"), YES_NO_CASES)
def test_yes_no_accuracy(completion, truth, expected):
    assert timed_score(yes_no_accuracy, completion, truth) == expected


def test_yes_no_accuracy_needs_a_yes_or_no_ground_truth():
    with pytest.raises(ValueError, match="must say yes/true or no/false, got 'blue'"):
        score(yes_no_accuracy, "yes", "blue")


# --- counting_accuracy -----------------------------------------------------------------------------------------

COUNTING_CASES = [
    ("3", "3", 1.0),
    ("three", "3", 1.0),
    ("3 apples", "3", 1.0),
    ("There are 3 cats.", "three", 1.0),
    ("<answer>Twenty-one</answer>", "21", 1.0),
    ("twenty one birds", "21", 1.0),
    ("seventeen", "17", 1.0),
    ("<answer>none</answer>", "0", 1.0),
    ("1,000", "1000", 1.0),
    ("three (3)", "3", 1.0),  # one count, written twice
    ("4", "3", 0.0),
    ("3.5", "3", 0.0),
    ("", "3", 0.0),
    ("<answer>a few</answer>", "3", 0.0),
    ("３ 只猫", "3", 1.0),
    (LONG + "<answer>3</answer>", "3", 1.0),
    ("3 or 4", "3", 0.0),
    ("3-4 cats", "3", 0.0),
    ("3 cats and 2 dogs", "3", 0.0),
    ("maybe 3", "3", 0.0),
    ("3", None, None),
]


@pytest.mark.parametrize(("completion", "truth", "expected"), COUNTING_CASES)
def test_counting_accuracy(completion, truth, expected):
    assert timed_score(counting_accuracy, completion, truth) == expected


@pytest.mark.parametrize("truth", ["3.5", "-1", "many", "3 or 4"])
def test_counting_accuracy_needs_a_whole_count(truth):
    with pytest.raises(ValueError, match="whole, non-negative count"):
        score(counting_accuracy, "3", truth)


# --- ocr_similarity --------------------------------------------------------------------------------------------

OCR_CASES = [
    ("hello world", "hello world", {}, 1.0),
    ("<answer>hello world</answer>", "hello world", {}, 1.0),
    ("hello wrld", "hello world", {}, 1 - 1 / 11),
    ("xyz", "abc", {}, 0.0),
    ("", "abc", {}, 0.0),
    ("<answer>abc", "abc", {}, 1 - 8 / 11),
    ("HELLO", "hello", {}, 0.0),
    ("HELLO", "hello", {"ignore_case": True}, 1.0),
    ("hello   world", "hello world", {}, 1 - 2 / 13),
    ("hello \n world", "hello world", {"ignore_whitespace": True}, 1.0),
    ("ﬁnance", "finance", {}, 1.0),
    ("ＡＢＣ", "ABC", {}, 1.0),
    ("cafe\u0301", "café", {}, 1.0),
    ("abc abc abc abc", "abc", {}, 0.2),  # repeating the text does not pay
    (LONG, "abc", {}, pytest.approx(0.0, abs=1e-4)),
    ("abc", None, {}, None),
]


@pytest.mark.parametrize(("completion", "truth", "kwargs", "expected"), OCR_CASES)
def test_ocr_similarity(completion, truth, kwargs, expected):
    expected = pytest.approx(expected) if isinstance(expected, float) else expected
    assert timed_score(ocr_similarity, completion, truth, **kwargs) == expected


def test_ocr_similarity_is_fast_on_two_long_texts():
    page = "The quick brown fox jumps over the lazy dog. " * 2_000  # 90k characters
    assert timed_score(ocr_similarity, page.replace("fox", "cat"), page) == pytest.approx(1 - 6_000 / len(page))


# --- overlong_penalty ------------------------------------------------------------------------------------------


def penalties(reward, lengths_or_ids: list, **kwargs) -> list[float]:
    ids = [list(range(item)) if isinstance(item, int) else item for item in lengths_or_ids]
    return reward(prompts=["q"] * len(ids), completions=["…"] * len(ids), completion_ids=ids, **kwargs)


def test_overlong_penalty_is_zero_then_linear_to_minus_one():
    scores = penalties(overlong_penalty, [0, 80, 90, 95, 100, 150], max_length=100, cache_length=20)
    assert scores == [0.0, 0.0, -0.5, -0.75, -1.0, -1.0]
    # The cache defaults to a fifth of max_length, DAPO's ratio.
    assert penalties(overlong_penalty, [80, 90], max_length=100) == [0.0, -0.5]
    assert penalties(overlong_penalty, [1_000_000], max_length=100) == [-1.0]
    # In training, VLMGRPOTrainer passes its max_completion_length; an explicit max_length wins.
    assert penalties(overlong_penalty, [80, 90], max_completion_length=100) == [0.0, -0.5]
    assert penalties(overlong_penalty, [80], max_length=50, max_completion_length=100) == [-1.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs `max_length`"),
        ({"max_length": 0}, "max_length must be a positive"),
        ({"max_length": 100, "cache_length": 0}, "cache_length must be"),
        ({"max_length": 100, "cache_length": 101}, "cache_length must be"),
    ],
)
def test_overlong_penalty_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        penalties(overlong_penalty, [10], **kwargs)


def test_overlong_penalty_needs_token_ids():
    with pytest.raises(ValueError, match="needs `completion_ids`"):
        overlong_penalty(prompts=["q"], completions=["text"], max_length=10)


# --- repetition_penalty ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "kwargs", "expected"),
    [
        ("the cat sat on the mat", {}, 0.0),
        ("", {}, 0.0),
        ("too short", {}, 0.0),
        ("a a a a", {"ngram_size": 1}, -0.75),
        ("a a a a", {"ngram_size": 1, "max_penalty": -0.5}, -0.375),
        ("猫 猫 猫 猫", {"ngram_size": 1}, -0.75),
        ("the cat " * 50, {}, pytest.approx(-(1 - 2 / 98))),  # repeated text is penalised almost fully
        ("<think>" + "I am not sure. " * 20_000 + "</think>", {}, pytest.approx(-1.0, abs=1e-3)),
    ],
)
def test_repetition_penalty_over_words(completion, kwargs, expected):
    assert timed_score(repetition_penalty, completion, **kwargs) == expected


def test_repetition_penalty_prefers_token_ids():
    # ids (1,2,3,1,2,3) hold four 3-grams, one of them a repeat; the text itself does not repeat.
    assert penalties(repetition_penalty, [[1, 2, 3, 1, 2, 3]]) == [-0.25]
    assert penalties(repetition_penalty, [list(range(200_000)), [7] * 200_000]) == [0.0, pytest.approx(-1.0, abs=1e-4)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"ngram_size": 0}, "ngram_size must be"), ({"max_penalty": 1.0}, "max_penalty must be a finite number <= 0")],
)
def test_repetition_penalty_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        score(repetition_penalty, "a b c", **kwargs)
