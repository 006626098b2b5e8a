"""Turning a recipe's data section into train and held-out datasets."""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset

from vlm_rl.data.synthetic import COLORS, make_grounding_math_dataset, make_shapes_dataset

SYNTHETIC_DATASETS = ("synthetic:shapes", "synthetic:grounding_math")


@dataclass
class TaskData:
    """The splits of a task, and the accuracy of guessing (None when the task cannot say)."""

    train: Dataset
    eval: Dataset | None
    chance: float | None


def load_task(
    dataset: str, *, train_size: int, eval_size: int, text_fraction: float, image_size: int, seed: int
) -> TaskData:
    """Build the datasets a recipe names. This release knows the built-in synthetic tasks only."""
    if dataset == "synthetic:shapes":
        kwargs = {"image_size": image_size, "text_fraction": text_fraction, "seed": seed}
        return TaskData(
            train=make_shapes_dataset(train_size, "train", **kwargs),
            eval=make_shapes_dataset(eval_size, "test", **kwargs) if eval_size > 0 else None,
            chance=1.0 / len(COLORS),
        )
    if dataset == "synthetic:grounding_math":
        kwargs = {"image_size": image_size, "seed": seed}
        return TaskData(
            train=make_grounding_math_dataset(train_size, "train", **kwargs),
            eval=make_grounding_math_dataset(eval_size, "test", **kwargs) if eval_size > 0 else None,
            chance=None,
        )
    raise ValueError(
        f"Unknown dataset {dataset!r}. This release supports: {', '.join(SYNTHETIC_DATASETS)}; "
        "local jsonl/parquet/csv files and Hub datasets are not supported yet."
    )
