"""Exact resume, atomic checkpoints and stopping on a signal, with real runs of the tiny model on CPU.

A resumed run is compared with an uninterrupted one of the same recipe: the checkpoint it resumes from is one the
uninterrupted run wrote mid-run, so it holds exactly what a stopped run leaves behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import shapes_trainer
from safetensors.torch import load_file
from test_data_training import TINY_RUN

from vlm_rl.checkpoints import (
    MANIFEST,
    STAGING_DIR,
    checkpoint_problem,
    latest_checkpoint,
    rotate_checkpoints,
)
from vlm_rl.cli import main as cli_main
from vlm_rl.train import main as train_main

REWARD_FILE = '''
def length(completions, **kwargs):
    """Varies between completions, so that advantages and updates are not zero."""
    return [float(len(completion[0]["content"])) for completion in completions]
'''
RUN = {
    **TINY_RUN,
    "model_name_or_path": "tiny:qwen2_vl",
    "dataset": "synthetic:shapes",
    "train_size": 3,  # prompts: an epoch is 3 steps at (1, 1), 2 at (2, 1), 4 at (2, 2)
    "eval_size": 2,
    "reward_funcs": ["accuracy", {"reward": "length_reward.py:length", "weight": 0.1}],
    "per_device_train_batch_size": 2,
    "max_completion_length": 3,
    "learning_rate": 1.0e-3,
    "save_strategy": "steps",
    "save_steps": 1,
    "final_eval": False,
}
# Logged per step but not part of what a run computes.
NOT_COMPARED = ("timing/", "step_time")


def write_recipe(directory: Path, **fields) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "length_reward.py").write_text(REWARD_FILE)
    recipe = directory / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RUN, "output_dir": str(directory / "run"), **fields}))
    return recipe


def train(recipe: Path, *flags: str) -> None:
    train_main(["--config", str(recipe), *flags])


def steps(run_dir: Path) -> dict[int, dict]:
    """Each optimizer step's logged values, without timings."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return {
        entry["step"]: {k: v for k, v in entry.items() if not k.startswith(NOT_COMPARED)}
        for entry in history
        if "loss" in entry
    }


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    first, second = weights(a), weights(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def resume_copy(run_dir: Path, step: int, directory: Path) -> Path:
    """An output directory holding only what a run stopped after `step` would have: the model it was built from
    and its checkpoints up to `step` (here the last one)."""
    resumed = directory / "run"
    resumed.mkdir(parents=True)
    shutil.copytree(run_dir / "tiny-qwen2_vl", resumed / "tiny-qwen2_vl")
    shutil.copytree(run_dir / f"checkpoint-{step}", resumed / f"checkpoint-{step}")
    return resumed


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Uninterrupted six-step runs, one per (steps_per_generation, num_iterations), built on first use."""
    runs: dict[tuple, tuple[Path, Path]] = {}

    def get(steps_per_generation: int, num_iterations: int, **extra) -> tuple[Path, Path]:
        key = (steps_per_generation, num_iterations, *sorted(extra))
        if key not in runs:
            directory = tmp_path_factory.mktemp(f"full-{steps_per_generation}-{num_iterations}")
            fields = {"max_steps": 6, "steps_per_generation": steps_per_generation, "num_iterations": num_iterations}
            recipe = write_recipe(directory, **fields, **extra)
            train(recipe)
            runs[key] = recipe, directory / "run"
        return runs[key]

    return get


# (steps_per_generation, num_iterations, the step the run stops after): each stop is inside a generation cycle
# (none at (1, 1), which has no cycle) and in the run's second epoch, where the sampler's order is epoch 2's.
CYCLES = [(1, 1, 4), (2, 1, 3), (2, 2, 5)]


@pytest.mark.parametrize(("steps_per_generation", "num_iterations", "stop"), CYCLES)
def test_resumed_run_matches_the_uninterrupted_one(
    uninterrupted, tmp_path, steps_per_generation, num_iterations, stop, caplog
):
    recipe, full = uninterrupted(steps_per_generation, num_iterations)
    resumed = resume_copy(full, stop, tmp_path)
    with caplog.at_level(logging.WARNING):
        train(recipe, "--output_dir", str(resumed), "--resume_from_checkpoint", "auto")
    assert "without its buffered generations" not in caplog.text

    expected, got = steps(full), steps(resumed)
    assert sorted(got) == list(range(1, 7))
    for step in range(stop + 1, 7):
        assert got[step] == expected[step], f"step {step} differs after resuming from step {stop}"
    assert any(expected[step]["rewards/length/std"] > 0 for step in expected)  # updates were not all zero
    assert not same_weights(full / f"checkpoint-{stop}", full)  # the steps after the stop changed the weights
    assert same_weights(resumed, full)


def test_the_loss_logged_after_resuming_inside_a_logging_window_is_the_uninterrupted_runs(uninterrupted, tmp_path):
    """HF logs the loss summed since the last logging step over the steps since; on resume it forgot both, and the
    loss logged at step 6 averaged steps 5 and 6 alone (found by `make soak`, which logs every 10 steps)."""
    recipe, full = uninterrupted(1, 1, logging_steps=3)
    resumed = resume_copy(full, 4, tmp_path)
    train(recipe, "--output_dir", str(resumed), "--resume_from_checkpoint", "auto")
    expected, got = steps(full), steps(resumed)
    assert sorted(got) == [3, 6] and expected[6]["loss"] != 0
    assert got[6] == expected[6]


# Dynamic sampling: groups of 2 whose lengths tie are dropped and refilled from prompts drawn by (seed, step, round).
DYNAMIC = {"dynamic_sampling": True, "max_resample_rounds": 2, "max_completion_length": 1}


@pytest.mark.parametrize(("steps_per_generation", "num_iterations", "stop"), CYCLES)
def test_a_resumed_run_with_dynamic_sampling_matches_the_uninterrupted_one(
    uninterrupted, tmp_path, steps_per_generation, num_iterations, stop
):
    recipe, full = uninterrupted(steps_per_generation, num_iterations, **DYNAMIC)
    resumed = resume_copy(full, stop, tmp_path)
    train(recipe, "--output_dir", str(resumed), "--resume_from_checkpoint", "auto")
    expected, got = steps(full), steps(resumed)
    assert any(entry.get("dynamic_sampling/rounds", 0) >= 1 for entry in expected.values())
    for step in range(stop + 1, 7):
        assert got[step] == expected[step], f"step {step} differs after resuming from step {stop}"
    assert same_weights(resumed, full)


def test_a_checkpoint_without_buffered_generations_resumes_as_stock_trl_with_a_warning(
    uninterrupted, tmp_path, caplog
):
    """The control for the test above: TRL's own resume samples the cycle anew, and the run differs."""
    recipe, full = uninterrupted(2, 1)
    resumed = resume_copy(full, 3, tmp_path)
    for name in ("rollout_state_0.pt", MANIFEST):  # as a checkpoint written by stock TRL
        (resumed / "checkpoint-3" / name).unlink()
    with caplog.at_level(logging.WARNING):
        train(recipe, "--output_dir", str(resumed), "--resume_from_checkpoint", "auto")
    assert "without its buffered generations: it has no rollout_state_0.pt" in caplog.text
    expected, got = steps(full), steps(resumed)
    assert sorted(got) == list(range(1, 7))
    assert got[4] != expected[4]
    assert "reward" in got[4] and "reward" not in expected[4]  # generated at step 4, mid-cycle


def test_changing_steps_per_generation_on_resume_regenerates_with_a_warning(uninterrupted, tmp_path, caplog):
    recipe, full = uninterrupted(2, 1)
    resumed = resume_copy(full, 3, tmp_path)
    with caplog.at_level(logging.WARNING):
        train(recipe, "--output_dir", str(resumed), "--resume_from_checkpoint", "auto", "--steps_per_generation", "1")
    assert "'steps_per_generation': 2" in caplog.text and "'steps_per_generation': 1" in caplog.text
    assert sorted(steps(resumed)) == list(range(1, 7))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_auto_skips_a_truncated_newest_checkpoint_and_says_so(uninterrupted, tmp_path, caplog):
    recipe, full = uninterrupted(1, 1)
    run = tmp_path / "run"
    shutil.copytree(full, run)
    for step in (5, 6):
        shutil.rmtree(run / f"checkpoint-{step}")  # as if stopped after step 4
    truncate(run / "checkpoint-4" / "model.safetensors")
    with caplog.at_level(logging.INFO):
        train(recipe, "--output_dir", str(run), "--resume_from_checkpoint", "auto")
    assert "Skipping damaged checkpoint" in caplog.text and "checkpoint-4: model.safetensors is" in caplog.text
    assert "resuming from " + str(run / "checkpoint-3") in caplog.text
    assert sorted(steps(run)) == list(range(1, 7))
    assert same_weights(run, full)  # steps 4 to 6 were trained again, as the uninterrupted run did
    assert checkpoint_problem(run / "checkpoint-4") is None  # the damaged one was replaced by this run's


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda c: truncate(c / "model.safetensors"), "model.safetensors is"),
        (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt is"),
        (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
        (lambda c: (c / "trainer_state.json").write_text("{"), "trainer_state.json is 1 bytes"),
        (lambda c: (c / MANIFEST).unlink() or (c / "trainer_state.json").write_text("{"), "unreadable trainer_state"),
        (lambda c: (c / MANIFEST).unlink() or truncate(c / "optimizer.pt"), "optimizer.pt is not a complete archive"),
        (lambda c: (c / MANIFEST).unlink() or truncate(c / "model.safetensors"), "model.safetensors is"),
    ],
    ids=[
        "weights",
        "optimizer",
        "missing-file",
        "state",
        "no-manifest-state",
        "no-manifest-optimizer",
        "no-manifest-weights",
    ],
)
def test_damaged_checkpoints_are_named_with_their_fault(uninterrupted, tmp_path, damage, reason):
    _, full = uninterrupted(1, 1)
    checkpoint = shutil.copytree(full / "checkpoint-2", tmp_path / "checkpoint-2")
    assert checkpoint_problem(checkpoint) is None
    damage(checkpoint)
    assert reason in checkpoint_problem(checkpoint)
    with pytest.raises(ValueError, match="cannot be resumed from"):
        train(write_recipe(tmp_path), "--resume_from_checkpoint", str(checkpoint))


