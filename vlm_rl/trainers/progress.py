"""The console: a progress bar with the latest reward, and one readable line per logging step.

transformers prints each log as a dict of some 35 stringified values (`ProgressCallback` above the bar, or
`PrinterCallback` with `disable_tqdm`). Here each log is one line with the numbers to watch:

    step 12/100 | reward 0.625 | accuracy 0.50 | kl 0.00312 | len 18.2 | 1.93 s/step | ETA 02:47

Every value still goes to `trainer_state.json`, the trackers and `<output_dir>/metrics.jsonl` (`metrics_file.py`).
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback, TrainerState

from vlm_rl.trainers.metrics_file import MetricsFileCallback

# Shown in this order when a log line has them; `eval_accuracy` after an in-loop evaluation.
POSTFIX_KEYS = ("reward", "eval_accuracy", "loss", "step_time")
# (log key, label, format) of the values a line shows; an evaluation's keys carry the `eval_` prefix.
COLUMNS = (
    ("reward", "reward", "{:.3f}"),
    ("accuracy", "accuracy", "{:.2f}"),
    ("kl", "kl", "{:.3g}"),
    ("completions/mean_length", "len", "{:.1f}"),
)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class LogLines:
    """Formats a log dict as one line, and times the optimizer steps of this (possibly resumed) training."""

    def __init__(self) -> None:
        self.started: tuple[float, int] | None = None

    def start(self, state: TrainerState) -> None:
        # From where this run starts: a resumed run's steps before its checkpoint took no time here.
        self.started = (time.monotonic(), state.global_step)

    def line(self, logs: dict, state: TrainerState) -> str:
        step = f"step {state.global_step}/{state.max_steps}"
        if "train_runtime" in logs:  # the summary `Trainer` logs when training ends
            parts = [f"done {step}", f"{tqdm.format_interval(logs['train_runtime'])} total"]
            if _number(logs.get("train_loss")):
                parts.append(f"loss {logs['train_loss']:.4g}")
            return " | ".join(parts)
        is_eval = any(key.startswith("eval_") for key in logs)
        prefix = "eval_" if is_eval else ""
        parts = [f"{'eval ' if is_eval else ''}{step}"]
        shown = [(label, form, logs.get(prefix + key)) for key, label, form in COLUMNS]
        parts += [f"{label} {form.format(value)}" for label, form, value in shown if _number(value)]
        if len(parts) == 1:  # none of the usual values: show what there is
            parts += [f"{key} {value:.4g}" for key, value in logs.items() if _number(value)]
        if is_eval:
            if _number(logs.get("eval_runtime")):
                parts.append(f"{logs['eval_runtime']:.1f} s")
        elif self.started is not None and state.global_step > self.started[1]:
            seconds_per_step = (time.monotonic() - self.started[0]) / (state.global_step - self.started[1])
            remaining = seconds_per_step * max(state.max_steps - state.global_step, 0)
            parts += [f"{seconds_per_step:.3g} s/step", f"ETA {tqdm.format_interval(remaining)}"]
        return " | ".join(parts)


class RewardProgressCallback(ProgressCallback):
    """transformers' bar (step / max_steps, elapsed, ETA) that also shows the last logged reward and loss, with
    each log written above it as one line instead of transformers' dict."""

    def __init__(self, max_str_len: int = 100):
        super().__init__(max_str_len)
        self.postfix: dict[str, str] = {}
        self.lines = LogLines()

    def on_train_begin(self, args, state, control, **kwargs):
        # transformers' bar starts at 0 on resume, jumps to the resumed step at the first update and counts that
        # jump in its rate and ETA: start it where the run is.
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, dynamic_ncols=True)
        self.current_step = state.global_step
        self.lines.start(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Replaces transformers' `on_log`, which writes the whole dict above the bar.
        if not (state.is_world_process_zero and self.training_bar is not None and logs):
            return
        self.training_bar.write(self.lines.line(logs, state))
        # Eval lines carry only eval keys: keep the last training values beside them.
        latest = {key: logs[key] for key in POSTFIX_KEYS if _number(logs.get(key))}
        self.postfix.update({key: f"{value:.4g}" for key, value in latest.items()})
        if self.postfix:
            self.training_bar.set_postfix(self.postfix, refresh=True)


class LogLinePrinter(TrainerCallback):
    """With `disable_tqdm`: transformers' `PrinterCallback` prints each log dict; this prints the line instead."""

    def __init__(self) -> None:
        self.lines = LogLines()

    def on_train_begin(self, args, state, control, **kwargs):
        self.lines.start(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:  # where `PrinterCallback` prints
            print(self.lines.line(logs, state), flush=True)


def install_console(trainer) -> None:
    """Swap transformers' console callbacks for the one-line ones, and write `metrics.jsonl`."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(RewardProgressCallback)
    elif trainer.pop_callback(PrinterCallback) is not None:
        trainer.add_callback(LogLinePrinter)
    trainer.add_callback(MetricsFileCallback)
