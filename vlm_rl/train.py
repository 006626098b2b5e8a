"""One GRPO run from a recipe.

vlm-rl train --config recipes/demo_cpu.yaml [--field value ...]
accelerate launch --config_file launch/single_process.yaml -m vlm_rl.train --config recipes/demo_cpu.yaml
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
import trl
from peft import PeftModel
from torch import nn

import vlm_rl
from vlm_rl.config import DataArguments, ModelArguments, RewardArguments, VLMGRPOConfig, parse_recipe, recipe_as_run
from vlm_rl.data import SkippedRowsCallback, image_counts
from vlm_rl.data.sources import resolve_path
from vlm_rl.errors import RunStopped
from vlm_rl.evaluation import evaluate_and_write, image_rows
from vlm_rl.model_card import write_model_card
from vlm_rl.models import apply_freezing, load_model_and_processor
from vlm_rl.models.loading import TINY_PREFIX
from vlm_rl.models.lora import wrap_with_lora
from vlm_rl.plotting import PLOT_FILE, plot_run
from vlm_rl.prepare import Prepared, RunFinished, evaluates, prepare, without_zero3_init
from vlm_rl.redaction import redacted_argv
from vlm_rl.rewards.boxes import resolve_box_format
from vlm_rl.tools import recipe_toolbox
from vlm_rl.trainers import VLMGRPOTrainer
from vlm_rl.trainers.preemption import Preempted
from vlm_rl.trainers.step_timeout import watching

logger = logging.getLogger("vlm_rl")


def final_evaluation(model, trainer: VLMGRPOTrainer, prepared: Prepared, args: VLMGRPOConfig) -> dict:
    """Greedy held-out evaluation of `model`, with the run's tools; also with images swapped between rows when two
    or more have one."""
    task, reward_funcs = prepared.task, prepared.reward_funcs
    ablate = len(image_rows(task.eval, args.per_device_eval_batch_size)) >= 2
    if not ablate:
        logger.info("Fewer than two held-out rows have images: no blind (image-swapped) evaluation.")
    return evaluate_and_write(
        model,
        trainer.processing_class,
        task.eval,
        reward_funcs,
        args.output_dir,
        accuracy_reward=args.eval_accuracy_reward,
        max_new_tokens=args.max_completion_length,
        batch_size=args.per_device_eval_batch_size,
        ablate_images=ablate,
        chance=task.chance,
        extra={"global_step": trainer.state.global_step},
        environment_factory=recipe_toolbox(
            prepared.tools, trainer.processing_class, model.config.model_type, args.max_tool_turns
        ),
        max_tool_turns=args.max_tool_calling_iterations,
    )


def is_zero3(accelerator) -> bool:
    """Whether the model's weights are partitioned over processes (DeepSpeed ZeRO stage 3)."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


def check_zero3_saves_full_model(accelerator) -> None:
    """Under ZeRO-3 the output directory must get gathered weights, or it holds no loadable model at all."""
    if not is_zero3(accelerator):
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    if not config.get("stage3_gather_16bit_weights_on_model_save", False):
        raise ValueError(
            "DeepSpeed ZeRO-3 is set to save only sharded weights, so the output directory and checkpoints would hold "
            "no model that `from_pretrained` can load. Set `zero3_save_16bit_model: true` under `deepspeed_config` in "
            "the accelerate config (as launch/zero3.yaml does), or `stage3_gather_16bit_weights_on_model_save: true` "
            "in a DeepSpeed JSON config."
        )


