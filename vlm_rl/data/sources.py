"""Reading a recipe's data source into a `Dataset`, remembering which file and line each row came from.

Text formats (jsonl, json, csv) are parsed here, row by row, so that an unreadable row is reported with
its file and line, or skipped and counted. Parquet, `save_to_disk` directories and the Hub go through
`datasets` (memory-mapped Arrow). Every row gets a `ROW_ID` column: its number across the source's files,
kept through any later selection, so that messages name the right file and row.
"""

from __future__ import annotations

import bisect
import csv
import glob
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset, load_from_disk
from huggingface_hub import constants as hub_constants

from vlm_rl.data.stats import DataError, SkippedRows

ROW_ID = "_row_id"
FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SKIP_HINT = "set `bad_rows: skip` to skip such rows (they are counted in data/skipped_rows)"


@dataclass
class SourceFile:
    """One file's rows: ids `start` to `start + num_rows - 1`; `lines` holds each row's line number if known.

    (An array, not a list: `datasets` hashes the loader, and with it this, when the lazy transform is set.)
    """

    path: Path
    start: int
    num_rows: int
    lines: np.ndarray | None = None

    @cached_property
    def directory(self) -> str:
        return str(self.path.parent)

    def where(self, row_id: int) -> str:
        index = row_id - self.start
        return f"{self.path} line {self.lines[index]}" if self.lines is not None else f"{self.path} row {index}"


@dataclass
class Source:
    """Where a dataset's rows came from, and the directory relative image paths start from."""

    name: str
    files: list[SourceFile]
    image_root: Path | None

    def file_of(self, row_id: int) -> SourceFile | None:
        index = bisect.bisect_right(self.files, row_id, key=lambda file: file.start) - 1
        return self.files[index] if index >= 0 else None

    def where(self, row_id: int) -> str:
        file = self.file_of(row_id)
        return file.where(row_id) if file is not None else f"{self.name} row {row_id}"

    def image_dir(self, row_id: int) -> str:
        """`image_root` if the recipe sets one, else the directory holding the row's file (or saved dataset)."""
        if self.image_root is not None:
            return str(self.image_root)
        file = self.file_of(row_id)
        return file.directory if file is not None else os.getcwd()

    def image_path(self, path: str, row_id: int) -> str:
        """Where a row's image path points (`os.path`: one call per image of every row before training)."""
        return path if os.path.isabs(path) else os.path.join(self.image_dir(row_id), path)


def resolve_path(path: str, base_dir: Path | None) -> Path | None:
    """A recipe path: as given if absolute, else from the recipe's directory, then the working directory."""
    candidates = [Path(path)] if Path(path).is_absolute() else [d / path for d in (base_dir, Path.cwd()) if d]
    for candidate in candidates:
        if candidate.exists() or (glob.has_magic(str(candidate)) and glob.glob(str(candidate))):
            return candidate
    return None


def read_source(
    spec: str,
    *,
    split: str | None,
    split_field: str,
    config: str | None,
    base_dir: Path | None,
    image_root: Path | None,
    image_columns: set[str],
    skipped: SkippedRows,
    bad_rows: str,
) -> tuple[Dataset, Source]:
    """The rows of a local file, glob, directory or Hub dataset, with a `ROW_ID` column.

    `split` picks the split of a Hub dataset or a saved `DatasetDict` (`split_field` is the recipe field that
    named it, for messages); a source without splits is read whole, unless `split_field` is `eval_split`.
    `image_columns` are the source columns that hold images: in text formats their values become lists,
    so one column may mix rows with one image, several or none.
    """
    local = resolve_path(spec, base_dir)
    if local is None:
        if Path(spec).suffix in FORMATS or Path(spec).is_absolute() or spec.startswith("."):
            tried = [spec] if Path(spec).is_absolute() else [str(d / spec) for d in (base_dir, Path.cwd()) if d]
            raise DataError(f"Data file {spec!r} not found (looked for: {', '.join(tried)}).")
        dataset = _pick_split(_load_hub(spec, split=split, config=config), split, split_field, spec)
        return with_row_ids(dataset), Source(spec, [], image_root)
    if local.is_dir() and _is_saved_dataset(local):
        dataset = _pick_split(load_from_disk(str(local)), split, split_field, str(local))
        return with_row_ids(dataset), Source(str(local), [SourceFile(local, 0, len(dataset))], image_root)
    if split_field == "eval_split" and split is not None:
        raise DataError(_no_splits(local, split))
    paths = _data_files(local)
    kinds = {FORMATS[path.suffix] for path in paths}
    if len(kinds) > 1:
        raise DataError(f"{local}: mixes data formats {sorted(kinds)}; use files of one format.")
    (kind,) = kinds
    if kind == "parquet":
        return _read_parquet(paths, local, image_root)
    rows, files = [], []
    for path in paths:
        file_rows, lines = _read_text_rows(path, kind, skipped, bad_rows)
        files.append(SourceFile(path, len(rows), len(file_rows), None if lines is None else np.array(lines)))
        rows += file_rows
    columns = {key: [row.get(key) for row in rows] for key in dict.fromkeys(k for row in rows for k in row)}
    for key in image_columns & columns.keys():
        columns[key] = [v if isinstance(v, list) else [] if v is None or v == "" else [v] for v in columns[key]]
    if ROW_ID in columns:
        raise DataError(f"{local}: the data has a column named {ROW_ID!r}, which vlm-rl reserves; rename it.")
    columns[ROW_ID] = list(range(len(rows)))
    return _from_columns(columns, files), Source(str(local), files, image_root)


