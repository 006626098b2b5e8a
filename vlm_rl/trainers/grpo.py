"""`VLMGRPOTrainer`: TRL's GRPO trainer, made safe for batches that mix text-only and image samples.

Each override is narrow and names the TRL 1.16 behaviour it changes. Checkpoint and resume overrides live in
`checkpointing.py`, logging and timing ones in `metrics.py` (mixins of this class). The contract with TRL and HF is
one table, `SEAMS` in `tests/test_trl_contract.py`: a row per TRL/HF method overridden here, in the mixins or in the
vLLM backend, per copy of TRL logic and per set of private attributes read, each pinned by behaviour or by TRL's
source. A TRL upgrade that moves them fails there, and so does a new override without a row.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import datasets
import numpy as np
import torch
from accelerate.utils import gather_object, is_peft_model
from PIL import Image
from torch import nn
from transformers import AutoConfig, ProcessorMixin
from trl import GRPOConfig, GRPOTrainer
from trl.extras.profiling import profiling_decorator
from trl.trainer import grpo_trainer as grpo_trainer_module
from trl.trainer.utils import (
    RepeatSampler,
    get_callable_name,
    get_config_model_id,
    pad,
    shuffle_sequence_dict,
    split_tensor_dict,
)

from vlm_rl.data import most_images_per_row
from vlm_rl.data.rows import check_prefills, dataset_prompts
from vlm_rl.models.adapters import PER_TOKEN_KEYS, FamilyAdapter, GenericAdapter
from vlm_rl.models.families import adapter_for
from vlm_rl.models.inputs import (
    BOOKKEEPING_KEYS,
    group_rows,
    media_token_ids,
    prompt_inputs,
    select_rows,
)
from vlm_rl.models.lora import use_base_as_reference
from vlm_rl.models.preprocess_once import images_preprocessed_once
from vlm_rl.models.processing import continuing_final_message, load_processor
from vlm_rl.models.video import configure_video_from
from vlm_rl.rewards.columns import check_reward_columns
from vlm_rl.rewards.configured import ConfiguredReward, bind_context
from vlm_rl.rewards.registry import reward_or_model
from vlm_rl.rollout.finished_rows import finished_rows_left_out
from vlm_rl.rollout.prefill import prompts_prefilled_once
from vlm_rl.rollout.vllm import VLMRollout, most_videos_per_row
from vlm_rl.trainers.block_mask import KERNEL, block_sparse_unavailable, packed_block_mask
from vlm_rl.trainers.checkpointing import CheckpointMixin, RescheduleOnResume
from vlm_rl.trainers.completion_logs import tool_images
from vlm_rl.trainers.dynamic_sampling import DynamicSampling, GroupFilter, Layout, fresh_rows
from vlm_rl.trainers.epoch_sampler import EpochSeededSampler
from vlm_rl.trainers.logprobs import align_per_token_inputs, score_from_logits
from vlm_rl.trainers.metrics import MetricsMixin
from vlm_rl.trainers.micro_batches import (
    ROW_MEAN_LOSSES,
    ROW_WEIGHT,
    TOKEN_NORMALIZED_LOSSES,
    balanced_by_tokens,
    row_weights,
    rows_of,
)
from vlm_rl.trainers.preemption import PreemptionCallback
from vlm_rl.trainers.progress import install_console
from vlm_rl.trainers.shared_prefix import Packing, forward_flops, image_runs, pack
from vlm_rl.trainers.temporal_grpo import TemporalGRPO, TemporalRule
from vlm_rl.trainers.tool_metrics import ToolMetricsMixin
from vlm_rl.trainers.video_rows import (
    NUM_VIDEOS,
    VideoFields,
    count_videos,
    prompts_with_videos,
    without_clips,
)
from vlm_rl.trainers.vision_once import MODALITIES, encode_images_once, encoded_slots, image_features_reused
from vlm_rl.trainers.vlm_options import VLMOptions

logger = logging.getLogger(__name__)

_TRL_LOGPS_PARAMETERS = frozenset(inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters)


def images_per_conversation(args, train_dataset, uses_tools: bool) -> int:
    """The most images one vLLM prompt holds: a row's own and, with tools, one per tool-calling turn after it (TRL's
    tool loop sends the conversation so far, tool images included, as the next turn's prompt)."""
    most = most_images_per_row(train_dataset)
    iterations = getattr(args, "max_tool_calling_iterations", None)
    if not uses_tools:
        return most
    if iterations is None:
        logger.warning(
            "vLLM makes room for %d image(s) per prompt, the data's most: a tool that returns images needs more. Set "
            "max_tool_calling_iterations (then one image per tool turn is allowed for) or vllm_limit_mm_per_prompt.",
            most,
        )
        return most
    return most + iterations


