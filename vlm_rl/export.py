"""`vlm-rl export`: a LoRA run's adapter merged into its base model, saved as a plain model directory.

A LoRA run saves only adapters (in `output_dir` and every `checkpoint-N/`). Serving it, evaluating it with
other tools or training on from it wants an ordinary `from_pretrained` directory: the base model with the
adapter's update added to its weights, and the processor the run trained with.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlm_rl.errors import InvalidValueError, MissingPathError, first_line
from vlm_rl.models.loading import load_model_and_processor
from vlm_rl.models.processing import _with_chat_template

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def adapter_base_model(checkpoint: Path) -> str:
    """The base model an adapter directory names (`base_model_name_or_path` in its adapter_config.json)."""
    if not checkpoint.is_dir():
        raise MissingPathError(f"--checkpoint {checkpoint} is not a directory.")
    config_file = checkpoint / ADAPTER_CONFIG
    if not config_file.is_file():
        full = (checkpoint / "config.json").is_file()
        raise InvalidValueError(
            f"{checkpoint} holds no LoRA adapter (no {ADAPTER_CONFIG}); "
            + (
                "it is a full model already: load it with from_pretrained."
                if full
                else "pass a LoRA run's output_dir or one of its checkpoint-N directories."
            )
        )
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise InvalidValueError(
            f"{config_file} names no base_model_name_or_path; pass the base model with --base_model."
        )
    return base


def load_merged(
    checkpoint: str | Path, *, base_model: str | None = None, dtype: str = "auto", trust_remote_code: bool = False
):
    """The adapter in `checkpoint` merged into its base model, and the processor to use with it.

    The base model is `base_model` if given, else the one the adapter config names. The processor is the
    checkpoint's own when it saved one (it carries the run's image-size bounds), else the base model's.
    """
    from peft import PeftModel

    checkpoint = Path(checkpoint)
    named_base = adapter_base_model(checkpoint)
    base = base_model or named_base
    source = "--base_model" if base_model else f"base_model_name_or_path in {checkpoint / ADAPTER_CONFIG}"
    if Path(base).is_absolute() and not Path(base).is_dir():
        raise MissingPathError(
            f"Base model directory {base} (from {source}) does not exist; pass the base model's directory or Hub id "
            "with --base_model."
        )
    try:
        model, processor = load_model_and_processor(base, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise MissingPathError(
            f"Cannot load the base model {base!r} (from {source}): {first_line(error)}. Pass the base model's "
            "directory or Hub id with --base_model."
        ) from error
    if any((checkpoint / name).is_file() for name in _PROCESSOR_FILES):
        # The processor's own class (image-only where torchvision is missing), from the checkpoint's files.
        processor = type(processor).from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
        processor = _with_chat_template(processor)
    logger.info("Merged the adapter in %s into %s.", checkpoint, base)
    return PeftModel.from_pretrained(model, checkpoint).merge_and_unload(), processor


def export_merged(
    checkpoint: str | Path,
    output_dir: str | Path,
    *,
    base_model: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> Path:
    """Merge the adapter in `checkpoint` into its base model (`load_merged`); save model and processor."""
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    adapter_base_model(checkpoint)  # a clear error for a directory without an adapter, before anything loads
    if output_dir.resolve() == checkpoint.resolve():
        raise InvalidValueError(
            f"--output_dir must differ from --checkpoint ({checkpoint}): the adapter files would mix in."
        )
    merged, processor = load_merged(
        checkpoint, base_model=base_model, dtype=dtype, trust_remote_code=trust_remote_code
    )
    merged.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    logger.info("Saved the merged model to %s.", output_dir)
    return output_dir
