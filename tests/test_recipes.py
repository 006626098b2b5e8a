"""Every shipped recipe loads and runs one optimizer step with the tiny model of its family.

Each recipe is copied next to a few rows of data in exactly the format its header describes, at the paths it
names, and run with only what cannot run here overridden: the model (the tiny one of the same family), vLLM,
bf16 and the sizes. Rewards, column mapping, prompt template, image-size bounds, freezing, gradient checkpointing
and the rest run as written.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from test_data import png, write_jsonl

from vlm_rl.config import check_recipe
from vlm_rl.data.export import main as export_shapes
from vlm_rl.train import main as train_main

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def refcoco(directory: Path) -> None:
    for split in ("train", "val"):
        rows = [
            {"image": f"images/{split}{i}.png", "expression": f"the {color} box", "box": [4, 6, 30 + i, 28]}
            for i, color in enumerate(["red", "blue", "green", "red"])
        ]
        for row in rows:
            png(directory / "data/refcoco" / row["image"], size=(48, 40))
        write_jsonl(directory / f"data/refcoco/{split}.jsonl", rows)


def geometry3k(directory: Path) -> None:
    for split in ("train", "test"):
        rows = [
            {
                "images": [f"images/{split}{i}.png"] * (1 + i % 2),
                "problem": f"Find x if 2x = {2 * i}.",
                "answer": str(i),
            }
            for i in range(4)
        ]
        for i in range(4):
            png(directory / f"data/geometry3k/images/{split}{i}.png", size=(40, 40))
        write_jsonl(directory / f"data/geometry3k/{split}.jsonl", rows)


def clevr_count(directory: Path) -> None:
    for split in ("train", "val"):
        rows = [
            {"image": f"images/{split}{i}.png", "question": "How many cubes are there?", "answer": str(i + 1)}
            for i in range(4)
        ]
        for row in rows:
            png(directory / "data/clevr_count" / row["image"], "gray", size=(48, 32))
        write_jsonl(directory / f"data/clevr_count/{split}.jsonl", rows)


def multiple_choice(directory: Path) -> None:
    for split in ("train", "val"):
        rows = [
            {
                "image": f"images/{split}{i}.png",
                "question": "Which is red?",
                "choices": "A. sky\nB. apple",
                "answer": "B",
            }
            for i in range(4)
        ]
        for row in rows:
            png(directory / "data/mcq" / row["image"], size=(40, 40))
        write_jsonl(directory / f"data/mcq/{split}.jsonl", rows)


def shapes_jsonl(directory: Path) -> None:
    export_shapes(["--output_dir", str(directory / "data/shapes_jsonl"), "--train_size", "8", "--eval_size", "4"])


# Recipe file -> (the tiny model of its family, what writes its data (None: synthetic data, built in code), and
# what else must change for the tiny model).
RECIPE_SETUPS = {
    "demo_cpu.yaml": ("qwen2_vl", None, {}),
    "grounding_math_cpu.yaml": ("qwen2_5_vl", None, {}),
    "local_jsonl_cpu.yaml": ("qwen2_vl", shapes_jsonl, {}),
    "qwen2_5_vl_3b_rec_grounding.yaml": ("qwen2_5_vl", refcoco, {}),
    "qwen2_5_vl_7b_geometry.yaml": ("qwen2_5_vl", geometry3k, {}),
    "qwen3_vl_counting.yaml": ("qwen3_vl", clevr_count, {}),
    # The tiny SmolVLM's tiles are 32 px, not 512: the recipe's 512 px bound would make 256 tiles per image.
    "smolvlm_small_gpu.yaml": ("smolvlm", multiple_choice, {"max_pixels": "4096"}),
}

# What cannot run on this CPU: the real model, vLLM, bf16; and sizes, for one short step.
ONE_STEP = {
    "use_vllm": "false",
    "bf16": "false",
    "use_cpu": "true",
    "dtype": "float32",
    "max_steps": "1",
    "num_generations": "2",
    "per_device_train_batch_size": "2",
    "gradient_accumulation_steps": "1",
    "steps_per_generation": "1",
    "per_device_eval_batch_size": "2",
    "max_completion_length": "4",
    "logging_steps": "1",
    "eval_strategy": "no",
    "save_strategy": "no",
    "final_eval": "false",
    "plot": "false",
    "report_to": "none",
    "disable_tqdm": "true",
    "train_size": "8",
}


def test_every_recipe_has_a_setup_here():
    names = {path.name for path in RECIPES}
    assert names == set(RECIPE_SETUPS), f"recipes without a data builder in this file: {names - set(RECIPE_SETUPS)}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.stem)
def test_recipe_keys_types_and_summary_line(path):
    check_recipe(path)  # unknown keys and values of the wrong type
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) <= 120, "the first line is the summary `vlm-rl recipes` shows"


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.stem)
def test_recipe_runs_one_step_with_the_tiny_model(path, tmp_path):
    family, write_data, tiny_overrides = RECIPE_SETUPS[path.name]
    recipe = shutil.copy(path, tmp_path / path.name)
    if write_data is not None:
        write_data(tmp_path)
    written = yaml.safe_load(path.read_text())
    overrides = {
        **ONE_STEP,
        **tiny_overrides,
        "model_name_or_path": f"tiny:{family}",
        "output_dir": str(tmp_path / "run"),
    }
    if written.get("dataset", "").startswith("synthetic:"):
        overrides["eval_size"] = "4"
    argv = ["--config", str(recipe)]
    for key, value in overrides.items():
        argv += [f"--{key}", value]
    train_main(argv)

    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    (step,) = [entry for entry in history if "loss" in entry]
    assert step["step"] == 1 and math.isfinite(step["loss"]) and math.isfinite(step["grad_norm"])
    names = [
        entry if isinstance(entry, str) else entry.get("name") or entry["reward"] for entry in written["reward_funcs"]
    ]
    for name in names:
        assert f"rewards/{name}/count" in step, f"{path.name}: reward {name!r} was not run"
    assert sum(step[f"rewards/{name}/count"] for name in names) > 0  # the step's completions were scored
