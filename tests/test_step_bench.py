"""`benchmarks/step_bench.py` runs both trainers end to end and ends with its JSON summary (smallest settings)."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_bench.py"


def test_step_bench_runs_and_ends_with_the_ratios():
    tiny = ["--hidden_size", "64", "--layers", "2", "--vision_width", "32", "--vision_depth", "1"]
    tiny += ["--vision_heads", "2", "--image_size", "112", "--generations", "2", "--steps", "1"]
    tiny += ["--completion_length", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), *tiny], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["generations"] == 2 and summary["step_time_ratio"] > 0 and summary["peak_mem_ratio"] > 0
    runs = {run["trainer"]: run for run in summary["runs"]}
    assert runs.keys() == {"stock", "ours"}
    for run in runs.values():  # the rollout is part of the step
        assert 0 < run["generation_time_s"] < run["step_time_s"], run
    # Ours sends each prompt's image through the vision tower once instead of G = 2 times, in every phase, and runs
    # fewer language-model tokens.
    for phase in ("generation", "scoring"):
        stock, ours = runs["stock"]["tokens_per_step"][phase], runs["ours"]["tokens_per_step"][phase]
        assert ours["vision"] * 2 == stock["vision"] > 0, phase
        assert ours["language"] < stock["language"], phase
