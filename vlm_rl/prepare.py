"""What a run needs before any model loads, built once for `vlm-rl train`, `vlm-rl sft`, `vlm-rl eval` and
`vlm-rl vllm-serve`.

The three entry points read the same recipe; each piece here (the rewards, the data split with `data_seed`, the
model path and its family adapter) has one implementation, so they cannot drift apart: a server that made room
for fewer images than the trainer's rows hold, or an evaluation on other held-out rows than training's, would
fail or mislead only at run time.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from transformers import PretrainedConfig, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

from vlm_rl.checkpoints import resolve_resume
from vlm_rl.config import DataArguments, ModelArguments, RewardArguments, VLMGRPOConfig
from vlm_rl.data import TaskData, image_counts, load_task, most_images_per_row, video_counts
from vlm_rl.errors import InvalidValueError
from vlm_rl.models import FamilyAdapter, adapter_for, resolve_model_path
from vlm_rl.models.loading import load_config
from vlm_rl.rewards import ConfiguredReward, RewardSpecError, recipe_rewards
from vlm_rl.rewards.columns import check_reward_columns
from vlm_rl.tools import resolve_tool

logger = logging.getLogger("vlm_rl")


class RunFinished(Exception):
    """The run in `output_dir` already trained to its last step: relaunching it has nothing to do."""


@dataclass
class Prepared:
    """A run's inputs, checked: everything that can fail from a typo has failed before this exists."""

    reward_funcs: list[ConfiguredReward]  # none for `vlm-rl sft`
    task: TaskData
    model_path: str
    config: PretrainedConfig  # the model's
    resume: str | None  # the checkpoint to resume from
    recipe_dir: Path | None  # where the recipe's relative paths start (then the working directory)
    default_max_prompt_length: int | None = None  # where the recipe sets no `max_prompt_length`: the context's room
    tools: list = field(default_factory=list)  # the recipe's `tools`, resolved (functions, environment classes)


def prepare_rewards(
    reward_args: RewardArguments, training_args: VLMGRPOConfig, recipe_dir: Path | None
) -> list[ConfiguredReward]:
    """The recipe's rewards, with `reward_weights` resolved into `training_args`."""
    reward_funcs = recipe_rewards(reward_args, training_args, recipe_dir)
    training_args.reward_weights = reward_weights(reward_funcs, training_args.reward_weights)
    return reward_funcs


def prepare_data(data_args: DataArguments, training_args: TrainingArguments, recipe_dir: Path | None) -> TaskData:
    """The recipe's data, held out with `data_seed` (else `seed`): the same rows wherever the recipe is read."""
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    return load_task(data_args, seed=seed, base_dir=recipe_dir)


def prepare_model_path(
    model_args: ModelArguments, training_args: TrainingArguments, recipe_dir: Path | None
) -> tuple[str, FamilyAdapter, PretrainedConfig]:
    """The model's directory or Hub id (a `tiny:` model built first), its family adapter and its config."""
    model_path = resolve_model_path(
        model_args.model_name_or_path,
        training_args.output_dir,
        recipe_dir,
        projector_scale=model_args.tiny_projector_scale,
    )
    config = load_config(model_path, trust_remote_code=training_args.trust_remote_code)
    return model_path, adapter_for(config), config


def prepare(
    model_args: ModelArguments,
    data_args: DataArguments,
    reward_args: RewardArguments,
    training_args: VLMGRPOConfig,
    recipe_dir: Path | None = None,
) -> Prepared:
    """Everything `vlm-rl train` checks and resolves before it loads the model.

    Raises `RunFinished` when `output_dir` holds a run that already reached its last step.
    """
    reward_funcs = prepare_rewards(reward_args, training_args, recipe_dir)
    names = [func.__name__ for func in reward_funcs]
    if training_args.final_eval and training_args.eval_accuracy_reward not in names:
        raise InvalidValueError(
            f"eval_accuracy_reward={training_args.eval_accuracy_reward!r} is not among the recipe's rewards {names}."
        )

    def check_data(task: TaskData) -> None:
        # Start-up checks of the data against the rewards, each naming the column or row and the fix. The rows'
        # plain columns: reading them decodes no image.
        check_routes(reward_funcs, task.train.with_format(None), training_args.reward_route_column)
        check_reward_columns(reward_funcs, task.train)  # before the model loads (the trainer checks again)
        check_reward_columns(reward_funcs, task.eval, split="held-out")  # the final evaluation scores these

    tools = [resolve_tool(spec, recipe_dir) for spec in training_args.tools]
    prepared = prepare_run(model_args, data_args, training_args, recipe_dir, reward_funcs, check_data)
    prepared.tools = tools
    if training_args.vllm_limit_mm_per_prompt is None:
        training_args.vllm_limit_mm_per_prompt = images_per_prompt(training_args, prepared.task)
    prepared.default_max_prompt_length = default_max_prompt_length(data_args, training_args, prepared.config)
    return prepared