@contextlib.contextmanager
def trained_policy(trainer: VLMGRPOTrainer, model_path: str, dtype: str) -> Iterator[nn.Module]:
    """The trained model, whole, for the main process to evaluate alone.

    Under ZeRO-3 each process holds a shard of the weights and every forward gathers them with collectives the
    other processes would have to join, step for step, through a generation whose length only the main process
    knows. The output directory holds the same weights gathered (`trainer.save_model` ran first), so the main
    process loads them from there, unpartitioned: one more copy of the model in memory, for the evaluation only.
    """
    if not is_zero3(trainer.accelerator):
        yield trainer.accelerator.unwrap_model(trainer.model)
        return
    output_dir = Path(trainer.args.output_dir)
    adapter = (output_dir / "adapter_config.json").is_file()  # LoRA: the base model with the saved adapter
    # Also while it runs: with ZeRO-3 on, `generate` would sync every step with the other processes.
    with without_zero3_init(trainer.args):
        model, _ = load_model_and_processor(
            model_path if adapter else str(output_dir), dtype=dtype, trust_remote_code=trainer.args.trust_remote_code
        )
        if adapter:
            model = PeftModel.from_pretrained(model, output_dir)
        yield model.to(trainer.accelerator.device)


def describe_distribution(accelerator) -> str:
    """How training is spread over processes, in one line: a DeepSpeed launch on CPU without `ddp_backend: gloo`
    or `use_cpu` silently runs without DeepSpeed, and this line (logged at start-up) shows it."""
    state = accelerator.state
    text = f"{state.num_processes} process(es), distributed type {state.distributed_type.value}"
    if state.deepspeed_plugin is not None:
        plugin = state.deepspeed_plugin
        text += f", ZeRO stage {plugin.zero_stage}"
        offload = {
            name: plugin.deepspeed_config.get("zero_optimization", {}).get(key, {}).get("device", "none")
            for name, key in (("optimizer", "offload_optimizer"), ("parameters", "offload_param"))
        }
        text += ", offload " + ", ".join(f"{name}: {device}" for name, device in offload.items())
    return text


def end_processes(accelerator) -> None:
    """Every process waits for the main one to finish (its final evaluation and model card), then the process
    group is torn down. A process that exits while another still works can abort in its C++ teardown
    (`terminate called without an active exception`, SIGABRT), and the launcher then kills the whole run."""
    if accelerator.num_processes == 1:
        return
    accelerator.wait_for_everyone()
    logger.info("Process %d of %d: done.", accelerator.process_index, accelerator.num_processes)
    accelerator.end_training()


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    reward_args: RewardArguments,
    training_args: VLMGRPOConfig,
    recipe_dir: Path | None = None,
    recipe: dict | None = None,
) -> VLMGRPOTrainer:
    """Prepare (check the recipe, data and rewards), train (resuming if asked), then finish: save the model, plot
    and evaluate as the recipe says, and write the model card; `recipe` is the fields the run was given (for the
    card). Raises `RunFinished` when `output_dir` holds a run that already reached its end, and `Preempted` when a
    signal stopped training (after its checkpoint was saved)."""
    # Everything that can fail from a typo fails here, before any model is loaded.
    prepared = prepare(model_args, data_args, reward_args, training_args, recipe_dir)
    trainer = train(prepared, model_args, training_args)
    finish(prepared, trainer, model_args, data_args, training_args, recipe or {})
    return trainer


def load_policy(prepared: Prepared, model_args: ModelArguments, trust_remote_code: bool) -> tuple[nn.Module, object]:
    """The model to train (LoRA-wrapped and frozen as the recipe says) and its processor, attached to the data."""
    model, processor = load_model_and_processor(
        prepared.model_path,
        dtype=model_args.dtype,
        trust_remote_code=trust_remote_code,
        min_pixels=model_args.min_pixels,
        max_pixels=model_args.max_pixels,
    )
    if model_args.use_peft:  # before freezing: a frozen part then trains no LoRA weights either
        model = wrap_with_lora(model, model_args)
    apply_freezing(
        model,
        vision_tower=model_args.freeze_vision_tower,
        projector=model_args.freeze_projector,
        language_model=model_args.freeze_language_model,
    )
    prepared.task.attach_processor(processor, default_max_prompt_length=prepared.default_max_prompt_length)
    return model, processor


