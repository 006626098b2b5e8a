"""Datasets for training and evaluation: the synthetic tasks, and data from files or the Hub (docs/data.md)."""

from vlm_rl.data.loading import TaskData, load_task
from vlm_rl.data.rows import LazyRows, image_counts, load_rows, most_images_per_row, video_counts
from vlm_rl.data.stats import DataError, SkippedRows, SkippedRowsCallback
from vlm_rl.data.synthetic import make_grounding_math_dataset, make_shapes_dataset

__all__ = [
    "DataError",
    "LazyRows",
    "SkippedRows",
    "SkippedRowsCallback",
    "TaskData",
    "image_counts",
    "most_images_per_row",
    "load_rows",
    "load_task",
    "make_grounding_math_dataset",
    "make_shapes_dataset",
    "video_counts",
]
