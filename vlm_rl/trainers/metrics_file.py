"""`<output_dir>/metrics.jsonl`: every log (training steps, evaluations, the end-of-training summary) as one JSON line.

The same entries as `log_history` in `trainer_state.json`, readable while the run goes (`trainer_state.json` is
written only with checkpoints) and with `jq`, pandas or `tail -f`, no tracker needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from transformers.trainer_callback import TrainerCallback

METRICS_FILE = "metrics.jsonl"


def _open(output_dir: str, mode: str) -> TextIO:
    path = Path(output_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)  # a fresh run's output_dir is made at its first checkpoint
    return path.open(mode)


class MetricsFileCallback(TrainerCallback):
    """Appends each `log_history` entry to `<output_dir>/metrics.jsonl` on the main process."""

    def on_train_begin(self, args, state, control, **kwargs):
        # Rewritten from the history training starts with: empty for a fresh run, the checkpoint's on a resumed one.
        # Lines a stopped run wrote after its last checkpoint are dropped, as they are from `trainer_state.json`;
        # the resumed run logs those steps again.
        if state.is_world_process_zero:
            with _open(args.output_dir, "w") as file:
                file.writelines(json.dumps(entry) + "\n" for entry in state.log_history)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # `Trainer.log` appends the entry (the logs plus `step`) to `log_history` just before calling `on_log`.
        if state.is_world_process_zero and state.log_history:
            with _open(args.output_dir, "a") as file:
                file.write(json.dumps(state.log_history[-1]) + "\n")
