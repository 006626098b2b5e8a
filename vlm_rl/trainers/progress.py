"""The training progress bar, with the latest reward beside the step count and ETA."""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers.trainer_callback import ProgressCallback

# Shown in this order when a log line has them; `eval_accuracy` after an in-loop evaluation.
POSTFIX_KEYS = ("reward", "eval_accuracy", "loss", "step_time")


class RewardProgressCallback(ProgressCallback):
    """transformers' bar (step / max_steps, elapsed, ETA) that also shows the last logged reward and loss."""

    def __init__(self, max_str_len: int = 100):
        super().__init__(max_str_len)
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        # transformers' bar starts at 0 on resume, jumps to the resumed step at the first update and counts that
        # jump in its rate and ETA: start it where the run is.
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, dynamic_ncols=True)
        self.current_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        if not (state.is_world_process_zero and self.training_bar is not None and logs):
            return
        # Eval lines carry only eval keys: keep the last training values beside them.
        latest = {key: logs[key] for key in POSTFIX_KEYS if isinstance(logs.get(key), int | float)}
        self.postfix.update({key: f"{value:.4g}" for key, value in latest.items()})
        if self.postfix:
            self.training_bar.set_postfix(self.postfix, refresh=True)
