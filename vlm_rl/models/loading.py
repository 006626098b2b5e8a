"""Loading the policy model and its processor from a recipe's model section."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from vlm_rl.data.sources import resolve_path
from vlm_rl.errors import InvalidValueError, MissingPathError, first_line
from vlm_rl.models.families import adapter_for, build_tiny_model, tiny_families
from vlm_rl.models.processing import load_processor

logger = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # `name` or `org/name`


def resolve_model_path(
    model_name_or_path: str, output_dir: str | Path, base_dir: Path | None = None, *, projector_scale: float = 1.0
) -> str:
    """The model a recipe names: `tiny:<family>` becomes a tiny model built (once) inside `output_dir`, its projector's
    output scaled by `projector_scale` (`build_tiny`); a local directory, found as data paths are (`base_dir`, the
    recipe's directory, then the working directory), becomes its absolute path; anything else is a Hub id, unless it
    can only be a path (then it is reported missing)."""
    if not model_name_or_path.startswith(TINY_PREFIX):
        return _local_or_hub(model_name_or_path, base_dir)
    family = model_name_or_path.removeprefix(TINY_PREFIX)
    families = tiny_families()
    if family not in families:
        raise InvalidValueError(
            f"model_name_or_path {model_name_or_path!r}: unknown tiny family; use one of {sorted(families)}."
        )
    path = Path(output_dir) / (f"tiny-{family}" + (f"-projector{projector_scale:g}" if projector_scale != 1 else ""))
    if not (path / "config.json").is_file():
        logger.info("Building the tiny %s model in %s.", family, path)
        # Built aside and moved in whole: a trainer and a `vlm-rl vllm-serve` started together from one recipe
        # must never read a half-written model.
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        build_tiny(family, partial, projector_scale=projector_scale)
        try:
            partial.rename(path)
        except OSError:  # another process finished first; its model is the same (same family and seed)
            if not (path / "config.json").is_file():
                raise
            shutil.rmtree(partial)
    return str(path)


def build_tiny(family: str, output_dir: str | Path, *, projector_scale: float = 1.0, **sizes: int) -> Path:
    """`build_tiny_model`, with the projector's last linear layer (weights and bias) multiplied by `projector_scale`.

    A random tiny model's image features enter the language model about as faint as its text embeddings, and it
    sits at blind accuracy for hundreds of SFT steps before it starts to read them; in a pretrained VLM they are
    what the language model already attends to. A louder projector shortens that plateau (docs/learning.md).
    """
    path = build_tiny_model(family, output_dir, **sizes)
    if projector_scale == 1:
        return path
    model = AutoModelForImageTextToText.from_pretrained(path)
    adapter = adapter_for(model.config)
    linears = [
        module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and adapter.parameter_group(f"{name}.weight") == "projector"
    ]
    if not linears:
        raise InvalidValueError(f"tiny:{family} has no linear projector layer to scale (projector_scale).")
    with torch.no_grad():
        for parameter in (linears[-1].weight, linears[-1].bias):
            if parameter is not None:
                parameter.mul_(projector_scale)
    model.save_pretrained(path)
    record = path / "vlm_rl_tiny.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "projector_scale": projector_scale}, indent=2))
    return path


def _local_or_hub(model_name_or_path: str, base_dir: Path | None) -> str:
    local = resolve_path(model_name_or_path, base_dir)
    if local is not None:
        if not local.is_dir():
            raise MissingPathError(
                f"model_name_or_path {model_name_or_path!r}: {local} is a file, not a model directory."
            )
        return str(local.resolve())
    path = Path(model_name_or_path)
    if path.is_absolute() or model_name_or_path.startswith((".", "~")) or not _HUB_ID.match(model_name_or_path):
        tried = [path] if path.is_absolute() else [d / path for d in (base_dir, Path.cwd()) if d is not None]
        raise MissingPathError(
            f"model_name_or_path {model_name_or_path!r}: no such directory (looked for "
            f"{', '.join(str(p) for p in tried)}); pass a model directory or a Hub id such as `org/name`."
        )
    return model_name_or_path


class RemoteCodeError(InvalidValueError):
    """A model ships Python code of its own, and the recipe does not allow running it."""


@contextlib.contextmanager
def _explain_remote_code(model_name_or_path: str) -> Iterator[None]:
    """Transformers refuses a model's own code (config `auto_map`) without `trust_remote_code=True`, in words
    meant for a Python caller; this says which recipe key allows it."""
    try:
        yield
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise RemoteCodeError(
            f"{model_name_or_path} ships its own Python code (`auto_map` in its config.json), which vlm-rl never runs "
            "unless the recipe allows it. Read that code; if you trust it, set `trust_remote_code: true` in the "
            "recipe (or pass `--trust_remote_code true`)."
        ) from error


def load_config(model_name_or_path: str, *, trust_remote_code: bool = False):
    """`AutoConfig.from_pretrained`, failing with `RemoteCodeError` when the model needs code it may not run, and
    with `MissingPathError` (one line, not the Hub client's traceback) when no directory or Hub model has it."""
    with _explain_remote_code(model_name_or_path):
        try:
            return AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        except OSError as error:
            raise MissingPathError(
                f"Model {model_name_or_path!r} is neither a model directory (with a config.json) nor a model the "
                f"Hugging Face Hub serves here ({first_line(error)})."
            ) from error


def load_model_and_processor(
    model_name_or_path: str,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
):
    """The image-text-to-text model and its processor from a Hub id or a local directory.

    `min_pixels` / `max_pixels` bound image sizes on the processor itself, so every place that runs it
    (generation, scoring, training, evaluation) and the processor saved with checkpoints agree. Code shipped with
    the model runs only with `trust_remote_code`; without it a model that needs its code raises `RemoteCodeError`.
    """
    if dtype != "auto" and dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of: auto, {', '.join(_DTYPES)}.")
    with _explain_remote_code(model_name_or_path):
        processor = load_processor(model_name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            model_name_or_path, dtype=_DTYPES.get(dtype, "auto"), trust_remote_code=trust_remote_code
        )
    adapter_for(model.config).set_image_size_bounds(processor, min_pixels, max_pixels)
    return model, processor