def test_an_interrupted_save_is_never_resumed_from_and_is_cleaned_up(uninterrupted, tmp_path, caplog):
    recipe, full = uninterrupted(1, 1)
    run = resume_copy(full, 2, tmp_path)
    partial = shutil.copytree(full / "checkpoint-6", run / STAGING_DIR / "checkpoint-6")  # killed while renaming
    (partial / "optimizer.pt").unlink()
    assert latest_checkpoint(run) == run / "checkpoint-2"
    with caplog.at_level(logging.INFO):
        train(recipe, "--output_dir", str(run), "--resume_from_checkpoint", "auto", "--max_steps", "3")
    assert f"Removing {partial}: a checkpoint whose writing was interrupted" in caplog.text
    assert not (run / STAGING_DIR).exists()
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def test_save_total_limit_never_deletes_the_only_good_checkpoint(uninterrupted, tmp_path, caplog):
    _, full = uninterrupted(1, 1)
    for step in (1, 2, 3):
        shutil.copytree(full / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    for step in (2, 3):
        truncate(tmp_path / f"checkpoint-{step}" / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        rotate_checkpoints(tmp_path, save_total_limit=1)
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]
    assert "Keeping " + str(tmp_path / "checkpoint-1") in caplog.text
    rotate_checkpoints(tmp_path, save_total_limit=2)  # two kept, and one of them good: as transformers does
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]


