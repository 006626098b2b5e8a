"""What VLMGRPOTrainer assumes about TRL's and HF's internals: every seam in one table. A TRL upgrade fails here first.

`SEAMS` has one row per seam: each TRL/HF method the trainer (and its mixins, and the vLLM backend) overrides,
the module-level name swapped for the vLLM backend, the places that copy TRL logic, and the private attributes
read. Each row pins what the override relies on, by behaviour or by TRL's source. A new override without a row
fails `test_every_override_has_a_row`.

If `test_stock_trl_still_fails_on_mixed_batches` starts failing, TRL fixed mixed batches itself: re-check
whether the overrides in `vlm_rl/trainers/grpo.py` are still needed.
"""

import ast
import inspect
import textwrap
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import trl
from conftest import shapes_trainer, small_config
from datasets import concatenate_datasets
from packaging.version import Version
from transformers import ProcessorMixin, Qwen2_5_VLModel, Qwen2VLModel, Qwen3VLModel, Trainer
from transformers.models.internvl.processing_internvl import InternVLProcessor
from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor
from transformers.video_processing_utils import BaseVideoProcessor
from trl import GRPOConfig, GRPOTrainer, SFTTrainer
from trl.data_utils import prepare_multimodal_messages
from trl.generation.vllm_client import VLLMClient
from trl.generation.vllm_generation import VLLMGeneration
from trl.trainer import grpo_trainer as grpo_trainer_module
from trl.trainer.utils import add_fused_lm_head

from vlm_rl.config import VLMGRPOConfig
from vlm_rl.data import make_shapes_dataset
from vlm_rl.models.inputs import prompt_inputs
from vlm_rl.rewards.accuracy import accuracy
from vlm_rl.rollout.vllm import VLMClient, VLMRollout
from vlm_rl.sft import VLMSFTTrainer
from vlm_rl.trainers import VLMGRPOTrainer
from vlm_rl.trainers.logprobs import score_from_logits


def test_trl_version_is_in_the_tested_range():
    assert Version("1.16") <= Version(trl.__version__) < Version("1.17")


# ----- how a row pins its seam ------------------------------------------------------------------------------------


def has_lines(obj, *lines: str) -> Callable[[], None]:
    """TRL's (or HF's) source of `obj` still holds each of `lines`, as the override assumes."""

    def check():
        source = inspect.getsource(obj)
        for line in lines:
            assert line in source, f"{obj.__qualname__} no longer has: {line}"

    return check


def has_parameters(obj, names: list[str], prefix: bool = False) -> Callable[[], None]:
    """`obj` still takes exactly these parameters (or, with `prefix`, these first), in this order."""

    def check():
        parameters = list(inspect.signature(obj).parameters)
        assert (parameters[: len(names)] if prefix else parameters) == names, obj.__qualname__

    return check


def holds(condition: Callable[[], bool], message: str) -> Callable[[], None]:
    def check():
        assert condition(), message

    return check


def calls_only(obj, name: str) -> bool:
    """Whether the source of `obj` calls `name` exactly once and uses it in no other way (`name.attribute`)."""
    source = inspect.getsource(obj)
    return source.count(f"{name}(") == 1 and f"{name}." not in source.replace(f"self.{name}.", "")


def call_keywords(obj, callee: str) -> set[str]:
    """The keyword names of the calls to `callee` (a name or `x.name`) in the source of `obj`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    keywords = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name == callee:
                keywords |= {keyword.arg for keyword in node.keywords if keyword.arg}
    return keywords


def dict_keys_assigned(obj, target: str) -> set[str]:
    """The keys of the dict literal assigned to `target` in the source of `obj`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    for node in ast.walk(tree):
        named = isinstance(node, ast.Assign) and any(getattr(t, "id", None) == target for t in node.targets)
        if named and isinstance(node.value, ast.Dict):
            return {key.value for key in node.value.keys if isinstance(key, ast.Constant)}
    return set()


def all_of(*checks: Callable[[], None]) -> Callable[[], None]:
    def check():
        for each in checks:
            each()

    return check


