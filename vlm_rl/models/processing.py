"""Loading processors, including where torchvision is missing.

transformers 5 type-checks every sub-processor of a processor when it is built or loaded. The Qwen-VL
processors declare a video processor whose classes need torchvision, and the only torchvision wheels on
PyPI are CUDA builds that do not load against a CPU torch. For image (and text) work the video processor
is never used, so on such machines we build the same processor class without it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
from collections.abc import Iterator
from pathlib import Path

import transformers
from transformers import AutoConfig, AutoProcessor, ProcessorMixin
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.utils import is_torchvision_available

from vlm_rl.data.rows import generation_prompt
from vlm_rl.models.video import prepare_video


@functools.cache
def image_only_processor_class(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_class` without its `video_processor` sub-processor (same name, so saved files are unchanged)."""
    if "video_processor" not in inspect.signature(processor_class.__init__).parameters:
        return processor_class

    methods = {"__init__": init_without_parameter(processor_class.__init__, "video_processor"), "__module__": __name__}
    if "apply_chat_template" in vars(processor_class):
        # SmolVLM's override fills video defaults from `self.video_processor`; for images and text it adds nothing.
        methods["apply_chat_template"] = ProcessorMixin.apply_chat_template
    return type(processor_class.__name__, (processor_class,), methods)


def init_without_parameter(init, name: str):
    """`init` with its parameter `name` always None and every other parameter (name, order, default) kept.

    transformers reads a processor's settings from the parameters of its `__init__`, both when saving
    (`to_dict`: its signature) and when loading (`from_args_and_dict`: its code's argument names). A wrapper taking
    `**kwargs` would drop settings such as LLaVA-OneVision's `num_image_tokens`, so the wrapper is generated with
    the same parameters.
    """
    parameters = [p for p in inspect.signature(init).parameters.values() if p.name not in ("self", name)]
    if any(p.kind not in (p.POSITIONAL_OR_KEYWORD, p.VAR_KEYWORD) for p in parameters):
        raise TypeError(f"Cannot rebuild {init.__qualname__}{inspect.signature(init)} without {name!r}.")
    named = [p for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    defaults = {p.name: p.default for p in named}
    declared = [p.name if p.default is p.empty else f"{p.name}=_defaults[{p.name!r}]" for p in named]
    passed = [f"{p.name}={p.name}" for p in named]
    source = (
        f"def __init__(self, {', '.join([*declared, '**kwargs'])}):\n"
        f"    _init(self, {', '.join([*passed, f'{name}=None', '**kwargs'])})\n"
    )
    namespace = {"_defaults": defaults, "_init": init}
    exec(source, namespace)  # a def built from the parameter names of a transformers class, nothing else
    return namespace["__init__"]


def load_processor(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """`AutoProcessor.from_pretrained`, falling back to an image-only processor without torchvision, or for a
    saved processor that has no video processor (one saved where torchvision was missing)."""
    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision}
    if not is_torchvision_available() or _saved_without_video_processor(name_or_path):
        model_type = AutoConfig.from_pretrained(name_or_path, **kwargs).model_type
        class_name = PROCESSOR_MAPPING_NAMES.get(model_type)
        processor_class = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
        if processor_class is not None:
            processor = image_only_processor_class(processor_class).from_pretrained(name_or_path, **kwargs)
            return _with_chat_template(processor)
    return _with_chat_template(AutoProcessor.from_pretrained(name_or_path, **kwargs))


@contextlib.contextmanager
def continuing_final_message(processor, prompts: list) -> Iterator[None]:
    """Inside, `processor.apply_chat_template` renders `prompts` that end with an assistant message (a prefill
    such as `"<think>"`) open, so that the completion continues that message.

    TRL 1.16's `GRPOTrainer._tokenize_prompts` renders every prompt with `add_generation_prompt=True`, which closes
    the assistant's message and opens a new turn, while its training forward renders the same prompt with
    `continue_final_message` (`trl.data_utils.apply_chat_template`): the two disagree in length and the forward
    fails (Qwen-VL: "The shape of the mask [58] ... does not match").
    """
    settings = generation_prompt(prompts)
    if settings["add_generation_prompt"]:
        yield
        return
    original = processor.apply_chat_template
    had_own = "apply_chat_template" in vars(processor)

    def apply_chat_template(*args, **kwargs):
        return original(*args, **{**kwargs, **settings})

    processor.apply_chat_template = apply_chat_template
    try:
        yield
    finally:
        if had_own:
            processor.apply_chat_template = original
        else:
            del processor.apply_chat_template


def _saved_without_video_processor(name_or_path: str) -> bool:
    """A local processor directory whose files hold no video processor."""
    directory = Path(name_or_path)
    config = directory / "processor_config.json"
    if not config.is_file() or (directory / "video_preprocessor_config.json").is_file():
        return False
    return "video_processor" not in json.loads(config.read_text())


def _with_chat_template(processor):
    """`processor` with its saved chat template, which BLIP-2's and InstructBLIP's processors drop.

    Their `__init__` does not pass `chat_template` on to `ProcessorMixin` (transformers 5.19,
    processing_blip_2.py:59, processing_instructblip.py:61), so `apply_chat_template` fails with "this processor
    does not have a chat template"; their tokenizer loads the same saved `chat_template.jinja`.
    """
    tokenizer = getattr(processor, "tokenizer", None)
    if getattr(processor, "chat_template", None) is None and getattr(tokenizer, "chat_template", None):
        processor.chat_template = tokenizer.chat_template
    prepare_video(processor)  # decoded clips carry their timing into its video processor (`models/video.py`)
    return processor


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
