"""Stopping on SIGTERM / SIGINT with a checkpoint, as cluster schedulers ask before they kill a job."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; the run is not finished."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum = signum
        self.exit_code = 128 + signum  # what a shell reports for a process ended by that signal
        super().__init__(
            f"Stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in {checkpoint}. Run the "
            "same command with --resume_from_checkpoint auto to continue."
        )


class PreemptionCallback(TrainerCallback):
    """The first SIGTERM or SIGINT makes training save a checkpoint after the current optimizer step and stop; a
    second one exits at once (a checkpoint being written is then left incomplete, and never resumed from).

    Only the main thread can take signals; elsewhere (a trainer driven from another thread) nothing is installed.
    """

    def __init__(self) -> None:
        self.received: int | None = None  # the signal this process got
        self.stopped_by: int | None = None  # the signal any process got, once training stops for it
        self._previous: dict[int, object] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            sys.stderr.write(f"\nvlm-rl: second {name}: exiting now, without finishing the checkpoint.\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.received = signum
        logger.warning(
            "%s received: saving a checkpoint after the current optimizer step, then stopping. Send it again to exit "
            "at once.",
            name,
        )

    def on_step_end(self, args, state, control, **kwargs):
        self.stopped_by = self._received_anywhere()
        if self.stopped_by is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def _received_anywhere(self) -> int | None:
        """The signal, if any process got one: all processes must stop at the same step."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.received
        flag = torch.tensor([self.received or 0], device=PartialState().device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None
