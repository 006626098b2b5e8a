"""Training curves from a run's `trainer_state.json`."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def plot_reward_curve(log_history: list[dict], path: str | Path, title: str = "") -> Path:
    """Total reward and each reward function's mean against the optimizer step."""
    logs = [entry for entry in log_history if "reward" in entry and "step" in entry]
    if not logs:
        raise ValueError("The log history has no reward entries to plot (was `logging_steps` larger than the run?).")
    steps = [entry["step"] for entry in logs]
    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    axis.plot(
        steps, [entry["reward"] for entry in logs], label="reward (weighted total)", linewidth=2.2, color="black"
    )
    per_function = sorted(
        {key for entry in logs for key in entry if key.startswith("rewards/") and key.endswith("/mean")}
    )
    for key in per_function:
        axis.plot(steps, [entry.get(key) for entry in logs], label=key.removeprefix("rewards/"), alpha=0.8)
    axis.set_xlabel("step")
    axis.set_ylabel("reward")
    axis.set_title(title or "GRPO reward")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_run(run_dir: str | Path) -> Path:
    """Plot `<run_dir>/trainer_state.json` (or that of its newest checkpoint) to `<run_dir>/reward_curve.png`."""
    run_dir = Path(run_dir)
    state_file = run_dir / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} not found: is {run_dir} a finished vlm-rl run directory?")
    state = json.loads(state_file.read_text())
    return plot_reward_curve(state["log_history"], run_dir / "reward_curve.png", title=f"GRPO reward — {run_dir.name}")
