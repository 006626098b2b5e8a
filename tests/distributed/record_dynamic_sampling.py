"""`vlm_rl.train` recording, per process, what dynamic sampling gave it to train on each generation.

Launched by tests/test_distributed.py in place of `-m vlm_rl.train`; everything else is the real entry point.
"""

import json
import os
import sys

import vlm_rl.train
from vlm_rl.trainers import VLMGRPOTrainer


class RecordingDynamicSampling(VLMGRPOTrainer):
    """Appends {rows, rows with a non-zero advantage, extra rounds} to `dynamic-rank<N>.jsonl` in the output dir."""

    def _scored_generation_batch(self, generation_batch):
        batch = super()._scored_generation_batch(generation_batch)
        record = {
            "rows": batch["advantages"].numel(),
            "signal_rows": int((batch["advantages"] != 0).sum()),
            "rounds": self._metrics["train"]["dynamic_sampling/rounds"][-1],
            "padded_groups": self._metrics["train"]["dynamic_sampling/padded_groups"][-1],
        }
        path = os.path.join(self.args.output_dir, f"dynamic-rank{self.accelerator.process_index}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return batch


if __name__ == "__main__":
    vlm_rl.train.VLMGRPOTrainer = RecordingDynamicSampling
    vlm_rl.train.main(sys.argv[1:])
