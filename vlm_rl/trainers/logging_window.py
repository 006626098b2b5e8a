"""The loss HF's Trainer has summed since its last logging step, kept across a resume (GRPO and SFT).

HF logs the loss summed since the last logging step (`_tr_loss`) divided by the steps since (from
`_globalstep_last_logged`), and its training loop sets both afresh when it resumes: the first loss logged after a stop
inside a logging window averaged only the steps since the resume. Each process saves both with its checkpoint (GRPO
inside `rollout_state_<rank>.pt`, SFT in `logging_window_<rank>.pt`) and restores them right before the first resumed
step, so that logged loss is the uninterrupted run's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "logging_window_{rank}.pt"


def logging_window(trainer) -> dict[str, Any]:
    """This process's loss summed since the last logging step, and that step."""
    return {"unlogged_loss": trainer._tr_loss.detach().clone(), "last_logged_step": trainer._globalstep_last_logged}


def restore_logging_window(trainer, state: Mapping[str, Any]) -> None:
    """Put back what `logging_window` returned; a state without it (an earlier vlm-rl's) leaves HF's reset as is."""
    if "unlogged_loss" in state:
        trainer._tr_loss.copy_(state["unlogged_loss"])
        trainer._globalstep_last_logged = state["last_logged_step"]


def save_logging_window(trainer, checkpoint: str | Path) -> None:
    """Write this process's logging window into `checkpoint` (each process its own file)."""
    path = Path(checkpoint) / STATE_FILE.format(rank=trainer.accelerator.process_index)
    torch.save(logging_window(trainer), path)


def load_logging_window(trainer, checkpoint: str | Path) -> None:
    """Restore what `save_logging_window` wrote; a checkpoint without the file resumes as HF's would."""
    path = Path(checkpoint) / STATE_FILE.format(rank=trainer.accelerator.process_index)
    if path.is_file():
        restore_logging_window(trainer, torch.load(path, map_location="cpu", weights_only=True))
