"""Tools a policy calls during its rollouts ("thinking with images"): built-in image tools and user tools."""

from vlm_rl.tools.replies import ERROR_PREFIX, error_reply
from vlm_rl.tools.toolbox import BUILTIN_TOOLS, check_tool_template, recipe_toolbox, resolve_tool, toolbox
from vlm_rl.tools.zoom import ZoomEnvironment, crop_budget, crop_region

__all__ = [
    "BUILTIN_TOOLS",
    "ERROR_PREFIX",
    "ZoomEnvironment",
    "check_tool_template",
    "crop_budget",
    "crop_region",
    "error_reply",
    "recipe_toolbox",
    "resolve_tool",
    "toolbox",
]
