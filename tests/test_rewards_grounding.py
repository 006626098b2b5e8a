"""Grounding and detection rewards: box parsing, IoU, coordinate conventions against real processors, hacking."""

import json
import math
import random

import pytest
from conftest import no_hang
from PIL import Image
from transformers import AutoConfig

from vlm_rl.models import families, register_adapter
from vlm_rl.models.families.llava import LlavaAdapter
from vlm_rl.models.processing import load_processor, resized_image_size
from vlm_rl.rewards.boxes import MAX_ANSWER_CHARS, Box, box_iou, parse_boxes, resolve_box_format
from vlm_rl.rewards.grounding import detection_f1, detection_map, iou, truth_boxes
from vlm_rl.rewards.registry import REWARD_REGISTRY, load_rewards

IMAGE = Image.new("RGB", (300, 200), "white")
TRUTH = [30.0, 40.0, 130.0, 140.0]
MB = 1_000_000


@pytest.fixture(scope="module")
def processors(tiny_dirs):
    return {family: load_processor(str(path)) for family, path in tiny_dirs.items()}


def score_iou(completion: str, truth=TRUTH, image=IMAGE, **kwargs) -> float | None:
    """`iou` of one completion against one ground-truth box on `image` (pixel coordinates unless told)."""
    kwargs = {"box_format": "pixel", **kwargs}
    return iou([completion], answer=[json.dumps(truth)], images=[[image]], **kwargs)[0]


def objects(*items) -> str:
    """A detection answer: `objects(("cat", [x1, y1, x2, y2]), ...)` as JSON."""
    return json.dumps([{"bbox_2d": box, "label": label} for label, box in items])


def detect(reward, completion: str, truth: str, **kwargs) -> float | None:
    return reward([completion], answer=[truth], images=[[IMAGE]], **{"box_format": "pixel", **kwargs})[0]


CAT = ("cat", [10, 10, 60, 60])
DOG = ("dog", [100, 100, 200, 180])
CAT2 = ("cat", [220, 20, 290, 90])
TRUTH_OBJECTS = objects(CAT, DOG, CAT2)


# --- parsing ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[10, 20, 30, 40]", [(10, 20, 30, 40, None)]),
        ("[10.5,20,30,40.25]", [(10.5, 20, 30, 40.25, None)]),
        ('{"bbox_2d": [1, 2, 3, 4], "label": "cat"}', [(1, 2, 3, 4, "cat")]),
        ('{"bbox": [1, 2, 3, 4], "label": "cat"}', [(1, 2, 3, 4, "cat")]),
        ('{"box": [[1, 2], [3, 4]]}', [(1, 2, 3, 4, None)]),
        ("[[1, 2, 3, 4], [5, 6, 7, 8]]", [(1, 2, 3, 4, None), (5, 6, 7, 8, None)]),
        ('{"objects": [{"bbox_2d": [1, 2, 3, 4], "label": "a"}]}', [(1, 2, 3, 4, "a")]),
        (
            "[{'bbox_2d': [1, 2, 3, 4], 'label': 'cat'}, {'bbox_2d': [5, 6, 7, 8], 'label': 'dog'},]",
            [
                (1, 2, 3, 4, "cat"),
                (5, 6, 7, 8, "dog"),
            ],
        ),
        ('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}]\n```', [(1, 2, 3, 4, "cat")]),
        ("Sure:\n```\n[1, 2, 3, 4]\n```\nDone.", [(1, 2, 3, 4, None)]),
        (
            "<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|>",
            [(10, 20, 30, 40, "the dog")],
        ),
        ("It is at (10, 20), (30, 40).", [(10, 20, 30, 40, None)]),
        (
            "The cat is at [10, 20, 30, 40] and the dog at [50, 60, 70, 80].",
            [
                (10, 20, 30, 40, None),
                (50, 60, 70, 80, None),
            ],
        ),
        (
            '{"label": "cat", "bbox_2d": [1, 2, 3, 4], "score": 0.9} then [5, 6, 7, 8]',
            [
                (1, 2, 3, 4, "cat"),
                (5, 6, 7, 8, None),
            ],
        ),
    ],
)
def test_parse_boxes_reads_every_form(text, expected):
    assert [(*box.coords, box.label) for box in parse_boxes(text)] == [
        (*map(float, item[:4]), item[4]) for item in expected
    ]


