"""`vlm_rl.train` with the trainer's dummy vision forward turned off: shows the hang/failure that it prevents.

Launched by tests/test_distributed.py in place of `-m vlm_rl.train`; everything else is the real entry point.
"""

import contextlib
import sys

import vlm_rl.train
from vlm_rl.trainers import VLMGRPOTrainer


class WithoutDummyVisionForward(VLMGRPOTrainer):
    """A text-only chunk runs a plain language-model forward, as in one process."""

    def _vision_forward_without_images(self, model):
        return contextlib.nullcontext()


if __name__ == "__main__":
    vlm_rl.train.VLMGRPOTrainer = WithoutDummyVisionForward
    vlm_rl.train.main(sys.argv[1:])
