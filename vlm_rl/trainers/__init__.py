"""Trainers: TRL's GRPO trainer, extended for vision-language batches."""

from vlm_rl.trainers.grpo import VLMGRPOTrainer

__all__ = ["VLMGRPOTrainer"]
