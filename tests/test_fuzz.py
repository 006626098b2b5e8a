"""Bad input, fuzzed: dataset rows and reward outputs drawn by hypothesis, through the real loader, processor, guard.

Each example either works or fails with an error that names the row (file and line) or the reward; under
`bad_rows: skip` and the default `reward_error_policy`, the bad parts are counted and the rest goes on. What
each example must do is worked out from how it was drawn, not from the code under test. A few one-step
trainings with the tiny model then run the worst of it through the real trainer.
"""

import json
import math
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import no_hang, small_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_data_training import run_recipe, skipped_reasons

from vlm_rl.config import DataArguments
from vlm_rl.data import DataError, load_task
from vlm_rl.models import build_tiny_model, load_model_and_processor
from vlm_rl.rewards import ConfiguredReward, RewardError
from vlm_rl.trainers import VLMGRPOTrainer
from vlm_rl.trainers.vlm_options import VLMOptions


def fuzz(max_examples: int):
    """Reproducible (a fixed seed, no example database) and bounded, so the file runs in the default suite."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Image files, written once. A good one decodes to RGB with a known size and top-left pixel; a bad one gives its
# row the reason it is skipped for. `thin.png` (1x300) decodes, but Qwen-VL's processor refuses aspect ratios
# over 200; `missing.png` is never written.
GOOD_IMAGES: dict[str, tuple[tuple[int, int], tuple[int, int, int]]] = {
    "rgb.png": ((24, 16), (10, 20, 30)),
    "pixel.png": ((1, 1), (7, 8, 9)),
    "huge.png": ((5000, 4000), (10, 200, 30)),
    "cmyk.jpg": ((12, 10), (255, 0, 255)),
    "rgba.png": ((9, 7), (0, 0, 255)),  # alpha dropped
    "gray.png": ((8, 8), (100, 100, 100)),
    "palette.png": ((8, 6), (200, 30, 40)),
    "gray16.png": ((8, 4), (0x12, 0x12, 0x12)),  # 16-bit 0x1234, scaled to 8 bits rather than clipped to 255
}
BAD_IMAGES = {
    "empty.png": "corrupt_image",  # 0 bytes
    "text.png": "corrupt_image",  # not an image
    "truncated.png": "corrupt_image",  # a PNG cut short
    "thin.png": "processor_error",
    "missing.png": "missing_image",
}
IMAGE_NAMES = sorted(GOOD_IMAGES) + sorted(BAD_IMAGES)
FAMILY = "qwen2_vl"
IMAGE_TOKEN = "<|image_pad|>"  # Qwen-VL's placeholder: in a question of an image row, the counts no longer match
HUGE_QUESTION = "Count the words. " * 3000  # ~12k tokens
MAX_PROMPT_LENGTH = 1000  # any other drawn row fits: 40 characters of text and three images


def write_images(directory: Path) -> None:
    Image.new("RGB", (24, 16), (10, 20, 30)).save(directory / "rgb.png")
    Image.new("RGB", (1, 1), (7, 8, 9)).save(directory / "pixel.png")
    Image.new("RGB", (5000, 4000), (10, 200, 30)).save(directory / "huge.png")
    Image.new("CMYK", (12, 10), (0, 255, 0, 0)).save(directory / "cmyk.jpg")
    Image.new("RGBA", (9, 7), (0, 0, 255, 128)).save(directory / "rgba.png")
    Image.new("L", (8, 8), 100).save(directory / "gray.png")
    palette = Image.new("P", (8, 6), 3)
    palette.putpalette([0, 0, 0] * 3 + [200, 30, 40] + [0, 0, 0] * 252)
    palette.save(directory / "palette.png")
    samples = np.full((4, 8), 0x1234, dtype=np.uint16)
    samples[:, 4:] = 0xFFFF
    Image.fromarray(samples).save(directory / "gray16.png")
    assert Image.open(directory / "gray16.png").mode == "I;16"
    (directory / "empty.png").write_bytes(b"")
    (directory / "text.png").write_bytes(b"just some text, not an image\n")
    (directory / "truncated.png").write_bytes((directory / "rgb.png").read_bytes()[:40])
    Image.new("RGB", (1, 300), "white").save(directory / "thin.png")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Images, a tiny model of the family whose processor the rows go through, and room for each example."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "images").mkdir()
    write_images(root / "images")
    model_dir = build_tiny_model(FAMILY, root / FAMILY)
    _, processor = load_model_and_processor(str(model_dir), dtype="float32")
    return {"root": root, "images": root / "images", "model": model_dir, "processor": processor}


def check_images(images: list, names: list[str]) -> None:
    assert len(images) == len(names)
    for image, name in zip(images, names, strict=True):
        size, pixel = GOOD_IMAGES[name]
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == size, name
        got = image.getpixel((0, 0))
        assert all(abs(a - b) <= 3 for a, b in zip(got, pixel, strict=True)), (name, got, pixel)  # 3: JPEG


# --- Rows: every kind of bad row and image file, with an exact expectation -------------------------------------


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()  # a key left out of the row
UNREADABLE = ['{"question": "cut off', "[1, 2]", "7", '"just text"', b'{"question": "\xff\xfe"}']
FRAGMENTS = {
    "unreadable_row": r"(not valid JSON|expected a JSON object|not valid UTF-8)",
    "missing_value": r"column 'question' is empty",
    "missing_image": r"image '.*' not found",
    "corrupt_image": r"image '.*' cannot be decoded",
    "processor_error": r"the processor cannot take this row",
    "prompt_too_long": r"over max_prompt_length=",
}
UP_FRONT = ("unreadable_row", "missing_value", "missing_image")


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, drawn in proportion to its weight."""
    return st.sampled_from([strategy for weight, strategy in choices for _ in range(weight)]).flatmap(lambda s: s)