def _no_splits(path: Path | str, split: str) -> str:
    return (
        f"{path} has no splits, so eval_split {split!r} cannot be read from it: give held-out data as "
        "`eval_dataset` (a file or directory of its own), or hold out training rows with `eval_size`."
    )


def _pick_split(dataset: Dataset | DatasetDict, split: str | None, split_field: str, name: str) -> Dataset:
    if not isinstance(dataset, DatasetDict):
        if split_field == "eval_split" and split is not None:
            raise DataError(_no_splits(name, split))
        return dataset
    if split not in dataset:
        named = f"{split_field} {split!r} is not one of them" if split is not None else f"name one with {split_field}"
        raise DataError(f"{name} has splits {list(dataset)}; {named}.")
    return dataset[split]


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.suffix in FORMATS)
        if not paths:
            raise DataError(
                f"{path}: a directory with no data files ({', '.join(FORMATS)}) and no `save_to_disk` dataset."
            )
        return paths
    paths = [Path(p) for p in sorted(glob.glob(str(path)))] if glob.has_magic(str(path)) else [path]
    for p in paths:
        if p.suffix not in FORMATS:
            raise DataError(f"{p}: unknown data file type {p.suffix!r}; use one of {', '.join(FORMATS)}.")
    return paths


def _read_text_rows(path: Path, kind: str, skipped: SkippedRows, bad_rows: str) -> tuple[list[dict], list[int] | None]:
    """The rows of a jsonl, json or csv file and their line numbers (None inside a JSON array).

    Bytes that are not UTF-8 are read as lone surrogates (`surrogateescape`), so that they spoil only their own
    line: such a line is unreadable, like one that is not JSON.
    """
    rows, lines = [], []
    with open(path, encoding="utf-8", errors="surrogateescape", newline="" if kind == "csv" else None) as f:
        if kind == "csv":
            reader = csv.DictReader(f)
            for row in reader:
                if None in row:  # more fields than the header names
                    problem = f"more fields than the {len(reader.fieldnames or [])} columns of the header"
                    _bad_line(path, reader.line_num, problem, skipped, bad_rows)
                    continue
                if not all(_is_utf8(value) for value in (*row.keys(), *row.values())):
                    _bad_line(path, reader.line_num, NOT_UTF8, skipped, bad_rows)
                    continue
                rows.append(row)
                lines.append(reader.line_num)
            return rows, lines
        if kind == "json" and f.read(1024).lstrip().startswith("["):
            data = path.read_bytes()
            try:
                rows = json.loads(data.decode("utf-8"))
            except UnicodeDecodeError as error:
                line = data.count(b"\n", 0, error.start) + 1
                problem = f"{NOT_UTF8}. A JSON array cannot skip a row: fix the file"
                raise DataError(f"{path} line {line}: {problem}.") from error
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path} line {error.lineno}: not valid JSON ({error.msg}, column {error.colno}). A JSON array "
                    "cannot skip a row: fix the file, or write it as JSON Lines (one object per line)."
                ) from error
            for index, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise DataError(f"{path} row {index}: expected an object of the row's columns, got {row!r}.")
            return rows, None
        f.seek(0)  # JSON Lines, whatever the extension
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if not _is_utf8(line):
                _bad_line(path, number, NOT_UTF8, skipped, bad_rows)
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                _bad_line(path, number, f"not valid JSON ({error.msg}, column {error.colno})", skipped, bad_rows)
                continue
            if not isinstance(row, dict):
                _bad_line(path, number, f"expected a JSON object, got {type(row).__name__}", skipped, bad_rows)
                continue
            rows.append(row)
            lines.append(number)
    return rows, lines


