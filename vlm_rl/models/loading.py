"""Loading the policy model and its processor from a recipe's model section."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from vlm_rl.models.adapters import adapter_for
from vlm_rl.models.processing import load_processor
from vlm_rl.models.tiny import build_tiny_model, tiny_families

logger = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model_name_or_path: str, output_dir: str | Path) -> str:
    """`tiny:<family>` becomes a tiny model built (once) inside `output_dir`; anything else is returned as is."""
    if not model_name_or_path.startswith(TINY_PREFIX):
        return model_name_or_path
    family = model_name_or_path.removeprefix(TINY_PREFIX)
    families = tiny_families()
    if family not in families:
        raise ValueError(
            f"model_name_or_path {model_name_or_path!r}: unknown tiny family; use one of {sorted(families)}."
        )
    path = Path(output_dir) / f"tiny-{family}"
    if not (path / "config.json").is_file():
        logger.info("Building the tiny %s model in %s.", family, path)
        # Built aside and moved in whole: a trainer and a `vlm-rl vllm-serve` started together from one recipe
        # must never read a half-written model.
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        build_tiny_model(family, partial)
        try:
            partial.rename(path)
        except OSError:  # another process finished first; its model is the same (same family and seed)
            if not (path / "config.json").is_file():
                raise
            shutil.rmtree(partial)
    return str(path)


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
    (generation, scoring, training, evaluation) and the processor saved with checkpoints agree.
    """
    if dtype != "auto" and dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of: auto, {', '.join(_DTYPES)}.")
    processor = load_processor(model_name_or_path, trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(
        model_name_or_path, dtype=_DTYPES.get(dtype, "auto"), trust_remote_code=trust_remote_code
    )
    adapter_for(model.config).set_image_size_bounds(processor, min_pixels, max_pixels)
    return model, processor