def test_parse_boxes_reads_scores():
    assert [box.score for box in parse_boxes('[{"bbox": [1, 2, 3, 4], "confidence": 0.25}, [5, 6, 7, 8]]')] == [
        0.25,
        None,
    ]
    assert parse_boxes("{'box': [1, 2, 3, 4], 'score': 0.5}")[0].score == 0.5
    # A score that is no finite number is no score (the box still counts).
    for score in ["NaN", "1e999", "9" * 400, '"high"']:
        assert parse_boxes(f'[{{"bbox": [1, 2, 3, 4], "score": {score}}}]')[0].score is None
    assert parse_boxes("{'box': [1, 2, 3, 4], 'score': 1e999}")[0].score is None


@pytest.mark.parametrize(
    "text",
    [
        "[30, 20, 10, 40]",
        "[10, 40, 30, 40]",
        "[1, 2, 3, NaN]",
        "[1, 2, Infinity, 4]",
        "[1e999, 0, 1, 1]",
        "[1, 2, 3]",
        "[1, 2, 3, " + "9" * 400 + "]",  # an integer too big for a float
        "[1, 2, 3, " + "9" * 5000 + "]",  # too many digits for Python's int parser
        "[1, 2, 3, true]",
    ],
)
def test_parse_boxes_rejects_invalid_boxes(text):
    assert parse_boxes(text) == []


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no box here",
        "[1, 2, 3, 4",
        '{"bbox_2d": [1, 2, 3, "four"]}',
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1, 2, 3, 4]",
        "[" * 20_000 + "]" * 20_000,
        "[" * 900 + "[1, 2, 3, 4]" + "]" * 900,
        '{"a":' * 5_000 + "1" + "}" * 5_000,
        "1" * 10_000,
        "```json\n```\n```",
        "框在这里：（1，2），（3，4）🙂 \u202e\x00\ud800",
        "<|box_start|>(1,2),(3<|box_end|>",
        "{" * 20_000,
        "(" * 20_000 + ")" * 20_000,
    ],
)
def test_parse_boxes_never_raises_on_garbage(text):
    boxes = parse_boxes(text)
    assert all(box.is_valid() for box in boxes)


