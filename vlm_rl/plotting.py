"""Training curves from a run's `trainer_state.json`: one PNG that says at a glance how the run went."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from vlm_rl.checkpoints import latest_checkpoint  # noqa: E402
from vlm_rl.errors import InvalidValueError, MissingPathError  # noqa: E402

PLOT_FILE = "training_curves.png"


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]  # log keys, drawn in this order; a key ending in `/` stands for every key under it
    empty: str  # shown in the panel when the run logged none of its keys


PANELS = (
    Panel("Reward", ("reward", "rewards/", "eval_reward"), "no reward logged"),
    # `accuracy`: the mean of the recipe's `eval_accuracy_reward` (logged by `VLMGRPOTrainer`).
    Panel("Accuracy", ("accuracy", "eval_accuracy"), "no `eval_accuracy_reward` among the rewards"),
    Panel("Completion length (tokens)", ("completions/mean_length", "eval_completions/mean_length"), "not logged"),
    Panel("KL to the reference", ("kl", "eval_kl"), "not logged (beta = 0: no reference model)"),
    Panel("Entropy", ("entropy", "eval_entropy"), "not logged"),
    Panel("Seconds per step", ("timing/rollout_s", "timing/scoring_s", "timing/update_s"), "not logged"),
)


def _series(log_history: list[dict], keys: tuple[str, ...]) -> dict[str, list]:
    """{label: [(step, value), ...]} for each key of a panel that the run logged."""
    names: list[str] = []
    for key in keys:
        if key.endswith("/"):  # each reward function's mean, over all rows (not per task)
            found = {k for entry in log_history for k in entry if k.startswith(key) and k.endswith("/mean")}
            names += sorted(k for k in found if k.count("/") == 2)
        else:
            names.append(key)
    series = {}
    for name in names:
        points = [
            (entry["step"], entry[name])
            for entry in log_history
            if isinstance(entry.get(name), int | float) and "step" in entry
        ]
        if points:
            series[name] = points
    return series


def plot_training_curves(log_history: list[dict], path: str | Path, title: str = "") -> Path:
    """Reward (total and per function), accuracy, completion length, KL, entropy and step time against step.

    Evaluation values (`eval_*`) are drawn dashed on the panel of their training twin.
    """
    if not any("reward" in entry for entry in log_history):
        raise InvalidValueError(
            "The log history has no reward entries to plot (was `logging_steps` larger than the run?)."
        )
    figure, axes = plt.subplots(2, 3, figsize=(15, 8), dpi=100)
    for panel, axis in zip(PANELS, axes.flat, strict=True):
        series = _series(log_history, panel.keys)
        for label, points in series.items():
            steps, values = zip(*points, strict=True)
            evaluation = label.startswith("eval_")
            axis.plot(
                steps,
                values,
                label=label.replace("rewards/", "").removesuffix("/mean"),
                linewidth=2.6 if label in ("reward", "eval_reward") else 1.4,
                zorder=3 if label in ("reward", "eval_reward") else 2,  # the total on top of its parts
                linestyle="--" if evaluation else "-",
                marker="o" if evaluation or len(steps) < 20 else None,
                markersize=3,
            )
        axis.set_title(panel.title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if series:
            axis.legend(fontsize=8, loc="best")
        else:
            axis.text(0.5, 0.5, panel.empty, ha="center", va="center", transform=axis.transAxes, color="gray")
    figure.suptitle(title or "GRPO training")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_run(run_dir: str | Path) -> Path:
    """Plot `<run_dir>/trainer_state.json` to `<run_dir>/training_curves.png`.

    A run still in progress (or stopped) has no `trainer_state.json` at its top yet; its newest complete
    checkpoint's is used instead.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingPathError(f"{run_dir} is not a directory: pass a run's output_dir.")
    state_file = run_dir / "trainer_state.json"
    if not state_file.is_file():
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise MissingPathError(
                f"{run_dir} has no trainer_state.json and no complete checkpoint-N: is it a vlm-rl run directory?"
            )
        state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    title = f"GRPO training — {run_dir.name}, step {state['global_step']}"
    return plot_training_curves(state["log_history"], run_dir / PLOT_FILE, title=title)
