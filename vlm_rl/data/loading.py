"""Turning a recipe's data section into train and held-out datasets."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from datasets import Dataset

from vlm_rl.data.motion import make_motion_dataset
from vlm_rl.data.rows import (
    IMAGE_COLUMNS,
    LazyRows,
    RowFormat,
    check_rows,
    image_counts,
    lazy_rows,
    rename_columns,
    undecoded,
)
from vlm_rl.data.scenes import CELL, COUNTS, make_count_diff_dataset, make_counting_dataset, make_grounding_dataset
from vlm_rl.data.sources import Source, read_source, resolve_path, with_row_ids
from vlm_rl.data.stats import DataError, SkippedRows
from vlm_rl.data.synthetic import COLORS, make_grounding_math_dataset, make_shapes_dataset
from vlm_rl.data.video import VIDEO_COLUMNS
from vlm_rl.data.zoom import GRID, MIN_CELL, NO_TOOLS_SPLIT, make_zoom_dataset

if TYPE_CHECKING:
    from vlm_rl.config import DataArguments

logger = logging.getLogger("vlm_rl")

SYNTHETIC_DATASETS = (
    "synthetic:shapes", "synthetic:grounding_math", "synthetic:counting", "synthetic:grounding",
    "synthetic:count_diff", "synthetic:zoom", "synthetic:motion",
)  # fmt: skip
SCENES = {"synthetic:counting", "synthetic:grounding", "synthetic:count_diff"}
WITH_SFT_ROWS = SCENES | {"synthetic:zoom", "synthetic:motion"}
# Recipe fields that only mean something for data read from files or the Hub.
FILE_ONLY_FIELDS = (
    "dataset_config", "eval_dataset", "eval_split", "column_mapping", "prompt_template", "system_prompt", "image_root",
    "max_prompt_length",
)  # fmt: skip


@dataclass
class TaskData:
    """The splits of a task, the accuracy of guessing (None when the task cannot say), and the rows skipped."""

    train: Dataset
    eval: Dataset | None
    chance: float | None
    skipped_train: SkippedRows = field(default_factory=lambda: SkippedRows("train"))
    skipped_eval: SkippedRows = field(default_factory=lambda: SkippedRows("eval"))

    def attach_processor(self, processor, default_max_prompt_length: int | None = None) -> None:
        """Give the loaders the model's processor, which measures prompts for `max_prompt_length`;
        `default_max_prompt_length` (the model's context length less `max_completion_length`) bounds them where
        the recipe sets none."""
        for dataset in (self.train, self.eval):
            loader = lazy_rows(dataset) if dataset is not None else None
            if loader is not None:
                loader.processor = processor
                if loader.max_prompt_length is None and default_max_prompt_length is not None:
                    loader.max_prompt_length = default_max_prompt_length
                    loader.length_limit = "the model's context length less max_completion_length"

    def log_summary(self) -> None:
        """One line per split: the rows skipped, by reason, with the first of each."""
        for dataset, skipped in ((self.train, self.skipped_train), (self.eval, self.skipped_eval)):
            if dataset is not None:
                (logger.warning if skipped.total else logger.info)("Data: %s", skipped.summary())


def load_task(args: DataArguments, *, seed: int, base_dir: Path | None = None) -> TaskData:
    """Build the datasets a recipe names; relative paths start from `base_dir` (the recipe's), then the cwd.

    Data from files or the Hub is checked where cheap before anything trains (see `rows.check_rows`), and
    loads lazily: each split is a `Dataset` whose transform builds the rows of a batch when it is loaded.
    """
    if args.dataset.startswith("synthetic:"):
        return _synthetic(args, seed)
    image_root = None
    if args.image_root is not None:
        image_root = resolve_path(args.image_root, base_dir)
        if image_root is None or not image_root.is_dir():
            raise DataError(f"image_root {args.image_root!r} is not a directory.")
    train = _read(args, args.dataset, args.split, "split", SkippedRows("train"), base_dir, image_root)
    held_out = None
    if args.eval_dataset is not None or args.eval_split is not None:
        spec = args.eval_dataset if args.eval_dataset is not None else args.dataset
        held_out = _read(args, spec, args.eval_split, "eval_split", SkippedRows("eval"), base_dir, image_root)
        if args.eval_size is not None:
            held_out.first(args.eval_size, "eval_size")
    elif args.eval_size:
        if args.eval_size >= len(train.rows):
            raise DataError(
                f"eval_size={args.eval_size} would hold out all {len(train.rows)} rows of {train.source.name}."
            )
        # Held-out rows are chosen with the seed, so that a file sorted by anything (difficulty, source) splits
        # fairly; both splits keep file order.
        order = np.random.default_rng(seed).permutation(len(train.rows))
        held = train.rows.select(np.sort(order[: args.eval_size]))
        held_out = _Split(held, train.source, train.fmt, SkippedRows("eval"))
        train.rows = train.rows.select(np.sort(order[args.eval_size :]))
    if args.train_size is not None:
        train.first(args.train_size, "train_size")
    return TaskData(
        train=train.lazy(args),
        eval=held_out.lazy(args) if held_out is not None else None,
        chance=None,
        skipped_train=train.skipped,
        skipped_eval=held_out.skipped if held_out is not None else SkippedRows("eval"),
    )


@dataclass
class _Split:
    """One split on its way to the trainer: raw rows (checked), where they came from, and how to read them."""

    rows: Dataset
    source: Source
    fmt: RowFormat
    skipped: SkippedRows

    def first(self, size: int, name: str) -> None:
        if size < len(self.rows):
            logger.info("Using the first %d of %d %s rows (%s).", size, len(self.rows), self.skipped.split, name)
            self.rows = self.rows.select(range(size))

    def lazy(self, args: DataArguments) -> Dataset:
        if len(self.rows) == 0:
            detail = f" {self.skipped.summary()}" if self.skipped.total else ""
            raise DataError(f"{self.source.name}: no {self.skipped.split} rows to use.{detail}")
        loader = LazyRows(
            self.rows,
            self.fmt,
            self.source,
            bad_rows=args.bad_rows,
            skipped=self.skipped,
            max_prompt_length=args.max_prompt_length,
        )
        logger.info(
            "%s data: %d rows from %s, loaded lazily; the rows have columns %s.",
            self.skipped.split.capitalize(),
            len(self.rows),
            self.source.name,
            loader.output_columns(self.rows.column_names),
        )
        dataset = self.rows.with_transform(loader)
        if self.fmt.video_column is None and not image_counts(dataset)[0].any():
            # Loud, not an error: text-only data is legitimate, but with a VLM it is more often a mistake.
            logger.warning(
                "%s data: NONE of the %d rows has an image, so the model sees text only. If the data has images, "
                "name their column `image` or `images` (column_mapping: {your_column: image}).",
                self.skipped.split.capitalize(),
                len(self.rows),
            )
        return dataset


def _synthetic(args: DataArguments, seed: int) -> TaskData:
    if args.dataset not in SYNTHETIC_DATASETS:
        raise DataError(f"Unknown dataset {args.dataset!r}; the synthetic ones are: {', '.join(SYNTHETIC_DATASETS)}.")
    for name in FILE_ONLY_FIELDS:
        if getattr(args, name) is not None:
            raise DataError(f"{name} applies to data read from files or the Hub, not to {args.dataset}.")
    splits = ("train", "sft") if args.dataset in WITH_SFT_ROWS else ("train",)
    if args.dataset == "synthetic:zoom":
        splits = (*splits, NO_TOOLS_SPLIT)
    if args.split not in splits:
        raise DataError(f"split: {args.dataset} trains on {' or '.join(map(repr, splits))}, not {args.split!r}.")
    train_size = 2000 if args.train_size is None else args.train_size
    eval_size = 200 if args.eval_size is None else args.eval_size
    if args.dataset in SCENES:
        return _scenes(args, seed, train_size, eval_size)
    if args.dataset == "synthetic:zoom":
        if args.image_size < MIN_CELL * GRID:
            raise DataError(
                f"image_size: synthetic:zoom needs cells of {MIN_CELL} pixels, at least {MIN_CELL * GRID}."
            )
        held_out = make_zoom_dataset(eval_size, "test", image_size=args.image_size, seed=seed) if eval_size else None
        return TaskData(
            train=make_zoom_dataset(train_size, args.split, image_size=args.image_size, seed=seed),
            eval=held_out,
            chance=_most_common_share(held_out),
        )
    if args.dataset == "synthetic:motion":
        return _motion(args, seed, train_size, eval_size)
    if args.dataset == "synthetic:shapes":
        kwargs = {"image_size": args.image_size, "text_fraction": args.text_fraction, "seed": seed}
        return TaskData(
            train=make_shapes_dataset(train_size, "train", **kwargs),
            eval=make_shapes_dataset(eval_size, "test", **kwargs) if eval_size > 0 else None,
            chance=1.0 / len(COLORS),
        )
    kwargs = {"image_size": args.image_size, "seed": seed}
    return TaskData(
        train=make_grounding_math_dataset(train_size, "train", **kwargs),
        eval=make_grounding_math_dataset(eval_size, "test", **kwargs) if eval_size > 0 else None,
        chance=None,
    )


def _scenes(args: DataArguments, seed: int, train_size: int, eval_size: int) -> TaskData:
    """The scene tasks (`vlm_rl.data.scenes`): `split: sft` trains on the teacher's replies."""
    side = args.image_size // CELL
    if args.dataset == "synthetic:grounding":
        make, kwargs = make_grounding_dataset, {"image_cells": (args.image_size * 3 // 2 // CELL, side)}
    else:
        if side * side < 2 * max(COUNTS):
            raise DataError(f"image_size: {args.dataset} needs room for 10 shapes, at least {4 * CELL} pixels.")
        make, kwargs = make_counting_dataset, {"image_cells": (side, side)}
        if args.dataset == "synthetic:count_diff":
            make, kwargs["text_fraction"] = make_count_diff_dataset, args.text_fraction
    held_out = make(eval_size, "test", seed=seed, **kwargs) if eval_size > 0 else None
    chance = _most_common_share(held_out) if args.dataset != "synthetic:grounding" else None
    return TaskData(train=make(train_size, args.split, seed=seed, **kwargs), eval=held_out, chance=chance)


def _motion(args: DataArguments, seed: int, train_size: int, eval_size: int) -> TaskData:
    """`synthetic:motion` (`vlm_rl.data.motion`): its clips are frames in memory, which go through the loader that
    file data goes through, so that training, generation and evaluation all see the same decoded clips."""
    try:
        train = make_motion_dataset(train_size, args.split, image_size=args.image_size, seed=seed)
        held_out = make_motion_dataset(eval_size, "test", image_size=args.image_size, seed=seed) if eval_size else None
    except ValueError as error:
        raise DataError(str(error)) from error
    skipped_train, skipped_eval = SkippedRows("train"), SkippedRows("eval")
    return TaskData(
        train=_in_memory(train, args, skipped_train),
        eval=_in_memory(held_out, args, skipped_eval) if held_out is not None else None,
        chance=_most_common_share(held_out),
        skipped_train=skipped_train,
        skipped_eval=skipped_eval,
    )


def _in_memory(dataset: Dataset, args: DataArguments, skipped: SkippedRows) -> Dataset:
    """A generated dataset, loaded lazily like rows read from a file (its images handed over undecoded)."""
    dataset = with_row_ids(dataset)
    fmt = RowFormat.for_dataset(dataset, None, None, args.dataset)
    dataset = undecoded(dataset, fmt.image_column, fmt.video_column)
    return _Split(dataset, Source(args.dataset, [], None), fmt, skipped).lazy(args)


def _most_common_share(held_out: Dataset | None) -> float | None:
    """The accuracy of always giving the most common held-out answer (None without held-out rows)."""
    if held_out is None:
        return None
    return max(Counter(held_out["answer"]).values()) / len(held_out)


def _read(
    args: DataArguments,
    spec: str,
    split: str | None,
    split_field: str,
    skipped: SkippedRows,
    base_dir: Path | None,
    image_root: Path | None,
) -> _Split:
    """Read one source, rename its columns and check its rows."""
    mapping = args.column_mapping or {}
    image_sources = {src for src, dst in mapping.items() if dst in IMAGE_COLUMNS}
    image_sources |= {column for column in IMAGE_COLUMNS if column not in mapping}
    # Video columns, like image columns, hold a list per row in text formats (a file, or its frames).
    image_sources |= {src for src, dst in mapping.items() if dst in VIDEO_COLUMNS}
    image_sources |= {column for column in VIDEO_COLUMNS if column not in mapping}
    dataset, source = read_source(
        spec,
        split=split,
        split_field=split_field,
        config=args.dataset_config,
        base_dir=base_dir,
        image_root=image_root,
        image_columns=image_sources,
        skipped=skipped,
        bad_rows=args.bad_rows,
    )
    if len(dataset) == 0:
        detail = f" {skipped.summary()}" if skipped.total else ""
        raise DataError(f"{source.name}: no rows.{detail}")
    dataset = rename_columns(dataset, mapping, source.name)
    fmt = RowFormat.for_dataset(dataset, args.prompt_template, args.system_prompt, source.name)
    dataset = undecoded(dataset, fmt.image_column, fmt.video_column)
    dataset = check_rows(dataset, fmt, source, bad_rows=args.bad_rows, skipped=skipped)
    return _Split(dataset, source, fmt, skipped)