def prepare_run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    recipe_dir: Path | None,
    reward_funcs: list[ConfiguredReward],
    check_data: Callable[[TaskData], None] | None = None,
) -> Prepared:
    """What every training command (`vlm-rl train`, `vlm-rl sft`) resolves before it loads the model: the checkpoint
    to resume from, the data (then `check_data` on it), the model's path and family, and the rows the family takes.

    Raises `RunFinished` when `output_dir` holds a run that already reached its last step.
    """
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    check_not_finished(training_args, resume)
    task = prepare_data(data_args, training_args, recipe_dir)
    if check_data is not None:
        check_data(task)
    # One process builds a tiny model; the others then load it.
    with PartialState().main_process_first(), without_zero3_init(training_args):
        model_path, adapter, config = prepare_model_path(model_args, training_args, recipe_dir)
    # Rows the family cannot take (e.g. text-only rows for BLIP-2) fail here, named, before the model loads.
    for dataset in (task.train, task.eval):
        if dataset is not None:
            adapter.check_images_per_row(*image_counts(dataset))
            adapter.check_videos_per_row(*video_counts(dataset))
    warn_if_schedule_changes(training_args, resume)
    return Prepared(
        reward_funcs=reward_funcs,
        task=task,
        model_path=model_path,
        config=config,
        resume=resume,
        recipe_dir=recipe_dir,
    )


def images_per_prompt(training_args: VLMGRPOConfig, task: TaskData) -> int:
    """The most images one vLLM prompt holds: the data's most and, with tools, one per tool turn (TRL's tool loop
    sends the conversation so far, the tools' images included, as the next turn's prompt)."""
    most = most_images_per_row(task.train, task.eval)
    if not training_args.tools:
        return most
    return most + (training_args.max_tool_turns or training_args.max_tool_calling_iterations or 0)


def evaluates(training_args: TrainingArguments) -> bool:
    """Whether the trainer evaluates during training, and so needs the held-out rows: every `eval_steps`, or once
    before the first step (`eval_on_start`, which transformers runs whatever `eval_strategy` says)."""
    return training_args.eval_strategy != "no" or training_args.eval_on_start


def default_max_prompt_length(
    data_args: DataArguments, training_args: VLMGRPOConfig, config: PretrainedConfig
) -> int | None:
    """Unless the recipe sets `max_prompt_length`: the model's context length less `max_completion_length`. A longer
    prompt leaves its completion no room, or runs past the position embeddings, and trains on garbage silently."""
    if data_args.max_prompt_length is not None or data_args.dataset.startswith("synthetic:"):
        return None  # the recipe's bound applies; generated rows are short and not measured
    context = context_length(config)
    if context is None:
        return None
    return max(1, context - training_args.max_completion_length)


