"""Each distinct image and each distinct video of a forward through the vision tower once.

A GRPO batch holds every image and video G times (once per completion). transformers 5 models take precomputed
vision-encoder outputs (`mm_encoder_outputs`) in place of `pixel_values` / `pixel_values_videos`; here the distinct
images and videos of a forward are encoded once and their features indexed out to every slot that shows them.
Indexing is differentiable, so a trainable vision tower gets the summed gradient of all the slots, as it does when
each copy is encoded separately.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from vlm_rl.models.adapters import FamilyAdapter


def _select(value: Any, index: list[int]) -> Any:
    """Per-image features at `index`: a tensor with one entry per image, a sequence of one tensor per image, or a
    list of such sequences (Qwen3-VL's deepstack features, one per layer)."""
    if isinstance(value, torch.Tensor):
        return value[index]
    if all(isinstance(item, torch.Tensor) for item in value):
        return type(value)(value[i] for i in index)
    return [_select(item, index) for item in value]


def _join(values: list[Any]) -> Any:
    """Single images' features (each as `_select` gives them) one after another, in the same layout."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values)
    if all(isinstance(item, torch.Tensor) for item in first):
        return type(first)(item for value in values for item in value)
    return [_join([value[layer] for value in values]) for layer in range(len(first))]


@contextlib.contextmanager
def image_features_reused(base_model, adapter: FamilyAdapter, cache: dict) -> Iterator[None]:
    """Inside, the model's image encoder (`get_image_features` of a family with Qwen-VL's `pixel_values` /
    `image_grid_thw` layout) runs only on the images not in `cache`, and adds them to it.

    TRL's tool loop generates each turn from the whole conversation so far, so every turn's prefill would encode the
    prompt's image and each earlier tool image again, for every completion; with one cache per generation step (the
    weights do not change within it), each distinct image is encoded once. Images are keyed by their vision inputs.
    """
    owner = base_model.model if hasattr(getattr(base_model, "model", None), "get_image_features") else base_model
    original = owner.get_image_features

    def get_image_features(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, **kwargs: Any):
        count = image_grid_thw.size(0)
        per_image = adapter.split_vision_inputs(
            {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}, [1] * count
        )
        keys = [
            (tuple(grid.flatten().tolist()), hashlib.sha1(pixels.detach().cpu().numpy().tobytes()).hexdigest())
            for pixels, grid in zip(per_image["pixel_values"], per_image["image_grid_thw"], strict=True)
        ]
        new: dict[tuple, int] = {}
        for image, key in enumerate(keys):
            if key not in cache:
                new.setdefault(key, image)
        if new:
            features = original(
                torch.cat([per_image["pixel_values"][i] for i in new.values()]),
                torch.cat([per_image["image_grid_thw"][i] for i in new.values()]),
                **kwargs,
            )
            for position, key in enumerate(new):
                fields = {
                    field: _select(getattr(features, field), [position]) for field in adapter.image_feature_fields
                }
                cache[key] = (type(features), fields)
        output_type = cache[keys[0]][0]
        return output_type(
            **{field: _join([cache[key][1][field] for key in keys]) for field in adapter.image_feature_fields}
        )

    owner.get_image_features = get_image_features
    try:
        yield
    finally:
        del owner.get_image_features


@dataclass(frozen=True)
class Modality:
    """Images or videos: the model inputs of each and the encoder that turns them into features."""

    name: str
    """The key of `mm_encoder_outputs` (`image` / `video`)."""
    count: str
    """The bookkeeping input counting each row's items (`num_images` / `num_videos`)."""
    pixels: str
    """The input the precomputed features replace."""
    encoder: str
    """The model's method that encodes them (`get_image_features` / `get_video_features`)."""

    def keys(self, adapter: FamilyAdapter) -> tuple[str, ...]:
        return adapter.image_keys if self.name == "image" else adapter.video_keys

    def split(self, adapter: FamilyAdapter, inputs: dict[str, Any], counts: list[int]) -> dict[str, Any]:
        """`inputs` of this modality split by `counts` (each row's items), as the adapter splits them."""
        if self.name == "image":
            return adapter.split_vision_inputs(inputs, counts)
        return adapter.split_vision_inputs({**inputs, self.count: counts}, [])


