"""Rewards: the registry, the built-in rewards and loading user rewards named in a recipe."""

from vlm_rl.rewards import accuracy, format  # noqa: F401  (register the built-ins)
from vlm_rl.rewards.registry import (
    REWARD_REGISTRY,
    RewardSpecError,
    load_rewards,
    register_reward,
    resolve_reward,
)

__all__ = ["REWARD_REGISTRY", "RewardSpecError", "load_rewards", "register_reward", "resolve_reward"]