def context_length(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's language model takes (`max_position_embeddings`), if its config says."""
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def _saved_state(path: Path) -> dict | None:
    state_file = path / "trainer_state.json"
    return json.loads(state_file.read_text()) if state_file.is_file() else None


def check_not_finished(training_args: TrainingArguments, resume: str | None) -> None:
    """Raise `RunFinished` when resuming would start at or past the run's last step.

    TRL's trainer, resumed from the final step, still trains one more step and overwrites the saved model; a
    relaunched finished run (`resume_from_checkpoint: auto`) must do nothing instead. The step reached is the
    checkpoint's (transformers saves one at the last step under every `save_strategy` but `no`); with `auto` and no
    checkpoint, the final `trainer_state.json` in `output_dir` (written only when a run completes). The end is
    `max_steps` when the recipe sets it, else the steps the saved `num_train_epochs` came to.
    """
    output_dir = Path(training_args.output_dir)
    if resume is not None:
        state = _saved_state(Path(resume))
    elif training_args.resume_from_checkpoint == "auto":
        state = _saved_state(output_dir)
    else:
        return
    if state is None:
        return
    step = state["global_step"]
    if training_args.max_steps > 0:
        done = step >= training_args.max_steps
    else:
        done = step >= state["max_steps"] and training_args.num_train_epochs <= state["num_train_epochs"]
    if done:
        target = (
            f"max_steps={training_args.max_steps}"
            if training_args.max_steps > 0
            else f"num_train_epochs={training_args.num_train_epochs}"
        )
        raise RunFinished(
            f"The run in {output_dir} already finished (step {step}, {target}): nothing to train. To train "
            f"longer, raise max_steps (e.g. --max_steps {2 * step}) or num_train_epochs and resume; to start "
            "over, use another output_dir."
        )


def warn_if_schedule_changes(training_args: TrainingArguments, resume: str | None) -> None:
    """Say how the learning rate goes on when a run resumes with another length than the checkpoint's.

    The scheduler is rebuilt for the new length and its steps so far are kept, so from the first resumed step the
    learning rate follows the new schedule at the step reached (`RescheduleOnResume` makes that first step agree;
    docs/reliability.md).
    """
    state = _saved_state(Path(resume)) if resume else None
    if state is None or training_args.max_steps <= 0 or state["max_steps"] == training_args.max_steps:
        return
    logger.warning(
        "Resuming %s, saved by a run of max_steps=%d, with max_steps=%d: the %s learning-rate schedule is rebuilt for "
        "%d steps and goes on from step %d of it (for a decaying schedule the learning rate rises back from where "
        "the shorter run left it).",
        resume,
        state["max_steps"],
        training_args.max_steps,
        getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type),
        training_args.max_steps,
        state["global_step"],
    )


@contextlib.contextmanager
def without_zero3_init(training_args: TrainingArguments) -> Iterator[None]:
    """Models constructed inside are not partitioned by ZeRO-3 as they are built.

    Under ZeRO-3, transformers partitions a model while constructing it, with collectives every process must
    join; a model only the main process builds (a `tiny:` model, before the others load it) would wait forever.
    """
    plugin = training_args.deepspeed_plugin
    if plugin is None or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def reward_weights(rewards: list[ConfiguredReward], recipe_weights: list[float] | None) -> list[float] | None:
    """One weight per reward, from the entries' `weight` or else the recipe's `reward_weights` (None: all 1.0)."""
    if all(reward.weight is None for reward in rewards):
        return recipe_weights
    if recipe_weights is not None:
        raise RewardSpecError(
            "The recipe sets both `reward_weights` and a `weight` inside `reward_funcs`; use one of the two."
        )
    return [1.0 if reward.weight is None else float(reward.weight) for reward in rewards]


def check_routes(rewards: list[ConfiguredReward], dataset, route_column: str) -> None:
    """Every task a reward is routed to exists in the data, and every row is scored by at least one reward."""
    routed = [reward for reward in rewards if reward.tasks is not None]
    if not routed:
        return
    if route_column not in dataset.column_names:
        raise RewardSpecError(
            f"Rewards {[r.__name__ for r in routed]} are routed by `tasks`, but the training data has no "
            f"{route_column!r} column (columns: {dataset.column_names}); set `reward_route_column`."
        )
    present = {str(value) for value in dataset[route_column] if value is not None}
    for reward in routed:
        missing = sorted(set(reward.tasks) - present)
        if missing:
            raise RewardSpecError(
                f"Reward {reward.__name__!r} is routed to tasks {missing} that no training row has; the "
                f"{route_column!r} column holds {sorted(present)}."
            )
    if len(routed) == len(rewards):
        unscored = sorted(present - {task for reward in routed for task in reward.tasks})
        if unscored:
            raise RewardSpecError(
                f"Training rows with {route_column} {unscored} are scored by no reward; add them to a reward's "
                "`tasks`, or add a reward without `tasks`."
            )
