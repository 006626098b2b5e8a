"""Checkpoint and resume overrides of `VLMGRPOTrainer`: atomic checkpoints, buffered generations, weight names.

A mixin placed before `GRPOTrainer` in the trainer's bases; each method overrides an HF `Trainer` (or TRL) method
named in `tests/test_trl_contract.py`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from accelerate.utils import gather_object, is_peft_model
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME

from vlm_rl.checkpoints import (
    STAGING_DIR,
    discard,
    full_disk,
    load_renamed_weights,
    not_saved,
    publish,
    remove_incomplete,
    rotate_checkpoints,
    staging_path,
    write_error,
)
from vlm_rl.redaction import redacted_secrets
from vlm_rl.rollout.server_retry import VLLMServerGone
from vlm_rl.trainers.rollout_state import load_rollout_state, save_rollout_state

logger = logging.getLogger(__name__)


class CheckpointMixin:
    """HF's checkpoint save and resume, made atomic and exact for GRPO runs."""

    # True while HF's `_save_checkpoint` runs inside ours: `_get_output_dir` then points at the staging directory.
    _writing_checkpoint: bool = False

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is written, HF's `_save_checkpoint` (and TRL's) put it under the staging directory.
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._writing_checkpoint else run_dir

    def train(self, *args, **kwargs):
        """HF's training loop. A run stopped because the vLLM server stayed away (`VLLMServerGone`, raised on every
        process at the same point of a step, before its update) first saves a checkpoint of the last complete step,
        so that the same command resumes it; HF's loop saves nothing when an exception leaves it."""
        try:
            return super().train(*args, **kwargs)
        except VLLMServerGone as gone:
            self._save_checkpoint(self.model, trial=None)
            checkpoint = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            raise VLLMServerGone(gone.reason, checkpoint) from gone

    def _save_checkpoint(self, model, trial) -> None:
        """HF's checkpoint, written whole into a staging directory and then renamed (`vlm_rl.checkpoints`), with each
        process's buffered generations (`rollout_state`), and rotated so that a good checkpoint always remains.

        A write that fails on any process (a full disk) stops training on every process with `CheckpointNotSaved`:
        the partial checkpoint is deleted and the last complete one stays the one `auto` resumes from. HF lets the
        `OSError` escape from the failing process alone, and the others wait for it in the next collective."""
        run_dir = self._get_output_dir(trial)
        staging = staging_path(run_dir, self.state.global_step)
        if self.args.should_save:
            remove_incomplete(run_dir)  # left by a run killed while saving
        self.accelerator.wait_for_everyone()
        error = None
        self._writing_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
            save_rollout_state(self, staging)
        except Exception as raised:  # a full disk is not always an `OSError` (`vlm_rl.checkpoints.write_error`)
            error = raised
        finally:
            self._writing_checkpoint = False
        self._agree_on_write(run_dir, staging, error)  # every process's files are written
        if self.args.should_save:
            try:
                best = self.state.best_model_checkpoint
                if best is not None and Path(best).parent == staging.parent:
                    self.state.best_model_checkpoint = str(Path(run_dir) / Path(best).name)
                    self.state.save_to_json(str(staging / "trainer_state.json"))
                publish(staging, run_dir)
            except Exception as raised:
                error = raised
        self._agree_on_write(run_dir, staging, error)
        if self.args.should_save:
            rotate_checkpoints(run_dir, self.args.save_total_limit, keep=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _agree_on_write(self, run_dir: str, staging: Path, error: Exception | None) -> None:
        """Raise `CheckpointNotSaved` on every process if writing failed on any (a collective: every process calls
        it at the same point, failed or not)."""
        description = write_error(error, run_dir) if error is not None else None
        if error is not None and full_disk(error, run_dir) is None:
            logger.error("Writing %s failed:", staging, exc_info=error)  # not the disk: the traceback says where
        errors = gather_object([description])
        failed = next((text for text in errors if text is not None), None)
        if failed is None:
            return
        if self.args.should_save:
            discard(staging)
        raise not_saved(failed, run_dir, self.state.global_step) from error

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # HF pickles the arguments into `training_args.bin` here (every checkpoint, the output dir): no tokens.
        with redacted_secrets(self.args):
            super()._save(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        """transformers 5 saves many VLMs' weights under their original checkpoint names (`save_pretrained`'s
        `save_original_format`), and HF's resume loads them with a plain `load_state_dict` that matches none of
        them: it warns and trains on from the base weights. Those checkpoints load through `from_pretrained`, which
        converts the names (`vlm_rl.checkpoints.load_renamed_weights`).

        A LoRA checkpoint that also holds TRL's frozen `ref` adapter (in `ref/`, kept for an adapter that was already
        trained: `use_base_as_reference`) makes HF load only the adapters in sub-directories, not the trained one at
        the checkpoint's root: the run would resume from its starting adapter. That one is loaded here too."""
        model = model if model is not None else self.model
        if is_peft_model(model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            if _adapter_sub_directories(resume_from_checkpoint) and _has_adapter(Path(resume_from_checkpoint)):
                active = model.active_adapters[0]
                model.load_adapter(resume_from_checkpoint, active, is_trainable=True)
                model.set_adapter(active)
            return None
        if not load_renamed_weights(model, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        return None

    def _load_rng_state(self, checkpoint) -> None:
        # HF restores the RNG right before the first step it resumes: the buffered generations go with it.
        super()._load_rng_state(checkpoint)
        if checkpoint is not None:
            load_rollout_state(self, checkpoint)


def _has_adapter(directory: Path) -> bool:
    return any((directory / name).is_file() for name in (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME))


def _adapter_sub_directories(checkpoint: str | os.PathLike) -> list[Path]:
    """The PEFT adapters a checkpoint holds besides the one at its root (HF's test for several adapters)."""
    return [path for path in Path(checkpoint).iterdir() if path.is_dir() and _has_adapter(path)]


class RescheduleOnResume(TrainerCallback):
    """The first step after resuming trains at the learning rate the rebuilt schedule gives the step reached.

    transformers restores the optimizer's saved learning rate with its state, and the scheduler's last value with
    it; the scheduler, rebuilt for this run's `max_steps`, sets the next rate only after that first step. With the
    checkpoint's `max_steps` both are the same number; with a longer run the saved rate (0.0 at the end of a linear
    schedule) would train the first resumed step. Schedulers that are not `LambdaLR` (`reduce_lr_on_plateau`, a
    DeepSpeed config's own) keep the restored rate.
    """

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper holds the scheduler
        if state.global_step == 0 or optimizer is None or not isinstance(scheduler, LambdaLR):
            return
        # As `LambdaLR.get_lr` computes it, so an unchanged schedule gets the very same numbers.
        rates = [
            base * factor(scheduler.last_epoch)
            for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        scheduler._last_lr = (
            rates  # torch's private record of the last rates: what the trainer logs as `learning_rate`
        )