# ----- the copies of TRL logic, pinned ------------------------------------------------------------------------------


def colocated_llm_matches_trl():
    """`VLMRollout._init_vllm` builds vLLM's `LLM` as TRL's colocate mode does, plus the image settings and dtype.
    Not copied: `quantization` (TRL's bitsandbytes 4-bit policies; vlm-rl's vLLM path does not load those)."""
    ours = call_keywords(VLMRollout._init_vllm, "LLM")
    trl_keywords = call_keywords(VLLMGeneration._init_vllm, "LLM")
    assert trl_keywords == {
        "model", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "max_num_seqs",
        "enable_sleep_mode", "model_impl", "distributed_executor_backend", "seed", "max_num_batched_tokens",
        "logprobs_mode", "quantization", "trust_remote_code",
    }, "TRL's colocated LLM(...) changed: update VLMRollout._init_vllm"  # fmt: skip
    assert trl_keywords - ours == {"quantization"}
    assert ours - trl_keywords == {"dtype", "mm_processor_kwargs", "limit_mm_per_prompt"}


def sampling_params_match_trl():
    """`VLMRollout._generate_colocated` assembles `SamplingParams` from TRL's settings (per prompt group, `n` = the
    group's copies, where TRL sends each copy with `n=1`), then the user's `generation_kwargs` on top."""
    trl_keys = dict_keys_assigned(VLLMGeneration.generate, "generation_kwargs")
    assert trl_keys == {
        "n", "repetition_penalty", "temperature", "top_p", "top_k", "min_p", "max_tokens", "logprobs",
    }, "TRL's colocated SamplingParams changed: update VLMRollout._generate_colocated"  # fmt: skip
    assert dict_keys_assigned(VLMRollout._generate_colocated, "settings") == trl_keys - {"n"}
    has_lines(
        VLLMGeneration.generate,
        "generation_kwargs.update(self.generation_kwargs)",
        'generation_kwargs["structured_outputs"] = StructuredOutputsParams(regex=self.structured_outputs_regex)',
        "all_logprobs, all_logprob_token_ids = extract_logprobs(all_outputs)",
    )()


def fused_lm_head_protocol(load_tiny):
    """`score_from_logits` (a model with no separate backbone) answers `model(..., labels=..., fused_lm_head=True)`
    as TRL's `add_fused_lm_head` does: same log-probs, entropies and label mask, zero where the label is -100."""
    outputs = []
    for patch in (
        lambda model: add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy")),
        lambda model: score_from_logits(model, temperature=0.7),
    ):
        model, _ = load_tiny("qwen2_vl")
        patch(model)
        input_ids = torch.arange(3, 3 + 2 * 9).reshape(2, 9)
        labels = input_ids.masked_fill(torch.arange(9) < 5, -100)
        with torch.no_grad():
            outputs.append(model(input_ids=input_ids, labels=labels, fused_lm_head=True))
    trl_output, ours = outputs
    for field in ("log_probs", "entropy", "label_mask"):
        torch.testing.assert_close(getattr(ours, field), getattr(trl_output, field), atol=1e-5, rtol=1e-5)
    assert (trl_output.log_probs[:, :4] == 0).all()


def prompt_tokenisation_matches_trl(vlm_trainer):
    """`models.inputs.prompt_inputs` tokenises prompts as TRL's `_tokenize_prompts` does (one `apply_chat_template`
    call with the images), so that evaluation scores what training generates from, with and without images."""
    rows = list(concatenate_datasets([make_shapes_dataset(2), make_shapes_dataset(2, text_fraction=1.0)]))
    images = [row.get("images") or [] for row in rows]
    prompts = [prepare_multimodal_messages(row["prompt"], images=i) for row, i in zip(rows, images, strict=True)]
    prompt_ids, _, _ = vlm_trainer._tokenize_prompts(prompts)
    inputs = prompt_inputs(vlm_trainer.adapter, vlm_trainer.processing_class, [row["prompt"] for row in rows], images)
    ours = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)]
    assert ours == prompt_ids


# ----- the table ----------------------------------------------------------------------------------------------------

