"""Loading processors, including where torchvision is missing.

transformers 5 type-checks every sub-processor of a processor when it is built or loaded. The Qwen-VL
processors declare a video processor whose classes need torchvision, and the only torchvision wheels on
PyPI are CUDA builds that do not load against a CPU torch. For image (and text) work the video processor
is never used, so on such machines we build the same processor class without it.
"""

from __future__ import annotations

import functools
import inspect

import transformers
from transformers import AutoConfig, AutoProcessor, ProcessorMixin
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.utils import is_torchvision_available


@functools.cache
def image_only_processor_class(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_class` without its `video_processor` sub-processor (same name, so saved files are unchanged)."""
    if "video_processor" not in inspect.signature(processor_class.__init__).parameters:
        return processor_class

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(processor_class.__name__, (processor_class,), {"__init__": __init__, "__module__": __name__})


def load_processor(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """`AutoProcessor.from_pretrained`, falling back to an image-only processor without torchvision."""
    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision}
    if not is_torchvision_available():
        model_type = AutoConfig.from_pretrained(name_or_path, **kwargs).model_type
        class_name = PROCESSOR_MAPPING_NAMES.get(model_type)
        processor_class = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
        if processor_class is not None:
            return image_only_processor_class(processor_class).from_pretrained(name_or_path, **kwargs)
    return AutoProcessor.from_pretrained(name_or_path, **kwargs)


def resized_image_size(processor, width: int, height: int) -> tuple[int, int]:
    """The (width, height) a Qwen-VL style processor resizes a `width`×`height` image to, for its coordinates.

    It asks the processor itself (a blank image through its image processor, `image_grid_thw` × patch size)
    rather than re-implementing its resize rule, so it stays exact whatever the family's rule and settings.
    Results are cached per image processor object and size.
    """
    image_processor = getattr(processor, "image_processor", processor)
    if not isinstance(getattr(image_processor, "patch_size", None), int):
        raise ValueError(
            f"box_format 'resized' needs a Qwen-VL style processor (an image processor with a `patch_size` that "
            f"returns `image_grid_thw`); {type(image_processor).__name__} has no such resize rule. Use box_format "
            "'pixel', 'norm1000' or 'norm1' for this model."
        )
    if width < 1 or height < 1:
        raise ValueError(f"Cannot resize an image of {width}x{height} pixels.")
    return _resized_image_size(image_processor, int(width), int(height))


@functools.lru_cache(maxsize=4096)
def _resized_image_size(image_processor, width: int, height: int) -> tuple[int, int]:
    from PIL import Image

    output = image_processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")
    if "image_grid_thw" not in output:
        raise ValueError(
            f"box_format 'resized' needs a Qwen-VL style processor; {type(image_processor).__name__} returns no "
            "`image_grid_thw`. Use box_format 'pixel', 'norm1000' or 'norm1' for this model."
        )
    _, grid_height, grid_width = (int(value) for value in output["image_grid_thw"][0])
    return grid_width * image_processor.patch_size, grid_height * image_processor.patch_size