# Weighted towards good values, so that most examples mix good rows with a few bad ones.
questions = weighted(
    (8, st.text(max_size=40)),
    (1, st.sampled_from([None, ABSENT])),
    (1, st.sampled_from([HUGE_QUESTION, f"Look: {IMAGE_TOKEN}"])),
)
image_refs = weighted(
    (2, st.sampled_from([ABSENT, None, "", []])),
    (4, st.sampled_from(sorted(GOOD_IMAGES))),
    (2, st.sampled_from(IMAGE_NAMES)),
    (2, st.lists(st.sampled_from([*IMAGE_NAMES, ""]), min_size=1, max_size=3)),
)
lines = st.lists(
    weighted(
        (8, st.tuples(st.just("row"), questions, image_refs)),
        (1, st.tuples(st.just("raw"), st.sampled_from(UNREADABLE), st.none())),
        (1, st.tuples(st.just("blank"), st.none(), st.none())),
    ),
    min_size=1,
    max_size=7,
)


@dataclass
class Line:
    number: int
    reason: str | None  # None: a good row
    question: Any = None
    images: tuple[str, ...] = ()

    @property
    def answer(self) -> str:
        return f"line {self.number}"


def refs_of(image: Any) -> list[str]:
    """What the loader makes of a JSON Lines image value: a scalar "" or null is no image, a list is kept."""
    return [] if image in (ABSENT, None, "") else image if isinstance(image, list) else [image]


def reason_of(question: Any, refs: list[str], max_prompt_length: int | None) -> str | None:
    """Why the row is bad, in the order the loader looks: up-front checks, then images in order, then the processor."""
    if question in (None, ABSENT):
        return "missing_value"
    if any(ref in ("", "missing.png") for ref in refs):
        return "missing_image"
    if any(BAD_IMAGES.get(ref) == "corrupt_image" for ref in refs):
        return "corrupt_image"
    if "thin.png" in refs or (IMAGE_TOKEN in question and refs):
        return "processor_error"
    if question == HUGE_QUESTION and max_prompt_length is not None:
        return "prompt_too_long"
    return None


