"""The training-curves PNG, read back as pixels: each panel draws what the run logged, and says when it did not."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vlm_rl.cli import main as cli_main
from vlm_rl.plotting import PANELS, PLOT_FILE, plot_run, plot_training_curves

FIRST_LINE_COLOR = np.array([31, 119, 180])  # matplotlib's first colour (C0): each panel's first series


def log_history(steps: int = 30, beta: float = 0.0) -> list[dict]:
    history = []
    for step in range(1, steps + 1):
        entry = {
            "step": step,
            "loss": 0.01,
            "reward": 0.5 + 0.5 * step / steps,  # accuracy + 0.5 x format
            "rewards/accuracy/mean": step / steps,
            "rewards/accuracy/count": 16.0,  # not a mean: not drawn
            "rewards/accuracy/image/mean": 0.5,  # a per-task mean: not drawn
            "rewards/format/mean": 1.0,
            "accuracy": step / steps,
            "completions/mean_length": 10.0 + step,
            "entropy": 2.0 - step / steps,
            "timing/rollout_s": 0.2,
            "timing/scoring_s": 0.01,
            "timing/update_s": 0.3,
        }
        if beta:
            entry["kl"] = 0.001 * step
        history.append(entry)
        if step % 10 == 0:
            history.append({"step": step, "eval_reward": 0.4, "eval_accuracy": 0.4})
    return history


def panel_pixels(path, index: int) -> np.ndarray:
    """The pixels of panel `index` (row-major over the 2 x 3 grid)."""
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    height, width = image.shape[0] // 2, image.shape[1] // 3
    row, column = divmod(index, 3)
    return image[row * height : (row + 1) * height, column * width : (column + 1) * width]


def drawn(pixels: np.ndarray) -> int:
    """How many pixels have the first series' colour."""
    return int((np.abs(pixels - FIRST_LINE_COLOR).sum(axis=-1) < 40).sum())


def test_each_panel_draws_its_series_and_names_what_is_missing(tmp_path):
    path = plot_training_curves(log_history(beta=0.0), tmp_path / "curves.png")
    with Image.open(path) as image:
        assert image.size == (1500, 800)
    titles = [panel.title for panel in PANELS]
    kl = titles.index("KL to the reference")
    for index, title in enumerate(titles):
        if index == kl:
            assert drawn(panel_pixels(path, index)) == 0, "beta = 0 logs no KL: nothing to draw"
        else:
            assert drawn(panel_pixels(path, index)) > 200, f"{title}: its first series is not drawn"

    with_kl = plot_training_curves(log_history(beta=0.04), tmp_path / "kl.png")
    assert drawn(panel_pixels(with_kl, kl)) > 200


def test_a_log_without_rewards_is_refused():
    with pytest.raises(ValueError, match="no reward entries"):
        plot_training_curves([{"step": 1, "loss": 0.1}], "unused.png")


def test_plot_command_uses_the_newest_checkpoint_while_the_run_is_going(tmp_path, capsys):
    run = tmp_path / "run"
    for step in (10, 20):
        checkpoint = run / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        state = {"global_step": step, "log_history": log_history(steps=step)}
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))
        save_file({"weight": torch.zeros(2)}, checkpoint / "model.safetensors")
    cli_main(["plot", str(run)])
    assert f"Wrote {run / PLOT_FILE}" in capsys.readouterr().out
    assert drawn(panel_pixels(run / PLOT_FILE, 0)) > 200

    shutil.rmtree(run)
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="no trainer_state.json and no complete checkpoint"):
        plot_run(run)
