"""The built-in family adapters; importing this package registers them."""

from vlm_rl.models.families import qwen_vl

__all__ = ["qwen_vl"]