def write_lines(path: Path, drawn: list, max_prompt_length: int | None) -> list[Line]:
    raw, written = [], []
    for kind, question, image in drawn:
        if kind == "blank":
            raw.append(b"")
            continue
        number = len(raw) + 1
        if kind == "raw":
            raw.append(question if isinstance(question, bytes) else question.encode())
            written.append(Line(number, "unreadable_row"))
            continue
        row = {"answer": f"line {number}"}
        if question is not ABSENT:
            row["question"] = question
        if image is not ABSENT:
            row["image"] = image
        raw.append(json.dumps(row).encode())
        refs = refs_of(image)
        written.append(Line(number, reason_of(question, refs, max_prompt_length), question, tuple(refs)))
    path.write_bytes(b"\n".join(raw) + b"\n")
    return written


def check_loaded(row: dict, line: Line) -> None:
    assert row["answer"] == line.answer
    assert row["prompt"] == [{"role": "user", "content": line.question}]
    check_images(row["images"], list(line.images))


@fuzz(max_examples=100)
@given(drawn=lines, bad_rows=st.sampled_from(["raise", "skip"]), limit=st.sampled_from([None, MAX_PROMPT_LENGTH]))
def test_bad_rows_are_named_or_skipped_and_counted_and_good_rows_load_intact(workdir, drawn, bad_rows, limit):
    with tempfile.TemporaryDirectory(dir=workdir["root"]) as directory, no_hang(120):
        path = Path(directory) / "d.jsonl"
        written = write_lines(path, drawn, limit)
        args = DataArguments(
            dataset=str(path),
            prompt_template="{question}",
            image_root=str(workdir["images"]),
            bad_rows=bad_rows,
            max_prompt_length=limit,
        )
        rows = [line for line in written if line.reason != "unreadable_row"]
        survivors = [line for line in rows if line.reason not in UP_FRONT]

        def named(line: Line) -> str:
            return rf"{re.escape(str(path))} line {line.number}: .*{FRAGMENTS[line.reason]}"

        # Errors before training: the first unreadable line, then the data as a whole, then the first row with a
        # value or an image file missing.
        error = None
        if bad_rows == "raise" and len(rows) < len(written):
            error = named(next(w for w in written if w.reason == "unreadable_row"))
        elif not rows:
            error = rf"{re.escape(str(path))}: no rows\."
        elif all(line.question is ABSENT for line in rows):
            error = r"prompt_template uses \{question\}, but there is no column"
        elif bad_rows == "raise" and len(survivors) < len(rows):
            error = named(next(r for r in rows if r.reason in UP_FRONT))
        elif not survivors:
            error = r"no train rows to use\. Skipped"
        if error is not None:
            with pytest.raises(DataError, match=error):
                load_task(args, seed=0)
            return

        task = load_task(args, seed=0)
        task.attach_processor(workdir["processor"])  # as a run does: rows go through the processor when loaded
        assert len(task.train) == len(survivors)
        positions = [p for p in range(len(survivors)) for _ in range(2)]  # as TRL's sampler asks: each index twice
        good = [p for p, line in enumerate(survivors) if line.reason is None]
        if bad_rows == "raise" and len(good) < len(survivors):
            with pytest.raises(DataError, match=named(next(s for s in survivors if s.reason is not None))):
                task.train.__getitems__(positions)
            return
        if not good:
            with pytest.raises(DataError, match=r"every train row is bad\. Skipped"):
                task.train.__getitems__(positions)
            return
        loaded = task.train.__getitems__(positions)
        for index, position in enumerate(positions):
            # A bad row is replaced by the next good row of the split, wrapping around.
            replacement = min((p for p in good if p >= position), default=good[0])
            check_loaded(loaded[index], survivors[replacement])
        expected = Counter(line.reason for line in written if line.reason is not None)
        assert task.skipped_train.counts == expected


@pytest.mark.parametrize(
    ("name", "data", "skipped"),
    [
        ("d.jsonl", b'{"question": "a"}\n\n{"question": "\xff\xfe"}\n{"question": "b"}\n', True),
        ("d.csv", b"question\na\n\xff\xfe\nb\n", True),
        ("d.json", b'[\n{"question": "a"},\n{"question": "\xff\xfe"},\n{"question": "b"}\n]\n', False),
    ],
)
def test_bytes_that_are_not_utf8_name_their_line_in_every_text_format(tmp_path, name, data, skipped):
    (tmp_path / name).write_bytes(data)
    args = {"dataset": str(tmp_path / name), "prompt_template": "{question}"}
    with pytest.raises(DataError, match=rf"{name} line 3: not valid UTF-8 text"):
        load_task(DataArguments(**args), seed=0)
    if skipped:  # a line of a text file can be skipped; a JSON array can only be fixed
        task = load_task(DataArguments(**args, bad_rows="skip"), seed=0)
        assert [row["question"] for row in task.train] == ["a", "b"]
        assert task.skipped_train.counts == {"unreadable_row": 1}