TRL_LOGPS = GRPOTrainer._get_per_token_logps_and_entropies
# The attributes of TRL's (and HF's) trainer that ours reads, each set by `__init__` (pinned on a real trainer).
TRAINER_ATTRIBUTES = (
    "_is_vlm", "_step", "_buffered_inputs", "_metrics", "_logs", "log_completions", "log_multimodal",
    "log_unique_prompts", "num_completions_to_print", "reward_func_names", "use_vllm",
    "use_transformers_continuous_batching", "generation_kwargs", "generation_config", "temperature", "ref_model",
    "num_iterations", "max_completion_length", "model_wrapped", "_tokenizer", "reward_weights", "num_generations",
    "tools", "environments",
)  # fmt: skip
# The attributes of TRL's vLLM backend that `VLMRollout` reads, each set by its `__init__`.
ROLLOUT_ATTRIBUTES = (
    "model", "accelerator", "processing_class", "mode", "structured_outputs_regex", "server_base_url", "server_host",
    "server_port", "server_timeout", "group_port", "tensor_parallel_size", "gpu_memory_utilization",
    "max_model_length", "max_num_seqs", "enable_sleep_mode", "model_impl", "trust_remote_code", "repetition_penalty",
    "temperature", "top_p", "top_k", "min_p", "max_completion_length", "logprobs", "generation_kwargs",
)  # fmt: skip
LOGPS_PARAMETERS = [
    "self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
    "compute_aux_loss",
]  # fmt: skip

# HF restores the RNG right before the first resumed step, on every resume path (what GRPO's buffered generations and
# both trainers' logging window are restored with).
rng_restored_before_the_first_resumed_step = holds(
    lambda: inspect.getsource(Trainer._run_epoch).count("self._load_rng_state(resume_from_checkpoint)") == 2,
    "HF restores the RNG elsewhere now",
)

