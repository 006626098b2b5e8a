"""What VLMGRPOTrainer assumes about TRL's internals. A TRL upgrade that changes them fails here first.

If `test_stock_trl_still_fails_on_mixed_batches` starts failing, TRL fixed mixed batches itself: re-check
whether the overrides in `vlm_rl/trainers/grpo.py` are still needed.
"""

import inspect
from types import SimpleNamespace

import pytest
import torch
import trl
from conftest import small_config
from datasets import concatenate_datasets
from packaging.version import Version
from trl import GRPOConfig, GRPOTrainer

from vlm_rl.config import VLMGRPOConfig
from vlm_rl.data import make_shapes_dataset
from vlm_rl.rewards.accuracy import accuracy
from vlm_rl.trainers import VLMGRPOTrainer


def test_trl_version_is_in_the_tested_range():
    assert Version("1.16") <= Version(trl.__version__) < Version("1.17")


def test_overridden_methods_keep_their_signatures():
    logps = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    # Our override forwards these positionally to TRL's method, one chunk at a time.
    assert list(logps)[:8] == [
        "self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
        "compute_aux_loss",
    ]  # fmt: skip
    assert "num_images" in logps and "pixel_values" in logps
    # Extra inputs reach the model through `functools.partial(model, ...)`: TRL's method may only call `model`.
    source = inspect.getsource(GRPOTrainer._get_per_token_logps_and_entropies)
    assert (
        source.count("model(") == 1 and "outputs = model(**model_inputs, labels=labels, fused_lm_head=True)" in source
    )
    assert "model." not in source.replace("self.model.", "")
    # Our `_prepare_inputs` is TRL's with the adapter's split/merge in place of TRL's shape-based guess.
    prepare = inspect.getsource(GRPOTrainer._prepare_inputs)
    for line in (
        "generate_every = self.args.steps_per_generation * self.num_iterations",
        "if self._step % generate_every == 0 or self._buffered_inputs is None:",
        "generation_batch = split_pixel_values_by_grid(generation_batch)",
        "generation_batch = shuffle_sequence_dict(generation_batch)",
        "generation_batches = split_tensor_dict(generation_batch, self.args.steps_per_generation)",
        "self._buffered_inputs = [unsplit_pixel_values_by_grid(batch) for batch in generation_batches]",
        "inputs = self._buffered_inputs[self._step % self.args.steps_per_generation]",
    ):
        assert line in prepare, line
    assert list(inspect.signature(GRPOTrainer._tokenize_prompts).parameters) == ["self", "prompts"]
    # TRL still marks image-less rows with None (what our `_tokenize_prompts` normalises).
    assert "images.append(prompt_images if prompt_images else None)" in inspect.getsource(
        GRPOTrainer._tokenize_prompts
    )


def test_vllm_backend_is_built_by_its_module_level_name():
    """`VLMGRPOTrainer` swaps `VLLMGeneration` in TRL's trainer module while TRL's `__init__` runs."""
    from trl.trainer import grpo_trainer

    assert "self.vllm_generation = VLLMGeneration(" in inspect.getsource(GRPOTrainer.__init__)
    assert hasattr(grpo_trainer, "VLLMGeneration")
    # `VLMRollout` overrides these and relies on the rest.
    from trl.generation.vllm_generation import VLLMGeneration

    for name in ("_init_vllm", "sync_weights", "generate", "_iter_named_params", "_place_features"):
        assert callable(getattr(VLLMGeneration, name)), name
    assert list(inspect.signature(VLLMGeneration.generate).parameters) == [
        "self", "prompts", "images", "num_generations", "profiler",
    ]  # fmt: skip


def test_stock_trl_still_fails_on_mixed_batches(load_tiny, tmp_path):
    model, processor = load_tiny("qwen2_vl")
    # One batch of 4 prompts, 2 with an image and 2 without.
    dataset = concatenate_datasets([make_shapes_dataset(2), make_shapes_dataset(2, text_fraction=1.0)])
    args = small_config(tmp_path, max_steps=1, per_device_train_batch_size=8, shuffle_dataset=False)
    trainer = GRPOTrainer(
        model=model, reward_funcs=[accuracy], args=args, train_dataset=dataset, processing_class=processor
    )
    with pytest.raises(TypeError, match="only a single or a list of entries is supported"):
        trainer.train()


def test_generation_never_samples_media_tokens(load_tiny, tmp_path):
    model, processor = load_tiny("qwen2_vl")
    trainer = VLMGRPOTrainer(
        model=model, reward_funcs=[accuracy], args=small_config(tmp_path), train_dataset=make_shapes_dataset(4),
        processing_class=processor,
    )  # fmt: skip
    config = model.config
    media = {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id}
    assert media <= set(trainer.generation_config.suppress_tokens)