# --- Rows: any JSON value in any column ----------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**80), max_value=2**80),  # beyond int64 too
        st.floats(),  # NaN and infinities included: Python's json writes and reads them
        st.text(max_size=8),
        st.sampled_from(["rgb.png", "missing.png", "thin.png", "\ud800", "user", "system", "assistant"]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from(["role", "content", "path", "bytes", "x"]), children, max_size=3),
    ),
    max_leaves=6,
)
names = st.sampled_from(["rgb.png", "gray16.png", "missing.png", "thin.png", "empty.png", ""])
# Per column, one kind of value for every row (else nearly every example would stop at a column mixing types),
# or any JSON value at all.
COLUMN_KINDS = {
    "text": st.text(max_size=8),
    "odd text": st.sampled_from(["\ud800", "\x00", "{question}", "", " ", IMAGE_TOKEN]),
    "integer": st.integers(min_value=-(2**80), max_value=2**80),
    "float": st.floats(),
    "boolean": st.booleans(),
    "image name": names,
    "image names": st.lists(names, max_size=3),
    "image object": st.fixed_dictionaries({}, optional={"path": names, "bytes": st.none(), "x": st.integers()}),
    "conversation": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", ""]), "content": st.text(max_size=8)},
            optional={"x": st.integers()},
        ),
        max_size=3,
    ),
    "anything": json_values,
}
# The kinds each column is drawn from; None: the column is left out of every row.
COLUMNS = {
    "question": ["text", "text", "odd text", "integer", "float", "boolean", "anything"],
    "prompt": [None, None, "conversation", "conversation", "text", "odd text", "anything"],
    "image": [None, "image name", "image names", "image object", "anything"],
    "answer": [None, "text", "anything"],
}
# Problems with a whole column, named by file and column rather than row (docs/data.md, "Bad rows").
WHOLE_DATA = (
    r"no rows\.",
    r"no train rows to use\.",
    r"every train row is bad\.",
    r"column 'image' holds ",
    r"column 'prompt' must hold strings or conversations",
    r"column 'prompt' already holds conversations",
    r"no 'prompt' column, and the recipe sets no prompt_template",
    r"prompt_template uses \{question\}, but there is no column",
)


def check_error(error: DataError, path: Path, num_lines: int) -> None:
    """A data error starts with the file and names the line, or is one about the data as a whole."""
    message = str(error)
    assert message.startswith(str(path)), message
    line = re.match(rf"{re.escape(str(path))} line (\d+): ", message)
    if line is not None:
        assert 1 <= int(line.group(1)) <= num_lines, message
    else:
        assert any(re.search(pattern, message) for pattern in WHOLE_DATA), message


@fuzz(max_examples=200)
@given(data=st.data(), bad_rows=st.sampled_from(["raise", "skip"]))
def test_any_json_value_in_any_column_loads_or_names_the_row(workdir, data, bad_rows):
    kinds = {column: data.draw(st.sampled_from(choices), label=column) for column, choices in COLUMNS.items()}
    template = None if kinds["prompt"] is not None and data.draw(st.booleans(), label="no template") else "{question}"
    values = {
        column: weighted((4, COLUMN_KINDS[kind]), (1, st.none())) for column, kind in kinds.items() if kind is not None
    }
    row = st.fixed_dictionaries({}, optional=values)
    drawn = data.draw(st.lists(row, min_size=1, max_size=5), label="rows")
    with tempfile.TemporaryDirectory(dir=workdir["root"]) as directory, no_hang(120):
        path = Path(directory) / "d.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in drawn))
        args = DataArguments(
            dataset=str(path), prompt_template=template, image_root=str(workdir["images"]), bad_rows=bad_rows
        )
        try:
            task = load_task(args, seed=0)
            task.attach_processor(workdir["processor"])
            loaded = task.train.__getitems__(list(range(len(task.train))))
        except DataError as error:
            check_error(error, path, len(drawn))
            return
        for row in loaded:  # what the trainer gets: a conversation of text messages and RGB images
            assert row["prompt"] and all(
                message["role"] in ("system", "user", "assistant") and isinstance(message["content"], str)
                for message in row["prompt"]
            )
            assert all(isinstance(image, Image.Image) and image.mode == "RGB" for image in row["images"])


