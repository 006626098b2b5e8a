"""One supervised fine-tuning run (a warm start for GRPO) from a recipe.

vlm-rl sft --config recipes/counting_sft_cpu.yaml [--field value ...]

The recipe format, data loading, model families, LoRA, freezing, checkpoints and resume are `vlm-rl train`'s; the
training is TRL's `SFTTrainer` on prompt-completion rows, with the loss on the completion's tokens only. The output
directory holds a whole model and its processor (a LoRA adapter is merged into it), a `model_name_or_path` for
`vlm-rl train` and `vlm-rl eval`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import transformers
from accelerate.utils import is_peft_model
from datasets import Dataset
from peft import PeftModel
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer

from vlm_rl.checkpoints import load_renamed_weights
from vlm_rl.config import DataArguments, ModelArguments, VLMSFTConfig, parse_sft_recipe
from vlm_rl.data import DataError, SkippedRowsCallback, TaskData
from vlm_rl.data.rows import trainer_columns
from vlm_rl.models import adapter_for
from vlm_rl.models.collator import PromptCompletionCollator
from vlm_rl.models.video import configure_video_from
from vlm_rl.prepare import Prepared, RunFinished, evaluates, prepare_run
from vlm_rl.redaction import redacted_argv
from vlm_rl.train import check_zero3_saves_full_model, describe_distribution, end_processes, load_policy
from vlm_rl.trainers.logging_window import load_logging_window, save_logging_window
from vlm_rl.trainers.step_timeout import watching

logger = logging.getLogger("vlm_rl")

COMPLETION = "completion"


def check_completions(task: TaskData, data_args: DataArguments, training_args: VLMSFTConfig) -> None:
    """The rows SFT trains (and, if it evaluates, evaluates) on have the assistant's reply to learn."""
    splits = [("training", task.train, data_args.dataset)]
    if evaluates(training_args) and task.eval is not None:
        splits.append(("held-out", task.eval, data_args.eval_dataset or data_args.dataset))
    for split, dataset, name in splits:
        if COMPLETION not in trainer_columns(dataset):
            hint = " (the synthetic scene tasks have it in `split: sft`)" if name.startswith("synthetic:") else ""
            raise DataError(
                f"{name}: the {split} rows have no {COMPLETION!r} column, the assistant reply SFT learns; add one "
                f"(a conversation of one assistant message, or its text), or rename yours with `column_mapping: "
                f"{{your_column: {COMPLETION}}}`{hint}."
            )


def prepare_sft(
    model_args: ModelArguments, data_args: DataArguments, training_args: VLMSFTConfig, recipe_dir: Path | None
) -> Prepared:
    """What `vlm-rl sft` checks and resolves before it loads the model (as `vlm-rl train` does, without rewards)."""
    return prepare_run(
        model_args,
        data_args,
        training_args,
        recipe_dir,
        reward_funcs=[],
        check_data=lambda task: check_completions(task, data_args, training_args),
    )


class VLMSFTTrainer(SFTTrainer):
    """TRL's `SFTTrainer` for every model family, resuming checkpoints saved under original weight names, and with
    the loss logged after a resume inside a logging window the uninterrupted run's (`logging_window`).

    Each override here has a row in the `SEAMS` table of tests/test_trl_contract.py."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # TRL's loss runs its fused LM head on the model's backbone (`base_model`), which BLIP-2 and InstructBLIP
        # lack (their outputs have no `last_hidden_state`): those train on their own loss, without TRL's token
        # accuracy and entropy metrics.
        policy = self.accelerator.unwrap_model(model)
        policy = policy.get_base_model() if is_peft_model(policy) else policy
        if policy.base_model is policy:
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        # HF's resume would warn and train on from the base weights (`vlm_rl.checkpoints.load_renamed_weights`).
        model = model if model is not None else self.model
        if is_peft_model(model) or not load_renamed_weights(model, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_checkpoint(self, model, trial) -> None:
        """HF's (and TRL's) checkpoint, plus each process's loss summed since the last logging step and that step,
        which HF's checkpoint lacks (`logging_window`)."""
        super()._save_checkpoint(model, trial)
        checkpoint = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        save_logging_window(self, checkpoint)

    def _load_rng_state(self, checkpoint) -> None:
        """HF restores the RNG right before the first resumed step, after its loop set the logging window afresh:
        the saved window is put back with it. A checkpoint without the file (an earlier vlm-rl's) resumes as before."""
        super()._load_rng_state(checkpoint)
        if checkpoint is not None:
            load_logging_window(self, checkpoint)


def build_trainer(
    model: nn.Module, processor, args: VLMSFTConfig, train_dataset: Dataset, eval_dataset: Dataset | None = None
) -> SFTTrainer:
    """`VLMSFTTrainer` with the prompt-completion collator of the model's family (`vlm_rl.models.collator`), and the
    recipe's video settings on the processor (saved with the model, as `vlm-rl train` saves them)."""
    configure_video_from(processor, args)
    return VLMSFTTrainer(
        model=model,
        args=args,
        data_collator=PromptCompletionCollator(processor, adapter_for(model.config), args.max_length),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
    )


def train(prepared: Prepared, model_args: ModelArguments, training_args: VLMSFTConfig) -> SFTTrainer:
    """Load the model, build the trainer and train."""
    task = prepared.task
    model, processor = load_policy(prepared, model_args, training_args.trust_remote_code)
    eval_dataset = task.eval if evaluates(training_args) else None
    trainer = build_trainer(model, processor, training_args, task.train, eval_dataset)
    logger.info("Training setup: %s.", describe_distribution(trainer.accelerator))
    check_zero3_saves_full_model(trainer.accelerator)
    trainer.callback_handler.callbacks.insert(0, SkippedRowsCallback(task.skipped_train))
    with watching(trainer, training_args.step_timeout):
        trainer.train(resume_from_checkpoint=prepared.resume)
    return trainer


def save_model(trainer: SFTTrainer, output_dir: str) -> None:
    """The trained model and its processor in `output_dir`, whole: a LoRA adapter is merged into its base model, so
    that the directory is a plain `model_name_or_path` for `vlm-rl train` (which puts a fresh adapter on it)."""
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if not isinstance(policy, PeftModel):
        trainer.save_model(output_dir)
        return
    if trainer.accelerator.is_main_process:
        policy.merge_and_unload().save_pretrained(output_dir)
        trainer.processing_class.save_pretrained(output_dir)
    trainer.accelerator.wait_for_everyone()


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: VLMSFTConfig,
    recipe_dir: Path | None = None,
) -> SFTTrainer:
    """Prepare (check the recipe and data), train (resuming if asked), then save the model, processor and state.
    Raises `RunFinished` when `output_dir` holds a run that already reached its end."""
    prepared = prepare_sft(model_args, data_args, training_args, recipe_dir)
    trainer = train(prepared, model_args, training_args)
    save_model(trainer, training_args.output_dir)
    trainer.save_state()
    prepared.task.log_summary()
    return trainer


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args, recipe_path = parse_sft_recipe(argv)
    sys.argv[:] = redacted_argv(sys.argv)  # trackers record the command line (wandb's run metadata)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    try:
        trainer = run(model_args, data_args, training_args, recipe_path.parent if recipe_path else None)
    except RunFinished as finished:
        logger.warning("%s", finished)
        return
    end_processes(trainer.accelerator)


if __name__ == "__main__":
    main(sys.argv[1:])
