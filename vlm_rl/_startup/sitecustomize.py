"""Run at the start of every Python subprocess of a vlm-rl process whose torchvision needed `declare_missing_ops`.

vLLM inspects model classes (importing torchvision through transformers) in a fresh interpreter; without this the
import fails there. `vlm_rl._torchvision` puts this directory on PYTHONPATH only when it had to declare the ops.
"""

import vlm_rl  # noqa: F401  (its import declares the ops)
