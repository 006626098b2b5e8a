"""What a run reports to experiment trackers: wandb (offline, read back from its run files) and the console."""

import contextlib
import json
import math
import os
import re
import sqlite3
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from PIL import Image
from test_data import png, write_jsonl
from test_data_training import TINY_RUN
from wandb_records import history, tables

from vlm_rl.train import main as train_main

COLORS = ("red", "green", "blue")


def mixed_image_rows(directory):
    """Rows with 0, 1 and 2 images; each prompt says how many, so a table row can be checked against it."""
    rows = []
    for index in range(6):
        count = index % 3
        images = [
            png(directory / f"img/{index}_{k}.png", COLORS[(index + k) % 3], size=(24 + 8 * k, 16)).name
            for k in range(count)
        ]
        row = {"question": f"Row {index} has {count} images. Which color?", "answer": COLORS[index % 3]}
        if images:
            row["images"] = [f"img/{name}" for name in images]
        rows.append(row)
    return write_jsonl(directory / "train.jsonl", rows)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),  # where the tables' files are staged
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_PROJECT": "vlm-rl-tests",
        "WANDB_SILENT": "true",
    }.items():
        monkeypatch.setenv(name, value)
    yield wandb
    if wandb.run is not None:
        wandb.finish()
    # wandb keeps its settings (the run directory among them) for the process: the next test's run must get its own.
    wandb.teardown()


def write_recipe(tmp_path, report_to: list[str]):
    """Two logged steps on rows with 0, 1 and 2 images, completions logged, reported to `report_to`."""
    data = mixed_image_rows(tmp_path)
    recipe = {
        **TINY_RUN,
        "model_name_or_path": "tiny:qwen2_vl",
        "dataset": str(data),
        "prompt_template": "{question}",
        "per_device_train_batch_size": 12,  # every row, twice, in each step
        "max_steps": 2,
        "report_to": report_to,
        "log_completions": True,
        "final_eval": False,
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "recipe.yaml"


def check_completion_rows(rows: list[dict], step: int, image_file) -> None:
    """Every row of one step's table: its own images, in their own columns, beside its text, reward and advantage."""
    assert len(rows) == 12 and {row["step"] for row in rows} == {step}
    assert {"accuracy", "advantage", "image_1", "image_2"} <= set(rows[0]) and "image_3" not in rows[0]
    seen_counts = set()
    for row in rows:
        count = int(re.search(r"has (\d) images", row["prompt"]).group(1))
        seen_counts.add(count)
        cells = [row[f"image_{k}"] for k in (1, 2)]
        assert row["num_images"] == count == row["prompt"].count("<image>")
        assert [cell is not None for cell in cells] == [k < count for k in range(2)], row
        for k, cell in enumerate(cells[:count]):
            with Image.open(image_file(cell)) as image:  # the image itself, at its own size
                assert image.size == (24 + 8 * k, 16)
        assert isinstance(row["accuracy"], int | float) and isinstance(row["advantage"], int | float)
    assert seen_counts == {0, 1, 2}


def test_wandb_gets_scalars_and_a_completions_table_per_step_with_every_image(tmp_path, offline_wandb):
    train_main(["--config", str(write_recipe(tmp_path, ["wandb"]))])  # stock TRL 1.16: TypeError in wandb.Table
    offline_wandb.finish()

    scalars = [row for row in history(tmp_path) if "train/reward" in row]
    assert [row["train/global_step"] for row in scalars] == [1, 2]
    for key in ("train/loss", "train/rewards/accuracy/mean", "train/timing/rollout_s", "train/timing/update_s"):
        assert all(isinstance(row.get(key), int | float) and math.isfinite(row[key]) for row in scalars), key

    logged = tables(tmp_path, "completions")
    assert len(logged) == 2  # one per logging step, none overwritten, no repeat from the end-of-run log line
    for step, (table, files) in enumerate(logged, start=1):
        assert table["columns"][:4] == ["step", "prompt", "completion", "num_images"]
        rows = [dict(zip(table["columns"], values, strict=True)) for values in table["data"]]
        check_completion_rows(rows, step, lambda cell, files=files: files[cell["path"]])

    parquet = sorted((tmp_path / "run" / "completions").glob("*.parquet"))
    assert [path.name for path in parquet] == ["completions_00001.parquet", "completions_00002.parquet"]
    frame = pd.read_parquet(parquet[-1])
    assert frame["prompt"].map(type).eq(str).all() and len(frame) == 12
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["global_step"] == 2


@pytest.mark.scale  # a training run in a subprocess (13 s): with the other end-to-end runs
def test_trackio_gets_the_tables_and_tensorboard_the_scalars(tmp_path):
    pytest.importorskip("trackio")
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    # trackio reads TRACKIO_DIR once, when imported: the run gets a process of its own.
    recipe = write_recipe(tmp_path, ["trackio", "tensorboard"])
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "vlm_rl.cli", "train", "--config", str(recipe)], env=env, check=True, timeout=300
    )

    (database,) = (tmp_path / "trackio").glob("*.db")
    with contextlib.closing(sqlite3.connect(database)) as connection:
        logged = [json.loads(metrics) for (metrics,) in connection.execute("SELECT metrics FROM metrics ORDER BY id")]
    logged = [entry["completions"]["_value"] for entry in logged if "completions" in entry]
    assert len(logged) == 2
    for step, rows in enumerate(logged, start=1):
        check_completion_rows(rows, step, lambda cell: tmp_path / "trackio" / "media" / cell["file_path"])

    (events,) = (tmp_path / "run" / "runs").glob("*/events.out.tfevents.*")
    scalars = event_accumulator.EventAccumulator(str(events)).Reload()
    assert [event.step for event in scalars.Scalars("train/reward")] == [1, 2]
    assert len(scalars.Scalars("train/timing/rollout_s")) == 2


