"""The learning benchmark's pipeline end to end, a few steps a stage (`--smoke`): `vlm-rl sft`, held-out evaluation
(greedy, sampled, blind), `vlm-rl train` from the SFT output, evaluation again, tables, figure and the JSON line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # about 50 s: the whole pipeline in subprocesses (`make bench-learning` runs it for real)
def test_the_learning_benchmark_runs_sft_then_grpo_and_reports_every_score(tmp_path):
    process = subprocess.run(
        [sys.executable, "benchmarks/learning.py", "--smoke", "--task", "counting", "--seeds", "1", "--samples", "2",
         "--output_dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    summary = json.loads(process.stdout.strip().splitlines()[-1])["counting"]
    for key in ("sft", "grpo", "sft_sampled", "grpo_sampled", "blind_sft", "blind_grpo", "chance"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["sft_minutes"] > 0 and summary["grpo_minutes"] > 0 and summary["seeds"] == 1
    # The GRPO run started from the SFT output, not from a fresh tiny model.
    state = json.loads((tmp_path / "counting-seed0" / "grpo" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    card = (tmp_path / "counting-seed0" / "grpo" / "README.md").read_text()
    assert str(tmp_path / "counting-seed0" / "sft") in card
    table = (tmp_path / "results.md").read_text()
    assert "| counting | accuracy |" in table and "true \\ answer" in table
    assert (tmp_path / "learning_counting.png").stat().st_size > 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]["counting"]
    assert sum(sum(row.values()) for row in runs[0]["confusion_grpo"].values()) == 8  # every held-out row
    assert [step for step, _ in runs[0]["curve"]] == [0, 1, 2]  # `eval_on_start`, then each in-loop evaluation


@pytest.mark.slow
def test_the_zoom_task_runs_with_and_without_its_tool(tmp_path):
    """`--task zoom`: SFT + GRPO with the `zoom_in` tool, and the same budget with tools off (`no_tools`)."""
    process = subprocess.run(
        [sys.executable, "benchmarks/learning.py", "--smoke", "--task", "zoom", "--samples", "1",
         "--output_dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    summary = json.loads(process.stdout.strip().splitlines()[-1])["zoom"]
    for key in ("sft", "grpo", "no_tools", "blind_grpo", "tool_calls_sft", "tool_calls_per_completion"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["no_tools_minutes"] > 0
    # The tool run logged its calls; the run without tools is the same recipe with `tools` and `max_tool_turns` off.
    logged = (tmp_path / "zoom-seed0" / "grpo" / "metrics.jsonl").read_text()
    assert '"tools/zoom_in/calls"' in logged
    assert '"tools/' not in (tmp_path / "zoom-seed0" / "no_tools" / "grpo" / "metrics.jsonl").read_text()
    plain = yaml.safe_load((tmp_path / "zoom-seed0" / "no_tools" / "zoom_cpu.yaml").read_text())
    recipe = yaml.safe_load((ROOT / "recipes" / "zoom_cpu.yaml").read_text())
    assert "tools" not in plain and plain == {k: v for k, v in recipe.items() if k not in ("tools", "max_tool_turns")}
    assert "| zoom |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow  # about 2 minutes: SFT and GRPO on video rows, and four evaluations, in subprocesses
def test_the_motion_task_reports_the_grpo_model_with_its_frames_shuffled(tmp_path):
    """`--task motion`: SFT + GRPO on clips; the control is the held-out clips with their frames shuffled."""
    process = subprocess.run(
        [sys.executable, "benchmarks/learning.py", "--smoke", "--task", "motion", "--samples", "1",
         "--output_dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    summary = json.loads(process.stdout.strip().splitlines()[-1])["motion"]
    for key in ("sft", "grpo", "shuffled_frames_sft", "shuffled_frames_grpo", "chance"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert "blind_grpo" not in summary  # no images to swap
    assert summary["total_minutes"] >= summary["sft_minutes"] + summary["grpo_minutes"]
    assert "| motion |" in (tmp_path / "results.md").read_text()
