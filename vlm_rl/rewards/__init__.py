"""Rewards: the registry, the built-in rewards, and loading and guarding the rewards a recipe names."""

from vlm_rl.rewards import accuracy, counting, format, grounding, judge, length, ocr  # noqa: F401  (built-ins)
from vlm_rl.rewards.configured import ConfiguredReward, RewardError
from vlm_rl.rewards.registry import (
    ENTRY_POINT_GROUP,
    REWARD_REGISTRY,
    load_rewards,
    recipe_rewards,
    register_reward,
    resolve_reward,
)
from vlm_rl.rewards.spec import RewardSpec, RewardSpecError
from vlm_rl.rewards.timeout import RewardTimeout, time_limit

__all__ = [
    "ENTRY_POINT_GROUP",
    "REWARD_REGISTRY",
    "ConfiguredReward",
    "RewardError",
    "RewardSpec",
    "RewardSpecError",
    "RewardTimeout",
    "load_rewards",
    "recipe_rewards",
    "register_reward",
    "resolve_reward",
    "time_limit",
]
