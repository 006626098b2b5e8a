"""Family adapters: everything that differs between VLM families, behind one small interface.

The trainer, the freezing options and the tiny-model builder ask the adapter of the model's family instead
of guessing from tensor shapes. Guessing is what TRL 1.16 does (`split_pixel_values_by_grid`): it tells a
per-image `pixel_values` from a per-sample padded one by comparing its length with the number of images,
which is wrong whenever the two happen to be equal, and then hands one sample's images to another.

A family module (`vlm_rl/models/families/<family>.py`) subclasses `FamilyAdapter`, sets its class
attributes and overrides what its layout needs; `vlm_rl/models/families/__init__.py` maps model types to the
adapters (`ADAPTERS`, `adapter_for`). This module imports no family: they import it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

# Per-token inputs: one row per sample, one column per token. They describe text, so they are kept for rows
# without images and are split and merged like `input_ids`.
PER_TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")


class FamilyAdapter:
    """One VLM family: its module layout, its vision-input layout, its image-size rule and its tiny model.

    Class attributes describe the family; methods have defaults for the common case (one `pixel_values` entry
    per image) and are overridden where a family differs.
    """

    name: ClassVar[str]
    """Key of the family (`tiny:<name>`, `vlm-rl tiny-model --family <name>`)."""
    label: ClassVar[str]
    """Name people know the family by, for tables and messages."""
    model_types: ClassVar[tuple[str, ...]]
    """`config.model_type` values this adapter handles."""
    vision_modules: ClassVar[tuple[str, ...]]
    """Parameter-name prefixes of the vision tower (the projector excluded when it lives inside it)."""
    projector_modules: ClassVar[tuple[str, ...]]
    """Parameter-name prefixes of the projector / connector / resampler."""
    language_modules: ClassVar[tuple[str, ...]]
    """Parameter-name prefixes of the language model, its embeddings and its head."""
    image_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    """Model inputs with one entry per image (or per tile, per grid row: see `split_vision_inputs`)."""
    video_keys: ClassVar[tuple[str, ...]] = ()
    """Model inputs of videos (split per row by `num_videos`); empty: the family refuses rows with a video."""
    uniform_frames: ClassVar[bool] = False
    """Whether the processor stacks a batch's videos into one tensor, so that they need one frame count."""
    row_keys: ClassVar[tuple[str, ...]] = PER_TOKEN_KEYS
    """Model inputs with one row per sample, needed with or without images (e.g. per-token type ids)."""
    multi_image: ClassVar[bool] = True
    """Whether a row may hold several images."""
    text_only: ClassVar[bool] = True
    """Whether text-only rows may share a batch with image rows."""
    image_size_bounds: ClassVar[tuple[str, ...]] = ()
    """Which of `min_pixels` / `max_pixels` `set_image_size_bounds` maps onto the processor (it refuses others)."""
    notes: ClassVar[str] = ""
    """What a user should know about this family (shown in docs/models.md)."""
    shares_prompts: ClassVar[bool] = False
    """Whether the rows of one prompt can be scored in one packed sequence (`vlm_rl/trainers/shared_prefix.py`):
    the language model takes a custom 4D attention mask and explicit position ids and has no attention rule of its
    own (Gemma 3 attends bidirectionally among image tokens; BLIP-2 prepends query tokens)."""
    vllm_video: ClassVar[bool] = False
    """Whether video rows go through vLLM rollouts (`vlm_rl/rollout/vllm.py`); where not, they are refused there."""
    shares_video_prompts: ClassVar[bool] = False
    """Whether prompt sharing (the packed forward, prefill once) and encode-once also cover rows with a video; where
    not, a forward or generation whose inputs hold a video takes the plain path."""
    preprocesses_per_image: ClassVar[bool] = False
    """Whether the image processor's output holds each image's inputs apart from the others' (no padding or tiling
    that depends on the other images of the call), so that an image shown by several rows can be preprocessed once
    (`vlm_rl/models/preprocess_once.py`)."""
    image_feature_fields: ClassVar[tuple[str, ...]] = ()
    """Fields of the model's `get_image_features` output that its forward reads from `mm_encoder_outputs`, each
    holding one entry per image; empty where precomputed features are not used (`vlm_rl/trainers/vision_once.py`)."""
    box_format: ClassVar[str] = "pixel"
    """The coordinates the family's models write boxes in (one of `vlm_rl.rewards.boxes.BOX_FORMATS`): what the
    grounding rewards' `box_format: auto` reads them as."""

    # ----- vision inputs -----------------------------------------------------------------------------------

    def split_vision_inputs(self, inputs: dict[str, Any], num_images: list[int]) -> dict[str, Any]:
        """Split batched model inputs into per-sample lists for every image-indexed key.

        Afterwards each key in `image_keys` maps to a list with one tensor per sample (empty for a row without
        images); per-token keys stay tensors with one row per sample; anything else is returned unchanged.
        """
        split = dict(inputs)
        for key in self.image_keys:
            if key in inputs and inputs[key] is not None:
                split[key] = self._split_by_counts(key, inputs[key], num_images)
        return split | self._split_videos(inputs)

    def _split_videos(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The `video_keys` inputs split per sample by `num_videos` (one entry per video)."""
        return {
            key: self._split_by_counts(key, inputs[key], list(inputs["num_videos"]))
            for key in self.video_keys
            if inputs.get(key) is not None
        }

    def video_inputs(self, fields: dict[str, Any], processor, videos: list) -> dict[str, Any]:
        """The video inputs of a batch (the `video_keys`, one entry per video) from the output of the processor call
        that tokenized its prompts for generation, `fields`; `videos`: the batch's clips in order, for a family whose
        processor merges frames into its image inputs and so returns no video input of its own."""
        return {key: fields[key] for key in self.video_keys if key in fields}

    def video_forward_inputs(self, inputs: dict[str, Any], num_videos: list[int]) -> dict[str, Any]:
        """The merged inputs of a log-prob forward with videos (`num_videos` per row) as the model takes them: as they
        are, unless the family's processor merges frames into its image inputs."""
        return inputs

    def merge_vision_inputs(self, split: dict[str, Any]) -> dict[str, Any]:
        """The inverse of `split_vision_inputs`: batched tensors again, for a forward pass."""
        merged = dict(split)
        for key in (*self.image_keys, *self.video_keys):
            if isinstance(split.get(key), list):
                merged[key] = torch.cat(split[key], dim=0)
        return merged

    def check_images_per_row(
        self, num_images: Sequence[int], where: Callable[[int], str] = "row {} of this batch".format
    ) -> None:
        """Refuse rows the family cannot take (text-only rows, several images), before the model fails on them
        with a shape error or, worse, silently pairs a row with another row's image. `where` names a row."""
        unsupported = [
            (i, n)
            for i, n in enumerate(num_images)
            if (n == 0 and not self.text_only) or (n > 1 and not self.multi_image)
        ]
        if unsupported:
            kinds = (("no image", self.text_only), ("one image", True), ("several images", self.multi_image))
            allowed = " or ".join(label for label, ok in kinds if ok)
            row, count = unsupported[0]
            raise ValueError(
                f"{self.label} rows take {allowed}; {where(row)} has {count} image(s) ({len(unsupported)} such "
                "rows). Filter the dataset, or choose a family that supports it (docs/models.md)."
            )

    def check_videos_per_row(
        self, num_videos: Sequence[int], where: Callable[[int], str] = "row {} of this batch".format
    ) -> None:
        """Refuse video rows where the family takes no video, and rows with several videos (one per row for now)."""
        rows = [i for i, n in enumerate(num_videos) if n]
        if rows and not self.video_keys:
            raise ValueError(
                f"{self.label} does not take video, but {where(rows[0])} has one ({len(rows)} such rows); drop the "
                "`videos` column or use a family that supports video (docs/models.md)."
            )
        several = [i for i, n in enumerate(num_videos) if n > 1]
        if several:
            raise ValueError(f"{where(several[0])} has {num_videos[several[0]]} videos; a row holds one for now.")

    def check_video_frames(
        self, frames: Sequence[int | None], where: Callable[[int], str] = "row {} of this batch".format
    ) -> None:
        """Refuse videos of different frame counts in one batch (`frames`: each row's, None without a video) where the
        family stacks a batch's videos into one tensor (`uniform_frames`), before its processor fails on them."""
        counts = {n for n in frames if n is not None}
        if self.uniform_frames and len(counts) > 1:
            first = next(i for i, n in enumerate(frames) if n is not None)
            other = next(i for i, n in enumerate(frames) if n is not None and n != frames[first])
            raise ValueError(
                f"{self.label} takes videos of one frame count per batch, but {where(first)} has {frames[first]} "
                f"frames and {where(other)} {frames[other]}; set `video_num_frames` (not `video_fps`) so every clip "
                "is sampled to the same count."
            )

    def repad_prompt_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """A left-padded batch of prompt inputs (one processor call), with any input that must pad elsewhere fixed.

        Processors pad every text input on the language model's side; an input with absolute positions of its
        own (InstructBLIP's Q-Former text) must stay right-padded.
        """
        return inputs

    @staticmethod
    def _split_by_counts(key: str, value: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        if value.size(0) != sum(counts):
            raise ValueError(
                f"Vision input {key!r} has {value.size(0)} entries for {sum(counts)} images ({counts} per sample); "
                "the processor output does not match this family's adapter."
            )
        return list(torch.split(value, counts, dim=0))

    def position_ids(
        self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: dict[str, Any]
    ) -> torch.Tensor:
        """The position ids `model`'s plain forward gives these rows, `(rows, length)` (M-RoPE: `(3, rows, length)`).

        `inputs` are the rows' merged model inputs. By default the language model numbers the columns from 0.
        """
        return torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)

    def tiles_per_row(self, processor, images: list[list]) -> list[int] | None:
        """For a family whose vision inputs hold tiles, each row's tile count (`num_tiles`); None otherwise."""
        return None

    def select_generation_rows(self, model, index: torch.Tensor) -> None:
        """After a prefill of distinct prompts, keep per-row generation state of `model` for the rows `index` (one
        entry per generated row, naming its prompt's row in the prefill), as the cache's rows are."""

    # ----- image size ----------------------------------------------------------------------------------------

    def set_image_size_bounds(self, processor, min_pixels: int | None, max_pixels: int | None) -> None:
        """Bound the pixels per image the processor resizes to. Families that resize to a fixed size refuse."""
        if min_pixels is None and max_pixels is None:
            return
        image_processor = processor.image_processor
        size = getattr(image_processor, "crop_size", None) if image_processor.do_center_crop else None
        size = size or image_processor.size
        fixed = f" ({size['width']}×{size['height']} for this model)" if size.get("width") else ""
        raise ValueError(
            f"{self.label} resizes every image to one fixed size{fixed}, so `min_pixels` / `max_pixels` do not "
            "apply; remove them from the recipe."
        )

    def engine_processor_kwargs(self, processor) -> dict[str, Any]:
        """Image-processor settings an inference engine (vLLM's `mm_processor_kwargs`) needs to expand images into
        as many tokens as `processor`: the ones `set_image_size_bounds` may have changed from the saved files."""
        return {}

    # ----- tiny model ----------------------------------------------------------------------------------------

    def build_tiny(self, output_dir: Path, *, hidden_size: int, num_hidden_layers: int, seed: int) -> None:
        """Save a tiny random-weight model and its processor (real classes, offline) to `output_dir`."""
        raise NotImplementedError(
            f"{type(self).__name__} defines no `build_tiny`; every registered family needs one (docs/models.md)."
        )

    # ----- parameters ----------------------------------------------------------------------------------------

    def parameter_group(self, name: str) -> str | None:
        """`vision`, `projector` or `language` for a parameter name (a PEFT wrapper's prefix is ignored)."""
        name = name.removeprefix("base_model.model.")
        for group, prefixes in (
            ("projector", self.projector_modules),  # first: Qwen's merger sits inside its vision tower
            ("vision", self.vision_modules),
            ("language", self.language_modules),
        ):
            if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
                return group
        return None


class GenericAdapter(FamilyAdapter):
    """Fallback for a model type no adapter knows: TRL's own shape-based handling of vision inputs."""

    name = "generic"
    label = "unknown family"
    model_types = ()
    vision_modules = ("model.vision_tower", "model.visual", "vision_tower", "vision_model")
    projector_modules = ("model.multi_modal_projector", "multi_modal_projector")
    language_modules = ("model.language_model", "language_model", "lm_head")

    def split_vision_inputs(self, inputs: dict[str, Any], num_images: list[int]) -> dict[str, Any]:
        from trl.trainer.utils import split_pixel_values_by_grid

        split = split_pixel_values_by_grid({**inputs, "num_images": list(num_images)})
        if "num_images" not in inputs:
            split.pop("num_images")
        return split

    def merge_vision_inputs(self, split: dict[str, Any]) -> dict[str, Any]:
        from trl.trainer.utils import unsplit_pixel_values_by_grid

        return unsplit_pixel_values_by_grid(split)
