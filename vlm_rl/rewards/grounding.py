"""Grounding (referring-expression) and detection rewards: boxes in the answer against the `answer` column.

Both sides are converted to original-image pixels of the row's first image before comparing: predictions from
`box_format` (`auto` picks the model family's convention, see `vlm_rl.rewards.boxes`), the ground truth from
`answer_box_format`. Rows whose `answer` holds no box get `None` (not applicable). Only the last
`<answer>…</answer>` block is read (the whole completion when it has none; the tag is `answer_tag`), and an
answer longer than `MAX_ANSWER_CHARS` scores 0.0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlm_rl.rewards.boxes import (
    ANSWER_BOX_FORMATS,
    MAX_ANSWER_CHARS,
    Box,
    box_iou,
    boxes_from_json,
    parse_boxes,
    pixel_scale,
    resolve_box_format,
)
from vlm_rl.rewards.parsing import completion_text, extract_answer, normalize
from vlm_rl.rewards.registry import register_reward


def truth_boxes(value: Any) -> list[Box] | None:
    """The ground-truth boxes of an `answer` value, or None when it is not a box answer (a word, a number…).

    A JSON list or object (or the decoded value itself) is read exactly, so `[]` is an image with no objects;
    other text is scanned like a completion.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            boxes = parse_boxes(value)
            return boxes or None
    if isinstance(value, list | tuple) and not value:
        return []
    if not isinstance(value, list | tuple | dict):
        return None
    boxes = [box for box in boxes_from_json(value) if box.is_valid()]
    return boxes or None


def _image_size(images: Any, row: int) -> tuple[int, int] | None:
    """The size of the row's first image, or None for a text-only row."""
    if images is None:
        return None
    row_images = images[row]
    if isinstance(row_images, list | tuple):
        row_images = row_images[0] if row_images else None
    return None if row_images is None else tuple(row_images.size)


class _Frame:
    """Converts one row's boxes, in a given convention, to clipped original-image pixels."""

    def __init__(self, box_format: str, image_size: tuple[int, int] | None, processor: Any):
        self.scale = pixel_scale(box_format, image_size, processor)
        self.image_size = image_size

    def __call__(self, box: Box) -> Box:
        box = box.scaled(*self.scale)
        return box if self.image_size is None else box.clipped(*self.image_size)


@dataclass(frozen=True)
class _Conventions:
    """The coordinate conventions of the predictions and of the ground truth, checked once per call."""

    prediction: str
    truth: str
    processor: Any

    @classmethod
    def resolve(cls, box_format: str, answer_box_format: str, model_type: str | None, processor: Any) -> _Conventions:
        if answer_box_format not in ANSWER_BOX_FORMATS:
            raise ValueError(f"answer_box_format must be one of {ANSWER_BOX_FORMATS}, got {answer_box_format!r}.")
        prediction = resolve_box_format(box_format, model_type)
        if prediction == "resized" and processor is None:
            raise ValueError(
                f"box_format {box_format!r} means 'resized' (Qwen2.5-VL style) coordinates here, which need the "
                "model's processor (processing_class); none was passed. Set box_format to 'pixel', 'norm1000' or "
                "'norm1'."
            )
        return cls(prediction, answer_box_format, processor)


def _check_threshold(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}.")


def _rows(
    reward: str,
    completions: list,
    answer: list | None,
    images: list | None,
    conventions: _Conventions,
    answer_tag: str,
) -> list[tuple[list[Box], list[Box] | None] | None]:
    """Per row, the ground-truth and predicted boxes in clipped pixels; None where the row has no box answer.

    The predictions are None when the answer is too long to read.
    """
    if answer is None:
        raise KeyError(f"The {reward!r} reward needs an 'answer' column of ground-truth boxes in the dataset.")
    rows = []
    for row, (completion, truth) in enumerate(zip(completions, answer, strict=True)):
        truths = truth_boxes(truth)
        if truths is None:
            rows.append(None)
            continue
        image_size = _image_size(images, row)
        to_truth = _Frame(conventions.truth, image_size, conventions.processor)
        truths = [to_truth(box) for box in truths]
        text = extract_answer(completion_text(completion), answer_tag)
        if len(text) > MAX_ANSWER_CHARS:
            rows.append((truths, None))
            continue
        to_pixels = _Frame(conventions.prediction, image_size, conventions.processor)
        rows.append((truths, [to_pixels(box) for box in parse_boxes(text)]))
    return rows


