"""Each distinct image of a forward through the vision tower once.

A GRPO batch holds every image G times (once per completion). transformers 5 models take precomputed vision-encoder
outputs (`mm_encoder_outputs`) in place of `pixel_values`; here the distinct images of a forward are encoded once and
their features indexed out to every image slot that shows them. Indexing is differentiable, so a trainable vision
tower gets the summed gradient of all the slots, as it does when each copy is encoded separately.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from collections.abc import Iterator
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


def encode_images_once(base_model, adapter: FamilyAdapter, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Model inputs that replace `inputs`' image inputs with `mm_encoder_outputs` of each distinct image encoded once.

    `inputs` are a forward's merged model inputs (`num_images` among them); None where they hold no image or the
    family does not support it (the caller then passes `inputs` unchanged). Images that are all distinct take the same
    route, so that every image forward runs the vision tower at the same point (before the language model's token
    embeddings), which processes training together rely on.
    """
    num_images = inputs.get("num_images")
    if not adapter.image_feature_fields or inputs.get("pixel_values") is None or not num_images:
        return None
    if "mm_encoder_outputs" not in inspect.signature(base_model.forward).parameters:
        return None
    image_inputs = {key: inputs[key] for key in adapter.image_keys if inputs.get(key) is not None}
    per_image = adapter.split_vision_inputs(image_inputs, [1] * sum(num_images))
    images = [tuple(per_image[key][i] for key in image_inputs) for i in range(sum(num_images))]
    distinct: list[int] = []  # the first slot of each distinct image
    index: list[int] = []  # for each slot, its image's position in `distinct`
    for slot, image in enumerate(images):
        for position, first in enumerate(distinct):
            other = images[first]
            if all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(image, other, strict=True)):
                index.append(position)
                break
        else:
            index.append(len(distinct))
            distinct.append(slot)
    encoder_inputs = adapter.merge_vision_inputs({key: [per_image[key][i] for i in distinct] for key in image_inputs})
    # Image inputs the encoder takes, by name or through `**kwargs` (LLaVA passes Pixtral's `image_sizes` that way).
    parameters = inspect.signature(base_model.get_image_features).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kept = {
        key: value for key, value in encoder_inputs.items() if key in parameters or (takes_any and key in image_inputs)
    }
    features = base_model.get_image_features(**kept, return_dict=True)
    reused = type(features)(
        **{field: _select(getattr(features, field), index) for field in adapter.image_feature_fields}
    )
    replaced = {key: value for key, value in image_inputs.items() if key != "pixel_values"}
    return {**replaced, "mm_encoder_outputs": {"image": reused}}


def encoded_slots(adapter: FamilyAdapter, encoded: dict[str, Any], inputs: dict[str, Any], first: int, count: int):
    """`encode_images_once`'s output for the image slots `first` to `first + count` of the forward it encoded, given
    as their own forward's model inputs `inputs`: another forward's share of the same encoding."""
    features = encoded["mm_encoder_outputs"]["image"]
    slots = list(range(first, first + count))
    kept = type(features)(
        **{field: _select(getattr(features, field), slots) for field in adapter.image_feature_fields}
    )
    keys = [key for key in adapter.image_keys if key != "pixel_values" and inputs.get(key) is not None]
    replaced = {key: inputs[key] for key in keys}
    return {**replaced, "mm_encoder_outputs": {"image": kept}}