def test_save_total_limit_in_a_run_keeps_the_newest(tmp_path):
    recipe = write_recipe(tmp_path, max_steps=3, save_total_limit=2)
    train(recipe)
    run = tmp_path / "run"
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert all(checkpoint_problem(path) is None for path in run.glob("checkpoint-*"))


def start_training(recipe: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "vlm_rl.train", "--config", str(recipe)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def step_logged(log: Path) -> bool:
    """Whether the console shows a logged training step (`step N/M | ...`, one line per logging step)."""
    return re.search(r"^step \d+/\d+ \|", log.read_text(), re.MULTILINE) is not None


def wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"training exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def test_sigterm_saves_a_checkpoint_stops_and_auto_resumes_to_the_last_step(tmp_path):
    recipe = write_recipe(tmp_path, max_steps=40, save_strategy="no")
    run = tmp_path / "run"
    log = tmp_path / "train.log"
    process = start_training(recipe, log)
    try:
        wait_for(lambda: step_logged(log), process, log)  # training is under way
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        process.kill()
    text = log.read_text()
    assert "SIGTERM received: saving a checkpoint after the current optimizer step" in text
    (checkpoint,) = run.glob("checkpoint-*")
    stopped_at = int(checkpoint.name.removeprefix("checkpoint-"))
    assert 1 <= stopped_at < 40
    assert f"Stopped by SIGTERM after step {stopped_at}; checkpoint saved in {checkpoint}" in text
    assert "--resume_from_checkpoint auto" in text
    assert checkpoint_problem(checkpoint) is None
    assert not (run / "model.safetensors").exists()  # the run is not finished: no final model

    train(recipe, "--resume_from_checkpoint", "auto")
    assert sorted(steps(run)) == list(range(1, 41))
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 40


SLOW_REWARD = '''
import time


def slow(completions, **kwargs):
    """Long enough for two signals to arrive within one step."""
    time.sleep(1.0)
    return [0.0] * len(completions)
'''


def test_a_second_signal_exits_at_once_without_a_checkpoint(tmp_path):
    (tmp_path / "slow_reward.py").write_text(SLOW_REWARD)
    recipe = write_recipe(tmp_path, max_steps=40, save_strategy="no", reward_funcs=["slow_reward.py:slow"])
    log = tmp_path / "train.log"
    process = start_training(recipe, log)
    try:
        wait_for(lambda: step_logged(log), process, log)
        process.send_signal(signal.SIGINT)
        wait_for(lambda: "SIGINT received" in log.read_text(), process, log, timeout=30)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 128 + signal.SIGINT
    finally:
        process.kill()
    assert "second SIGINT: exiting now" in log.read_text()
    assert not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "idefics3", "llava", "gemma3"])
