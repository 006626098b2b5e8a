"""Datasets for training and evaluation."""

from vlm_rl.data.loading import TaskData, load_task
from vlm_rl.data.synthetic import make_grounding_math_dataset, make_shapes_dataset

__all__ = ["TaskData", "load_task", "make_grounding_math_dataset", "make_shapes_dataset"]