def test_checkpoint_internals_the_resume_overrides_rely_on():
    """`vlm_rl.checkpoints` / `rollout_state`: where checkpoints are written, when the RNG is restored, what the
    buffer is, and how HF loads full-model weights on resume."""
    from transformers import Trainer

    # Checkpoints go under `_get_output_dir`, which our override points at the staging directory while saving.
    assert "run_dir = self._get_output_dir(trial=trial)" in inspect.getsource(Trainer._save_checkpoint)
    assert "self._get_output_dir(trial=trial)" in inspect.getsource(GRPOTrainer._save_checkpoint)
    # The RNG is restored right before the first resumed step, on every resume path: the buffer goes with it.
    assert inspect.getsource(Trainer._run_epoch).count("self._load_rng_state(resume_from_checkpoint)") == 2
    # TRL's cycle state is these two attributes, counted in micro-steps (one `training_step` each).
    assert "self._step += 1" in inspect.getsource(GRPOTrainer.training_step)
    assert "self._buffered_inputs = None" in inspect.getsource(GRPOTrainer.__init__)
    # HF's resume loads a full model's weights with a plain `load_state_dict` (names unconverted).
    assert "load_result = model.load_state_dict(state_dict, False)" in inspect.getsource(Trainer._load_from_checkpoint)
    # HF pickles the arguments in `_save` (what `redacted_secrets` wraps).
    assert "TRAINING_ARGS_NAME" in inspect.getsource(Trainer._save)


def test_a_plain_grpo_config_gets_the_recipe_defaults(load_tiny, tmp_path):
    """With `trl.GRPOConfig` (no vlm-rl fields) the trainer behaves as with `VLMGRPOConfig`'s defaults."""
    model, processor = load_tiny("qwen2_vl")
    settings = {"per_device_train_batch_size": 4, "num_generations": 2, "bf16": False, "use_cpu": True}
    settings |= {"output_dir": str(tmp_path), "report_to": []}
    recipe, plain = VLMGRPOConfig(**settings), GRPOConfig(**settings)
    behaviour = {}
    for args in (recipe, plain):
        trainer = VLMGRPOTrainer(
            model=model, reward_funcs=[accuracy], args=args, train_dataset=make_shapes_dataset(4),
            processing_class=processor,
        )  # fmt: skip
        guard = trainer.reward_funcs[0]
        behaviour[type(args)] = (
            trainer._shares_prompts(trainer.model, packed=False),
            trainer._encodes_images_once(trainer.model),
            (guard.timeout, guard.error_policy, guard.route_column),
        )
    assert behaviour[GRPOConfig] == behaviour[VLMGRPOConfig] == (True, True, (60.0, "none", "task"))


def shell_trainer(**attributes) -> VLMGRPOTrainer:
    """A trainer built as TRL's unit tests build theirs: no `__init__`, only the attributes the path reads."""
    trainer = VLMGRPOTrainer.__new__(VLMGRPOTrainer)
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, process_index=0)
    trainer.args = SimpleNamespace(report_to=[])
    trainer.model = SimpleNamespace(training=True)
    trainer.state = SimpleNamespace(global_step=0, num_input_tokens_seen=0)
    trainer._last_loaded_step = 0
    trainer.use_vllm = False
    trainer.use_transformers_continuous_batching = False
    for name, value in attributes.items():
        setattr(trainer, name, value)
    return trainer


def test_overrides_let_trl_errors_through_on_a_trainer_built_without_init():
    """Our overrides' own state exists without `__init__`: TRL's error surfaces, not an `AttributeError`."""
    trainer = shell_trainer(rollout_func=lambda prompts, trainer: {"prompt_ids": [[1]], "completion_ids": [[2]]})
    with pytest.raises(ValueError, match=r"rollout_func must return keys \['logprobs'\]"):
        trainer._generate(["prompt"])

    def one_reward_too_few(prompts, completions, **kwargs):
        return [1.0] * (len(prompts) - 1)

    trainer = shell_trainer(
        reward_funcs=[one_reward_too_few], reward_processing_classes=[None], reward_func_names=["short"],
        environments=None,
    )  # fmt: skip
    with pytest.raises(ValueError, match="The reward function 'short' returned 1 rewards, but 2 were expected"):
        trainer._calculate_rewards([{"prompt": "a"}, {"prompt": "b"}], ["a", "b"], ["c", "d"], [[1], [2]])