def test_resume_loads_the_checkpoint_weights_in_every_family(tmp_path, family):
    """transformers 5 saves these families' weights under their original names, which HF's own resume matched to
    none of the model's parameters: it trained on from the base weights after a warning."""
    recipe = write_recipe(
        tmp_path, model_name_or_path=f"tiny:{family}", max_steps=2, reward_funcs=["length_reward.py:length"]
    )
    train(recipe)
    run = tmp_path / "run"
    assert not same_weights(run / "checkpoint-1", run / f"tiny-{family}")  # the step changed the weights
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(run / f"tiny-{family}", resumed / f"tiny-{family}")
    shutil.copytree(run / "checkpoint-1", resumed / "checkpoint-1")
    train(recipe, "--output_dir", str(resumed), "--resume_from_checkpoint", "auto")
    assert same_weights(resumed, run)


def test_the_progress_bar_of_a_resumed_run_starts_at_its_step(uninterrupted, tmp_path, capfd):
    recipe, full = uninterrupted(1, 1)
    resumed = resume_copy(full, 4, tmp_path)
    capfd.readouterr()
    train(recipe, "--output_dir", str(resumed), "--resume_from_checkpoint", "auto", "--disable_tqdm", "false")
    frames = [frame for frame in re.split(r"[\r\n]", capfd.readouterr().err) if re.search(r"\b\d/6 \[", frame)]
    assert frames, "no training bar drawn"
    assert re.search(r"\b4/6 \[", frames[0]) and re.search(r"\b6/6 \[", frames[-1]), frames


