"""`benchmarks/soak.py` (`make soak`): its /proc readings and its comparisons on tiny runs; the whole script, SIGTERM
and restart included, on a six-step run (`make test-slow`)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_resume import resume_copy, train, write_recipe

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
spec = importlib.util.spec_from_file_location("soak", SCRIPT)
soak = sys.modules["soak"] = importlib.util.module_from_spec(spec)  # registered first: its dataclasses look it up
spec.loader.exec_module(soak)


def test_proc_readings_count_open_files_and_threads(tmp_path):
    before = soak.read_proc(os.getpid())
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    with (tmp_path / "open.txt").open("w"):
        thread.start()
        try:
            during = soak.read_proc(os.getpid())
        finally:
            stop.set()
            thread.join()
    assert during.fds == before.fds + 1 and during.threads == before.threads + 1
    assert before.rss_kb > 10_000  # a Python process with torch loaded: tens of MB at least


def test_growth_is_measured_from_the_first_reading_after_warm_up():
    readings = [(2, 900, 9, 5), (5, 1000, 4, 3), (7, 1040, 5, 3), (9, 1030, 4, 4)]  # step, RSS kB, fds, threads
    segment = soak.Segment(start_step=2, samples=[soak.Sample(0.0, *reading) for reading in readings])
    growth = soak.resource_growth(segment, warmup_steps=3)
    assert growth["steps"] == [5, 9] and growth["rss_growth"] == 0.03 and growth["readings"] == 3
    assert growth["fds"] == [4, 4] and growth["threads"] == [3, 4]
    with pytest.raises(RuntimeError, match="1 reading"):
        soak.resource_growth(segment, warmup_steps=7)


def test_the_comparisons_find_a_resumed_run_equal_and_name_the_first_difference(tmp_path):
    recipe = write_recipe(tmp_path / "full", max_steps=3)  # a checkpoint at every step
    train(recipe)
    full = tmp_path / "full" / "run"
    resumed = resume_copy(full, 1, tmp_path / "resumed")
    train(recipe, "--output_dir", str(resumed), "--resume_from_checkpoint", "auto")
    assert soak.compare_logs(full, resumed) == {"equal": True, "logged_steps": 3, "first_difference": None}
    assert soak.compare_weights(full / "model.safetensors", resumed / "model.safetensors")["equal"]

    checkpoint = full / "checkpoint-1"  # what the run had logged and trained after its first step
    assert soak.compare_logs(full, checkpoint)["first_difference"] == "logged steps differ: [2, 3]"
    weights = soak.compare_weights(full / "model.safetensors", checkpoint / "model.safetensors")
    assert not weights["equal"] and "tensors differ, first " in weights["first_difference"]
    state = json.loads((resumed / "trainer_state.json").read_text())
    state["log_history"][1]["reward"] += 1e-9  # step 2
    (resumed / "trainer_state.json").write_text(json.dumps(state))
    assert soak.compare_logs(full, resumed)["first_difference"].startswith("step 2: reward ")


@pytest.mark.slow
def test_soak_script_end_to_end_on_a_tiny_recipe(tmp_path):
    """The whole script with a SIGTERM at step 6 of 12: every check passes and the last line is the JSON summary."""
    recipe = write_recipe(tmp_path, save_strategy="no")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(SCRIPT), "--config", str(recipe), "--steps", "12", "--every", "6"]
    command += ["--warmup_steps", "2", "--interval", "0.1", "--output_dir", str(tmp_path / "soak")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["passed"] and all(summary["checks"].values())
    assert summary["sigterm_at"] == [6] and 6 <= summary["stopped_after"][0] < 12
    assert [(p["run"], p["to_step"]) for p in summary["processes"]][0::2] == [
        ("uninterrupted", 12),
        ("interrupted", 12),
    ]
    assert summary["logs"]["logged_steps"] == 12 and summary["weights"]["equal"]