def train(prepared: Prepared, model_args: ModelArguments, training_args: VLMGRPOConfig) -> VLMGRPOTrainer:
    """Load the model, build the trainer and train; raises `Preempted` when a signal stopped training."""
    task = prepared.task
    model, processor = load_policy(prepared, model_args, training_args.trust_remote_code)
    environment_factory = recipe_toolbox(
        prepared.tools, processor, prepared.config.model_type, training_args.max_tool_turns
    )
    trainer = VLMGRPOTrainer(
        model=model,
        reward_funcs=prepared.reward_funcs,
        args=training_args,
        train_dataset=task.train,
        eval_dataset=task.eval if evaluates(training_args) else None,
        processing_class=processor,
        environment_factory=environment_factory,
    )
    logger.info("Training setup: %s.", describe_distribution(trainer.accelerator))
    check_zero3_saves_full_model(trainer.accelerator)
    # First in line, so that the reporters see `data/skipped_rows` in the logs it adds to.
    trainer.callback_handler.callbacks.insert(0, SkippedRowsCallback(task.skipped_train))
    with watching(trainer, training_args.step_timeout):
        trainer.train(resume_from_checkpoint=prepared.resume)
    if trainer.preemption.stopped_by is not None:
        step = trainer.state.global_step
        raise Preempted(trainer.preemption.stopped_by, step, Path(training_args.output_dir) / f"checkpoint-{step}")
    return trainer


def finish(
    prepared: Prepared,
    trainer: VLMGRPOTrainer,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: VLMGRPOConfig,
    recipe: dict,
) -> None:
    """Save the model and state, then (main process) plot, evaluate on the held-out data and write the card."""
    task = prepared.task
    for name, counts in trainer.reward_failures.items():
        if any(counts.values()):
            logger.warning("Reward %r failed on %s samples during training.", name, counts)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()

    if trainer.accelerator.is_main_process and training_args.plot:
        logger.info("Training curves: %s", plot_run(training_args.output_dir))
    results = None
    if trainer.accelerator.is_main_process and training_args.final_eval and task.eval is not None:
        with trained_policy(trainer, prepared.model_path, model_args.dtype) as policy:
            results = final_evaluation(policy, trainer, prepared, training_args)
        logger.info(
            "Held-out evaluation: %s",
            json.dumps({k: results.get(k) for k in ("accuracy", "image_accuracy", "blind_accuracy", "chance")}),
        )
    elif trainer.accelerator.is_main_process and training_args.final_eval:
        logger.info("No held-out data (eval_dataset, eval_split or eval_size): the final evaluation is skipped.")
    if trainer.accelerator.is_main_process:
        card = model_card(prepared, model_args, data_args, training_args, trainer, results, recipe)
        logger.info("Model card: %s", card)
    task.log_summary()