@pytest.mark.parametrize(
    ("length", "last", "end"),
    [
        ({"max_steps": 2}, 2, "max_steps=2"),
        ({"max_steps": -1, "num_train_epochs": 1}, 3, "num_train_epochs=1"),
        ({"max_steps": 2, "save_strategy": "no"}, 2, "max_steps=2"),  # the final trainer_state.json says so
    ],
    ids=["max_steps", "epochs", "no_checkpoints"],
)
def test_a_finished_run_relaunched_does_nothing_and_says_so(length, last, end, tmp_path, caplog):
    recipe = write_recipe(tmp_path, **length)  # an epoch: 3 steps
    train(recipe)
    run = tmp_path / "run"
    state, model = (run / "trainer_state.json").read_text(), weights(run)
    with caplog.at_level(logging.WARNING, logger="vlm_rl"):
        cli_main(["train", "--config", str(recipe), "--resume_from_checkpoint", "auto"])  # returns: exit status 0
    assert f"The run in {run} already finished (step {last}, {end}): nothing to train" in caplog.text
    assert f"--max_steps {2 * last}" in caplog.text  # how to train longer
    assert not (run / f"checkpoint-{last + 1}").exists() and (run / "trainer_state.json").read_text() == state
    assert all(torch.equal(tensor, model[name]) for name, tensor in weights(run).items())
    if length.get("save_strategy") != "no":
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vlm_rl"):  # the final checkpoint named by path: the same
            train(recipe, "--resume_from_checkpoint", str(run / f"checkpoint-{last}"))
        assert "already finished" in caplog.text and not (run / f"checkpoint-{last + 1}").exists()


def test_raising_max_steps_on_resume_follows_the_longer_schedule_and_warns(uninterrupted, tmp_path, caplog):
    _, full = uninterrupted(1, 1)  # six steps, planned as six from the start
    recipe = write_recipe(tmp_path, max_steps=2)
    train(recipe)
    with caplog.at_level(logging.WARNING, logger="vlm_rl"):
        train(recipe, "--resume_from_checkpoint", "auto", "--max_steps", "6")
    assert (
        "saved by a run of max_steps=2, with max_steps=6: the linear learning-rate schedule is rebuilt" in caplog.text
    )
    resumed = {step: entry["learning_rate"] for step, entry in steps(tmp_path / "run").items()}
    planned = {step: entry["learning_rate"] for step, entry in steps(full).items()}
    assert resumed[3] > 0  # not the 0.0 the two-step schedule ended at
    assert [resumed[step] for step in range(3, 7)] == [planned[step] for step in range(3, 7)]


def test_a_python_trainer_resumed_for_more_steps_follows_the_longer_schedule(load_tiny, tmp_path):
    def rates(trainer) -> dict[int, float]:
        return {
            entry["step"]: entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry
        }

    planned = shapes_trainer(*load_tiny("qwen2_vl"), tmp_path / "planned", max_steps=4)
    planned.train()
    short = shapes_trainer(*load_tiny("qwen2_vl"), tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2)
    short.train()
    longer = shapes_trainer(*load_tiny("qwen2_vl"), tmp_path / "run", max_steps=4)
    longer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert [rates(longer)[step] for step in (3, 4)] == [rates(planned)[step] for step in (3, 4)]