IMAGE = Modality("image", "num_images", "pixel_values", "get_image_features")
VIDEO = Modality("video", "num_videos", "pixel_values_videos", "get_video_features")
MODALITIES = (IMAGE, VIDEO)


def encode_images_once(base_model, adapter: FamilyAdapter, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Model inputs that replace `inputs`' image and video inputs with `mm_encoder_outputs` of each distinct image and
    each distinct video encoded once.

    `inputs` are a forward's merged model inputs (`num_images` / `num_videos` among them); None where they hold no
    image or video, or the family cannot take one of them precomputed (the caller then passes `inputs` unchanged: the
    model refuses precomputed features beside raw pixels). Items that are all distinct take the same route, so that
    every vision forward runs the vision tower at the same point (before the language model's token embeddings),
    which processes training together rely on.
    """
    present = [modality for modality in MODALITIES if inputs.get(modality.pixels) is not None]
    if not present or not adapter.image_feature_fields:
        return None
    if "mm_encoder_outputs" not in inspect.signature(base_model.forward).parameters:
        return None
    replaced, outputs = {}, {}
    for modality in present:
        encoded = _encode_once(base_model, adapter, inputs, modality)
        if encoded is None:
            return None
        replaced |= encoded[0]
        outputs[modality.name] = encoded[1]
    return {**replaced, "mm_encoder_outputs": outputs}


def _encode_once(base_model, adapter: FamilyAdapter, inputs: dict[str, Any], modality: Modality):
    """`modality`'s inputs of `inputs` but its pixels, and the features of each of its slots with each distinct item
    encoded once; None where the model has no encoder for it."""
    counts = inputs.get(modality.count)
    if not counts or not hasattr(base_model, modality.encoder):
        return None
    own = {key: inputs[key] for key in modality.keys(adapter) if inputs.get(key) is not None}
    per_item = modality.split(adapter, own, [1] * sum(counts))
    items = [tuple(per_item[key][i] for key in own) for i in range(sum(counts))]
    distinct: list[int] = []  # the first slot of each distinct item
    index: list[int] = []  # for each slot, its item's position in `distinct`
    for slot, item in enumerate(items):
        for position, first in enumerate(distinct):
            other = items[first]
            if all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(item, other, strict=True)):
                index.append(position)
                break
        else:
            index.append(len(distinct))
            distinct.append(slot)
    encoder_inputs = adapter.merge_vision_inputs({key: [per_item[key][i] for i in distinct] for key in own})
    # Inputs the encoder takes by name, or for images also through `**kwargs` (LLaVA passes Pixtral's `image_sizes`
    # that way); a video's timing (`second_per_grid_ts`) is for the positions, not the encoder.
    encoder = getattr(base_model, modality.encoder)
    parameters = inspect.signature(encoder).parameters
    takes_any = modality is IMAGE and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kept = {key: value for key, value in encoder_inputs.items() if key in parameters or (takes_any and key in own)}
    features = encoder(**kept, return_dict=True)
    reused = type(features)(
        **{field: _select(getattr(features, field), index) for field in adapter.image_feature_fields}
    )
    return {key: value for key, value in own.items() if key != modality.pixels}, reused


def encoded_slots(adapter: FamilyAdapter, encoded: dict[str, Any], inputs: dict[str, Any], first: dict[str, int]):
    """`encode_images_once`'s output for the slots of the forward it encoded that a forward of their own, with model
    inputs `inputs`, holds: per modality, from slot `first[name]` on, as many as `inputs` count. Another forward's
    share of the same encoding."""
    outputs, replaced = {}, {}
    for modality in MODALITIES:
        features = encoded["mm_encoder_outputs"].get(modality.name)
        count = sum(inputs.get(modality.count) or [])
        if features is None or not count:
            continue
        slots = list(range(first[modality.name], first[modality.name] + count))
        outputs[modality.name] = type(features)(
            **{field: _select(getattr(features, field), slots) for field in adapter.image_feature_fields}
        )
        keys = [key for key in modality.keys(adapter) if key != modality.pixels and inputs.get(key) is not None]
        replaced |= {key: inputs[key] for key in keys}
    return {**replaced, "mm_encoder_outputs": outputs}