@register_reward("iou", columns=("answer",))
def iou(
    completions: list,
    answer: list | None = None,
    images: list | None = None,
    processing_class: Any = None,
    model_type: str | None = None,
    threshold: float | None = None,
    box_format: str = "auto",
    answer_box_format: str = "pixel",
    answer_tag: str = "answer",
    **kwargs,
) -> list[float | None]:
    """IoU of the one box in the answer with the one ground-truth box (1.0/0.0 at `threshold` when given).

    An answer with several distinct boxes scores 0.0, so spraying boxes never pays; repeating the same box is
    one box. A box partly outside the image is clipped to it; one entirely outside scores 0.0. Rows whose
    ground truth is not exactly one box get None.
    """
    if threshold is not None:
        _check_threshold("threshold", threshold)
    scores: list[float | None] = []
    conventions = _Conventions.resolve(box_format, answer_box_format, model_type, processing_class)
    for row in _rows("iou", completions, answer, images, conventions, answer_tag):
        if row is None or len(row[0]) != 1:
            scores.append(None)
            continue
        (truth,), predictions = row
        distinct = {box.coords for box in predictions or []}
        if len(distinct) != 1 or not predictions[0].is_valid():
            scores.append(0.0)
            continue
        overlap = box_iou(predictions[0], truth)
        scores.append(overlap if threshold is None else float(overlap >= threshold))
    return scores


def _label(box: Box) -> str | None:
    return None if box.label is None else normalize(box.label)


def _labels_match(prediction: Box, truth: Box) -> bool:
    """A ground-truth box without a label accepts any prediction (class-agnostic detection)."""
    return truth.label is None or _label(prediction) == _label(truth)


def _score_detections(
    rows: list, max_boxes: int, metric: Callable[[list[Box], list[Box]], float]
) -> list[float | None]:
    """The rules both detection rewards share around `metric(predictions, truths)`, which sees neither side empty.

    Rows without a box answer get None; an unreadable answer, or one with more than `max_boxes` boxes, 0.0; no
    ground-truth objects and no predicted boxes 1.0, and one side empty but not the other 0.0.
    """
    if isinstance(max_boxes, bool) or not isinstance(max_boxes, int) or max_boxes < 1:
        raise ValueError(f"max_boxes must be a positive whole number, got {max_boxes!r}.")
    scores: list[float | None] = []
    for row in rows:
        if row is None:
            scores.append(None)
            continue
        truths, predictions = row
        if predictions is None or len(predictions) > max_boxes:
            scores.append(0.0)
        elif not truths or not predictions:
            scores.append(float(not truths and not predictions))
        else:
            scores.append(metric(predictions, truths))
    return scores


@register_reward("detection_f1", columns=("answer",))
def detection_f1(
    completions: list,
    answer: list | None = None,
    images: list | None = None,
    processing_class: Any = None,
    model_type: str | None = None,
    iou_threshold: float = 0.5,
    max_boxes: int = 100,
    box_format: str = "auto",
    answer_box_format: str = "pixel",
    answer_tag: str = "answer",
    **kwargs,
) -> list[float | None]:
    """F1 of the answer's labelled boxes against the ground truth, one-to-one, at IoU ≥ `iou_threshold`.

    Pairs of equal labels (case-insensitive) are matched greedily, highest IoU first; every unmatched or
    repeated box is a false positive, so duplicates only lower the score. An answer with more than `max_boxes`
    boxes scores 0.0. With no ground-truth objects, an answer without boxes scores 1.0, any box 0.0.
    """
    _check_threshold("iou_threshold", iou_threshold)
    conventions = _Conventions.resolve(box_format, answer_box_format, model_type, processing_class)
    rows = _rows("detection_f1", completions, answer, images, conventions, answer_tag)

    def f1(predictions: list[Box], truths: list[Box]) -> float:
        return 2 * _greedy_matches(predictions, truths, iou_threshold) / (len(predictions) + len(truths))

    return _score_detections(rows, max_boxes, f1)


