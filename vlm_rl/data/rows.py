"""From raw rows to the rows the trainer reads: a conversational `prompt` and a list of decoded `images`.

Before training, checks that are cheap for every row run on the whole split: columns and template
placeholders exist, the values a prompt needs are present, every image path exists. Everything else
happens lazily, in a `Dataset.with_transform` function, for the rows of the batch being loaded: images
are decoded (RGB), the prompt is built and, once the processor is attached, run through it the way TRL will
(and measured, for `max_prompt_length`). A dataset of 100k image paths therefore starts training without
decoding any image up front.
"""

from __future__ import annotations

import difflib
import os
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetInfo, Features, Image, LargeList, List, Value
from PIL import Image as PILImage
from trl.data_utils import prepare_multimodal_messages

from vlm_rl.data.sources import ROW_ID, SKIP_HINT, Source
from vlm_rl.data.stats import DataError, SkippedRows
from vlm_rl.data.video import (
    VIDEO_COLUMNS,
    Clip,
    ClipError,
    clip_from_frames,
    decode_file,
    decode_settings,
    is_video_file,
    with_video,
)

PROMPT, IMAGES, VIDEOS = "prompt", "images", "videos"
IMAGE_COLUMNS = ("image", "images")
IMAGE_MARKER = "<image>"  # where EasyR1 / LLaVA-style prompt text puts an image
# A text column whose first values all end in one of these holds image paths (unless it is the image column).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".avif", ".heic")
IMAGE_SAMPLE = 1000  # rows looked at per column
ROLES = ("system", "user", "assistant")
# Names TRL passes to reward functions itself: a column of the same name would clash with them.
RESERVED_COLUMNS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


