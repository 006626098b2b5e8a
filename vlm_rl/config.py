"""Recipe schema: the dataclasses a recipe YAML (and any `--field value` flag) is parsed into.

A recipe is one flat YAML mapping, as with TRL's own scripts; each key belongs to exactly one of the
dataclasses below. `TrlParser` does the parsing, so every field is also a command-line flag.
"""

from __future__ import annotations

import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from trl import GRPOConfig, SFTConfig, TrlParser

from vlm_rl.recipe_check import SFT_FIELD_TABLE, build_field_table, check_recipe, recipe_path, write_field_table

# RecipeError is raised by `check_recipe` and imported from here by callers that parse recipes.
from vlm_rl.recipe_check import RecipeError as RecipeError
from vlm_rl.rewards.configured import ERROR_POLICIES

WEIGHT_TRANSPORTS = ("auto", "nccl", "files")
PACKED_ATTENTIONS = ("auto", "block_sparse", "dense")


def step_timeout_field() -> Any:
    """`step_timeout`, the same field in the GRPO and SFT configs (both train in HF's loop).

    The default is HF's `ddp_timeout` default, 1,800 s: a run a stuck collective would have ended then ends no
    later, now with stack dumps and the stuck ranks named, and a step stuck outside any collective (a reward, a
    single process) ends too; a healthy step of a large model (long generations, a checkpoint of tens of GB) takes
    minutes, well under it.
    """
    return field(
        default=1800.0,
        metadata={
            "help": "Seconds a training step may take on any process, including the logging, checkpoint saving and "
            "evaluation after it; past it, every process that can still act dumps its threads' stacks, names the "
            "ranks that stopped answering and the last complete checkpoint, and exits with status 124 (see "
            "docs/reliability.md). Raise it for steps longer than half an hour; 0 or null: no limit."
        },
    )


@dataclass
class ModelArguments:
    """Which model to train."""

    model_name_or_path: str = field(
        default="tiny:qwen2_vl",
        metadata={
            "help": "A Hub id, a local model directory, or `tiny:<family>` for the embedded random-weight tiny model "
            "(built offline into `<output_dir>/tiny-<family>`; families: see docs/models.md)."
        },
    )
    tiny_projector_scale: float = field(
        default=1.0,
        metadata={
            "help": "`tiny:` models only: multiply the vision-to-language projection's output by this when the model "
            "is built (into `<output_dir>/tiny-<family>-projector<scale>`). A random tiny model reads its images "
            "sooner with louder image features (docs/learning.md)."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype: `auto` (as saved), `float32`, `bfloat16` or `float16`."},
    )
    min_pixels: int | None = field(
        default=None,
        metadata={
            "help": "Smallest image area (pixels) the processor resizes to, for families with dynamic resolution "
            "(Qwen-VL, InternVL; Idefics3 / SmolVLM take `max_pixels` only: see docs/models.md). Set on the "
            "processor itself, so generation, training, evaluation and saved checkpoints agree. Unset: the "
            "processor's own setting."
        },
    )
    max_pixels: int | None = field(
        default=None, metadata={"help": "Largest image area (pixels) the processor resizes to; see `min_pixels`."}
    )
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Do not train the vision encoder."})
    freeze_projector: bool = field(
        default=False, metadata={"help": "Do not train the projector (connector / merger / resampler)."}
    )
    freeze_language_model: bool = field(
        default=False, metadata={"help": "Do not train the language model (embeddings and head included)."}
    )
    use_peft: bool = field(
        default=False,
        metadata={
            "help": "Train LoRA adapters instead of the model's weights: on the language model's linear layers, "
            "plus the vision tower / projector with `lora_vision_tower` / `lora_projector` (see docs/lora.md)."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (the update is scaled by alpha/r)."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the LoRA input. 0 keeps generation and training log-probs of one policy equal."},
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Linear layers that get LoRA, by name or dotted name suffix (e.g. `q_proj v_proj`), within the "
            "parts that get LoRA. Unset or `all-linear`: every linear layer there except the LM head."
        },
    )
    lora_vision_tower: bool = field(
        default=False, metadata={"help": "Also put LoRA on the vision tower's linear layers (needs `use_peft`)."}
    )
    lora_projector: bool = field(
        default=False, metadata={"help": "Also put LoRA on the projector's linear layers (needs `use_peft`)."}
    )

    def __post_init__(self):
        if not self.tiny_projector_scale > 0:
            raise ValueError(f"tiny_projector_scale must be positive, got {self.tiny_projector_scale}.")
        # LoRA contradictions fail at parse time, before any model is loaded.
        if isinstance(self.lora_target_modules, str):  # a YAML scalar: `lora_target_modules: q_proj`
            self.lora_target_modules = [self.lora_target_modules]
        asked = [name for name in ("lora_vision_tower", "lora_projector") if getattr(self, name)]
        if self.lora_target_modules:
            asked.append("lora_target_modules")
        if asked and not self.use_peft:
            raise ValueError(f"{', '.join(asked)} set without use_peft: true; LoRA is off unless use_peft is set.")
        for lora_field, freeze_field in (
            ("lora_vision_tower", "freeze_vision_tower"),
            ("lora_projector", "freeze_projector"),
        ):
            if getattr(self, lora_field) and getattr(self, freeze_field):
                raise ValueError(
                    f"{lora_field}: true and {freeze_field}: true contradict each other (a frozen part trains no "
                    "LoRA weights either); drop one of the two."
                )
        if self.use_peft and (self.lora_r < 1 or self.lora_dropout < 0 or self.lora_dropout >= 1):
            raise ValueError(
                f"lora_r must be >= 1 and lora_dropout in [0, 1); got lora_r={self.lora_r}, "
                f"lora_dropout={self.lora_dropout}."
            )