def test_parse_boxes_ignores_text_beyond_the_cap_and_stays_fast():
    assert parse_boxes(" " * MAX_ANSWER_CHARS + "[1, 2, 3, 4]") == []
    with no_hang():
        for text in ["[1, 2, 3, 4] " * (MAX_ANSWER_CHARS // 13), "{[(" * (MAX_ANSWER_CHARS // 3), "``" * 25_000]:
            parse_boxes(text)


def test_box_iou():
    a = Box(0, 0, 10, 10)
    assert box_iou(a, a) == 1.0
    assert box_iou(a, Box(5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou(a, Box(10, 0, 20, 10)) == 0.0  # touching edges
    assert box_iou(a, Box(0, 0, 0, 0)) == 0.0
    assert Box(-5, -5, 5, 500).clipped(300, 200).coords == (0, 0, 5, 200)


def test_answer_tag():
    assert score_iou("<answer>none</answer><box>[30, 40, 130, 140]</box>", answer_tag="box") == 1.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[1, 2, 3, 4]", [(1, 2, 3, 4)]),
        ([1, 2, 3, 4], [(1, 2, 3, 4)]),
        ('[{"bbox_2d": [1, 2, 3, 4], "label": "x"}]', [(1, 2, 3, 4)]),
        ("(1,2),(3,4)", [(1, 2, 3, 4)]),
        ("[]", []),
        ([], []),
        ("red", None),
        ("3", None),
        (None, None),
        (["cat", "kitty"], None),
        ("[3, 2, 1, 0]", None),
    ],
)
def test_truth_boxes(value, expected):
    boxes = truth_boxes(value)
    assert (None if boxes is None else [box.coords for box in boxes]) == expected


# --- resized_image_size ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_resized_image_size_matches_the_processor(processors, family):
    processor = processors[family]
    patch = processor.image_processor.patch_size
    for width, height in [(300, 200), (333, 211), (97, 311), (640, 97), (29, 29), (1001, 999)]:
        image = Image.effect_noise((width, height), 40).convert("RGB")
        grid = processor(images=[image], text=["<|vision_start|><|image_pad|><|vision_end|>"])["image_grid_thw"][0]
        assert resized_image_size(processor, width, height) == (int(grid[2]) * patch, int(grid[1]) * patch)


def test_resized_image_size_needs_a_qwen_vl_processor(processors):
    with pytest.raises(ValueError, match="Qwen-VL style processor"):
        resized_image_size(processors["qwen3_vl"].tokenizer, 300, 200)


# --- coordinate conventions ------------------------------------------------------------------------------------------


def in_format(box: list[float], box_format: str, size: tuple[int, int], resized: tuple[int, int]) -> list[float]:
    """`box` (original pixels) written in `box_format`, computed here independently of the reward's code."""
    (width, height), (resized_width, resized_height) = size, resized
    factors = {
        "pixel": (1.0, 1.0),
        "resized": (resized_width / width, resized_height / height),
        "norm1000": (1000 / width, 1000 / height),
        "norm1": (1 / width, 1 / height),
    }[box_format]
    return [value * factors[i % 2] for i, value in enumerate(box)]


def actual_resized_size(processor, image) -> tuple[int, int]:
    grid = processor(images=[image], text=["<|vision_start|><|image_pad|><|vision_end|>"])["image_grid_thw"][0]
    patch = processor.image_processor.patch_size
    return int(grid[2]) * patch, int(grid[1]) * patch


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("size", [(300, 200), (333, 211)])
def test_every_convention_scores_the_same_iou(processors, family, size):
    processor = processors[family]
    image = Image.new("RGB", size, "gray")
    resized = actual_resized_size(processor, image)
    if size == (333, 211) or family == "qwen3_vl":  # the resize is not a uniform scale here
        assert not math.isclose(resized[0] / size[0], resized[1] / size[1], rel_tol=1e-3)
    truth = [30.5, 40.25, 200.75, 150.5]
    predicted = [35.3, 45.1, 210.2, 160.7]
    expected = box_iou(Box(*truth), Box(*predicted))
    assert 0.5 < expected < 0.95

    for box_format in ["pixel", "resized", "norm1000", "norm1"]:
        answer = f"<answer>{json.dumps(in_format(predicted, box_format, size, resized))}</answer>"
        score = score_iou(answer, truth, image, box_format=box_format, processing_class=processor, model_type=family)
        assert score == pytest.approx(expected, abs=1e-6), box_format
        for answer_box_format in ["norm1000", "norm1"]:
            written_truth = in_format(truth, answer_box_format, size, resized)
            score = score_iou(
                answer,
                written_truth,
                image,
                box_format=box_format,
                answer_box_format=answer_box_format,
                processing_class=processor,
            )
            assert score == pytest.approx(expected, abs=1e-6), (box_format, answer_box_format)

    # The conventions do differ: resized coordinates read as original pixels are a different box.
    misread = f"<answer>{json.dumps(in_format(predicted, 'resized', size, resized))}</answer>"
    assert abs(score_iou(misread, truth, image, box_format="pixel") - expected) > 0.01


@pytest.mark.parametrize(
    ("family", "convention"), [("qwen2_vl", "norm1000"), ("qwen2_5_vl", "resized"), ("qwen3_vl", "norm1000")]
)
def test_auto_picks_the_family_convention(processors, tiny_dirs, family, convention):
    model_type = AutoConfig.from_pretrained(tiny_dirs[family]).model_type
    assert resolve_box_format("auto", model_type) == convention
    image = Image.new("RGB", (333, 211))
    resized = actual_resized_size(processors[family], image)
    predicted, truth = [35.3, 45.1, 210.2, 160.7], [30.5, 40.25, 200.75, 150.5]
    answer = json.dumps(in_format(predicted, convention, image.size, resized))
    kwargs = {"box_format": "auto", "processing_class": processors[family], "model_type": model_type}
    assert score_iou(answer, truth, image, **kwargs) == pytest.approx(box_iou(Box(*predicted), Box(*truth)), abs=1e-6)


def test_auto_reads_the_convention_the_family_adapter_declares(monkeypatch):
    monkeypatch.setattr(families, "ADAPTERS", dict(families.ADAPTERS))

    @register_adapter
    class RelativeBoxes(LlavaAdapter):
        name = "llava_relative"
        model_types = ("llava_relative",)
        box_format = "norm1"

    assert resolve_box_format("auto", "llava_relative") == "norm1"
    assert resolve_box_format("auto", "qwen3_vl_moe") == "norm1000"
    assert resolve_box_format("auto", "no_such_family") == "pixel"


def test_auto_defaults_to_pixels_and_formats_are_checked():
    assert resolve_box_format("auto", "llava") == "pixel"
    assert resolve_box_format("auto", None) == "pixel"
    assert resolve_box_format("norm1", "qwen2_5_vl") == "norm1"
    with pytest.raises(ValueError, match="box_format must be"):
        resolve_box_format("xyxy", None)


def test_resized_needs_a_processor():
    with pytest.raises(ValueError, match="processing_class"):
        score_iou("[1, 2, 3, 4]", box_format="resized")
    with pytest.raises(ValueError, match="processing_class"):
        score_iou("[1, 2, 3, 4]", box_format="auto", model_type="qwen2_5_vl")


def test_relative_coordinates_need_an_image():
    with pytest.raises(ValueError, match="image size"):
        iou(["[1, 2, 3, 4]"], answer=["[1, 2, 3, 4]"], images=[[]], box_format="norm1000")
    # Pixels need no image (and are not clipped then).
    assert iou(["[1, 2, 3, 4]"], answer=["[1, 2, 3, 4]"], images=None, box_format="pixel") == [1.0]


# --- iou -------------------------------------------------------------------------------------------------------------


def test_rewards_are_registered_under_their_names():
    for name in ["iou", "detection_f1", "detection_map"]:
        assert REWARD_REGISTRY[name].__name__ == name


def test_iou_correct_partial_wrong():
    assert score_iou("<think>the dog</think><answer>[30, 40, 130, 140]</answer>") == 1.0
    assert score_iou('<answer>{"bbox_2d": [30, 40, 130, 140], "label": "dog"}</answer>') == 1.0
    assert score_iou("<answer>[80, 40, 180, 140]</answer>") == pytest.approx(50 / 150)
    assert score_iou("<answer>[200, 150, 250, 190]</answer>") == 0.0
    conversational = [{"role": "assistant", "content": "<answer>[30, 40, 130, 140]</answer>"}]
    assert iou([conversational], answer=[TRUTH], images=[[IMAGE]], box_format="pixel") == [1.0]


def test_iou_threshold():
    assert score_iou("[80, 40, 180, 140]", threshold=0.3) == 1.0
    assert score_iou("[80, 40, 180, 140]", threshold=0.5) == 0.0
    assert score_iou("[30, 40, 130, 140]", threshold=1.0) == 1.0
    for bad in [0, 1.5, -0.1, "0.5"]:
        with pytest.raises(ValueError, match="threshold"):
            score_iou("[30, 40, 130, 140]", threshold=bad)


@pytest.mark.parametrize(
    "completion",
    ["", "<answer></answer>", "<answer>the dog on the left</answer>", "<answer>[30, 40, 130</answer>", "[[[[", "🙂"],
)
def test_iou_empty_and_malformed_score_zero(completion):
    assert score_iou(completion) == 0.0


def test_iou_unicode():
    assert score_iou("<think>左边的狗 🐕 — «chien»</think><answer>狗：[30, 40, 130, 140]</answer>") == 1.0
    assert score_iou("<answer>\u202e[30, 40, 130, 140]\x00</answer>") == 1.0
    assert score_iou("<answer>［30，40，130，140］</answer>") == 0.0  # full-width punctuation is not a box


def test_iou_very_long_completions_are_fast():
    with no_hang():
        assert score_iou("blah " * (MB // 5) + "<answer>[30, 40, 130, 140]</answer>") == 1.0
        assert score_iou("x" * MB + "[30, 40, 130, 140]") == 0.0  # an over-long answer is not read
        assert score_iou("<answer>" * (MB // 8)) == 0.0
        assert score_iou("[30, 40, 130, 140] " * (MB // 19)) == 0.0


def test_iou_hacking():
    # Spraying boxes: several distinct boxes score nothing, even if one is right.
    assert score_iou("<answer>[30, 40, 130, 140] [0, 0, 300, 200]</answer>") == 0.0
    assert score_iou(json.dumps([[x, y, x + 100, y + 100] for x in range(0, 200, 10) for y in range(0, 100, 10)])) == 0
    # Repeating the same box is still one box.
    assert score_iou("<answer>[30, 40, 130, 140], [30, 40, 130, 140]</answer>") == 1.0
    # The whole image is a poor answer for a small object.
    assert score_iou("[0, 0, 300, 200]") == pytest.approx(100 * 100 / (300 * 200))
    # Boxes outside the image are clipped to it; a box entirely outside scores nothing.
    assert score_iou("[30, 40, 130, 140000]") == pytest.approx(box_iou(Box(30, 40, 130, 200), Box(*TRUTH)))
    assert score_iou("[-1000, -1000, 130, 140]") == pytest.approx(box_iou(Box(0, 0, 130, 140), Box(*TRUTH)))
    assert score_iou("[400, 300, 500, 400]") == 0.0
    assert score_iou("[-50, 40, -10, 140]") == 0.0
    # Only the last answer block counts: a box outside it (or in an earlier block) does not.
    assert score_iou("[30, 40, 130, 140] <answer>no idea</answer>") == 0.0
    assert score_iou("<answer>[30, 40, 130, 140]</answer> <answer>[200, 150, 250, 190]</answer>") == 0.0
    # Degenerate and non-finite boxes are not boxes.
    assert score_iou("[30, 40, 30, 140]") == 0.0
    assert score_iou("[30, 40, NaN, 140]") == 0.0


def test_iou_rows_without_a_box_are_not_applicable():
    scores = iou(
        ["[30, 40, 130, 140]", "red", "[1, 2, 3, 4]", "[1, 2, 3, 4]"],
        answer=[json.dumps(TRUTH), "red", "[]", objects(CAT, DOG)],
        images=[[IMAGE], [IMAGE], None, [IMAGE]],
        box_format="pixel",
    )
    assert scores == [1.0, None, None, None]


def test_iou_errors_are_actionable():
    with pytest.raises(KeyError, match="answer"):
        iou(["[1, 2, 3, 4]"], images=[[IMAGE]])
    with pytest.raises(ValueError, match="answer_box_format"):
        score_iou("[1, 2, 3, 4]", answer_box_format="resized")


# --- detection_f1 ----------------------------------------------------------------------------------------------------


def test_f1_correct_partial_wrong():
    assert detect(detection_f1, objects(CAT, DOG, CAT2), TRUTH_OBJECTS) == 1.0
    assert detect(detection_f1, objects(CAT2, ("DOG ", DOG[1]), ("Cat", CAT[1])), TRUTH_OBJECTS) == 1.0
    assert detect(detection_f1, objects(CAT, DOG), TRUTH_OBJECTS) == pytest.approx(2 * 2 / (2 + 3))
    assert detect(detection_f1, objects(("dog", CAT[1])), TRUTH_OBJECTS) == 0.0  # wrong label
    assert detect(detection_f1, objects(("cat", [150, 150, 200, 200])), TRUTH_OBJECTS) == 0.0  # wrong place
    # Qwen2-VL text form.
    qwen = "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(10,10),(60,60)<|box_end|>"
    assert detect(detection_f1, qwen, objects(CAT)) == 1.0


def test_f1_iou_threshold():
    shifted = objects(("cat", [30, 10, 80, 60]))  # IoU 30*50 / (2*2500 - 1500) = 3/7 with CAT
    assert detect(detection_f1, shifted, objects(CAT)) == 0.0
    assert detect(detection_f1, shifted, objects(CAT), iou_threshold=0.4) == 1.0
    with pytest.raises(ValueError, match="iou_threshold"):
        detect(detection_f1, shifted, objects(CAT), iou_threshold=0)


@pytest.mark.parametrize("reward", [detection_f1, detection_map])
def test_detection_empty_cases(reward):
    assert detect(reward, "", TRUTH_OBJECTS) == 0.0
    assert detect(reward, "[]", TRUTH_OBJECTS) == 0.0
    assert detect(reward, "[]", "[]") == 1.0  # nothing to find, nothing claimed
    assert detect(reward, "There are no cats.", "[]") == 1.0
    assert detect(reward, objects(CAT), "[]") == 0.0
    assert detect(reward, objects(CAT), "red") is None


@pytest.mark.parametrize("reward", [detection_f1, detection_map])
@pytest.mark.parametrize("completion", ["[{", '[{"bbox_2d": [10, 10, "x", 60]}]', "🐈" * 50, "<answer>" * 1000])
def test_detection_malformed(reward, completion):
    assert detect(reward, completion, TRUTH_OBJECTS) == 0.0


@pytest.mark.parametrize("reward", [detection_f1, detection_map])
def test_detection_unicode_labels(reward):
    truth = objects(("猫", CAT[1]), ("Ñandú", DOG[1]))
    assert detect(reward, f"<answer>{objects(('ñANDÚ', DOG[1]), ('猫', CAT[1]))}</answer>", truth) == 1.0


@pytest.mark.parametrize("reward", [detection_f1, detection_map])
def test_detection_very_long_is_fast(reward):
    with no_hang():
        assert detect(reward, "🙂" * MB + f"<answer>{objects(CAT, DOG, CAT2)}</answer>", TRUTH_OBJECTS) == 1.0
        assert detect(reward, objects(CAT, DOG, CAT2) + " etc" * MB, TRUTH_OBJECTS) == 0.0  # an over-long answer
        assert detect(reward, objects(CAT) * 20_000, "[]") == 0.0  # over-long, even against no objects


@pytest.mark.parametrize("reward", [detection_f1, detection_map])
def test_detection_hacking(reward):
    perfect = detect(reward, objects(CAT, DOG, CAT2), TRUTH_OBJECTS)
    # Duplicates never raise the score.
    assert detect(reward, objects(CAT, CAT, CAT, DOG, CAT2), TRUTH_OBJECTS) <= perfect
    assert detect(reward, objects(CAT, CAT), objects(CAT, ("cat", [12, 12, 62, 62]))) < 1.0
    # A grid of boxes over the image is far from a detection.
    grid = [("cat", [x, y, x + 50, y + 50]) for x in range(0, 300, 20) for y in range(0, 200, 20)]
    assert detect(reward, objects(*grid[:90]), TRUTH_OBJECTS) < 0.5
    # More than max_boxes boxes scores nothing, even with the right ones first.
    assert detect(reward, objects(CAT, DOG, CAT2, *grid[:98]), TRUTH_OBJECTS) == 0.0
    assert detect(reward, objects(CAT, DOG, CAT2, *grid[:98]), TRUTH_OBJECTS, max_boxes=200) > 0.0
    # Boxes outside the image are false positives.
    assert detect(reward, objects(CAT, DOG, CAT2, ("cat", [400, 400, 500, 500])), TRUTH_OBJECTS) <= perfect
    # Only the last answer block counts.
    assert detect(reward, f"{objects(CAT, DOG, CAT2)}<answer>[]</answer>", TRUTH_OBJECTS) == 0.0
    with pytest.raises(ValueError, match="max_boxes"):
        detect(reward, objects(CAT), TRUTH_OBJECTS, max_boxes=0)


def test_f1_counts_duplicates_as_false_positives():
    assert detect(detection_f1, objects(CAT, CAT), objects(CAT)) == pytest.approx(2 / 3)
    # One box cannot match two overlapping objects of the same label, however often it is repeated.
    assert detect(detection_f1, objects(CAT, CAT), objects(CAT, ("cat", [12, 12, 62, 62]))) == pytest.approx(0.5)


def test_map_ranking_and_labels():
    miss = ("cat", [150, 10, 200, 60])
    # Answer order ranks when there are no scores: a miss first costs precision, a miss last costs nothing.
    assert detect(detection_map, objects(CAT, CAT2, miss), objects(CAT, CAT2)) == 1.0
    assert detect(detection_map, objects(miss, CAT, CAT2), objects(CAT, CAT2)) == pytest.approx(2 / 3)
    # Scores rank when present.
    scored = json.dumps(
        [
            {"bbox_2d": miss[1], "label": "cat", "score": 0.1},
            {"bbox_2d": CAT[1], "label": "cat", "score": 0.9},
            {"bbox_2d": CAT2[1], "label": "cat", "confidence": 0.8},
        ]
    )
    assert detect(detection_map, scored, objects(CAT, CAT2)) == 1.0
    # The mean is over ground-truth labels: all cats, no dog.
    assert detect(detection_map, objects(CAT, CAT2), TRUTH_OBJECTS) == pytest.approx(0.5)


def test_unlabelled_truth_accepts_any_label():
    truth = json.dumps([CAT[1], DOG[1]])
    assert detect(detection_f1, objects(("anything", CAT[1]), ("x", DOG[1])), truth) == 1.0
    assert detect(detection_map, json.dumps([CAT[1], DOG[1]]), truth) == 1.0


@pytest.mark.parametrize("reward", [detection_f1, detection_map])
def test_duplicates_never_help_random_answers(reward):
    rng = random.Random(0)
    labels = ["cat", "dog"]

    def random_box():
        x, y = rng.uniform(0, 250), rng.uniform(0, 150)
        return [x, y, x + rng.uniform(5, 60), y + rng.uniform(5, 60)]

    for _ in range(200):
        truth = objects(*[(rng.choice(labels), random_box()) for _ in range(rng.randint(1, 4))])
        truth_items = json.loads(truth)
        predicted = [(item["label"], item["bbox_2d"]) for item in truth_items if rng.random() < 0.7]
        predicted += [(rng.choice(labels), random_box()) for _ in range(rng.randint(0, 3))]
        rng.shuffle(predicted)
        if not predicted:
            continue
        base = detect(reward, objects(*predicted), truth)
        original = rng.randrange(len(predicted))
        with_duplicate = list(predicted)
        with_duplicate.insert(rng.randint(original + 1, len(predicted)), predicted[original])
        assert detect(reward, objects(*with_duplicate), truth) <= base + 1e-12


def test_recipe_entry_routes_and_converts(processors):
    (reward,) = load_rewards(
        [
            {
                "reward": "vlm_rl.rewards.grounding:iou",
                "kwargs": {"threshold": 0.5, "box_format": "auto"},
                "tasks": ["grounding"],
            }
        ]
    )
    reward.context.update(processing_class=processors["qwen2_5_vl"], model_type="qwen2_5_vl")
    resized = actual_resized_size(processors["qwen2_5_vl"], IMAGE)
    answer = json.dumps(in_format(TRUTH, "resized", IMAGE.size, resized))
    scores = reward(
        prompts=["p", "p"],
        completions=[f"<answer>{answer}</answer>", "<answer>red</answer>"],
        answer=[json.dumps(TRUTH), "red"],
        images=[[IMAGE], None],
        task=["grounding", "vqa"],
    )
    assert scores == [1.0, None]