def _greedy_matches(predictions: list[Box], truths: list[Box], iou_threshold: float) -> int:
    """How many one-to-one (prediction, truth) pairs greedy matching by decreasing IoU makes."""
    firsts: dict[tuple, int] = {}
    for p, prediction in enumerate(predictions):
        firsts.setdefault((prediction.coords, _label(prediction)), p)
    pairs = sorted(
        (-overlap, p, t)
        for p, prediction in enumerate(predictions)
        if firsts[(prediction.coords, _label(prediction))] == p  # a repeated box is a false positive
        for t, truth in enumerate(truths)
        if _labels_match(prediction, truth) and (overlap := box_iou(prediction, truth)) >= iou_threshold
    )
    used_predictions: set[int] = set()
    used_truths: set[int] = set()
    for _, p, t in pairs:
        if p not in used_predictions and t not in used_truths:
            used_predictions.add(p)
            used_truths.add(t)
    return len(used_truths)


@register_reward("detection_map", columns=("answer",))
def detection_map(
    completions: list,
    answer: list | None = None,
    images: list | None = None,
    processing_class: Any = None,
    model_type: str | None = None,
    iou_threshold: float = 0.5,
    max_boxes: int = 100,
    box_format: str = "auto",
    answer_box_format: str = "pixel",
    answer_tag: str = "answer",
    **kwargs,
) -> list[float | None]:
    """Mean over ground-truth labels of the average precision at IoU ≥ `iou_threshold` (all-point interpolated).

    Predictions are ranked by their `score`/`confidence` field, in answer order where there is none; each in
    turn takes the unmatched ground-truth box of its label with the highest IoU. Repeated boxes are false
    positives, so they never help. More than `max_boxes` boxes scores 0.0; with no ground-truth objects, an
    answer without boxes scores 1.0, any box 0.0.
    """
    _check_threshold("iou_threshold", iou_threshold)
    conventions = _Conventions.resolve(box_format, answer_box_format, model_type, processing_class)
    rows = _rows("detection_map", completions, answer, images, conventions, answer_tag)

    def mean_average_precision(predictions: list[Box], truths: list[Box]) -> float:
        labels = {_label(truth) for truth in truths}
        precisions = [_average_precision(predictions, truths, label, iou_threshold) for label in labels]
        return sum(precisions) / len(precisions)

    return _score_detections(rows, max_boxes, mean_average_precision)


def _rank_key(indexed: tuple[int, Box]) -> tuple[float, int]:
    """Highest score first (boxes without a score after those with one), then answer order."""
    index, box = indexed
    return (math.inf if box.score is None else -box.score, index)


def _average_precision(predictions: list[Box], truths: list[Box], label: str | None, iou_threshold: float) -> float:
    """AP of one label: area under the precision-recall curve with precision made monotone (VOC 2010+)."""
    truths = [truth for truth in truths if _label(truth) == label]
    candidates = sorted(
        ((i, box) for i, box in enumerate(predictions) if label is None or _label(box) == label), key=_rank_key
    )
    seen: set[tuple] = set()
    matched: set[int] = set()
    hits: list[bool] = []
    for _, box in candidates:
        best, best_overlap = None, iou_threshold
        if (box.coords, _label(box)) not in seen:  # a repeated box is a false positive
            seen.add((box.coords, _label(box)))
            for t, truth in enumerate(truths):
                overlap = box_iou(box, truth)
                if t not in matched and overlap >= best_overlap:
                    best, best_overlap = t, overlap
        if best is not None:
            matched.add(best)
        hits.append(best is not None)
    precisions, true_positives = [], 0
    for rank, hit in enumerate(hits, start=1):
        true_positives += hit
        precisions.append(true_positives / rank)
    for rank in range(len(precisions) - 2, -1, -1):
        precisions[rank] = max(precisions[rank], precisions[rank + 1])
    return sum(p for p, hit in zip(precisions, hits, strict=True) if hit) / len(truths)