@dataclass
class DataArguments:
    """Which data to train and evaluate on, and how its rows become prompts (see docs/data.md)."""

    dataset: str = field(
        default="synthetic:shapes",
        metadata={
            "help": "`synthetic:shapes` (coloured shapes generated in code; the answer is only in the image), "
            "`synthetic:grounding_math` (boxes on non-square images mixed with text-only sums; `task` column "
            "`grounding` / `math`, for reward routing), `synthetic:counting`, `synthetic:grounding`, "
            "`synthetic:count_diff` (scenes of several shapes with multi-token answers and an `sft` split, "
            "docs/learning.md), `synthetic:zoom` (a small dot's colour in a named cell of a large image, a task for "
            "the `zoom_in` tool, with an `sft` split of tool-calling replies: docs/tools.md), `synthetic:motion` "
            "(4-frame clips of a moving shape, a `videos` column, and an `sft` split: docs/learning.md), a local "
            ".jsonl/.json/.parquet/.csv file, a glob or a "
            "directory of such files, a directory written by `Dataset.save_to_disk`, or a Hub dataset id. "
            "Relative paths: from the recipe's directory, then the working directory."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration name."})
    split: str = field(
        default="train",
        metadata={
            "help": "The training split of a Hub dataset or a saved `DatasetDict`; for the synthetic scene tasks "
            "(`counting`, `grounding`, `count_diff`), `zoom` and `motion`, `sft`: the rows with a teacher's reply, "
            "for `vlm-rl sft`."
        },
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={"help": "Held-out data, any kind `dataset` accepts; read with the same mapping and template."},
    )
    eval_split: str | None = field(
        default=None,
        metadata={"help": "The held-out split of `eval_dataset` if given, else of `dataset` (Hub or `DatasetDict`)."},
    )
    train_size: int | None = field(
        default=None,
        metadata={"help": "Synthetic: rows generated (default 2000). Otherwise: use only the first N training rows."},
    )
    eval_size: int | None = field(
        default=None,
        metadata={
            "help": "Synthetic: rows generated (default 200). Otherwise: with `eval_dataset`/`eval_split`, use only "
            "the first N held-out rows; without, hold out N training rows chosen with the seed (default: none)."
        },
    )
    column_mapping: dict[str, str] | str | None = field(
        default=None,
        metadata={
            "help": "Renames columns before anything else reads them, `{source: target}`, e.g. "
            "`{solution: answer, img: image}`. On the command line: `'{solution: answer}'`."
        },
    )
    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "The user message, formatted with the row's columns (after `column_mapping`), e.g. "
            "`'{question}\\nAnswer in <answer></answer>.'`. Unset: the `prompt` column, a string or a conversation."
        },
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "A system message put before every prompt that does not start with one."},
    )
    image_root: str | None = field(
        default=None,
        metadata={"help": "Directory that relative image paths start from. Unset: the directory of each data file."},
    )
    bad_rows: str = field(
        default="raise",
        metadata={
            "help": "A row that cannot be used (unreadable line, missing value, missing or corrupt image, a row the "
            "processor rejects, prompt over `max_prompt_length`): `raise` stops with the file and row, `skip` "
            "leaves it out and counts it in `data/skipped_rows`.",
            "choices": ["raise", "skip"],
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Longest prompt in tokens, image tokens included, measured with the model's processor when a row "
            "is loaded (a processor call per row). Unset: the model's context length (`max_position_embeddings`) "
            "less `max_completion_length`, for file and Hub data (`synthetic:` rows are not measured)."
        },
    )
    text_fraction: float = field(
        default=0.0,
        metadata={"help": "Synthetic: fraction of text-only rows (the colour stated in words) in both splits."},
    )
    image_size: int = field(
        default=56, metadata={"help": "Synthetic: side of the generated square images, in pixels."}
    )

    def __post_init__(self):
        if self.bad_rows not in ("raise", "skip"):
            raise ValueError(f"bad_rows must be `raise` or `skip`, got {self.bad_rows!r}.")
        if isinstance(self.column_mapping, str):
            try:
                self.column_mapping = yaml.safe_load(self.column_mapping)
            except yaml.YAMLError as error:
                raise ValueError(f"column_mapping is not a YAML mapping: {error}") from error
        mapping = self.column_mapping
        if mapping is not None and not (
            isinstance(mapping, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())
        ):
            raise ValueError(f"column_mapping must map column names to column names, got {mapping!r}.")
        for name in ("train_size", "eval_size"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} cannot be negative, got {getattr(self, name)}.")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be at least 1, got {self.max_prompt_length}.")


