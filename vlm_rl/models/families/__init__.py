"""The built-in family adapters; importing this package registers them."""

from vlm_rl.models.families import blip2, gemma3, idefics3, internvl, llava, qwen_vl

__all__ = ["blip2", "gemma3", "idefics3", "internvl", "llava", "qwen_vl"]