NOT_UTF8 = "not valid UTF-8 text"


def _is_utf8(text: str) -> bool:
    """False when `text` holds bytes that did not decode (read with `surrogateescape`)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad_line(path: Path, line: int, problem: str, skipped: SkippedRows, bad_rows: str) -> None:
    if bad_rows == "skip":
        skipped.add("unreadable_row", f"{path} line {line}: {problem}")
    else:
        raise DataError(f"{path} line {line}: {problem}. Fix the line, or {SKIP_HINT}.")


def _from_columns(columns: dict[str, list], files: list[SourceFile]) -> Dataset:
    try:
        return Dataset.from_dict(columns)
    except Exception as error:  # Arrow cannot hold the column: find the first row whose type differs
        for name, values in columns.items():
            kinds = {_kind(v) for v in values if v is not None}
            if len(kinds) > 1:
                first = _kind(next(v for v in values if v is not None))
                row = next(i for i, v in enumerate(values) if v is not None and _kind(v) != first)
                raise DataError(
                    f"{_where(files, row)}: column {name!r} holds a {_kind(values[row])} here but a {first} in "
                    "earlier rows; give each column one type."
                ) from error
        for name, values in columns.items():  # same kinds at the top, but nested types or values Arrow cannot hold
            found = _first_unstorable(values)
            if found is not None:
                row, problem = found
                raise DataError(f"{_where(files, row)}: column {name!r} {problem}.") from error
        raise DataError(f"{', '.join(str(f.path) for f in files)}: the rows do not form a table ({error}).") from error


def _where(files: list[SourceFile], row: int) -> str:
    return next(f for f in files if f.start <= row < f.start + f.num_rows).where(row)


def _first_unstorable(values: list) -> tuple[int, str] | None:
    """The first row whose value Arrow cannot store along with the rows before it, and why; None if all fit.

    A prefix that does not convert stays unconvertible when extended, so the row is found by bisection.
    """

    def problem(prefix: list) -> str | None:
        try:
            pa.array(prefix)
        except (pa.ArrowException, OverflowError, TypeError, ValueError, UnicodeError) as error:
            return f"{type(error).__name__}: {error}"
        return None

    if problem(values) is None:
        return None
    low, high = 1, len(values)  # the shortest failing prefix is values[:high]
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if problem(values[:middle]) is not None else (middle + 1, high)
    row = high - 1
    alone = problem(values[row : row + 1])
    if alone is not None:
        return row, (
            f"holds a value that cannot be stored ({alone}); a list must hold values of one type, an integer must fit "
            "in 64 bits and text must be valid Unicode"
        )
    return row, (
        f"holds a value whose type differs from the earlier rows' inside its lists or objects "
        f"({problem(values[: row + 1])}); give each column one type, nested values included"
    )


def _kind(value: Any) -> str:
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__


def _read_parquet(paths: list[Path], name: Path, image_root: Path | None) -> tuple[Dataset, Source]:
    files, start = [], 0
    for path in paths:
        try:
            num_rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as error:
            raise DataError(f"{path}: not a readable Parquet file ({error}).") from error
        files.append(SourceFile(path, start, num_rows))
        start += num_rows
    dataset = concatenate_datasets([Dataset.from_parquet(str(path)) for path in paths])
    return with_row_ids(dataset), Source(str(name), files, image_root)


def with_row_ids(dataset: Dataset) -> Dataset:
    if ROW_ID in dataset.column_names:
        raise DataError(f"The data has a column named {ROW_ID!r}, which vlm-rl reserves; rename it.")
    return dataset.add_column(ROW_ID, range(len(dataset)))


def _load_hub(name: str, *, split: str | None, config: str | None) -> Dataset | DatasetDict:
    try:
        return load_dataset(name, config, split=split)
    except Exception as error:
        offline = (
            " The Hub is offline (HF_HUB_OFFLINE): only datasets already in the local cache load."
            if hub_constants.HF_HUB_OFFLINE
            else ""
        )
        raise DataError(
            f"Dataset {name!r} is not a local file or directory, and loading it from the Hub failed: {error}.{offline}"
        ) from error
