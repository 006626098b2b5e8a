"""Tools a policy calls during its rollouts ("thinking with images"): built-in image tools and user tools."""

from vlm_rl.tools.zoom import crop_region

__all__ = ["crop_region"]