class BadRow(Exception):
    """A row that cannot be used; `reason` is its kind, as in `data/skipped_rows_<reason>`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def closest(name: str, names: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(names), n=1)
    return f" Did you mean {match[0]!r}?" if match else ""


@dataclass(frozen=True)
class RowFormat:
    """How a raw row (columns already renamed by `column_mapping`) becomes a trainer row."""

    template: str | None
    system_prompt: str | None
    image_column: str | None
    video_column: str | None  # one video per row: a file, or a list of frames
    conversational: bool  # the `prompt` column holds conversations; otherwise strings, or the template builds it
    placeholders: tuple[str, ...]

    @classmethod
    def for_dataset(cls, dataset: Dataset, template: str | None, system_prompt: str | None, name: str) -> RowFormat:
        """Check the columns the recipe relies on, failing with the column at fault and the ones present."""
        columns = [c for c in dataset.column_names if c != ROW_ID]
        listing = f"Columns: {columns}."
        for column in RESERVED_COLUMNS:
            if column in columns:
                raise DataError(
                    f"{name}: column {column!r} would clash with the argument of that name TRL passes to rewards; "
                    f"rename it with column_mapping: {{{column}: another_name}}."
                )
        image_columns = [c for c in IMAGE_COLUMNS if c in columns]
        if len(image_columns) > 1:
            raise DataError(f"{name}: has both an `image` and an `images` column; rename one with column_mapping.")
        image_column = image_columns[0] if image_columns else None
        video_columns = [c for c in VIDEO_COLUMNS if c in columns]
        if len(video_columns) > 1:
            raise DataError(f"{name}: has both a `video` and a `videos` column; rename one with column_mapping.")
        video_column = video_columns[0] if video_columns else None
        if video_column is not None:
            _check_image_type(dataset.data.schema.field(video_column).type, name, video_column)
        else:
            _refuse_unnamed_videos(dataset, [c for c in columns if c not in IMAGE_COLUMNS], name)
        if image_column is not None:
            _check_image_type(dataset.data.schema.field(image_column).type, name, image_column)
        else:
            _refuse_unnamed_images(dataset, [c for c in columns if c != video_column], name)

        conversational = False
        if PROMPT in columns:
            feature = dataset.features[PROMPT]
            conversational = _is_conversation(feature)
            if not conversational and feature != Value("string") and feature != Value("large_string"):
                raise DataError(
                    f"{name}: column 'prompt' must hold strings or conversations (lists of {{role, content}} "
                    f"messages with string content); it holds {feature}."
                )
            if conversational and template is not None:
                raise DataError(
                    f"{name}: column 'prompt' already holds conversations, and the recipe sets prompt_template; "
                    "remove prompt_template, or map the text column the template should use."
                )
        elif template is None:
            raise DataError(
                f"{name}: no 'prompt' column, and the recipe sets no prompt_template. {listing} Map the question "
                "column (column_mapping: {question: prompt}) or set prompt_template (e.g. '{question}')."
            )
        placeholders = _placeholders(template, name) if template is not None else ()
        for placeholder in placeholders:
            if placeholder not in columns:
                raise DataError(
                    f"{name}: prompt_template uses {{{placeholder}}}, but there is no column {placeholder!r} "
                    f"(after column_mapping). {listing}{closest(placeholder, columns)}"
                )
        return cls(template, system_prompt, image_column, video_column, conversational, placeholders)

    @property
    def required(self) -> list[str]:
        """Columns whose value every row needs."""
        return list(self.placeholders) if self.template is not None else [PROMPT]


def rename_columns(dataset: Dataset, mapping: dict[str, str] | None, name: str) -> Dataset:
    """Apply `column_mapping`, naming a source column the data lacks (and the closest it has). A source may name a
    field of a struct column as `column.field`."""
    if not mapping:
        return dataset
    if any("." in source and source not in dataset.column_names for source in mapping):
        # A field inside a struct column (verl / DeepEyes data: `reward_model.ground_truth`): struct columns become
        # `parent.child` columns, which the mapping can then rename.
        dataset = dataset.flatten()
    columns = [c for c in dataset.column_names if c != ROW_ID]
    for source, target in mapping.items():
        if source not in columns:
            raise DataError(
                f"{name}: column_mapping renames {source!r}, but there is no such column. Columns: {columns}."
                f"{closest(source, columns)}"
            )
        if target in columns and target not in mapping:
            raise DataError(
                f"{name}: column_mapping renames {source!r} to {target!r}, which is already a column; map "
                f"{target!r} away too (column_mapping: {{{target}: other_name}}) or pick another name."
            )
    return dataset.rename_columns(mapping)


def check_rows(dataset: Dataset, fmt: RowFormat, source: Source, *, bad_rows: str, skipped: SkippedRows) -> Dataset:
    """Find rows missing a value their prompt needs or with an image path that does not exist: one stat per path.

    Under `bad_rows: raise` the first one (in row order) is an error; under `skip` they are all left out.
    """
    table = dataset.with_format("arrow")
    row_ids = table[ROW_ID].to_numpy()
    bad: dict[int, tuple[str, str]] = {}  # position -> (reason, detail)
    for column in fmt.required:
        for position in np.flatnonzero(table[column].is_null().to_numpy(zero_copy_only=False)):
            bad.setdefault(int(position), ("missing_value", f"column {column!r} is empty"))
    for column, kind in ((fmt.image_column, "image"), (fmt.video_column, "video")):
        if column is None:
            continue
        for position, path in _image_paths(table[column]):
            if position in bad:
                continue
            full = source.image_path(path, int(row_ids[position]))
            if not os.path.isfile(full):
                what = "video" if kind == "video" and is_video_file(path) else "image" if kind == "image" else "frame"
                bad[position] = (f"missing_{kind}", f"{what} {path!r} not found (looked for {full})")
    for position in sorted(bad):
        reason, detail = bad[position]
        where = source.where(int(row_ids[position]))
        if bad_rows == "raise":
            raise DataError(f"{where}: {detail}. Fix the row, or {SKIP_HINT}.")
        skipped.add(reason, f"{where}: {detail}")
    if bad:
        dataset = dataset.select(np.setdiff1d(np.arange(len(dataset)), list(bad)))
    if len(dataset) and fmt.template is not None:
        first = dataset.with_format(None)[0]
        try:
            fmt.template.format_map(first)
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as error:
            raise DataError(
                f"{source.where(first[ROW_ID])}: prompt_template {fmt.template!r} cannot be formatted with this row "
                f"({type(error).__name__}: {error})."
            ) from error
    return dataset


def undecoded(dataset: Dataset, *columns: str | None) -> Dataset:
    """The same table with `columns`' image features handing over bytes and paths: decoding is the loader's.

    Called before any `select`, on a dataset without an indices mapping.
    """
    features = dict(dataset.features)
    for column in columns:
        feature = features.get(column) if column is not None else None
        if isinstance(feature, Image):
            features[column] = Image(decode=False)
        elif isinstance(feature, List | LargeList) and isinstance(feature.feature, Image):
            features[column] = type(feature)(Image(decode=False))
    if features == dict(dataset.features):
        return dataset
    return Dataset(dataset.data, info=DatasetInfo(features=Features(features)))


class LazyRows:
    """The `Dataset.with_transform` function that makes trainer rows out of the raw rows of a batch.

    A bad row (corrupt or vanished image, malformed conversation, a row the processor rejects, prompt over
    `max_prompt_length`) is an error naming its file and row; under `bad_rows: skip` it is replaced by the next
    good row of the split, the same one for every repeat of it (TRL's sampler asks for each index
    `num_generations` times, so the batch keeps its size and GRPO its groups), and counted once. Copies of the
    dataset share this object.
    """

    def __init__(
        self,
        raw: Dataset,
        fmt: RowFormat,
        source: Source,
        *,
        bad_rows: str,
        skipped: SkippedRows,
        max_prompt_length: int | None = None,
    ):
        self.raw = raw  # no format: plain values, images undecoded
        self.fmt = fmt
        self.source = source
        self.bad_rows = bad_rows
        self.skipped = skipped
        self.max_prompt_length = max_prompt_length
        self.length_limit = "max_prompt_length"  # where the bound came from, for the message
        self.processor = None  # set with `TaskData.attach_processor`; checks rows and measures prompts
        self._bad: set[int] = set()  # row ids found bad (and counted)
        self._replacements: dict[int, int] = {}  # bad row id -> position of its replacement in `raw`
        self._fits: set[int] = set()  # row ids the processor took (within max_prompt_length, if set)
        self._row_ids: np.ndarray | None = None

    def __deepcopy__(self, memo):
        return self  # `datasets` deep-copies formats; the counts must stay shared

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if ROW_ID not in batch:
            raise DataError(
                f"{self.source.name}: the data reached the loader without its {ROW_ID!r} column; were columns "
                "removed (remove_unused_columns: true)? vlm-rl needs remove_unused_columns: false, TRL's default."
            )
        cache: dict[Any, Any] = {}
        rows = [self._load_or_replace(row, cache) for row in _rows(batch)]
        return {key: [row[key] for row in rows] for key in self.output_columns(batch)}

    def load_or_drop(self, positions: list[int], batch: dict[str, list]) -> list[tuple[int, dict]]:
        """The loadable rows of a raw batch, with their positions: bad rows are left out (and counted)."""
        cache: dict[Any, Any] = {}
        loaded = []
        for position, row in zip(positions, _rows(batch), strict=True):
            if row[ROW_ID] in self._bad:
                continue
            try:
                loaded.append((position, self._load(row, cache)))
            except BadRow as bad:
                self._reject(row[ROW_ID], bad)
        return loaded

    def output_columns(self, raw_columns: Iterable[str]) -> list[str]:
        """The columns of the rows built from raw rows with `raw_columns`."""
        dropped = {ROW_ID, PROMPT, self.fmt.image_column, self.fmt.video_column}
        videos = [VIDEOS] if self.fmt.video_column is not None else []
        return [PROMPT, IMAGES, *videos, *(key for key in raw_columns if key not in dropped)]

    def _load_or_replace(self, row: dict, cache: dict) -> dict:
        row_id = row[ROW_ID]
        if row_id not in self._bad:
            try:
                return self._load(row, cache)
            except BadRow as bad:
                self._reject(row_id, bad)
        return self._replacement(row_id, cache)

    def _replacement(self, row_id: int, cache: dict) -> dict:
        """The next good row after `row_id` in the split (wrapping around), the same every time."""
        if row_id in self._replacements:
            return self._load(self.raw[self._replacements[row_id]], cache)
        if self._row_ids is None:
            self._row_ids = self.raw.with_format("arrow")[ROW_ID].to_numpy()
        start = int(np.searchsorted(self._row_ids, row_id))
        for step in range(1, len(self.raw) + 1):
            position = (start + step) % len(self.raw)
            candidate = self.raw[position]
            if candidate[ROW_ID] in self._bad:
                continue
            try:
                loaded = self._load(candidate, cache)
            except BadRow as bad:
                self._reject(candidate[ROW_ID], bad)
                continue
            self._replacements[row_id] = position
            return loaded
        raise DataError(f"{self.source.name}: every {self.skipped.split} row is bad. {self.skipped.summary()}")

    def _reject(self, row_id: int, bad: BadRow) -> None:
        where = self.source.where(row_id)
        if self.bad_rows == "raise":
            raise DataError(f"{where}: {bad.detail}. Fix the row, or {SKIP_HINT}.")
        self._bad.add(row_id)
        self.skipped.add(bad.reason, f"{where}: {bad.detail}")

    def _load(self, row: dict, cache: dict) -> dict:
        row_id = row[ROW_ID]
        if ("row", row_id) in cache:  # the same index repeated within a batch
            return dict(cache["row", row_id])
        refs = row.get(self.fmt.image_column) if self.fmt.image_column is not None else None
        refs = [] if refs is None else refs if isinstance(refs, list) else [refs]
        images = [self._image(ref, index, row_id, cache) for index, ref in enumerate(refs)]
        videos = self._videos(row, row_id, cache)
        prompt = place_images(self._prompt(row, has_images=bool(images or videos)), len(images))
        if (self.processor is not None or self.max_prompt_length is not None) and row_id not in self._fits:
            self._check_length(prompt, images, videos)
            self._fits.add(row_id)
        dropped = {ROW_ID, PROMPT, self.fmt.image_column, self.fmt.video_column}
        loaded = {PROMPT: prompt, IMAGES: images, **{k: v for k, v in row.items() if k not in dropped}}
        if self.fmt.video_column is not None:
            loaded[VIDEOS] = videos
        cache["row", row_id] = loaded
        return dict(loaded)

    def _prompt(self, row: dict, *, has_images: bool) -> list[dict]:
        fmt = self.fmt
        if fmt.conversational:
            messages = [dict(message) for message in row[PROMPT] or []]
            for message in messages:
                if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                    raise BadRow("bad_prompt", f"prompt message {message!r} needs a role in {ROLES} and text content")
            if not messages:
                raise BadRow("missing_value", "the prompt is an empty conversation")
            if has_images and not any(message["role"] == "user" for message in messages):
                raise BadRow("bad_prompt", "the row has images but its prompt has no user message to put them in")
        else:
            if fmt.template is not None:
                try:
                    text = fmt.template.format_map(row)
                except (KeyError, IndexError, ValueError, AttributeError, TypeError) as error:
                    raise BadRow("bad_prompt", f"prompt_template cannot be formatted ({error!r})") from error
            else:
                text = row[PROMPT]
            if not isinstance(text, str):
                raise BadRow("missing_value", "the prompt is empty")
            messages = [{"role": "user", "content": text}]
        if fmt.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            messages.insert(0, {"role": "system", "content": fmt.system_prompt})
        return messages

    def _videos(self, row: dict, row_id: int, cache: dict) -> list[Clip]:
        """The row's video, decoded (frames sampled at the processor's settings), as a list of none or one."""
        refs = row.get(self.fmt.video_column) if self.fmt.video_column is not None else None
        refs = [] if refs is None or refs == "" else refs if isinstance(refs, list) else [refs]
        if not refs:
            return []
        settings = decode_settings(self.processor)
        files = [ref for ref in refs if is_video_file(ref)]
        if len(files) > 1 or (files and len(refs) > 1):
            raise BadRow(
                "bad_video",
                f"the row has {len(refs)} videos or a video among frames; a row holds one video for now (a file, "
                "or a list of frames)",
            )
        key = ("video", self.source.image_path(files[0], row_id) if files else row_id, tuple(settings.items()))
        if key not in cache:
            try:
                if files:
                    cache[key] = decode_file(key[1], repr(files[0]), **settings)
                else:
                    frames = [self._image(ref, index, row_id, cache) for index, ref in enumerate(refs)]
                    cache[key] = clip_from_frames(frames, f"of {len(frames)} frames", fps=settings.get("fps"))
            except ClipError as error:
                cache[key] = BadRow(error.reason, error.detail)
        if isinstance(cache[key], BadRow):
            raise cache[key]
        return [cache[key]]

    def _image(self, ref: Any, index: int, row_id: int, cache: dict) -> PILImage.Image:
        if isinstance(ref, dict):  # an `Image` feature's storage
            ref = ref.get("bytes") or ref.get("path")
        if isinstance(ref, PILImage.Image):
            return ref if ref.mode == "RGB" else _rgb(ref)
        if isinstance(ref, str) and ref:
            key, name, data = self.source.image_path(ref, row_id), repr(ref), None
        elif isinstance(ref, bytes | bytearray):
            key, name, data = bytes(ref), f"{index} (embedded bytes)", BytesIO(ref)
        else:
            raise BadRow("missing_image", f"image {index} is {ref!r}, not a path, bytes or an image")
        if key not in cache:
            try:
                with PILImage.open(data or key) as image:
                    image.load()
                    cache[key] = _rgb(image)
            except FileNotFoundError:
                cache[key] = BadRow("missing_image", f"image {name} not found (looked for {key})")
            except Exception as error:  # decoding arbitrary bytes raises many types
                problem = f"{type(error).__name__}: {error}"
                cache[key] = BadRow("corrupt_image", f"image {name} cannot be decoded ({problem})")
        if isinstance(cache[key], BadRow):
            raise cache[key]
        return cache[key]

    def _check_length(self, prompt: list[dict], images: list, videos: list) -> None:
        """Run the row through the processor as TRL will: a row it rejects (Qwen-VL refuses images more than 200
        times wider than tall) would otherwise fail a training step without a name. Once per row per run."""
        if self.processor is None:
            raise DataError(
                "max_prompt_length is set but no processor measures prompts: call "
                "`TaskData.attach_processor(processor)` before training."
            )
        try:
            length = prompt_length(self.processor, prompt, images, videos)
        except Exception as error:  # processors raise many types; the row is what the user can fix
            size = f" with images of sizes {[image.size for image in images]}" if images else ""
            if videos:
                size += f" with a video of {len(videos[0])} frames of {videos[0].shape[2]}×{videos[0].shape[1]}"
            raise BadRow(
                "processor_error", f"the processor cannot take this row{size} ({type(error).__name__}: {error})"
            ) from error
        if self.max_prompt_length is not None and length > self.max_prompt_length:
            raise BadRow(
                "prompt_too_long",
                f"the prompt is {length} tokens with its images, over {self.length_limit}={self.max_prompt_length}; "
                "shorten it or raise max_prompt_length (prompt plus max_completion_length must fit the context)",
            )


def place_images(messages: list[dict], num_images: int) -> list[dict]:
    """Put each image where the prompt text has an `<image>` marker (EasyR1 and LLaVA-style data), in order.

    Marked text becomes content blocks, text and image placeholders in order, which TRL's
    `prepare_multimodal_messages` fills with the row's images; the other messages become text blocks, so that TRL
    adds no placeholders of its own. Left as text, the marker would stay literal (Qwen) or be a second image token
    for one image (LLaVA). Without markers TRL puts the images before the first user message's text.
    """
    markers = sum(message["content"].count(IMAGE_MARKER) for message in messages)
    if not markers:
        return messages
    for message in messages:
        if message["role"] != "user" and IMAGE_MARKER in message["content"]:
            role = message["role"]
            raise BadRow("bad_prompt", f"the {role} message has an {IMAGE_MARKER} marker; images go in user messages")
    if markers != num_images:
        raise BadRow(
            "bad_prompt",
            f"the prompt has {markers} {IMAGE_MARKER} marker(s) but the row has {num_images} image(s); give one "
            "marker per image, in order, or none (the images then go before the text)",
        )
    placed = []
    for message in messages:
        pieces = message["content"].split(IMAGE_MARKER)
        blocks = [{"type": "text", "text": pieces[0]}] if len(pieces) == 1 or pieces[0] else []
        for text in pieces[1:]:
            blocks += [{"type": "image"}, *([{"type": "text", "text": text}] if text else [])]
        placed.append({**message, "content": blocks})
    return placed


def prompt_length(processor, prompt: list[dict], images: list, videos: list = ()) -> int:
    """Tokens of the prompt as the trainer tokenizes it: chat template, generation prompt, image and video tokens."""
    conversation = prepare_multimodal_messages(with_video(prompt, videos, len(images)), images=images)
    tokenized = processor.apply_chat_template(
        conversation=[conversation], **generation_prompt([prompt]), tokenize=True, return_dict=True
    )
    return len(tokenized["input_ids"][0])


def _rgb(image: PILImage.Image) -> PILImage.Image:
    """The image in RGB. 16-bit samples are scaled to 8 bits first: Pillow's conversion clips them at 255, which
    turns a 16-bit image almost white. (Pillow reads 16-bit PNG and TIFF greyscale as `I;16*`, some files as `I`.)"""
    if image.mode.startswith("I;16") or image.mode == "I":
        samples = np.asarray(image)
        if image.mode != "I" or samples.max(initial=0) > 255:
            image = PILImage.fromarray((np.clip(samples, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8))
    return image.convert("RGB")  # a copy even in RGB: the file's image is closed after this


def lazy_rows(dataset: Dataset) -> LazyRows | None:
    """The loader behind a lazily loaded dataset; None for a plain one."""
    transform = (dataset.format.get("format_kwargs") or {}).get("transform")
    return transform if isinstance(transform, LazyRows) else None


def trainer_columns(dataset: Dataset) -> list[str]:
    """The columns of the rows the trainer reads from `dataset`: a lazily loaded one builds `prompt` and `images`."""
    loader = lazy_rows(dataset)
    return dataset.column_names if loader is None else loader.output_columns(dataset.column_names)


def load_rows(dataset: Dataset, positions: list[int]) -> list[tuple[int, dict]]:
    """The rows at `positions`, decoded, with their positions; one batch at a time, for evaluation.

    Unlike the trainer's batches, a bad row of a lazily loaded dataset is left out (and counted), not
    replaced: an evaluation scores each row once.
    """
    loader = lazy_rows(dataset)
    if loader is None:
        return list(zip(positions, _rows(dataset[positions]), strict=True))
    return loader.load_or_drop(positions, dataset.with_format(None)[positions])


def _rows(batch: dict[str, list]) -> list[dict]:
    return [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def _is_conversation(feature) -> bool:
    inner = getattr(feature, "feature", None)
    return (
        isinstance(feature, List | LargeList)
        and isinstance(inner, dict)
        and {"role", "content"} <= set(inner)
        and inner["content"] in (Value("string"), Value("large_string"))
    )


def _placeholders(template: str, name: str) -> tuple[str, ...]:
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:
        raise DataError(f"{name}: prompt_template {template!r} is not a valid format string ({error}).") from error
    names = []
    for field in fields:
        column = field.split(".")[0].split("[")[0]
        if not column or column.isdigit():
            raise DataError(
                f"{name}: prompt_template {template!r} has a positional placeholder {{{field}}}; name a column, "
                "as in {question}. Literal braces are written {{ and }}."
            )
        names.append(column)
    return tuple(dict.fromkeys(names))


def _is_list(data_type: pa.DataType) -> bool:
    return pa.types.is_list(data_type) or pa.types.is_large_list(data_type) or pa.types.is_fixed_size_list(data_type)


def _check_image_type(data_type: pa.DataType, name: str, column: str) -> None:
    leaf = data_type.value_type if _is_list(data_type) else data_type
    ok = (
        pa.types.is_null(leaf)
        or pa.types.is_string(leaf)
        or pa.types.is_large_string(leaf)
        or pa.types.is_binary(leaf)
        or pa.types.is_large_binary(leaf)
        or (pa.types.is_struct(leaf) and {leaf.field(i).name for i in range(leaf.num_fields)} & {"bytes", "path"})
    )
    if not ok:
        raise DataError(
            f"{name}: column {column!r} holds {data_type}; images must be paths, bytes, `datasets` Image "
            "features, or lists of these (null for none)."
        )


def _refuse_unnamed_images(dataset: Dataset, columns: list[str], name: str) -> None:
    """With no `image`/`images` column, a column that holds images under another name would silently train text
    alone: refuse it, naming the column and the `column_mapping` that makes it the image column."""
    for column in columns:
        data_type = dataset.data.schema.field(column).type
        leaf = data_type.value_type if _is_list(data_type) else data_type
        values = dataset.data.column(column).slice(0, IMAGE_SAMPLE)  # a look at the first rows, not a scan
        sample = (pc.list_flatten(values) if _is_list(data_type) else values).drop_null()
        if pa.types.is_struct(leaf) and {leaf.field(i).name for i in range(leaf.num_fields)} == {"bytes", "path"}:
            looks = "images (a `datasets` Image feature)"
        elif (pa.types.is_binary(leaf) or pa.types.is_large_binary(leaf)) and _is_image_bytes(sample):
            looks = "encoded images (bytes)"
        elif (pa.types.is_string(leaf) or pa.types.is_large_string(leaf)) and _are_image_paths(sample):
            looks = f"image paths (e.g. {sample[0].as_py()!r})"
        else:
            continue
        raise DataError(
            f"{name}: no `image` or `images` column, but column {column!r} holds {looks}; training would ignore them. "
            f"Make it the image column with column_mapping: {{{column}: image}}, or drop it for text-only rows."
        )


def _refuse_unnamed_videos(dataset: Dataset, columns: list[str], name: str) -> None:
    """With no `video`/`videos` column, a text column of video file paths would silently train without them."""
    for column in columns:
        data_type = dataset.data.schema.field(column).type
        leaf = data_type.value_type if _is_list(data_type) else data_type
        if not (pa.types.is_string(leaf) or pa.types.is_large_string(leaf)):
            continue
        values = dataset.data.column(column).slice(0, IMAGE_SAMPLE)
        paths = [p for p in (pc.list_flatten(values) if _is_list(data_type) else values).drop_null().to_pylist() if p]
        if paths and all(is_video_file(path) and not path.lower().endswith(".gif") for path in paths):
            raise DataError(
                f"{name}: no `video` or `videos` column, but column {column!r} holds video paths (e.g. {paths[0]!r}); "
                f"training would ignore them. Make it the video column with column_mapping: {{{column}: videos}}."
            )


def _is_image_bytes(sample: pa.Array) -> bool:
    """The first value is an encoded image Pillow recognises (its header is read, nothing decoded)."""
    if not len(sample):
        return False
    try:
        with PILImage.open(BytesIO(sample[0].as_py())):
            return True
    except Exception:  # Pillow raises several types on bytes that are not an image
        return False


def _are_image_paths(sample: pa.Array) -> bool:
    """Every non-empty value is a path ending in an image suffix."""
    paths = [path for path in sample.to_pylist() if path]
    return bool(paths) and all(path.lower().endswith(IMAGE_SUFFIXES) for path in paths)


def _image_paths(column: pa.ChunkedArray) -> list[tuple[int, str]]:
    """(position, path) of every image given by path in an image column; embedded bytes are not paths."""
    found, offset = [], 0
    for chunk in column.chunks:
        values, positions = chunk, np.arange(len(chunk))
        if _is_list(values.type):  # a row's images
            positions = pc.list_parent_indices(values).to_numpy()
            values = values.flatten()
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            paths = values.to_pylist()
        elif pa.types.is_struct(values.type) and values.type.get_field_index("path") >= 0:
            # An `Image` feature's storage: a path counts only where no bytes are embedded.
            embedded = values.field("bytes").is_valid() if values.type.get_field_index("bytes") >= 0 else None
            usable = values.is_valid() if embedded is None else pc.and_(values.is_valid(), pc.invert(embedded))
            paths = pc.if_else(usable, values.field("path"), None).to_pylist()
        else:  # bytes, or no image at all
            paths = [None] * len(values)
        found += [(int(p) + offset, path) for p, path in zip(positions, paths, strict=True) if path is not None]
        offset += len(chunk)
    return found


def image_counts(dataset: Dataset) -> tuple[np.ndarray, Callable[[int], str]]:
    """Images per row, read from the raw image column without decoding any, and a function naming a row."""
    return _value_counts(dataset, IMAGES, "image_column")


def video_counts(dataset: Dataset) -> tuple[np.ndarray, Callable[[int], str]]:
    """Whether each row has a video (1) or not (0), read from the raw video column without decoding, and a function
    naming a row. (A row's video is one value, or one list of frames.)"""
    counts, where = _value_counts(dataset, VIDEOS, "video_column")
    return np.minimum(counts, 1), where


def _value_counts(dataset: Dataset, name: str, format_column: str) -> tuple[np.ndarray, Callable[[int], str]]:
    """Values per row of the image or video column (`name` in memory, the loader's `format_column` when lazy)."""
    loader = lazy_rows(dataset)
    if loader is None:  # an in-memory dataset (the synthetic tasks): an `images` (`videos`) list column, if any
        raw, column, where = dataset, name if name in dataset.column_names else None, "row {}".format
    else:
        raw, column = loader.raw, getattr(loader.fmt, format_column)
        row_ids = raw.with_format("arrow")[ROW_ID].to_numpy()

        def where(position: int) -> str:
            return loader.source.where(int(row_ids[position]))

    if column is None:
        return np.zeros(len(raw), dtype=int), where
    values = raw.with_format("arrow")[column]
    if _is_list(values.type):
        counts = pc.fill_null(pc.list_value_length(values), 0)
    else:
        counts = pc.cast(pc.is_valid(values), pa.int64())
    return counts.to_numpy(zero_copy_only=False), where


def most_images_per_row(*datasets: Dataset | None) -> int:
    """The largest number of images in one row of `datasets` (None ones skipped), at least 1; nothing is decoded."""
    counts = [image_counts(dataset)[0] for dataset in datasets if isinstance(dataset, Dataset)]
    return max([1, *(int(c.max()) for c in counts if len(c))])


def check_prefills(prompts: Iterable, where: str) -> None:
    """Prompts that end with an assistant message (a prefill the completion continues) must all do.

    A batch's prompts are rendered in one chat-template call, either continuing the final message or opening a new
    assistant turn, so a batch cannot mix the two.
    """
    prefilled: dict[bool, int] = {}
    for row, prompt in enumerate(prompts):
        prefilled.setdefault(_ends_with_assistant(prompt), row)
        if len(prefilled) == 2:
            raise DataError(
                f"{where} row {prefilled[True]}: its prompt ends with an assistant message (a prefill the completion "
                f"continues) but row {prefilled[False]}'s does not; give every row the prefill or none."
            )


def generation_prompt(prompts: list) -> dict[str, bool]:
    """The chat-template settings that render `prompts` for generation, as `trl.data_utils.apply_chat_template` does:
    a new assistant turn, or (every prompt ending with an assistant message) that message continued."""
    prefilled = any(_ends_with_assistant(prompt) for prompt in prompts)
    if prefilled:
        check_prefills(prompts, "batch")
    return {"add_generation_prompt": not prefilled, "continue_final_message": prefilled}


def dataset_prompts(dataset: Any) -> Iterable:
    """The stored `prompt` column of a dataset, else nothing. Rows loaded lazily (every recipe's data) build their
    prompts per batch from it: it is read raw, without the per-batch transform, so no image is decoded."""
    if not isinstance(dataset, Dataset) or PROMPT not in dataset.column_names:
        return []
    return dataset.with_format(None).select_columns([PROMPT])[PROMPT]


def _ends_with_assistant(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and prompt[-1].get("role") == "assistant"