@dataclass
class RewardArguments:
    """How completions are scored. Weights are GRPOConfig's `reward_weights`."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={
            "help": "Rewards, each a registered name (`accuracy`, `iou`, ...), an installed `vlm_rl.rewards` entry "
            "point, `package.module:function` or `path/to/file.py:function` (relative to the recipe's directory, "
            "then the working directory); or a mapping `{reward: ..., name, weight, kwargs, tasks, timeout}` "
            "(see docs/rewards.md). On the command line a mapping is written as YAML: `'{reward: iou, tasks: [g]}'`."
        },
    )


@dataclass
class VLMGRPOConfig(GRPOConfig):
    """TRL's `GRPOConfig`, plus what a vlm-rl run does around training.

    `resume_from_checkpoint` also accepts `auto`: the newest complete checkpoint in `output_dir`, or a fresh
    start when there is none.
    """

    final_eval: bool = field(
        default=True,
        metadata={
            "help": "After training, generate greedily on the held-out split and write `eval_results.json` with "
            "each reward's mean, with the images as given and, when two or more rows have images, with images "
            "swapped between rows (`blind_*`); see docs/observability.md."
        },
    )
    eval_accuracy_reward: str = field(
        default="accuracy",
        metadata={
            "help": "The reward reported as accuracy: `accuracy` / `eval_accuracy` in the logs, `accuracy`, "
            "`image_accuracy` and `blind_accuracy` in `eval_results.json`."
        },
    )
    plot: bool = field(
        default=True,
        metadata={
            "help": "Write `training_curves.png` at the end: reward (total and per function), accuracy, completion "
            "length, KL, entropy and step time against step."
        },
    )
    step_timeout: float | None = step_timeout_field()
    reward_timeout: float | None = field(
        default=60.0,
        metadata={
            "help": "Seconds one call of one reward function may take (per batch); past it, its samples count as "
            "failed. A reward entry's `timeout` overrides it; 0 or null: no limit."
        },
    )
    reward_error_policy: str = field(
        default="none",
        metadata={
            "help": "What a sample gets when its reward raises, times out or returns NaN/inf: `none` (not scored "
            "by that reward), `zero` (0.0), or `raise` (stop the run; for debugging). Failures are counted in "
            "`rewards/<name>/failures`.",
            "choices": ["none", "zero", "raise"],
        },
    )
    reward_route_column: str = field(
        default="task",
        metadata={"help": "The dataset column whose value selects the rewards with matching `tasks` for each row."},
    )

    tools: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Tools the policy may call while it answers, each the built-in `zoom_in` (crops the original "
            "image at a box in the family's coordinates) or a function or environment class named "
            "`package.module:name` or `path/to/file.py:name`. Needs a chat template that renders tool calls (see "
            "docs/tools.md)."
        },
    )
    max_tool_turns: int | None = field(
        default=None,
        metadata={
            "help": "Most tool turns per completion; a call past them gets an error reply and the model one more "
            "turn to answer. Sets TRL's `max_tool_calling_iterations` to this + 1 (it wins over that field). Unset: "
            "TRL's field alone (no limit when that is unset too)."
        },
    )

    vllm_weight_transport: str = field(
        default="auto",
        metadata={
            "help": "How a vLLM server (`vllm_mode: server`) receives the policy's weights after each update: `nccl` "
            "(TRL's weight-transfer group; CUDA only), `files` (safetensors written to `vllm_weights_dir`, then "
            "reloaded by the server: works on CPU and across machines that share a file system), or `auto` (`nccl` "
            "when training on CUDA, else `files`). Colocated vLLM always reloads in place.",
            "choices": list(WEIGHT_TRANSPORTS),
        },
    )
    vllm_weights_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where `vllm_weight_transport: files` writes the weights; the server must be able to read it. "
            "Unset: `<output_dir>/vllm_weights`."
        },
    )
    vllm_server_retry_timeout: float = field(
        default=300.0,
        metadata={
            "help": "Seconds the trainer waits for a vLLM server (`vllm_mode: server`) that stopped answering, "
            "retrying with a doubling wait (1 s up to 30 s) and logging each; a server that comes back gets the "
            "policy's weights again (`vllm_weight_transport: files`) before the next generation. When it does not, "
            "the run saves a checkpoint and stops, naming the server. 0: stop at the first failed request."
        },
    )
    vllm_limit_mm_per_prompt: int | None = field(
        default=None,
        metadata={
            "help": "Most images in one prompt that vLLM makes room for. Unset: the largest number of images in a "
            "row of the training and held-out data (at least 1)."
        },
    )
    share_prompt_prefix: bool = field(
        default=True,
        metadata={
            "help": "Score the completions of one prompt in a single sequence that holds the prompt once: the "
            "language model runs P + G·C tokens per group instead of G·(P + C), with the same log-probs and "
            "gradients. Families or attention kernels that cannot take it use the plain forward."
        },
    )
    packed_attention: str = field(
        default="auto",
        metadata={
            "help": "The attention of the shared-prompt forward (`share_prompt_prefix`): `block_sparse` runs compiled "
            "flex attention over only the tiles each completion sees, `dense` SDPA over the whole packed square; "
            "`auto` takes `block_sparse` where torch can compile it (Triton on CUDA, a C++ compiler on CPU). On CPU "
            "flex attention has no backward: there the training forward stays dense. The trainer logs its choice."
        },
    )
    encode_images_once: bool = field(
        default=True,
        metadata={
            "help": "Run each distinct image of a log-prob pass through the vision tower once and reuse its "
            "features for every row that shows it (same log-probs and gradients)."
        },
    )
    video_fps: float | None = field(
        default=None,
        metadata={
            "help": "Frames per second sampled from each video file as it is decoded (a `videos` column, "
            "docs/data.md); or set `video_num_frames`. Set on the processor, so generation, training, evaluation "
            "and saved checkpoints agree. Unset: the processor's own setting (Qwen3-VL: 2; Qwen2/2.5-VL: every "
            "frame). A video given as frames plays at this rate (default 2)."
        },
    )
    video_num_frames: int | None = field(
        default=None,
        metadata={"help": "Frames sampled evenly from each video file instead of a rate; see `video_fps`."},
    )
    video_max_pixels: int | None = field(
        default=None,
        metadata={
            "help": "Largest area (pixels) the processor resizes each video frame to (its smallest area is lowered "
            "to this when above). Unset: the processor's own setting."
        },
    )
    video_total_pixels: int | None = field(
        default=None,
        metadata={
            "help": "Pixel budget of a whole clip, as Qwen-VL's reference video code counts it (frame area × "
            "temporal patches of 2 frames; `cap_pixels_per_frame`): long clips get smaller frames. Unset: no budget."
        },
    )

    dynamic_sampling: bool = field(
        default=False,
        metadata={
            "help": "DAPO dynamic sampling: drop the groups whose completions all got the same total reward (zero "
            "advantage, no learning signal) and fill the batch with groups generated for fresh prompts, up to "
            "`max_resample_rounds` extra generation rounds per step (see docs/trainer.md)."
        },
    )
    max_resample_rounds: int = field(
        default=3,
        metadata={
            "help": "With `dynamic_sampling`: most extra generation rounds per step. A batch still short after them "
            "is filled with the dropped groups of largest reward spread (`dynamic_sampling/padded_groups`)."
        },
    )
    dynamic_sampling_accuracy_band: list[float] | None = field(
        default=None,
        metadata={
            "help": "With `dynamic_sampling`: keep the groups whose mean accuracy is within `[low, high]` "
            "(inclusive) instead of those whose total reward varies, e.g. `[0.1, 0.9]`."
        },
    )
    dynamic_sampling_accuracy_reward: str | None = field(
        default=None,
        metadata={"help": "The reward whose score is the accuracy of the band filter. Unset: `eval_accuracy_reward`."},
    )

    temporal_grpo: bool = field(
        default=False,
        metadata={
            "help": "T-GRPO (Video-R1): also roll out each video prompt with its clip's frames shuffled (those "
            "completions are scored, compared and dropped, never trained on); a prompt whose share of correct "
            "completions p is at least `temporal_margin` x the shuffled share p~ gets `temporal_bonus` added to the "
            "accuracy reward of each correct completion (see docs/trainer.md). Rows without a video are untouched; "
            "not with vLLM."
        },
    )
    temporal_bonus: float = field(
        default=0.3,
        metadata={"help": "With `temporal_grpo`: added to a correct completion's accuracy reward (Video-R1's alpha)."},
    )
    temporal_margin: float = field(
        default=0.8,
        metadata={
            "help": "With `temporal_grpo`: a prompt earns the bonus when p >= this x the shuffled share p~ "
            "(Video-R1's mu)."
        },
    )
    temporal_shuffled_generations: int | None = field(
        default=None,
        metadata={
            "help": "With `temporal_grpo`: shuffled rollouts per video prompt (1 to num_generations). Unset: half of "
            "num_generations, at least 1 (as Video-R1)."
        },
    )
    temporal_accuracy_reward: str | None = field(
        default=None,
        metadata={
            "help": "With `temporal_grpo`: the reward that says whether a completion is correct and gets the "
            "bonus. Unset: `eval_accuracy_reward`."
        },
    )
    temporal_accuracy_threshold: float = field(
        default=0.5,
        metadata={
            "help": "With `temporal_grpo`: a completion is correct when its accuracy reward is above this (Video-R1's "
            "code: 0.1, for its partial-credit rewards)."
        },
    )

    def __post_init__(self):
        generation_batch_given = self.generation_batch_size is not None
        try:
            super().__post_init__()
        except ValueError as error:
            if "must be divisible by" not in str(error):
                raise
            raise RecipeError(self._indivisible_batch(generation_batch_given)) from error
        if self.vllm_weight_transport not in WEIGHT_TRANSPORTS:
            raise ValueError(
                f"vllm_weight_transport must be one of {list(WEIGHT_TRANSPORTS)}, got {self.vllm_weight_transport!r}."
            )
        if self.packed_attention not in PACKED_ATTENTIONS:
            raise ValueError(
                f"packed_attention must be one of {list(PACKED_ATTENTIONS)}, got {self.packed_attention!r}."
            )
        if self.vllm_server_retry_timeout < 0:
            raise ValueError(f"vllm_server_retry_timeout must be >= 0 seconds, got {self.vllm_server_retry_timeout}.")
        self._check_dynamic_sampling()
        self._check_temporal_grpo()
        if self.max_tool_turns is not None:
            if self.max_tool_turns < 1:
                raise ValueError(f"max_tool_turns must be at least 1, got {self.max_tool_turns}.")
            # One TRL iteration past the limit: the call made there gets the error reply, then the model answers.
            self.max_tool_calling_iterations = self.max_tool_turns + 1
        if self.reward_error_policy not in ERROR_POLICIES:
            raise ValueError(
                f"reward_error_policy must be one of {list(ERROR_POLICIES)}, got {self.reward_error_policy!r}."
            )

    def _check_dynamic_sampling(self) -> None:
        """Dynamic sampling's settings, and the batch layout it needs: each process's generation batch holds whole
        groups, or a group whole processes' batches (`dynamic_sampling.py` keeps a process's part of a group)."""
        band = self.dynamic_sampling_accuracy_band
        if band is not None and (len(band) != 2 or band[0] > band[1]):
            raise ValueError(f"dynamic_sampling_accuracy_band must be [low, high] with low <= high, got {band}.")
        if self.max_resample_rounds < 0:
            raise ValueError(f"max_resample_rounds cannot be negative, got {self.max_resample_rounds}.")
        if not self.dynamic_sampling:
            return
        rows = self.per_device_train_batch_size * self.steps_per_generation
        if rows % self.num_generations and self.num_generations % rows:
            raise ValueError(
                f"dynamic_sampling needs per_device_train_batch_size x steps_per_generation ({rows}) to be a multiple "
                f"or a divisor of num_generations ({self.num_generations}): set per_device_train_batch_size to "
                f"{self.num_generations // math.gcd(self.num_generations, self.steps_per_generation)}."
            )

    def _check_temporal_grpo(self) -> None:
        """T-GRPO's settings: the shuffled rollouts run through the policy's own `generate`."""
        if not self.temporal_grpo:
            return
        if self.use_vllm:
            raise ValueError(
                "temporal_grpo generates its shuffled rollouts with the policy's `generate`, not vLLM: set use_vllm: "
                "false or temporal_grpo: false."
            )
        shuffled = self.temporal_shuffled_generations
        if shuffled is not None and not 1 <= shuffled <= self.num_generations:
            raise ValueError(
                f"temporal_shuffled_generations must be between 1 and num_generations ({self.num_generations}), "
                f"got {shuffled}."
            )
        if self.temporal_margin < 0:
            raise ValueError(f"temporal_margin must be >= 0, got {self.temporal_margin}.")

    def _indivisible_batch(self, generation_batch_given: bool) -> str:
        """GRPOConfig's batch-size checks in the recipe's words: the fields to change, and a value that works.

        TRL raises them with the derived `generation_batch_size`, a field most recipes never set.
        """
        processes = self.world_size
        group = self.num_generations
        if self.generation_batch_size is not None and self.generation_batch_size % group != 0:
            if generation_batch_given:
                # TRL also wants it a multiple of the global batch.
                valid = _next_multiple(
                    self.generation_batch_size, math.lcm(group, self.per_device_train_batch_size * processes)
                )
                return (
                    f"generation_batch_size ({self.generation_batch_size}) is not a multiple of num_generations "
                    f"({group}): set generation_batch_size to {valid}."
                )
            per_step = processes * self.steps_per_generation  # rows per unit of per_device_train_batch_size
            valid = _next_multiple(self.per_device_train_batch_size, group // math.gcd(group, per_step))
            return (
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) x {processes} process(es) x "
                f"steps_per_generation ({self.steps_per_generation}) = {self.generation_batch_size} completions per "
                f"generation, not a multiple of num_generations ({group}): set per_device_train_batch_size to "
                f"{valid}, or num_generations to a divisor of {self.generation_batch_size}."
            )
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            eval_group = self.num_generations_eval or group
            valid = _next_multiple(self.per_device_eval_batch_size, eval_group // math.gcd(eval_group, processes))
            return (
                f"per_device_eval_batch_size ({self.per_device_eval_batch_size}) x {processes} process(es) is not a "
                f"multiple of the generations per held-out prompt (num_generations_eval or num_generations: "
                f"{eval_group}): set per_device_eval_batch_size to {valid}."
            )
        return (
            f"generation_batch_size ({self.generation_batch_size}) is not a multiple of per_device_train_batch_size "
            f"({self.per_device_train_batch_size}) x {processes} process(es): set it to a multiple of "
            f"{self.per_device_train_batch_size * processes}."
        )


def _next_multiple(value: int, unit: int) -> int:
    """The smallest multiple of `unit` that is at least `value`: the batch size to suggest."""
    return math.ceil(value / unit) * unit


def _grpo_field(name: str) -> Any:
    """A field of `VLMGRPOConfig` (its default and help) for another config that means the same by it."""
    source = VLMGRPOConfig.__dataclass_fields__[name]
    return field(default=source.default, metadata=source.metadata)


@dataclass
class VLMSFTConfig(SFTConfig):
    """TRL's `SFTConfig` for `vlm-rl sft`, with vlm-rl's defaults where TRL's would break its data.

    `resume_from_checkpoint` also accepts `auto`, as in `vlm-rl train`.
    """

    # The rows load lazily (`vlm_rl.data.rows`): the loader needs its row-id column, which TRL's default would drop.
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep False: vlm-rl's data loader needs every raw column of the rows it builds."},
    )
    step_timeout: float | None = step_timeout_field()
    # `vlm-rl train`'s video settings: SFT trains on clips sampled and sized as GRPO and evaluation will show them.
    video_fps: float | None = _grpo_field("video_fps")
    video_num_frames: int | None = _grpo_field("video_num_frames")
    video_max_pixels: int | None = _grpo_field("video_max_pixels")
    video_total_pixels: int | None = _grpo_field("video_total_pixels")


RECIPE_DATACLASSES = (ModelArguments, DataArguments, RewardArguments, VLMGRPOConfig)
SFT_RECIPE_DATACLASSES = (ModelArguments, DataArguments, VLMSFTConfig)


class RecipeParser(TrlParser):
    """TRL's parser, whose errors (a flag's value of the wrong type) are one line instead of the whole usage of
    some 300 fields."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(`--help` lists every field with its type.)\n")


