"""The README's demo, end to end, and `vlm-rl eval --ablate-images` on the model it trains (`make test-slow`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_policy_learns_through_the_image(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    vlm_rl = [sys.executable, "-m", "vlm_rl.cli"]
    recipe = str(REPO / "recipes" / "demo_cpu.yaml")
    run = tmp_path / "demo"
    subprocess.run([*vlm_rl, "train", "--config", recipe, "--output_dir", str(run)], env=env, check=True, timeout=900)
    evaluation = tmp_path / "eval"
    command = [
        *vlm_rl,
        "eval",
        "--model",
        str(run),
        "--config",
        recipe,
        "--ablate-images",
        "--output_dir",
        str(evaluation),
    ]
    subprocess.run(command, env=env, check=True, timeout=300)

    results = json.loads((evaluation / "eval_results.json").read_text())
    assert results["num_rows"] == results["num_image_rows"] == 200
    assert results["accuracy"] >= 0.9, results
    assert results["blind_accuracy"] <= 0.45, results  # chance is 0.25: the answer is only in the image
    assert results["image_reliance"] >= 0.5, results
    # The evaluation the training run ended with agrees with the command's.
    assert json.loads((run / "eval_results.json").read_text())["accuracy"] == results["accuracy"]