def model_card(
    prepared: Prepared,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: VLMGRPOConfig,
    trainer: VLMGRPOTrainer,
    eval_results: dict | None,
    recipe: dict,
) -> Path:
    """Write the README.md of the saved model (`vlm_rl.model_card`), local paths absolute as the run resolved them."""
    task, reward_funcs = prepared.task, prepared.reward_funcs
    weights = training_args.reward_weights or [1.0] * len(reward_funcs)
    rewards = [
        {
            "name": func.__name__,
            "weight": weight,
            "tasks": getattr(func, "tasks", None),
            "kwargs": getattr(func, "kwargs", None),
        }
        for func, weight in zip(reward_funcs, weights, strict=True)
    ]
    train_images = image_counts(task.train)[0]
    held_out = None
    if task.eval is not None:
        synthetic = data_args.dataset.startswith("synthetic:")
        held_out = "generated apart from the training rows" if synthetic else "rows held out of the training data"
    recipe_dir = prepared.recipe_dir
    data = {
        "dataset": card_path(data_args.dataset, recipe_dir),
        "held-out data": card_path(data_args.eval_dataset, recipe_dir) or data_args.eval_split or held_out,
        "training rows": len(task.train),
        "training rows with images": int((train_images > 0).sum()),
        "most images in a row": int(train_images.max(initial=0)),
        "held-out rows": len(task.eval) if task.eval is not None else None,
        "prompt template": data_args.prompt_template,
        "system prompt": data_args.system_prompt,
        "image root": card_path(data_args.image_root, recipe_dir),
    }
    versions = {"vlm-rl": vlm_rl.__version__, "trl": trl.__version__, "transformers": transformers.__version__}
    versions["torch"] = torch.__version__
    output_dir = Path(training_args.output_dir)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    # A Hub id or `tiny:<family>` as given; a local directory as the absolute path the run loaded.
    local = Path(prepared.model_path).is_dir() and not model_args.model_name_or_path.startswith(TINY_PREFIX)
    base_model = str(Path(prepared.model_path).resolve()) if local else model_args.model_name_or_path
    return write_model_card(
        output_dir,
        base_model=base_model,
        reward_rows=rewards,
        data=data,
        log_history=trainer.state.log_history,
        eval_results=eval_results,
        recipe=recipe,
        versions=versions,
        has_plot=(output_dir / PLOT_FILE).is_file(),
        lora_adapter=isinstance(policy, PeftModel),
        resolved=resolved_settings(prepared, model_args, data_args, training_args, policy),
        recipe_dir=str(recipe_dir.resolve()) if recipe_dir is not None else None,
    )


def card_path(path: str | None, recipe_dir: Path | None) -> str | None:
    """A recipe path as the run read it: absolute when it is a local file or directory, else as given (a Hub id)."""
    if path is None:
        return None
    local = resolve_path(path, recipe_dir)
    return str(local.resolve()) if local is not None else path


def resolved_settings(
    prepared: Prepared,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: VLMGRPOConfig,
    policy: nn.Module,
) -> dict[str, str]:
    """What the recipe's automatic settings (`auto`, or unset with a computed default) came to in this run."""
    resolved = {}
    if model_args.dtype == "auto":
        resolved["dtype: auto"] = str(policy.dtype).removeprefix("torch.")
    for func in prepared.reward_funcs:
        parameter = inspect.signature(func.func).parameters.get("box_format")
        if parameter is None:
            continue
        box_format = (func.kwargs or {}).get("box_format", parameter.default)
        if box_format == "auto":
            convention = resolve_box_format(box_format, policy.config.model_type)
            resolved[f"{func.__name__}: box_format auto"] = f"{convention} ({policy.config.model_type})"
    if training_args.resume_from_checkpoint == "auto":
        resolved["resume_from_checkpoint: auto"] = prepared.resume or "none found: trained from the start"
    if prepared.default_max_prompt_length is not None:
        bound = f"{prepared.default_max_prompt_length} (the context length less max_completion_length)"
        resolved["max_prompt_length: unset"] = bound
    if training_args.use_vllm:
        resolved["vllm_limit_mm_per_prompt"] = str(training_args.vllm_limit_mm_per_prompt)
    return resolved


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, reward_args, training_args, recipe_path = parse_recipe(argv)
    sys.argv[:] = redacted_argv(sys.argv)  # trackers record the command line (wandb's run metadata)
    recipe = recipe_as_run(argv, (model_args, data_args, reward_args, training_args))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    try:
        trainer = run(
            model_args, data_args, reward_args, training_args, recipe_path.parent if recipe_path else None, recipe
        )
    except RunFinished as finished:
        logger.warning("%s", finished)
        return
    except Preempted as stop:
        logger.warning("%s", stop)
        sys.exit(stop.exit_code)
    except RunStopped as stop:  # a full disk, a vLLM server gone: what to do is in the one line
        sys.exit(f"vlm-rl train: error: {stop}")
    end_processes(trainer.accelerator)


if __name__ == "__main__":
    main(sys.argv[1:])