@pytest.mark.scale  # a training run in a subprocess (13 s): with the other end-to-end runs
def test_console_bar_shows_step_reward_and_eta_and_the_logs_time_each_phase(tmp_path):
    recipe = write_recipe(tmp_path, [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "vlm_rl.cli", "train", "--config", str(recipe), "--disable_tqdm", "false"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=300)
    # tqdm redraws with carriage returns; the last frame of the training bar: 2/2 steps, elapsed<remaining, reward.
    frames = [frame for frame in re.split(r"[\r\n]", result.stderr) if re.search(r"\b2/2 \[", frame)]
    assert frames and re.search(r"\[\d\d:\d\d<\d\d:\d\d, .*reward=[-\d.e]+", frames[-1]), frames[-1:]

    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:
        phases = [entry[f"timing/{phase}_s"] for phase in ("rollout", "scoring", "update")]
        assert all(seconds > 0 for seconds in phases), entry
        # The three phases are the step: TRL's own step_time measures the same span.
        assert sum(phases) == pytest.approx(entry["step_time"], rel=0.05)


FRAME_SHADES = (0, 80, 160, 240)  # a video row's frames, in order: grey levels a frame strip must show left to right


def test_wandb_tables_show_a_video_row_as_a_frame_strip_beside_its_images(tmp_path, offline_wandb):
    frames = [
        png(tmp_path / f"clip/{k}.png", (shade,) * 3, size=(56, 56)).name for k, shade in enumerate(FRAME_SHADES)
    ]
    still = png(tmp_path / "still.png", "red", size=(24, 16)).name
    rows = [
        {"question": "Which way?", "answer": "red", "videos": [f"clip/{name}" for name in frames]},
        {"question": "Same?", "answer": "red", "images": [still], "videos": [f"clip/{name}" for name in frames]},
        {"question": "Color?", "answer": "red", "images": [still]},
        {"question": "Say red.", "answer": "red"},
    ]
    recipe = {
        **TINY_RUN,
        "model_name_or_path": "tiny:qwen2_vl",
        "dataset": str(write_jsonl(tmp_path / "train.jsonl", rows)),
        "prompt_template": "{question}",
        "per_device_train_batch_size": 8,  # every row, twice
        "video_max_pixels": 56 * 56,
        "report_to": ["wandb"],
        "log_completions": True,
        "final_eval": False,
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    train_main(["--config", str(tmp_path / "recipe.yaml")])
    offline_wandb.finish()

    ((table, files),) = tables(tmp_path, "completions")
    logged = [dict(zip(table["columns"], values, strict=True)) for values in table["data"]]
    assert len(logged) == 8 and "image_3" not in table["columns"]
    for row in logged:
        videos, images = row["prompt"].count("<video>"), row["prompt"].count("<image>")
        assert (row["num_videos"], row["num_images"]) == (videos, images)
        assert videos == int(row["prompt"].endswith(("Which way?", "Same?"))), row["prompt"]
        cells = [row[f"image_{k}"] for k in (1, 2)]
        assert [cell is not None for cell in cells] == [k < images + videos for k in range(2)], row
        if not videos:
            continue
        with Image.open(files[cells[images]["path"]]) as strip:  # after the row's images: the video, frames in order
            assert strip.size == (4 * 56, 56)
            shades = [strip.convert("L").getpixel((56 * k + 28, 28)) for k in range(4)]
        assert shades == pytest.approx(FRAME_SHADES, abs=2)