# --- Rewards: whatever a reward returns or raises ------------------------------------------------------------------

FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Score:
    """A value a reward returns for one sample, made afresh for each call, and what the guard must make of it:
    a float, None (not scored, not a failure), or the failure kind."""

    make: Any
    expect: float | str | None


def number(value: Any, exact: float | int | Fraction) -> Score:
    """A number whose exact value is `exact`: a score if it is finite within float32 (TRL's reward dtype)."""
    try:
        as_float = float(exact)
    except OverflowError:
        return Score(lambda: value, "nonfinite")
    ok = math.isfinite(as_float) and abs(as_float) <= FLOAT32_MAX
    return Score(lambda: value, as_float if ok else "nonfinite")


def float32(x: float) -> np.float32:
    with np.errstate(over="ignore"):
        return np.float32(x)


numbers_ = st.one_of(
    st.floats().map(lambda x: number(x, x)),
    st.integers(min_value=-(10**400), max_value=10**400).map(lambda n: number(n, n)),
    st.booleans().map(lambda b: number(b, b)),
    st.fractions(max_denominator=1000).map(lambda q: number(q, q)),
    st.floats().map(lambda x: number(np.float64(x), x)),
    st.floats().map(lambda x: number(float32(x), float(float32(x)))),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(lambda n: number(np.int64(n), n)),
    st.floats(width=32).map(lambda x: number(torch.tensor(x), x)),  # 0-d
    st.floats(width=32).map(lambda x: number(torch.tensor([x]), x)),  # one element
    st.floats().map(lambda x: number(np.array(x), x)),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e39, -(10**400)]).map(lambda x: number(x, x)),
    st.sampled_from([math.nan, -math.inf]).map(lambda x: number(torch.tensor(x), x)),
)
JUNK_FACTORIES = [
    lambda: torch.ones(2),
    lambda: torch.tensor([]),
    lambda: np.zeros(3),
    lambda: (x for x in [1.0]),
    lambda: 1 + 2j,
    lambda: np.complex128(1 + 1j),
    lambda: Decimal("0.5"),
    lambda: np.str_("1"),
    lambda: torch.empty((), device="meta"),
    lambda: object(),
    lambda: "x" * 1_000_000,  # must not flood the log
]
junk = st.one_of(
    st.one_of(st.text(max_size=5), st.sampled_from(["1.0", "nan", "inf"]), st.binary(max_size=4)).map(
        lambda v: Score(lambda: v, "error")
    ),
    st.lists(st.floats(), max_size=2).map(lambda v: Score(lambda: list(v), "error")),  # nested list
    st.dictionaries(st.text(max_size=2), st.floats(), max_size=2).map(lambda v: Score(lambda: dict(v), "error")),
    st.sampled_from(JUNK_FACTORIES).map(lambda make: Score(make, "error")),
)
scores = weighted((3, numbers_), (1, junk), (1, st.just(Score(lambda: None, None))))
EXCEPTIONS = [
    ValueError("cannot parse"),
    ZeroDivisionError(),
    KeyError("answer"),
    TypeError(None),
    RuntimeError(b"\xff bytes"),
    OSError(2, "judge unreachable"),
    Exception("x" * 100_000),
]
NOT_A_LIST = {  # whole returns that are no list of scores: a broken contract, whatever the policy
    "None": lambda n: None,
    "a float": lambda n: 1.0,
    "a string": lambda n: "1.0" * n,
    "a dict": lambda n: dict.fromkeys(range(n), 1.0),
    "a tensor": lambda n: torch.ones(n),
    "an array": lambda n: np.ones(n),
    "a generator": lambda n: (1.0 for _ in range(n)),
    "a set": lambda n: set(range(n)),
}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """A trainer config per `reward_error_policy`, for the trainer's own guard (`VLMGRPOTrainer._guarded`)."""
    root = tmp_path_factory.mktemp("reward_configs")
    return {policy: small_config(root / policy, reward_error_policy=policy) for policy in ("none", "zero", "raise")}