def parse_recipe(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, RewardArguments, VLMGRPOConfig, Path | None]:
    """Parse `--config recipe.yaml` plus command-line overrides; also return the recipe's path."""
    *parsed, recipe = parse_recipe_as(RECIPE_DATACLASSES, argv)
    model_args, data_args, reward_args, training_args = parsed
    return model_args, data_args, reward_args, training_args, recipe


def parse_sft_recipe(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, VLMSFTConfig, Path | None]:
    """Parse an SFT recipe (`vlm-rl sft`) and its command-line overrides; also return the recipe's path."""
    *parsed, recipe = parse_recipe_as(SFT_RECIPE_DATACLASSES, argv)
    model_args, data_args, training_args = parsed
    return model_args, data_args, training_args, recipe


def parse_recipe_as(dataclasses: tuple[type, ...], argv: list[str] | None) -> tuple:
    """The recipe (`--config`) and overrides parsed into `dataclasses`, each field checked against them first;
    then the recipe's path."""
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = recipe_path(argv)
    if recipe is not None:
        check_recipe(recipe, build_field_table(dataclasses))
    parsed = RecipeParser(dataclasses).parse_args_and_config(args=argv)
    return (*parsed, recipe)


def recipe_as_run(argv: list[str], parsed: tuple) -> dict[str, Any]:
    """The fields a run was given, in the recipe file and as `--field` flags, with the values it ran with."""
    recipe = recipe_path(argv)
    names = list(yaml.safe_load(recipe.read_text()) or {}) if recipe is not None else []
    names += [arg[2:].split("=")[0].replace("-", "_") for arg in argv if arg.startswith("--") and arg != "--config"]
    values = {}
    for name in dict.fromkeys(names):
        owner = next((args for args in parsed if hasattr(args, name)), None)
        if owner is not None:
            values[name] = getattr(owner, name)
    return values


if __name__ == "__main__":
    # After a change of recipe fields or of the TRL/transformers releases: regenerate the early check's table.
    print(f"Wrote {write_field_table(build_field_table(RECIPE_DATACLASSES))}")
    print(f"Wrote {write_field_table(build_field_table(SFT_RECIPE_DATACLASSES), SFT_FIELD_TABLE)}")
