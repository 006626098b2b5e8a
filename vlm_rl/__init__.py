"""vlm-rl: GRPO post-training for vision-language models."""

from vlm_rl._torchvision import declare_missing_ops

# Before anything imports torchvision (transformers' image processors, vLLM's Qwen-VL models): see the module.
declare_missing_ops()

__version__ = "0.1.0"