@fuzz(max_examples=300)
@given(data=st.data(), policy=st.sampled_from(["none", "zero", "raise"]), is_async=st.booleans())
def test_whatever_a_reward_returns_comes_out_as_scores_counted_failures_or_an_error_naming_it(
    configs, data, policy, is_async
):
    num_samples = data.draw(st.integers(min_value=1, max_value=6), label="num_samples")
    tasks = data.draw(st.lists(st.sampled_from(["a", "b"]), min_size=num_samples, max_size=num_samples))
    routed_to = data.draw(st.sampled_from([None, ["a"]]), label="reward tasks")
    routed = [i for i in range(num_samples) if routed_to is None or tasks[i] in routed_to]
    shape = data.draw(st.sampled_from(["scores", "scores", "wrong length", "not a list"]), label="returns")
    planned = data.draw(st.lists(scores, min_size=num_samples, max_size=num_samples), label="scores")
    raising = data.draw(
        weighted((3, st.just(frozenset())), (1, st.frozensets(st.sampled_from(range(num_samples))))),
        label="samples that raise",
    )
    exception = data.draw(st.sampled_from(EXCEPTIONS), label="exception")
    length = data.draw(st.integers(min_value=0, max_value=len(routed) + 2).map(lambda k: k + (k >= len(routed))))
    not_a_list = data.draw(st.sampled_from(sorted(NOT_A_LIST)), label="not a list")

    def fuzzed_reward(prompts, completions, **kwargs):
        samples = [int(completion[0]["content"]) for completion in completions]
        if shape == "wrong length":
            return [0.5] * length
        if shape == "not a list":
            return NOT_A_LIST[not_a_list](len(samples))
        if raising & set(samples):
            raise exception
        return [planned[sample].make() for sample in samples]

    async def async_reward(prompts, completions, **kwargs):
        return fuzzed_reward(prompts, completions, **kwargs)

    func = async_reward if is_async else fuzzed_reward
    if routed_to is None and data.draw(st.booleans(), label="through the trainer's guard"):
        reward = VLMGRPOTrainer._guarded(func, VLMOptions.from_args(configs[policy]))
    else:
        reward = ConfiguredReward(func, name=func.__name__, tasks=routed_to, error_policy=policy)
    name = re.escape(func.__name__)
    batch = {
        "prompts": [[{"role": "user", "content": f"q{i}"}] for i in range(num_samples)],
        "completions": [[{"role": "assistant", "content": str(i)}] for i in range(num_samples)],
        "task": tasks,
    }

    if routed and shape != "scores":
        with pytest.raises(RewardError, match=rf"^Reward '{name}' returned .* for {len(routed)} completions; it must"):
            reward(**batch)
        return
    expected: list[float | None] = [None] * num_samples
    failures: Counter[str] = Counter()
    first_failure = None
    for i in routed:
        kind = "error" if i in raising else planned[i].expect
        if kind is None or isinstance(kind, float):
            expected[i] = kind
            continue
        failures[kind] += 1
        first_failure = first_failure or (i, kind)
        expected[i] = 0.0 if policy == "zero" else None
    if policy == "raise" and first_failure is not None:
        sample, kind = first_failure
        with pytest.raises(RewardError, match=rf"^Reward '{name}' failed on sample {sample} .*\[{kind}\]"):
            reward(**batch)
        return
    assert reward(**batch) == expected
    assert reward.failures == failures


# --- One step of the real trainer -----------------------------------------------------------------------------------


