"""Each distinct image preprocessed once per generation batch, however many rows show it.

TRL runs the processor on every row of a generation batch, twice (once to tokenize the prompts for generation, once
for the training forward's vision inputs), and a GRPO group's G rows all hold the same image: with G = 16 the image
processor resizes, normalizes and patches the same picture 32 times. Inside `images_preprocessed_once`, the
processor's image processor runs once per distinct image (compared by content) and per set of arguments; each call
gets back exactly the output it would have got, assembled from the per-image results. Families whose image
processor pads or tiles images per row, rather than per image, say so (`FamilyAdapter.preprocesses_per_image`) and
are left as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import make_flat_list_of_images

if TYPE_CHECKING:
    from vlm_rl.models.adapters import FamilyAdapter


def image_fingerprint(image: Any) -> tuple | None:
    """A key equal for images of equal content (size, mode and pixels); None for inputs it cannot read."""
    if isinstance(image, Image.Image):
        return ("pil", image.size, image.mode, hashlib.blake2b(image.tobytes(), digest_size=16).digest())
    if isinstance(image, torch.Tensor | np.ndarray):
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        array = np.ascontiguousarray(array)
        return ("array", array.shape, str(array.dtype), hashlib.blake2b(array.tobytes(), digest_size=16).digest())
    return None


class PerImageMemo:
    """Stands in for a processor's image processor: calls it once per distinct image and argument set, and hands
    each call the concatenation of its images' entries. Anything it cannot take apart goes straight through."""

    def __init__(self, image_processor, adapter: FamilyAdapter):
        self._inner = image_processor
        self._adapter = adapter
        self._entries: dict[tuple, dict[str, torch.Tensor]] = {}
        self._fingerprints: dict[int, tuple | None] = {}  # by object id: the images live as long as the memo
        self.calls = 0  # calls of the real image processor, for tests and benchmarks

    def __getattr__(self, name: str) -> Any:  # the processor reads the image processor's settings through it
        return getattr(self._inner, name)

    def _fingerprint(self, image: Any) -> tuple | None:
        if id(image) not in self._fingerprints:
            self._fingerprints[id(image)] = (image_fingerprint(image), image)  # keep the object: its id stays its own
        return self._fingerprints[id(image)][0]

    def __call__(self, images=None, *args, **kwargs):
        flat = make_flat_list_of_images(images) if images is not None else []
        keys = [self._fingerprint(image) for image in flat]
        if args or not flat or None in keys:
            self.calls += 1
            return self._inner(images, *args, **kwargs)
        # The output's container type aside (tensors here either way), the arguments decide what an image becomes.
        settings = repr(sorted((k, v) for k, v in kwargs.items() if k != "return_tensors"))
        missing = list(dict.fromkeys(key for key in keys if (key, settings) not in self._entries))
        if missing:
            first = {key: image for key, image in zip(keys, flat, strict=True)}
            self.calls += 1
            output = self._inner([first[key] for key in missing], **kwargs)
            if not all(name in self._adapter.image_keys and torch.is_tensor(v) for name, v in output.items()):
                self.calls += 1  # an output this family's adapter does not take apart: no memo for this call
                return self._inner(images, *args, **kwargs)
            split = self._adapter.split_vision_inputs(dict(output), [1] * len(missing))
            for index, key in enumerate(missing):
                self._entries[(key, settings)] = {name: split[name][index] for name in output}
        parts = [self._entries[(key, settings)] for key in keys]
        data = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        return BatchFeature(data=data, tensor_type=kwargs.get("return_tensors"))


@contextlib.contextmanager
def images_preprocessed_once(processor, adapter: FamilyAdapter) -> Iterator[PerImageMemo | None]:
    """Inside, `processor` preprocesses each distinct image once (see the module docstring); yields the memo, or
    None where the family's layout does not allow it."""
    inner = getattr(processor, "image_processor", None)
    if inner is None or not adapter.preprocesses_per_image or isinstance(inner, PerImageMemo):
        yield None
        return
    memo = PerImageMemo(inner, adapter)
    processor.image_processor = memo
    try:
        yield memo
    finally:
        processor.image_processor = inner