SEAMS: dict[str, Callable[..., None]] = {
    # --- VLMGRPOTrainer (grpo.py): methods of GRPOTrainer it overrides
    "__init__": all_of(
        # `use_base_as_reference`: TRL adds the `ref` copy of a wrapped model's adapter when beta > 0.
        has_lines(GRPOTrainer.__init__, 'model.add_adapter("ref", default_config)'),
        # `score_from_logits` follows TRL's fused head onto the same models.
        has_lines(
            GRPOTrainer.__init__,
            "self.model.get_base_model() if is_peft_model(self.model) else self.model,",
            "if self.ref_model is not None:\n            add_fused_lm_head(",
        ),
    ),
    "_tokenize_prompts": all_of(
        has_parameters(GRPOTrainer._tokenize_prompts, ["self", "prompts"]),
        # TRL still marks image-less rows with None (what our override normalises to []).
        has_lines(GRPOTrainer._tokenize_prompts, "images.append(prompt_images if prompt_images else None)"),
    ),
    "_generate_single_turn": all_of(
        has_parameters(
            GRPOTrainer._generate_single_turn,
            ["self", "prompt_ids", "images", "multimodal_fields", "num_generations", "has_tool_images"],
        ),
        # ToolMetricsMixin: TRL's tool loop generates once per turn, right after running the turn's tools.
        has_lines(GRPOTrainer._tool_call_loop, "post_tool_ids, post_tool_logprobs = self._generate_single_turn("),
    ),
    "_generate_and_score_completions": all_of(
        has_lines(
            GRPOTrainer._generate_and_score_completions,
            # The image gather for the completion logs we move to every process.
            "if images is not None and self.log_multimodal:",
            # The tool images of the completion logs are read from the completions TRL gathers for the same logs.
            'self._logs["completion"].extend(gather_object(completions))',
            # The processor calls whose image processor `images_preprocessed_once` serves from its memo: scoring's,
            "prompt_inputs = self.processing_class(images=images, text=prompts_text, padding=True,",
        ),
        # and generation's.
        has_lines(GRPOTrainer._tokenize_prompts, "tokenized = self.processing_class.apply_chat_template("),
    ),
    "_get_per_token_logps_and_entropies": all_of(
        # Our override forwards the first of these positionally to TRL's method, one chunk at a time.
        has_parameters(TRL_LOGPS, LOGPS_PARAMETERS, prefix=True),
        holds(lambda: {"num_images", "pixel_values"} <= set(inspect.signature(TRL_LOGPS).parameters), "vision inputs"),
        # Extra inputs reach the model through `functools.partial(model, ...)`: TRL's method may only call `model`.
        has_lines(TRL_LOGPS, "outputs = model(**model_inputs, labels=labels, fused_lm_head=True)"),
        holds(lambda: calls_only(TRL_LOGPS, "model"), "TRL's log-prob method uses the model in another way"),
    ),
    "compute_loss": all_of(
        has_parameters(GRPOTrainer.compute_loss, ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]),
        # `_loss_only_inputs`: TRL's loss scores through the log-prob method, which our override feeds.
        has_lines(GRPOTrainer._compute_loss, "self._get_per_token_logps_and_entropies("),
        # `row_weight` (micro_batches.py): the row-averaged losses weigh each micro-batch alike, the `dapo` family
        # divides by the generation batch's loss tokens.
        has_lines(
            GRPOTrainer._compute_loss,
            'if self.loss_type in ["grpo", "sapo"]:',
            "loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()",
            "loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * self.max_completion_length)",
            'elif self.loss_type in ["cispo", "dapo", "vespo"]:',
            'normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes',
        ),
    ),
    # Our `_prepare_inputs` is TRL's with the adapter's split/merge in place of TRL's shape-based guess.
    "_prepare_inputs": has_lines(
        GRPOTrainer._prepare_inputs,
        "generate_every = self.args.steps_per_generation * self.num_iterations",
        "if self._step % generate_every == 0 or self._buffered_inputs is None:",
        "generation_batch = split_pixel_values_by_grid(generation_batch)",
        "generation_batch = shuffle_sequence_dict(generation_batch)",
        "generation_batches = split_tensor_dict(generation_batch, self.args.steps_per_generation)",
        "self._buffered_inputs = [unsplit_pixel_values_by_grid(batch) for batch in generation_batches]",
        "inputs = self._buffered_inputs[self._step % self.args.steps_per_generation]",
    ),
    "_get_train_sampler": has_lines(GRPOTrainer._get_train_sampler, "return RepeatSampler("),
    # --- MetricsMixin (metrics.py)
    "training_step": has_lines(
        GRPOTrainer.training_step,
        "self._step += 1",  # TRL's cycle counter, one per micro-step: the timings close an optimizer step on it
        "if self._step % self.current_gradient_accumulation_steps == 0:",
    ),
    "_generate": has_lines(
        GRPOTrainer._generate,
        "output = self.rollout_func(prompts, self)",
        "prompt_ids, images, multimodal_fields = self._tokenize_prompts(prompts)",
        # ToolMetricsMixin reads the finished conversations, 4th in TRL's output; each tool reply a `tool` message.
        "return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images",
    ),
    "_calculate_rewards": all_of(
        has_parameters(
            GRPOTrainer._calculate_rewards, ["self", "inputs", "prompts", "completions", "completion_ids_list"]
        ),
        # The breakdown and dynamic sampling's decision read every process's rewards: TRL returns them gathered.
        has_lines(GRPOTrainer._calculate_rewards, "rewards_per_func = gather(rewards_per_func)"),
    ),
    # TRL writes its completion table from `log` when `log_completions` is set (ours replaces it).
    "log": has_lines(GRPOTrainer.log, "if self.accelerator.is_main_process and self.log_completions:"),
    # --- CheckpointMixin (checkpointing.py)
    # Checkpoints go under `_get_output_dir`, which our override points at the staging directory while saving.
    "_get_output_dir": all_of(
        has_lines(Trainer._save_checkpoint, "run_dir = self._get_output_dir(trial=trial)"),
        has_lines(GRPOTrainer._save_checkpoint, "self._get_output_dir(trial=trial)"),
    ),
    "_save_checkpoint": has_parameters(GRPOTrainer._save_checkpoint, ["self", "model", "trial"]),
    # A run stopped by an unreachable vLLM server saves a checkpoint before it stops (`VLLMServerGone`): HF's loop
    # saves nothing when an exception leaves it.
    "train": has_parameters(Trainer.train, ["self", "resume_from_checkpoint", "trial", "ignore_keys_for_eval"]),
    # HF pickles the arguments in `_save` (what `redacted_secrets` wraps).
    "_save": has_lines(Trainer._save, "TRAINING_ARGS_NAME"),
    "_load_from_checkpoint": has_lines(
        Trainer._load_from_checkpoint,
        # A full model's weights load with a plain `load_state_dict` (names unconverted).
        "load_result = model.load_state_dict(state_dict, False)",
        # With adapters in sub-directories (TRL's `ref`) only those load, not the trained one at the root.
        "if adapter_subdirs:",
        "model.load_adapter(peft_id, subdir_name, is_trainable=(subdir_name == active_adapter))",
    ),
    "_load_rng_state": rng_restored_before_the_first_resumed_step,
    # --- VLMSFTTrainer (sft.py): methods of TRL's SFTTrainer it overrides
    # TRL's loss asks the fused LM head, which needs the model's backbone; BLIP-2 has none and takes its own loss.
    "SFTTrainer.compute_loss": all_of(
        has_lines(SFTTrainer.compute_loss, "outputs = model(**inputs, fused_lm_head=True)"),
        has_parameters(SFTTrainer.compute_loss, ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]),
    ),
    # Renamed (original-format) weights load with a plain `load_state_dict` that matches none of them.
    "SFTTrainer._load_from_checkpoint": has_lines(
        Trainer._load_from_checkpoint, "load_result = model.load_state_dict(state_dict, False)"
    ),
    # Each process adds its logging window (`logging_window`) to the checkpoint HF's (and TRL's) method wrote there.
    "SFTTrainer._save_checkpoint": all_of(
        has_parameters(SFTTrainer._save_checkpoint, ["self", "model", "trial"]),
        has_lines(
            Trainer._save_checkpoint,
            'checkpoint_folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"',
            "run_dir = self._get_output_dir(trial=trial)",
        ),
    ),
    # The saved logging window is restored with the RNG, after the loop set it afresh.
    "SFTTrainer._load_rng_state": rng_restored_before_the_first_resumed_step,
    # --- VLMRollout (rollout/vllm.py): methods of TRL's VLLMGeneration it overrides
    "VLLMGeneration.__init__": all_of(
        has_parameters(VLLMGeneration.__init__, ["self", *ROLLOUT_ATTRIBUTES]),
        has_lines(VLLMGeneration.__init__, *(f"self.{name} = " for name in ROLLOUT_ATTRIBUTES)),
    ),
    "VLLMGeneration._init_vllm": colocated_llm_matches_trl,
    "VLLMGeneration.sync_weights": has_lines(VLLMGeneration.sync_weights, "self._llm_weights_sleeping = False"),
    "VLLMGeneration.generate": all_of(
        has_parameters(VLLMGeneration.generate, ["self", "prompts", "images", "num_generations", "profiler"]),
        sampling_params_match_trl,
    ),
    # Server mode: the features of each row's images and video (`RowMedia`) placed at their tokens, per modality.
    "VLLMGeneration._place_features": all_of(
        has_parameters(VLLMGeneration._place_features, ["self", "features", "prompt_ids"]),
        has_lines(VLLMGeneration.generate, "self._place_features(prompt_features, prompt_ids)"),
    ),
    # --- VLMClient (rollout/vllm.py)
    "VLLMClient._post": has_lines(VLLMClient._post, "def _post(self, url: str, **kwargs) -> dict:"),
    # The two calls a server-mode rollout makes on the main process, retried through a server outage
    # (`rollout/server_retry.py`); given up on, they return no completions, which TRL broadcasts to every process.
    "VLLMClient.image_features": all_of(
        has_parameters(VLLMClient.image_features, ["self", "images", "max_concurrent_requests"]),
        has_lines(VLLMGeneration.generate, "features = self.vllm_client.image_features("),
    ),
    "VLLMClient.generate": all_of(
        has_parameters(VLLMClient.generate, ["self", "prompts", "features"], prefix=True),
        has_lines(
            VLLMGeneration.generate,
            "output = self.vllm_client.generate(",
            "broadcast_object_list(obj_list, from_process=0)",
            "all_prompt_ids = [ids for ids in all_prompt_ids for _ in range(num_generations)]",
        ),
    ),
    # TRL's client sends every request through `self.session`, on which it mounts connection and read retries that
    # re-send a request as is (`server_retry.session_without_connection_retries` mounts its own instead).
    "attributes: VLLMClient.session (server_retry)": has_lines(
        VLLMClient.__init__, "self.session = requests.Session()", 'self.session.mount("http://", adapter)'
    ),
    # --- the module-level name TRL's `__init__` builds its vLLM backend by (`_vlm_rollout_backend` swaps it)
    "swap: grpo_trainer.VLLMGeneration": all_of(
        holds(lambda: grpo_trainer_module.VLLMGeneration is VLLMGeneration, "the name is no longer TRL's class"),
        has_lines(GRPOTrainer.__init__, "self.vllm_generation = VLLMGeneration("),
    ),
    # --- copies of TRL logic not tied to one override
    "copy: fused LM head protocol (score_from_logits)": fused_lm_head_protocol,
    "copy: prompt tokenisation (models.inputs.prompt_inputs)": prompt_tokenisation_matches_trl,
    "copy: packed prompts score with shift_labels (_shared_prompt_logps)": has_lines(
        add_fused_lm_head, "shift_labels"
    ),
    # Dynamic sampling (`dynamic_sampling.py`) relies on TRL's layout of a generation batch: each prompt repeated
    # `num_generations` times in a row, process p holding rows [p*N, (p+1)*N), rows fed as the dataset gives them;
    # and it recounts `num_items_in_batch` for the rows it keeps as TRL counts it.
    "copy: generation batch layout and loss-token count (dynamic sampling)": all_of(
        has_lines(GRPOTrainer._get_train_sampler, "mini_repeat_count=self.num_generations,"),
        has_lines(
            GRPOTrainer._generate_and_score_completions,
            "self.accelerator.process_index * len(prompts),",
            "loss_mask = completion_mask if tool_mask is None else completion_mask * tool_mask",
            "num_items_in_batch = self.accelerator.gather(loss_mask.sum()).sum()",
        ),
        has_lines(GRPOTrainer.__init__, "data_collator=identity,"),
    ),
    # TRL's tool loop puts a tool's images after the row's own, in the completion (`_shared_prompt_logps` shows each
    # row's last images in its completion segment; the completion tables list them after the prompt's), and sends the
    # conversation so far with all its images as the next turn's prompt (vLLM makes room for one per turn).
    "copy: tool images follow the prompt's, one prompt per turn (shared prompts, completion logs, vLLM limit)": all_of(
        has_lines(
            GRPOTrainer._generate,
            "images = [(existing or []) + new for existing, new in zip(images, tool_images, strict=True)]",
        ),
        has_lines(
            GRPOTrainer._tool_call_loop,
            "content = result if isinstance(result, list) else str(result)",
            "(existing or []) + new for existing, new in zip(merged_images, tool_images, strict=True)",
            "while idxs_with_tool and iteration_num < self.max_tool_calling_iterations:",
        ),
    ),
    # `image_features_reused` (vision_once.py) swaps the Qwen-VL models' `get_image_features` while a tool loop's turns
    # generate: each turn prefills the conversation so far, whose vision inputs the model encodes through that method.
    "swap: Qwen-VL get_image_features in generation (image_features_reused)": all_of(
        has_lines(
            GRPOTrainer._tool_call_loop, "prompt_ids[idx_with_tool] + completion_ids[idx_with_tool] + suffix_ids"
        ),
        *(
            has_lines(model.forward, f"{assignment} = self.get_image_features(", "pixel_values, image_grid_thw,")
            for model, assignment in (
                (Qwen2VLModel, 'mm_encoder_outputs["image"]'),
                (Qwen2_5_VLModel, 'mm_encoder_outputs["image"]'),
                (Qwen3VLModel, 'mm_encoder_outputs["image"]: BaseModelOutputWithDeepstackFeatures'),
            )
        ),
    ),
    # `prepare_video` (models/video.py) gives the video processor a subclass whose `preprocess` fills
    # `video_metadata` from the `Clip`s it is handed: the chat template passes on each video block's frames alone.
    "swap: video processor preprocess reads Clip metadata (models/video.py)": all_of(
        has_lines(
            BaseVideoProcessor.preprocess,
            'do_sample_frames = kwargs.pop("do_sample_frames")',
            'video_metadata = kwargs.pop("video_metadata")',
        ),
        has_lines(ProcessorMixin.apply_chat_template, 'for key in ["video", "url", "path"]'),
    ),
    # `prepare_video` (models/video.py) gives an InternVL processor a subclass whose
    # `__call__` keeps a `<video>` placeholder as text in a call without videos (TRL's scoring call) and asks for image
    # tensors in a call with videos (TRL's prompt tokenization passes no `return_tensors`).
    "swap: InternVL processor takes the calls of a batch with videos (models/video.py)": has_lines(
        InternVLProcessor.__call__,
        "for match in re.finditer(self.multimodal_pattern, sample)]",
        'video_pixel_values = model_inputs.pop("pixel_values_videos")',
        'model_inputs["pixel_values"] = concatenate_list(image_video_patches)',
    ),
    # `prepare_video` (models/video.py) gives a SmolVLM processor a subclass that keeps a call's video frames apart
    # from its images' `pixel_values` (which the merged output would drop) and puts them after each row's image tiles.
    "swap: SmolVLM processor keeps images and videos of one call (models/video.py)": all_of(
        has_lines(
            ProcessorMixin.__call__,
            "processed_videos, videos_replacements = self._process_videos(",
            "data = {**text_inputs, **processed_images, **processed_videos, **processed_audio}",
        ),
        has_lines(ProcessorMixin._process_videos, "replacement_text = self.replace_video_token(processed_videos"),
        has_lines(SmolVLMProcessor.replace_video_token, 'num_frames = video_inputs["pixel_values"].shape[1]'),
    ),
    # `video_rows.py`: TRL builds the scoring forward's vision inputs with a processor call that passes images only
    # (none at all without images), so the video inputs and `mm_token_type_ids` come from the prompt tokenization
    # (`_tokenize_prompts`), and reach TRL's own scoring forwards through our log-prob method.
    "copy: video inputs from the prompt tokenization (video_rows.py)": all_of(
        has_lines(
            GRPOTrainer._generate_and_score_completions,
            "prompt_inputs = self.processing_class(images=images, text=prompts_text, padding=True,",
            'self._logs["prompt"].extend(gather_object(prompts))',
        ),
        has_lines(
            GRPOTrainer._tokenize_prompts,
            'multimodal_fields = {k: v for k, v in tokenized.items() if k not in ("input_ids", "attention_mask")}',
        ),
    ),
    # `temporal_grpo.py`: T-GRPO's shuffled rollouts are generated and scored as TRL's own rows are: from the prompts
    # TRL's batch method built (images in place) and passes to `_calculate_rewards`, with the bonus added to what that
    # returns before the advantages; decoded as TRL decodes completions without a response schema; scored by TRL's
    # `_calculate_rewards`, whose logging callbacks it silences and whose gather keeps the processes in step.
    "copy: T-GRPO's shuffled rollouts (temporal_grpo.py)": all_of(
        has_lines(
            GRPOTrainer._generate_and_score_completions,
            "rewards_per_func = self._calculate_rewards(inputs, prompts, completions, completion_ids_list)",
            "unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)",
        ),
        has_lines(
            GRPOTrainer._generate,
            "contents = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)",
        ),
        has_lines(
            GRPOTrainer._calculate_rewards,
            'reward_kwargs["log_extra"] = self._log_completion_extra',
            'reward_kwargs["log_metric"] = self._log_metric',
            "rewards_per_func = gather(rewards_per_func)",
        ),
    ),
    # --- private attributes read
    "attributes: GRPOTrainer": lambda stock_trainer: [
        pytest.fail(f"TRL's trainer has no {name} after __init__")
        for name in TRAINER_ATTRIBUTES
        if not hasattr(stock_trainer, name)
    ],
    # `logging_window` saves and restores (GRPO in `rollout_state`, SFT in its own file) the loss summed since the last
    # logging step, and that step, which HF's training loop sets afresh on resume (the first loss logged after it
    # averaged only the steps since); it is restored with the RNG, after the loop set both.
    "attributes: Trainer logging": all_of(
        has_lines(
            Trainer._inner_training_loop,
            "self._tr_loss = torch.tensor(0.0, device=args.device)",
            "self._globalstep_last_logged = self.state.global_step",
        ),
        has_lines(
            Trainer._maybe_log_save_evaluate,
            "tr_loss -= tr_loss",
            'logs["loss"] = tr_loss_scalar / (self.state.global_step - self._globalstep_last_logged)',
        ),
        holds(
            lambda: (
                inspect.getsource(Trainer._inner_training_loop).index("self._tr_loss = torch.tensor(")
                < inspect.getsource(Trainer._inner_training_loop).index("self._run_epoch(")
            ),
            "HF now sets the logging window once the epochs begin: it would reset the window restored with the RNG",
        ),
    ),
    "attributes: VLLMGeneration": all_of(
        has_lines(VLLMGeneration._init_vllm, "self._llm_weights_sleeping = self.enable_sleep_mode"),
        # A method `VLMRollout` calls but keeps TRL's: the ZeRO-3/PEFT-aware parameter walk.
        holds(lambda: callable(VLLMGeneration._iter_named_params), "gone"),
    ),
}