def test_a_file_of_every_bad_row_kind_trains_one_step_under_skip_and_counts_each(workdir, tmp_path):
    good = [["rgb.png"], ["pixel.png"], ["huge.png"], ["cmyk.jpg", "rgba.png"], ["gray.png", "palette.png"]]
    good += [["gray16.png"], None]
    rows = [{"question": "What colour is it?", "image": image, "answer": "red"} for image in good]
    rows.append({"question": "", "image": None, "answer": "red"})  # an empty prompt is still a prompt
    bad = [
        {"image": "rgb.png", "answer": "red"},  # no question: missing_value
        {"question": "Colour?", "image": "missing.png", "answer": "red"},
        {"question": "Colour?", "image": "empty.png", "answer": "red"},  # corrupt_image
        {"question": "Colour?", "image": ["rgb.png", "text.png"], "answer": "red"},  # corrupt_image
        {"question": "Colour?", "image": "thin.png", "answer": "red"},  # processor_error
        {"question": HUGE_QUESTION, "image": "rgb.png", "answer": "red"},  # prompt_too_long
    ]
    raw = [json.dumps(row).encode() for row in [*rows, *bad]] + [b'{"question": "\xff"}', b"[1, 2]"]
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(raw) + b"\n")
    surviving = len(rows) + 4  # all but the missing value and the missing file
    state = run_recipe(
        tmp_path,
        model_name_or_path=str(workdir["model"]),
        dataset=str(tmp_path / "train.jsonl"),
        prompt_template="{question}",
        image_root=str(workdir["images"]),
        bad_rows="skip",
        max_prompt_length=MAX_PROMPT_LENGTH,
        per_device_train_batch_size=2 * surviving,  # every row that survives the up-front checks, twice
        shuffle_dataset=False,
        final_eval=False,
    )
    (step,) = [entry for entry in state["log_history"] if "loss" in entry]
    assert math.isfinite(step["loss"])
    reasons = skipped_reasons(step)
    assert reasons == {
        "unreadable_row": 2,
        "missing_value": 1,
        "missing_image": 1,
        "corrupt_image": 2,
        "processor_error": 1,
        "prompt_too_long": 1,
    }
    assert step["data/skipped_rows"] == 8


JUNK_REWARDS = """
import math

import torch


def junk(prompts, completions, **kwargs):
    values = [math.nan, math.inf, -math.inf, 1e39, "1.0", [1.0], torch.ones(2), None]
    return [values[i % len(values)] for i in range(len(completions))]


def short(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)
"""


def reward_run(directory: Path, model: Path, **fields) -> dict:
    (directory / "rewards.py").write_text(JUNK_REWARDS)
    rows = [{"question": f"Say {word}.", "image": None, "answer": word} for word in ("red", "blue", "green", "pink")]
    (directory / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run_recipe(
        directory,
        model_name_or_path=str(model),
        dataset=str(directory / "train.jsonl"),
        prompt_template="{question}",
        per_device_train_batch_size=8,
        final_eval=False,
        **fields,
    )


def test_a_reward_returning_nan_inf_and_junk_trains_with_each_failure_counted(workdir, tmp_path):
    state = reward_run(tmp_path, workdir["model"], reward_funcs=["accuracy", "rewards.py:junk"])
    (step,) = [entry for entry in state["log_history"] if "loss" in entry]
    # 8 samples: NaN, inf, -inf and 1e39 (inf in float32) are non-finite; a string, a list and a 2-element
    # tensor are errors; None is "not scored". None of them reaches the advantages: the loss is finite.
    assert step["rewards/junk/failures"] == 7
    assert step["rewards/junk/failures_nonfinite"] == 4 and step["rewards/junk/failures_error"] == 3
    assert step["rewards/junk/count"] == 0
    assert math.isfinite(step["loss"]) and math.isfinite(step["reward"])


@pytest.mark.parametrize(
    ("reward", "policy", "message"),
    [
        ("short", "none", r"Reward 'short' returned 7 values for 8 completions"),
        ("junk", "raise", r"Reward 'junk' failed on sample 0 .*\[nonfinite\]: returned nan"),
    ],
)
def test_a_wrong_length_reward_or_a_failure_under_policy_raise_stops_naming_the_reward(
    workdir, tmp_path, reward, policy, message
):
    with pytest.raises(RewardError, match=message):
        reward_run(
            tmp_path, workdir["model"], reward_funcs=["accuracy", f"rewards.py:{reward}"], reward_error_policy=policy
        )
