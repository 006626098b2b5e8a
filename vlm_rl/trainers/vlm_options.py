"""The vlm-rl options `VLMGRPOTrainer` reads, taken once from its arguments.

The trainer accepts a plain `trl.GRPOConfig` as well as a `VLMGRPOConfig`. A plain one has none of the vlm-rl fields;
each then takes its `VLMGRPOConfig` default, so that the dataclass field defaults are the one source of truth and a
run behaves the same whichever config class it was given.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from vlm_rl.config import VLMGRPOConfig

_DEFAULTS = {field.name: field.default for field in fields(VLMGRPOConfig)}


@dataclass(frozen=True)
class VLMOptions:
    """The `VLMGRPOConfig` fields the trainer itself reads (see their help in `vlm_rl/config.py`)."""

    share_prompt_prefix: bool = _DEFAULTS["share_prompt_prefix"]
    packed_attention: str = _DEFAULTS["packed_attention"]
    encode_images_once: bool = _DEFAULTS["encode_images_once"]
    reward_timeout: float | None = _DEFAULTS["reward_timeout"]
    reward_error_policy: str = _DEFAULTS["reward_error_policy"]
    reward_route_column: str = _DEFAULTS["reward_route_column"]
    eval_accuracy_reward: str = _DEFAULTS["eval_accuracy_reward"]
    vllm_weight_transport: str = _DEFAULTS["vllm_weight_transport"]
    vllm_weights_dir: str | None = _DEFAULTS["vllm_weights_dir"]
    vllm_server_retry_timeout: float = _DEFAULTS["vllm_server_retry_timeout"]
    vllm_limit_mm_per_prompt: int | None = _DEFAULTS["vllm_limit_mm_per_prompt"]
    dynamic_sampling: bool = _DEFAULTS["dynamic_sampling"]
    max_resample_rounds: int = _DEFAULTS["max_resample_rounds"]
    dynamic_sampling_accuracy_band: list[float] | None = _DEFAULTS["dynamic_sampling_accuracy_band"]
    dynamic_sampling_accuracy_reward: str | None = _DEFAULTS["dynamic_sampling_accuracy_reward"]
    video_fps: float | None = _DEFAULTS["video_fps"]
    video_num_frames: int | None = _DEFAULTS["video_num_frames"]
    video_max_pixels: int | None = _DEFAULTS["video_max_pixels"]
    video_total_pixels: int | None = _DEFAULTS["video_total_pixels"]
    temporal_grpo: bool = _DEFAULTS["temporal_grpo"]
    temporal_bonus: float = _DEFAULTS["temporal_bonus"]
    temporal_margin: float = _DEFAULTS["temporal_margin"]
    temporal_shuffled_generations: int | None = _DEFAULTS["temporal_shuffled_generations"]
    temporal_accuracy_reward: str | None = _DEFAULTS["temporal_accuracy_reward"]
    temporal_accuracy_threshold: float = _DEFAULTS["temporal_accuracy_threshold"]

    @classmethod
    def from_args(cls, args: Any) -> VLMOptions:
        """The options of `args` (any training arguments, or None); a field `args` lacks keeps its default."""
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls) if hasattr(args, field.name)})