@pytest.fixture
def stock_trainer(load_tiny, tmp_path) -> GRPOTrainer:
    """TRL's own trainer on a tiny Qwen2-VL: what TRL's `__init__` sets."""
    model, processor = load_tiny("qwen2_vl")
    return GRPOTrainer(
        model=model, reward_funcs=[accuracy], args=small_config(tmp_path), train_dataset=make_shapes_dataset(4),
        processing_class=processor,
    )  # fmt: skip


@pytest.fixture
def vlm_trainer(load_tiny, tmp_path) -> VLMGRPOTrainer:
    model, processor = load_tiny("qwen2_vl")
    return shapes_trainer(model, processor, tmp_path)


@pytest.mark.parametrize("seam", list(SEAMS))
def test_seam(seam, request):
    check = SEAMS[seam]
    check(*(request.getfixturevalue(name) for name in inspect.signature(check).parameters))


def overrides() -> set[str]:
    """Every method of TRL's (or HF's) that our classes define again: the trainer with its mixins, and the vLLM
    backend and client (those named after the TRL class)."""

    def overridden(ours: type, theirs: type) -> set[str]:
        return {name for name in vars(ours) if hasattr(theirs, name) and (name == "__init__" or name[:2] != "__")}

    names = {
        n
        for cls in VLMGRPOTrainer.__mro__
        if cls.__module__.startswith("vlm_rl.")
        for n in overridden(cls, GRPOTrainer)
    }
    for ours, theirs in ((VLMRollout, VLLMGeneration), (VLMClient, VLLMClient), (VLMSFTTrainer, SFTTrainer)):
        names |= {f"{theirs.__name__}.{name}" for name in overridden(ours, theirs)}
    return names


def test_every_override_has_a_row():
    """A new override of a TRL/HF method needs a row in `SEAMS` saying what it relies on; a row for an override
    that is gone must go too."""
    found = overrides()
    assert found - set(SEAMS) == set(), "overrides without a row in SEAMS"
    rows = {name for name in SEAMS if not name.startswith(("swap:", "copy:", "attributes:"))}
    assert rows - found == set(), "rows in SEAMS for methods nothing overrides"


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
