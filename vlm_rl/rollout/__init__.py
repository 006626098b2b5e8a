"""Rollout backends: vLLM (colocated or a server) for generation during GRPO."""
