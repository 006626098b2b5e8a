"""Counting the rows left out of a run, and showing the count in the training logs."""

from __future__ import annotations

import logging
from collections import Counter

from transformers import TrainerCallback

logger = logging.getLogger("vlm_rl")

METRIC = "data/skipped_rows"


class DataError(ValueError):
    """Data that cannot be used as given; the message names the file, the row and what to change."""


class SkippedRows:
    """The rows of one split left out under `bad_rows: skip`, by reason, each counted once.

    The first row of each reason is logged as a warning when it is found and kept for the summary.
    """

    def __init__(self, split: str):
        self.split = split
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def add(self, reason: str, message: str) -> None:
        if reason not in self.first:
            self.first[reason] = message
            logger.warning("Skipping a %s row (%s): %s; later ones are only counted.", self.split, reason, message)
        self.counts[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def metrics(self) -> dict[str, float]:
        """`data/skipped_rows` and, per reason found, `data/skipped_rows_<reason>`."""
        return {METRIC: float(self.total), **{f"{METRIC}_{reason}": float(n) for reason, n in self.counts.items()}}

    def summary(self) -> str:
        if not self.total:
            return f"No {self.split} rows were skipped."
        reasons = "; ".join(f"{n} {reason} (first: {self.first[reason]})" for reason, n in self.counts.items())
        return f"Skipped {self.total} {self.split} rows: {reasons}."


class SkippedRowsCallback(TrainerCallback):
    """Adds the running count of skipped training rows to every log (`data/skipped_rows[_<reason>]`).

    Register it first in the trainer's callback list: the reporters (wandb, tensorboard, ...) then see it in
    the same `logs`; the entry `Trainer.log` has already appended to `log_history` gets it too. With
    `dataloader_num_workers > 0` rows load in worker processes, whose counts do not reach this process.
    """

    def __init__(self, skipped: SkippedRows):
        self.skipped = skipped

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = self.skipped.metrics()
        if logs is not None:
            logs.update(metrics)
        if state.log_history:
            state.log_history[-1].update(metrics)
