"""Choosing the checkpoint to resume from."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from, or None if it looks complete."""
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state_file.read_text())
    except (OSError, ValueError) as error:
        return f"unreadable trainer_state.json ({error})"
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        return "no model weights"
    return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step complete `checkpoint-N` in `output_dir`; incomplete ones are reported and skipped."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    steps = sorted(
        ((int(match.group(1)), path) for path in output_dir.iterdir() if (match := pattern.match(path.name))),
        reverse=True,
    )
    for _, path in steps:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("Skipping incomplete checkpoint %s: %s.", path, problem)
    return None


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str | Path) -> str | None:
    """Turn the recipe's `resume_from_checkpoint` (None, `auto` or a path) into a checkpoint path or None."""
    if resume_from_checkpoint in (None, "", "false", "False"):
        return None
    if resume_from_checkpoint == "auto":
        path = latest_checkpoint(output_dir)
        if path is None:
            logger.info("resume_from_checkpoint=auto: no checkpoint in %s, starting from scratch.", output_dir)
            return None
        logger.info("resume_from_checkpoint=auto: resuming from %s.", path)
        return str(path)
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a directory.")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"resume_from_checkpoint: {path} cannot be resumed from: {problem}.")
    return str(path)