def _float_tensors(output: Any) -> list[torch.Tensor]:
    """Every floating-point tensor in a model output (a tensor, a ModelOutput or dict, or nested tuples/lists)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    values = output.values() if isinstance(output, dict) else output if isinstance(output, list | tuple) else []
    return [tensor for value in values for tensor in _float_tensors(value)]


class VLMGRPOTrainer(CheckpointMixin, MetricsMixin, ToolMetricsMixin, GRPOTrainer):
    """GRPO for vision-language models where any row may have zero, one or several images.

    Every override must also work on a trainer built without `__init__` (`VLMGRPOTrainer.__new__(VLMGRPOTrainer)`
    plus the few attributes a TRL unit test sets): the state an override keeps is a class-level default or created
    at first use, never only in `__init__`, so that TRL's own error surfaces instead of an `AttributeError`.
    """

    # TRL's `__init__` sets it from the processing class; a trainer built without `__init__` is a text model
    # unless told otherwise (then `adapter` is the generic one).
    _is_vlm: bool = False
    # Side channels between TRL call sites, each set where its comment says; empty between those calls.
    # `_tokenize_prompts` -> `_generate_and_score_completions`: a family's extra prompt inputs TRL drops.
    _adapter_fields: Mapping[str, torch.Tensor] = MappingProxyType({})
    # `compute_loss` -> `_get_per_token_logps_and_entropies`: a family's inputs TRL's loss does not pass on.
    _loss_only_inputs: Mapping[str, Any] = MappingProxyType({})
    # Blank-image vision inputs for `_vision_forward_without_images`, built at first need.
    _dummy_vision_inputs: dict[str, torch.Tensor] | None = None
    # `_calculate_rewards` -> `_scored_generation_batch`: the last round's rewards, gathered over processes.
    _round_rewards: torch.Tensor | None = None
    # `_generate_and_score_completions` -> `_generate_single_turn`: each image's features, encoded once per step.
    _generation_features: dict | None = None
    # `_tokenize_prompts` -> `_generate_and_score_completions` and the scoring forwards inside it: the batch's video
    # inputs (`video_rows.py`); None outside a batch with videos.
    _video_fields: VideoFields | None = None

    def __init__(self, model, reward_funcs=None, args=None, processing_class=None, **kwargs):
        options = VLMOptions.from_args(args)
        if reward_funcs is not None:  # None: TRL's own check (or an environment's rewards) applies
            reward_funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
            reward_funcs = [self._guarded(func, options) for func in reward_funcs]
            for split, key in (("training", "train_dataset"), ("held-out", "eval_dataset")):
                check_reward_columns(reward_funcs, kwargs.get(key), split=split)  # before any model loads
        for name in ("train_dataset", "eval_dataset"):
            check_prefills(dataset_prompts(kwargs.get(name)), name)
        if processing_class is None and model is not None:
            processing_class = self._default_processing_class(model, args)
        if isinstance(processing_class, ProcessorMixin):
            # TRL left-pads prompt ids itself, but builds per-token vision inputs (mm_token_type_ids,
            # token_type_ids) with a processor call that pads on the tokenizer's side. Qwen tokenizers pad
            # on the right, which misaligns those inputs with the prompt for every row shorter than the
            # longest: left-pad everywhere.
            processing_class.tokenizer.padding_side = "left"
            configure_video_from(processing_class, options)
        uses_tools = bool(kwargs.get("tools") or kwargs.get("environment_factory"))
        with self._vlm_rollout_backend(
            model, args, options, processing_class, kwargs.get("train_dataset"), uses_tools
        ):
            super().__init__(model, reward_funcs, args=args, processing_class=processing_class, **kwargs)
        self.options = options
        if options.dynamic_sampling:
            self._check_dynamic_sampling()
        if options.temporal_grpo:
            self._check_temporal_grpo()
        use_base_as_reference(self.model)  # beta > 0, fresh LoRA: the reference is the adapter-disabled base
        self.adapter = self._family_adapter()
        # The models TRL gave a fused LM head (the policy unwrapped from PEFT, the reference model).
        for scored in (self.model.get_base_model() if is_peft_model(self.model) else self.model, self.ref_model):
            if scored is not None and scored.base_model is scored:
                score_from_logits(scored, self.temperature)
        self._choose_packed_attention()
        if self._is_vlm and not self.use_vllm:
            # TRL suppresses only the image token. A sampled video or vision start/end token makes the next
            # forward fail ("Image features and image tokens do not match") or misplaces M-RoPE positions.
            suppress = set(self.generation_kwargs.get("suppress_tokens") or []) | set(
                media_token_ids(self.model.config)
            )
            self.generation_kwargs["suppress_tokens"] = sorted(suppress)
            self.generation_config.suppress_tokens = sorted(suppress)
        bind_context(
            self.reward_funcs,
            processing_class=self.processing_class,
            model_type=getattr(self.accelerator.unwrap_model(self.model).config, "model_type", None),
            max_completion_length=self.max_completion_length,
        )
        install_console(self)  # one line per log instead of transformers' dict, and metrics.jsonl
        self.preemption = PreemptionCallback()
        self.add_callback(self.preemption)
        self.add_callback(RescheduleOnResume())  # a longer run resumed: its first step at the rebuilt schedule's rate

    @functools.cached_property
    def options(self) -> VLMOptions:
        """The vlm-rl options, read once from the arguments (`__init__` sets them; else from `self.args`)."""
        return VLMOptions.from_args(getattr(self, "args", None))

    @functools.cached_property
    def adapter(self) -> FamilyAdapter:
        """The model family's adapter (`__init__` sets it; a trainer built without it gets it at first use)."""
        return self._family_adapter()

    @functools.cached_property
    def dynamic_sampling(self) -> DynamicSampling | None:
        """DAPO dynamic sampling (`dynamic_sampling.py`) when the options turn it on, else None."""
        options = self.options
        if not options.dynamic_sampling:
            return None
        band = options.dynamic_sampling_accuracy_band
        accuracy = options.dynamic_sampling_accuracy_reward or options.eval_accuracy_reward
        return DynamicSampling(
            GroupFilter(
                self.reward_weights,
                self.num_generations,
                tuple(band) if band is not None else None,
                self.reward_func_names.index(accuracy) if band is not None else None,
            ),
            Layout(
                self.accelerator.num_processes,
                self.accelerator.process_index,
                self.args.per_device_train_batch_size * self.args.steps_per_generation,
                self.num_generations,
            ),
            options.max_resample_rounds,
            self._tokenizer.pad_token_id,
        )

    @functools.cached_property
    def temporal(self) -> TemporalGRPO | None:
        """T-GRPO's shuffled rollouts and bonus (`temporal_grpo.py`) when the options turn it on, else None."""
        options = self.options
        if not options.temporal_grpo:
            return None
        accuracy = options.temporal_accuracy_reward or options.eval_accuracy_reward
        rule = TemporalRule(
            self.reward_func_names.index(accuracy),
            options.temporal_bonus,
            options.temporal_margin,
            options.temporal_accuracy_threshold,
            self.num_generations,
        )
        per_prompt = options.temporal_shuffled_generations or max(1, self.num_generations // 2)
        return TemporalGRPO(rule, per_prompt, self.args.seed)

    def _check_temporal_grpo(self) -> None:
        """What T-GRPO needs besides the config's own checks: its accuracy reward among the rewards."""
        accuracy = self.options.temporal_accuracy_reward or self.options.eval_accuracy_reward
        if accuracy not in self.reward_func_names:
            raise ValueError(
                f"temporal_grpo counts correct completions with the reward {accuracy!r}, which is not among the "
                f"rewards {self.reward_func_names}: set temporal_accuracy_reward (or eval_accuracy_reward)."
            )

    def _check_dynamic_sampling(self) -> None:
        """What dynamic sampling needs besides the config's own checks: indexable data and the band's reward."""
        if isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            raise ValueError("dynamic_sampling draws fresh prompts by index: use a map-style (not streaming) dataset.")
        accuracy = self.options.dynamic_sampling_accuracy_reward or self.options.eval_accuracy_reward
        if self.options.dynamic_sampling_accuracy_band is not None and accuracy not in self.reward_func_names:
            raise ValueError(
                f"dynamic_sampling_accuracy_band scores the reward {accuracy!r}, which is not among the rewards "
                f"{self.reward_func_names}: set dynamic_sampling_accuracy_reward (or eval_accuracy_reward)."
            )

    def _family_adapter(self) -> FamilyAdapter:
        return adapter_for(self.model.config) if self._is_vlm else GenericAdapter()

    @staticmethod
    def _default_processing_class(model: str | nn.Module, args: GRPOConfig | None):
        """The processor for `model` when the caller passes none, loaded with `load_processor`.

        TRL 1.16 loads it with `AutoProcessor.from_pretrained`, which fails on a CPU install without torchvision
        for the families whose processor declares a video processor (Qwen-VL, SmolVLM, LLaVA-OneVision...).
        Padding and truncation are on the left, as TRL asks.
        """
        name = model if isinstance(model, str) else get_config_model_id(model.config)
        revision = (getattr(args, "model_init_kwargs", None) or {}).get("revision")
        processor = load_processor(
            name, trust_remote_code=getattr(args, "trust_remote_code", False), revision=revision
        )
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = tokenizer.truncation_side = "left"
        return processor

    @staticmethod
    @contextlib.contextmanager
    def _vlm_rollout_backend(
        model, args, options: VLMOptions, processing_class, train_dataset=None, uses_tools: bool = False
    ):
        """Have TRL's `__init__` build `VLMRollout` where it builds its vLLM backend, with the VLM's settings.

        TRL 1.16 constructs `VLLMGeneration` by its module-level name inside `GRPOTrainer.__init__` and offers no
        hook; the name is swapped for the duration of that call only (`tests/test_trl_contract.py` pins it).
        """
        if not getattr(args, "use_vllm", False) or not isinstance(processing_class, ProcessorMixin):
            yield
            return
        # The config TRL loads the model with: the same remote-code setting and revision.
        revision = (getattr(args, "model_init_kwargs", None) or {}).get("revision")
        config = (
            model.config
            if isinstance(model, nn.Module)
            else AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code, revision=revision)
        )
        media = media_token_ids(config)
        backend = functools.partial(
            VLMRollout,
            mm_processor_kwargs=adapter_for(config).engine_processor_kwargs(processing_class),
            limit_mm_per_prompt=options.vllm_limit_mm_per_prompt
            or images_per_conversation(args, train_dataset, uses_tools),
            video_limit=most_videos_per_row(train_dataset) if adapter_for(config).vllm_video else 0,
            banned_tokens=processing_class.tokenizer.convert_ids_to_tokens(media),
            image_token_id=getattr(processing_class, "image_token_id", None),
            weight_transport=options.vllm_weight_transport,
            weights_dir=options.vllm_weights_dir or str(Path(args.output_dir) / "vllm_weights"),
            server_retry_timeout=options.vllm_server_retry_timeout,
            dtype=str(model.dtype).removeprefix("torch.") if isinstance(model, nn.Module) else "auto",
        )
        original = grpo_trainer_module.VLLMGeneration
        grpo_trainer_module.VLLMGeneration = backend
        try:
            yield
        finally:
            grpo_trainer_module.VLLMGeneration = original

    @staticmethod
    def _guarded(func, options: VLMOptions):
        """Plain reward callables get the same failure isolation as the ones a recipe configures.

        TRL 1.16 loads every string as a reward model; a vlm-rl reward name resolves here first (`reward_or_model`).
        """
        if isinstance(func, str):
            func = reward_or_model(func)
        if isinstance(func, str | nn.Module | ConfiguredReward):
            return func
        return ConfiguredReward(
            func,
            name=get_callable_name(func),
            timeout=options.reward_timeout,
            error_policy=options.reward_error_policy,
            route_column=options.reward_route_column,
        )

    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        return EpochSeededSampler(sampler) if isinstance(sampler, RepeatSampler) else sampler

    def _tokenize_prompts(self, prompts: list):
        # TRL marks an image-less row with `None`, and the processor call that builds the training inputs
        # rejects `None` inside the image list; an empty list means the same and is accepted.
        # TRL opens a new assistant turn after every prompt, also after a prefill its training forward continues.
        with continuing_final_message(self.processing_class, prompts):
            prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts)
        if images is not None:
            images = [row_images or [] for row_images in images]
        if self._is_vlm:
            self.adapter.check_images_per_row([len(row) for row in images] if images else [0] * len(prompts))
        # A family's extra inputs come back as unpadded lists, which TRL would left-pad like prompt ids for
        # generation; they are not aligned with the prompt (InstructBLIP's Q-Former text has its own absolute
        # positions), so pad them on the right, as the processor does, and keep them for the training batch.
        adapter_fields = {}
        for key in (*self.adapter.image_keys, *self.adapter.row_keys):
            value = multimodal_fields.get(key)
            if key in _TRL_LOGPS_PARAMETERS or key in PER_TOKEN_KEYS or not (value and isinstance(value[0], list)):
                continue
            multimodal_fields[key] = pad([torch.tensor(row) for row in value], padding_value=0, padding_side="right")
            adapter_fields[key] = multimodal_fields[key]
        self._adapter_fields = adapter_fields  # read by `_generate_and_score_completions`
        if self._video_fields is None and any(count_videos(prompts)):  # the batch's first call
            self._video_fields = VideoFields.from_processor_output(
                multimodal_fields, self.adapter, prompts, self.processing_class
            )
        # The processor returns vision inputs as NumPy arrays (with `environment_factory`, TRL's per-prompt calls make
        # them lists of arrays). TRL's generation converts them to tensors, but its tool-calling loop splits them per
        # row first (`split_pixel_values_by_grid`), which needs tensors: in TRL 1.16 every tool call in a batch with an
        # image fails there. Converted here as TRL's generation converts them; per-token lists (and arrays of
        # different shapes, which no tensor holds) stay as they are.
        for key, value in multimodal_fields.items():
            arrays = isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value)
            if isinstance(value, np.ndarray) or (arrays and len({v.shape for v in value}) == 1):
                multimodal_fields[key] = torch.tensor(np.array(value))
        return prompt_ids, images, multimodal_fields

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        # `generate` on the policy (no vLLM): prefill each distinct prompt once instead of once per generation.
        # With tools, each turn is generated from the whole conversation so far: each image is encoded once per step.
        args = (prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        if self.use_vllm and self._video_fields is not None:  # vLLM gets each prompt's clip with its images
            if not self.adapter.vllm_video:
                raise ValueError(
                    f"{self.adapter.label} video rows do not go through vLLM yet (the Qwen-VL families' do): set "
                    "`use_vllm: false` for this dataset, or drop its `videos` column."
                )
            with self.vllm_generation.videos(self._video_fields.clips):
                return super()._generate_single_turn(*args)
        if self.use_vllm or self.use_transformers_continuous_batching:
            return super()._generate_single_turn(*args)
        model = self.accelerator.unwrap_model(self.model_wrapped)
        base = model.get_base_model() if is_peft_model(model) else model
        reused = (
            image_features_reused(base, self.adapter, self._generation_features)
            if self._generation_features is not None and self.tools and self._reuses_image_features(base)
            else contextlib.nullcontext()
        )
        # Rows that have emitted EOS leave the decoding forwards (exact: the other rows' logits are unchanged).
        ended_left_out = finished_rows_left_out(model, base, self.adapter)
        # A batch's video inputs are those of its one prompt tokenization (`_tokenize_prompts`; tools, which tokenize
        # each turn, refuse video rows), so its rows' video counts are known. Families whose prefill sharing does not
        # cover video generate such a batch plainly.
        videos = self._video_fields.num_videos if self._video_fields is not None else None
        if not self._shares_prompts(self.model, False) or (
            videos is not None and not self.adapter.shares_video_prompts
        ):
            with reused, ended_left_out:
                return super()._generate_single_turn(*args)
        images = images if images is not None else [[] for _ in prompt_ids]
        tiles = self.adapter.tiles_per_row(self.processing_class, images)
        prefilled = prompts_prefilled_once(model, base, self.adapter, [len(row) for row in images], tiles, videos)
        with reused, ended_left_out, prefilled:
            return super()._generate_single_turn(*args)

    def _reuses_image_features(self, base) -> bool:
        """Whether generation reuses image features across the turns of a tool loop (`image_features_reused`): with
        `encode_images_once`, for families with Qwen-VL's vision-input layout."""
        return self._encodes_images_once(base) and tuple(self.adapter.image_keys) == ("pixel_values", "image_grid_thw")

    def _generate_and_score_completions(self, inputs):
        # TRL's output keeps a fixed list of vision inputs; add the family's others, from the same processor call
        # that generation used.
        self._adapter_fields = MappingProxyType({})  # `_tokenize_prompts` sets it if this batch has any
        # TRL gathers the batch's images for its completion logs only on processes whose batch has an image: a
        # process with only text rows skips that collective and the others wait in it forever. Gather here, on
        # every process alike, and only when the completion logs that read them are on.
        log_multimodal, self.log_multimodal = self.log_multimodal, False
        self._generation_features = {}  # read by `_generate_single_turn`
        video_rows = prompts_with_videos(
            inputs,
            self.adapter,
            getattr(self, "processing_class", None),
            uses_tools=bool(getattr(self, "tools", None)),
        )
        self._video_fields = None  # `_tokenize_prompts` sets it for a batch with videos
        try:
            # TRL preprocesses each row's images, for generation and again for scoring: a group's image once instead.
            with images_preprocessed_once(getattr(self, "processing_class", None), self.adapter):
                output = super()._generate_and_score_completions(video_rows or inputs)
            if self._video_fields is not None:
                self._add_video_inputs(output, len(inputs))
        finally:
            self.log_multimodal = log_multimodal
            self._generation_features = None
            self._video_fields = None
        if (
            log_multimodal
            and self.log_completions
            and (self.tools or any(key in inputs[0] for key in ("images", "image")))
        ):
            rows = gather_object(
                [row.get("images") or ([row["image"]] if row.get("image") is not None else []) for row in inputs]
            )
            # Each row's images in the order the model saw them: the prompt's, then those its tools returned (in the
            # completions TRL just gathered for the same logs).
            completions = list(self._logs["completion"])[-len(rows) :]
            self._logs["images"].extend(row + tool_images(c) for row, c in zip(rows, completions, strict=True))
        for key, value in self._adapter_fields.items():
            output.setdefault(key, value.to(self.accelerator.device))
        self._adapter_fields = MappingProxyType({})
        return output

    def _add_video_inputs(self, output: dict[str, Any], num_rows: int) -> None:
        """The batch's video inputs into TRL's output, whose `mm_token_type_ids` (from a processor call without the
        videos) they replace; the completion logs get the prompts without the frames."""
        prompt_width = output["prompt_ids"].size(1)
        width = prompt_width + output["completion_ids"].size(1)
        output.update(self._video_fields.model_inputs(width, prompt_width, self.accelerator.device))
        output["num_images"] = output.get("num_images") or [0] * num_rows
        logged = self._logs["prompt"]
        for index in range(max(0, len(logged) - num_rows), len(logged)):
            logged[index] = without_clips(logged[index])

    @contextlib.contextmanager
    def _vision_forward_without_images(self, model):
        """Inside, a forward of `model` also runs the vision tower once, on a blank image, adding exactly zero.

        With several processes, every process must run the same modules in the same order, forward and backward:
        under ZeRO-3 each module's weights are gathered from all processes as it runs (and its gradients reduced
        in backward), and DDP without `find_unused_parameters` waits for a gradient of every weight. A process
        whose chunk has no image would skip the vision tower another process runs on its images; they then wait
        for each other forever, or DeepSpeed fails comparing their module orders. So a forward without images
        runs the vision tower where an image forward does and adds `0.0 * features.sum()` to the token embeddings:
        the same modules and collectives as an image forward, and the same logits and loss as a plain text forward
        (the vision weights get zero gradients from it). An image forward runs the tower right after the token
        embeddings, or, when its images are encoded once up front (`encode_images_once`), before the forward.
        """
        base = self._unwrapped(model)
        if self._dummy_vision_inputs is None:
            prompt = [{"role": "user", "content": "?"}]
            inputs = prompt_inputs(self.adapter, self.processing_class, [prompt], [[Image.new("RGB", (32, 32))]])
            parameters = inspect.signature(base.get_image_features).parameters
            self._dummy_vision_inputs = {k: inputs[k] for k in self.adapter.image_keys if k in parameters}
        dtype = next(p.dtype for p in base.parameters() if p.is_floating_point())
        vision_inputs = {
            key: value.to(self.accelerator.device, dtype=dtype if value.is_floating_point() else value.dtype)
            for key, value in self._dummy_vision_inputs.items()
        }

        def zero_vision_output() -> torch.Tensor:
            # Only the features an image forward feeds the language model (`pooler_output`, and Qwen3-VL's deepstack
            # features, in transformers 5), so that the same weights get a gradient; a backward through other outputs
            # too would run the vision tower's backward hooks once more. Under autocast, as the image forward runs.
            with self.accelerator.autocast():
                features = base.get_image_features(**vision_inputs, return_dict=True)
            fields = self.adapter.image_feature_fields or ("pooler_output",)
            return sum(0.0 * tensor.sum() for field in fields for tensor in _float_tensors(getattr(features, field)))

        zero = zero_vision_output() if self._encodes_images_once(base) else None

        def add_zero_vision_output(module, args, embeddings):
            return embeddings + (zero if zero is not None else zero_vision_output()).to(embeddings.dtype)

        handle = base.get_input_embeddings().register_forward_hook(add_zero_vision_output)
        try:
            yield
        finally:
            handle.remove()

    def _unwrapped(self, model):
        """`model` without its DDP/DeepSpeed and PEFT wrappers: where the family's own methods live."""
        base = self.accelerator.unwrap_model(model)
        return base.get_base_model() if is_peft_model(base) else base

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        num_images: list[int] | None = None,
        **model_inputs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        model_inputs = {**self._loss_only_inputs, **{k: v for k, v in model_inputs.items() if v is not None}}
        if self._video_fields is not None and "pixel_values_videos" not in model_inputs:
            # TRL's scoring forwards of a batch with videos (`_generate_and_score_completions`) get none.
            prompt_width = input_ids.size(1) - logits_to_keep
            model_inputs |= self._video_fields.model_inputs(input_ids.size(1), prompt_width, input_ids.device)
        model_inputs = align_per_token_inputs(model_inputs, input_ids.size(1))
        if num_images is None:
            if any(key in model_inputs for key in self.adapter.image_keys):
                raise ValueError("Vision inputs were given without `num_images`; cannot tell which rows have images.")
            num_images = [0] * input_ids.size(0)
        # Chunk as TRL does, but give each chunk exactly its own rows' vision inputs (the family adapter knows
        # which are whose), and none when no row of the chunk has an image: TRL would run the vision tower on
        # an empty tensor. A text-only chunk is a plain language-model forward. Every process runs one forward per
        # chunk, whichever path it takes, so that processes stay in step (see `_vision_forward_without_images`).
        split_inputs = self.adapter.split_vision_inputs(model_inputs, num_images)
        batch_size = batch_size or input_ids.size(0)
        # An MoE router's load-balancing loss counts every token it routes: with each prompt once it would change.
        # Families whose packed forward does not cover video score a batch with videos plainly.
        shares_prompts = (
            self._shares_prompts(model)
            and not compute_aux_loss
            and (self.adapter.shares_video_prompts or NUM_VIDEOS not in model_inputs)
        )
        logps, entropies, aux_losses = [], [], []
        for start in range(0, input_ids.size(0), batch_size):
            rows = range(start, min(start + batch_size, input_ids.size(0)))
            chunk = (input_ids[start : rows.stop], attention_mask[start : rows.stop], logits_to_keep)
            with self._vision_forward_if_text_only(model, num_images[start : rows.stop]):
                shared = (
                    self._shared_prompt_logps(model, *chunk, compute_entropy, split_inputs, num_images, rows)
                    if shares_prompts
                    else None
                )
                chunk_logps, chunk_entropies, chunk_aux = shared or self._plain_logps(
                    model,
                    *chunk,
                    compute_entropy,
                    compute_aux_loss,
                    select_rows(self.adapter, split_inputs, num_images, rows),
                )
            logps.append(chunk_logps)
            entropies.append(chunk_entropies)
            aux_losses.append(chunk_aux)
        return (
            torch.cat(logps, dim=0),
            torch.cat(entropies, dim=0) if compute_entropy else None,
            torch.stack(aux_losses).mean() if compute_aux_loss else None,
        )

    def _plain_logps(
        self, model, input_ids, attention_mask, logits_to_keep, compute_entropy, compute_aux_loss, inputs
    ):
        """TRL's log-prob forward of one chunk, with the chunk's own model inputs."""
        # Inputs TRL's method has no parameter for (a family's extra inputs, the video inputs) go straight to the
        # model call; InternVL / SmolVLM take their frames among their image inputs.
        num_videos = inputs.pop(NUM_VIDEOS, None)
        if num_videos is not None:
            inputs = self.adapter.video_forward_inputs(inputs, num_videos)
        extra = {key: inputs.pop(key) for key in list(inputs) if key not in _TRL_LOGPS_PARAMETERS}
        encoded = self._images_encoded_once(model, {**inputs, **extra, NUM_VIDEOS: num_videos})
        if encoded is not None:  # TRL's method passes vision inputs only along with `pixel_values`
            extra = {key: value for key, value in extra.items() if key not in self.adapter.video_keys} | encoded
            inputs = {key: value for key, value in inputs.items() if key not in self.adapter.image_keys}
        return super()._get_per_token_logps_and_entropies(
            functools.partial(model, **extra) if extra else model,
            input_ids,
            attention_mask,
            logits_to_keep,
            input_ids.size(0),
            compute_entropy,
            compute_aux_loss,
            **inputs,
        )

    def _vision_forward_if_text_only(self, model, num_images: list[int]):
        """`_vision_forward_without_images` for a chunk without images when several processes train together."""
        if self._is_vlm and self.accelerator.num_processes > 1 and not any(num_images):
            return self._vision_forward_without_images(model)
        return contextlib.nullcontext()

    def _encodes_images_once(self, base) -> bool:
        """Whether image forwards of `base` (unwrapped) take their vision features precomputed, once per image."""
        return (
            bool(self.options.encode_images_once and self.adapter.image_feature_fields)
            and "mm_encoder_outputs" in inspect.signature(base.forward).parameters
        )

    def _images_encoded_once(self, model, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """A forward's vision inputs as features of each distinct image and video, encoded once (`vision_once.py`)."""
        base = self._unwrapped(model)
        if not self._encodes_images_once(base):
            return None
        with self.accelerator.autocast():  # the vision tower runs as it would inside the model's forward
            return encode_images_once(base, self.adapter, inputs)

    def _choose_packed_attention(self) -> None:
        """Put the text attention of the policy and the reference model on `block_mask.KERNEL` (SDPA, and block-sparse
        flex attention for the packed forward's block mask) where `packed_attention` allows it and torch can compile
        flex attention on this device, else leave SDPA and the dense mask; log which, once."""
        if not self._shares_prompts(self.model):
            return
        models = [self._unwrapped(model) for model in (self.model, self.ref_model) if model is not None]
        kernels = sorted({model.config.get_text_config()._attn_implementation for model in models})
        device = self.accelerator.device
        choice = self.options.packed_attention
        if choice == "dense":
            why_not = "packed_attention: dense"
        elif kernels != ["sdpa"]:
            why_not = f"the text attention is {'/'.join(kernels)}, not sdpa"
        else:
            why_not = block_sparse_unavailable(device)
        if why_not is None:
            for model in models:
                model.set_attn_implementation({"text_config": KERNEL})
            scope = "every log-prob pass" if device.type == "cuda" else "log-prob passes without gradients"
            logger.info(
                "Packed forward: block-sparse flex attention (%s, compiled) on %s for %s; SDPA with the dense mask "
                "for the rest.",
                KERNEL,
                device.type,
                scope,
            )
        elif choice == "block_sparse":
            raise ValueError(f"packed_attention: block_sparse cannot run here: {why_not}. Set packed_attention: auto.")
        else:
            logger.info("Packed forward: %s attention with the dense mask (%s).", "/".join(kernels), why_not)

    def _block_sparse(self, base, device: torch.device) -> bool:
        """Whether the packed forward of `base` (unwrapped) runs now under the block mask: on `KERNEL`, where flex
        attention has a backward (CUDA) or none is taken."""
        kernel = getattr(base.config.get_text_config(), "_attn_implementation", None)
        return kernel == KERNEL and (device.type == "cuda" or not torch.is_grad_enabled())

    def _shares_prompts(self, model, packed: bool = True) -> bool:
        """Whether prompts are run once per group for this model: in generation (`packed=False`) or in the packed
        log-prob forward, which also needs an attention kernel that takes a custom mask (else the plain one runs)."""
        if not (self.options.share_prompt_prefix and self.adapter.shares_prompts):
            return False
        if not packed:
            return True
        base = self._unwrapped(model)
        text_config = base.config.get_text_config()
        # A custom 4D mask works with the eager and SDPA kernels only, and `KERNEL`, which runs SDPA for it (a sliding
        # window is checked per chunk).
        kernels = {getattr(config, "_attn_implementation", None) for config in (base.config, text_config)}
        layer_types = set(getattr(text_config, "layer_types", None) or ["full_attention"])
        return (
            kernels <= {"eager", "sdpa", KERNEL}
            and layer_types <= {"full_attention", "sliding_attention"}
            and base.base_model is not base
        )

    @staticmethod
    def _attention_window(text_config) -> int | None:
        """The sliding-window size some layers attend within, or None. A custom 4D mask is used as given, without
        the window, which is exact only while no row is longer than the window."""
        layer_types = getattr(text_config, "layer_types", None)
        windowed = (
            "sliding_attention" in layer_types if layer_types else getattr(text_config, "use_sliding_window", True)
        )
        return getattr(text_config, "sliding_window", None) if windowed else None

    def _shared_prompt_logps(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        compute_entropy: bool,
        split_inputs: dict[str, Any],
        num_images: list[int],
        rows: range,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        """One chunk's log-prob forward with each prompt once (`shared_prefix.py`); None where that costs no less.

        `input_ids` / `attention_mask` are the chunk's, `rows` its rows in `split_inputs`.
        """
        keys = [key for key in self.adapter.image_keys if isinstance(split_inputs.get(key), list)]
        prompt_length = input_ids.size(1) - logits_to_keep
        parts = self._prompt_images(
            split_inputs, keys, num_images, rows, input_ids[:, :prompt_length], input_ids[:, prompt_length:]
        )
        if parts is None:
            return None
        images, by_part = parts
        # Rows of their own prompt are groups of one: scored at their own length too (`_packings`).
        groups = group_rows(input_ids[:, :prompt_length], images + self._row_videos(split_inputs, rows))
        base = self._unwrapped(model)
        text_config = base.config.get_text_config()
        sizes = (text_config.hidden_size, getattr(text_config, "intermediate_size", 4 * text_config.hidden_size))
        window = self._attention_window(text_config)
        if window is not None and input_ids.size(1) > window:
            return None
        block_sparse = self._block_sparse(base, input_ids.device)
        packings = self._packings(groups, input_ids, attention_mask, logits_to_keep, sizes, block_sparse)
        if packings is None:
            return None
        # The plain forward's positions of every row, gathered into the packed layout below.
        row_inputs = select_rows(self.adapter, split_inputs, num_images, rows)
        positions = self.adapter.position_ids(base, input_ids, attention_mask, row_inputs)
        every = self._packed_inputs(groups, split_inputs, keys, num_images, rows, by_part)
        forwards = [every] if len(packings) == 1 else [
            self._packed_inputs(packed_groups, split_inputs, keys, num_images, rows, by_part)
            for packed_groups, _ in packings
        ]  # fmt: skip
        forwards = self._images_encoded_once_across(model, every, forwards)
        logps, entropies = 0, 0
        for (_, packing), inputs in zip(packings, forwards, strict=True):
            for key in BOOKKEEPING_KEYS:
                inputs.pop(key, None)
            for key in self.adapter.row_keys:
                if key in split_inputs:
                    inputs[key] = packing.gather(split_inputs[key][rows.start : rows.stop])
            outputs = self._packed_forward(model, packing, input_ids, positions, inputs, block_sparse)
            logps = logps + packing.scatter(outputs.log_probs)
            if compute_entropy:
                entropies = entropies + packing.scatter(outputs.entropy)
        return logps, entropies if compute_entropy else None, None

    def _packings(
        self,
        groups: list[list[int]],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        sizes: tuple[int, int],
        block_sparse: bool = False,
    ) -> list[tuple[list[list[int]], Packing]] | None:
        """The packed forwards of a chunk, each with its groups; None where the plain forward costs less.

        One forward holds every group, each padded to the longest. Where groups differ in length and this process
        trains alone, each group gets a forward of its own instead: no padding, and fewer FLOPs (a forward's cost
        grows with its length squared). Processes training together run one forward per chunk each, as the plain
        path does, so that their collectives (ZeRO-3's parameter gathers, DDP's hooks) stay in step. Under the block
        mask (`block_sparse`) attention costs the tiles it visits, not the square (`Packing.flops`).
        """
        together = pack(groups, input_ids, attention_mask, logits_to_keep)
        if together is None:
            return None
        packings = [(groups, together)]
        if self.accelerator.num_processes == 1 and (together.segment < 0).any():
            packings = [([group], pack([group], input_ids, attention_mask, logits_to_keep)) for group in groups]
        packed_flops = sum(packing.flops(*sizes, block_sparse) for _, packing in packings)
        if packed_flops >= forward_flops(*input_ids.shape, *sizes):
            return None
        return packings

    def _packed_inputs(
        self,
        groups: list[list[int]],
        split_inputs: dict[str, Any],
        keys: list[str],
        num_images: list[int],
        rows: range,
        by_part: list | None,
    ) -> dict[str, Any]:
        """The model inputs of the packed sequences of `groups` (rows of the chunk): their prompts' images, then
        the images tools returned in their completions."""
        inputs = select_rows(self.adapter, split_inputs, num_images, [rows[group[0]] for group in groups])
        if by_part is not None:
            packed_images = [by_part[group[0]][0] + [i for row in group for i in by_part[row][1]]
                             for group in groups]  # fmt: skip
            per_image = [image for group_images in packed_images for image in group_images]
            if per_image:  # groups without any image (text-only prompts, no tool images) take no image inputs
                inputs |= self.adapter.merge_vision_inputs({key: [image[key] for image in per_image] for key in keys})
                inputs["num_images"] = [len(group_images) for group_images in packed_images]
        return inputs

    def _images_encoded_once_across(
        self, model, every: dict[str, Any], forwards: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The inputs of the `forwards` that together hold the images and videos of `every`, with each distinct one
        encoded once for all of them (`vision_once.py`): also one that two prompts scored in separate forwards show."""
        encoded = self._images_encoded_once(model, every)
        if encoded is None:
            return forwards
        vision_keys = (*self.adapter.image_keys, *self.adapter.video_keys)
        result, first = [], {modality.name: 0 for modality in MODALITIES}
        for inputs in forwards:
            counts = {modality.name: sum(inputs.get(modality.count) or []) for modality in MODALITIES}
            if any(counts.values()):
                own = encoded if len(forwards) == 1 else encoded_slots(self.adapter, encoded, inputs, first)
                inputs = {key: value for key, value in inputs.items() if key not in vision_keys} | own
            result.append(inputs)
            first = {name: first[name] + count for name, count in counts.items()}
        return result

    def _packed_forward(
        self, model, packing: Packing, input_ids, positions, inputs: dict[str, Any], block_sparse: bool = False
    ):
        """The model's forward on `packing`'s sequences, with their model inputs `inputs`, under the block mask
        (`block_sparse`, for `KERNEL`) or the dense one."""
        base = self._unwrapped(model)
        text_config = base.config.get_text_config()
        kernel = getattr(text_config, "_attn_implementation", None)
        dtype = next(p.dtype for p in base.parameters() if p.is_floating_point())
        if hasattr(text_config, "output_router_logits"):
            # TRL's fused head asks an MoE model for its router logits, whose load-balancing loss reads a 2D mask.
            inputs["output_router_logits"] = False
        with self.accelerator.autocast():
            return model(
                input_ids=packing.gather(input_ids),
                attention_mask=packed_block_mask(packing.segment)
                if block_sparse
                else packing.attention_mask(None if kernel in ("sdpa", KERNEL) else dtype),
                position_ids=packing.gather(positions),
                shift_labels=packing.labels,
                fused_lm_head=True,
                **inputs,
            )

    def _prompt_images(
        self,
        split_inputs: dict[str, Any],
        keys: list[str],
        num_images: list[int],
        rows: range,
        prompt_ids: torch.Tensor,
        completion_ids: torch.Tensor,
    ) -> tuple[list[list[torch.Tensor]], list | None] | None:
        """Per image input in `keys`, each row's input for its prompt's images (rows are the same prompt when these
        and their prompt ids are), and each row's images split by `_images_by_part` (None when no completion shows an
        image); None where that cannot be told: where the placeholders are not one run per image.

        The images a tool returned sit in the completion, after the prompt's own (TRL's tool loop appends them).
        """
        images = [split_inputs[key][rows.start : rows.stop] for key in keys]
        image_token_id = getattr(self._unwrapped(self.model).config, "image_token_id", None)
        in_completion = image_runs(completion_ids, image_token_id) if image_token_id is not None else None
        if in_completion is None or not in_completion.any():
            return images, None
        runs = image_runs(prompt_ids, image_token_id) + in_completion
        if runs.tolist() != [num_images[row] for row in rows]:
            return None
        by_part = self._images_by_part(split_inputs, keys, num_images, rows, in_completion.tolist())
        images = [[self._cat_images(prompt, key, split_inputs[key][row]) for (prompt, _), row in
                   zip(by_part, rows, strict=True)] for key in keys]  # fmt: skip
        return images, by_part

    def _images_by_part(
        self,
        split_inputs: dict[str, Any],
        keys: list[str],
        num_images: list[int],
        rows: range,
        in_completion: list[int],
    ) -> list[tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]]:
        """Per row of the chunk, its images (each `{key: tensor}`) in the prompt and, the last `in_completion` of
        them, in the completion."""
        parts = []
        for row, completion_count in zip(rows, in_completion, strict=True):
            count = num_images[row]
            if not count:
                parts.append(([], []))
                continue
            split = self.adapter.split_vision_inputs({key: split_inputs[key][row] for key in keys}, [1] * count)
            images = [{key: split[key][i] for key in keys} for i in range(count)]
            parts.append((images[: count - completion_count], images[count - completion_count :]))
        return parts

    def _row_videos(self, split_inputs: dict[str, Any], rows: range) -> list[list[torch.Tensor]]:
        """Per video input, each row's input of `rows` (as split per row by the adapter): with the prompt ids, they
        tell the rows of one prompt (two clips of one size under one question have the same prompt ids)."""
        keys = [key for key in self.adapter.video_keys if isinstance(split_inputs.get(key), list)]
        return [split_inputs[key][rows.start : rows.stop] for key in keys]

    @staticmethod
    def _cat_images(images: list[dict[str, torch.Tensor]], key: str, row_value: torch.Tensor) -> torch.Tensor:
        """`key`'s input of `images`, as one tensor (empty, shaped like the row's, for no image)."""
        return torch.cat([image[key] for image in images]) if images else row_value[:0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # TRL's loss passes a fixed list of vision inputs to the log-prob method; a family's other inputs (the
        # adapter's keys outside that list) reach it through `_loss_only_inputs`.
        keys = (*self.adapter.image_keys, *self.adapter.video_keys, NUM_VIDEOS, *self.adapter.row_keys)
        self._loss_only_inputs = {k: inputs[k] for k in keys if k in inputs and k not in _TRL_LOGPS_PARAMETERS}
        try:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # A micro-batch dealt by tokens counts in its window by its rows (`micro_batches.py`).
            return loss * inputs[ROW_WEIGHT] if ROW_WEIGHT in inputs else loss
        finally:
            self._loss_only_inputs = MappingProxyType({})

    @profiling_decorator
    def _prepare_inputs(self, generation_batch: dict[str, Any]) -> dict[str, Any]:
        # TRL's version (1.16), with the family adapter splitting vision inputs per sample before the generation
        # batch is shuffled and cut into micro-batches. TRL's `split_pixel_values_by_grid` guesses the layout
        # from shapes and, for per-sample padded `pixel_values` (Idefics3 / SmolVLM) whose row count equals the
        # batch's image count, reassigns images between samples.
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._scored_generation_batch(generation_batch)
            batches = self._micro_batches(batch)
            self._buffered_inputs = [self._merge_micro_batch(micro_batch) for micro_batch in batches]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _scored_rows(self, rows: list[dict]) -> dict[str, Any]:
        """TRL's scored generation batch of `rows`, with vision inputs split per row."""
        batch = self._generate_and_score_completions(rows)
        if batch.get("num_images") is not None:
            batch = self.adapter.split_vision_inputs(batch, batch["num_images"])
        return batch

    def _scored_generation_batch(self, generation_batch: list[dict]) -> dict[str, Any]:
        """The scored rows this process trains on; with dynamic sampling, only groups with a learning signal,
        topped up with groups generated for fresh prompts (`dynamic_sampling.py`)."""
        sampling = self.dynamic_sampling
        if sampling is None:
            return self._scored_rows(generation_batch)

        def scored(rows: list[dict]) -> tuple[dict[str, Any], torch.Tensor]:
            batch = self._scored_rows(rows)
            rewards, self._round_rewards = self._round_rewards, None
            return batch, rewards

        def extra_round(round_: int) -> tuple[dict[str, Any], torch.Tensor]:
            dataset = self.train_dataset
            if isinstance(dataset, datasets.Dataset):  # the columns TRL's dataloader keeps
                dataset = self._remove_unused_columns(dataset, description="training")
            indices = fresh_rows(sampling.layout, self.args.seed, self.state.global_step, round_, len(dataset))
            return scored(self.data_collator([dataset[i] for i in indices]))

        batch, metrics = sampling.fill(lambda: scored(generation_batch), extra_round)
        # TRL's count of the loss tokens of all processes' rows (its `dapo` loss divides by it), for the rows kept.
        loss_mask = batch["completion_mask"] * batch["tool_mask"] if "tool_mask" in batch else batch["completion_mask"]
        batch["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        for name, value in metrics.items():
            self._metrics["train"][name].append(value)
        return batch

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL's gathered rewards of every process's rows, with T-GRPO's bonus for the video prompts that do better in
        # order (`temporal_grpo.py`: TRL computes the advantages from them next); kept for dynamic sampling's
        # decision, which TRL's `_generate_and_score_completions` does not return.
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.temporal is not None and self.model.training:
            rewards = self.temporal.with_bonus(self, inputs, prompts, rewards)
        self._round_rewards = rewards
        return rewards

    def _micro_batches(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """TRL's shuffle of the generation batch and its cut into `steps_per_generation` micro-batches. With prompts
        shared, the prompts are shuffled and each prompt's rows stay together, so that a micro-batch scores each of
        its prompts once for all of its completions instead of once per micro-batch it landed in; and the groups are
        dealt so that the micro-batches hold about as many tokens each (`micro_batches.py`): with uneven completions,
        no micro-batch gets all the long ones. Where the loss allows it exactly, the micro-batches' row counts differ
        and each is weighted by its rows (`ROW_WEIGHT`); otherwise, with groups of one size, their row counts stay
        equal."""
        count = self.args.steps_per_generation
        if not self._shares_prompts(self.model) or count == 1:
            return split_tensor_dict(shuffle_sequence_dict(batch), count)
        keys = [key for key in self.adapter.image_keys if isinstance(batch.get(key), list)]
        rows = range(len(batch["prompt_ids"]))
        num_images = batch.get("num_images") or [0] * len(rows)
        parts = self._prompt_images(batch, keys, num_images, rows, batch["prompt_ids"], batch["completion_ids"])
        images = parts[0] if parts is not None else [batch[key] for key in keys]
        groups = group_rows(batch["prompt_ids"], images + self._row_videos(batch, rows))
        groups = [groups[i] for i in torch.randperm(len(groups))]
        # A group's packed length: its prompt once, then each completion and one token more.
        prompts, completions = batch["prompt_mask"].sum(dim=1), batch["completion_mask"].sum(dim=1)
        tokens = [int(prompts[group[0]]) + int((completions[group] + 1).sum()) for group in groups]
        window, size = self.args.gradient_accumulation_steps, len(groups[0])
        # One accumulation window per generation: the optimizer step holds the same rows whatever the cut.
        exact = self.loss_type in ROW_MEAN_LOSSES | TOKEN_NORMALIZED_LOSSES and count == window
        if exact and len(groups) >= count:
            bins = balanced_by_tokens(groups, tokens, count)
        elif all(len(group) == size for group in groups) and self.args.per_device_train_batch_size % size == 0:
            per_group = self.args.per_device_train_batch_size // size
            bins = balanced_by_tokens(groups, tokens, count, per_micro_batch=per_group)
        else:  # groups of different sizes: equal row counts, cut where they fall
            return split_tensor_dict(rows_of(batch, self._within_groups(groups)), count)
        micro_batches = [rows_of(batch, self._within_groups(groups)) for groups in bins]
        if self.loss_type in ROW_MEAN_LOSSES:
            weights = row_weights([sum(map(len, groups)) for groups in bins], window)
            for micro_batch, weight in zip(micro_batches, weights, strict=True):
                micro_batch[ROW_WEIGHT] = torch.tensor(weight)
        return micro_batches

    @staticmethod
    def _within_groups(groups: list[list[int]]) -> torch.Tensor:
        """The rows of `groups`, group after group, each group's rows shuffled."""
        return torch.cat([torch.tensor(group)[torch.randperm(len(group))] for group in groups])

    def _merge_micro_batch(self, micro_batch: dict[str, Any]) -> dict[str, Any]:
        if micro_batch.get("num_images") is None:
            return micro_batch
        if not sum(micro_batch.get(NUM_VIDEOS) or []):  # no video in this micro-batch: no video inputs
            drop = (*self.adapter.video_keys, NUM_VIDEOS)
            micro_batch = {k: v for k, v in micro_batch.items() if k not in drop}
        if sum(micro_batch["num_images"]) == 0:  # no image in this micro-batch: no image inputs
            micro_batch = {k: v for k, v in micro_batch.items() if k not in self.adapter.image_keys}
            if NUM_VIDEOS not in micro_batch:
                return micro_batch
        return self.adapter.merge_vision_inputs(micro_batch)
