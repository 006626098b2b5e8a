"""Whole runs from recipe files: the CLI, accelerate launch, outputs, resume and start-up errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from vlm_rl.config import RecipeError, parse_recipe
from vlm_rl.rewards import RewardSpecError
from vlm_rl.train import main as train_main

REPO = Path(__file__).resolve().parent.parent
SMALL_RUN = {
    "model_name_or_path": "tiny:qwen2_vl",
    "dtype": "float32",
    "dataset": "synthetic:shapes",
    "train_size": 32,
    "eval_size": 8,
    "text_fraction": 0.25,
    "reward_funcs": ["accuracy", "think_answer_format"],
    "reward_weights": [1.0, 0.5],
    "num_generations": 2,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "max_completion_length": 3,
    "max_steps": 2,
    "use_cpu": True,
    "bf16": False,
    "gradient_checkpointing": False,
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 1,
    "report_to": "none",
    "disable_tqdm": True,
}


def write_recipe(directory: Path, **overrides) -> Path:
    recipe = {**SMALL_RUN, "output_dir": str(directory / "run"), **overrides}
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def trainer_state(run_dir: Path) -> dict:
    return json.loads((run_dir / "trainer_state.json").read_text())


def logged_steps(state: dict) -> list[int]:
    return [entry["step"] for entry in state["log_history"] if "loss" in entry]


def test_demo_recipe_parses_and_flags_override_it():
    model, data, rewards, training, path = parse_recipe(
        ["--config", str(REPO / "recipes/demo_cpu.yaml"), "--max_steps", "7", "--reward_funcs", "accuracy", "x.py:f"]
    )
    assert path == REPO / "recipes/demo_cpu.yaml"
    assert model.model_name_or_path == "tiny:qwen2_vl"
    assert data.dataset == "synthetic:shapes"
    assert training.max_steps == 7 and training.num_generations == 16  # flag wins, YAML elsewhere
    assert rewards.reward_funcs == ["accuracy", "x.py:f"]


def test_unknown_recipe_key_names_file_key_and_closest_field(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("learning_rat: 0.1\n")
    with pytest.raises(RecipeError, match=r"typo\.yaml: unknown key 'learning_rat'\. Did you mean 'learning_rate'\?"):
        parse_recipe(["--config", str(path)])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("learning_rate: fast", r"learning_rate must be a number, got 'fast' \(str\)"),
        ("max_steps: 2.5", r"max_steps must be an integer, got 2\.5 \(float\)"),
        ("use_peft: maybe", r"use_peft must be true or false, got 'maybe' \(str\)"),
        ("lora_target_modules: {q: 1}", "lora_target_modules must be a list of strings or null"),
        ("save_strategy: no", "save_strategy must be .* got False \\(bool\\)\\. YAML reads a bare no/yes"),
        ("dataset: [a.jsonl, b.jsonl]", "dataset must be a string, got \\['a.jsonl', 'b.jsonl'\\] \\(list\\)"),
    ],
)
def test_a_value_of_the_wrong_type_names_file_key_and_type(tmp_path, line, message):
    path = tmp_path / "typed.yaml"
    path.write_text(f"max_steps: 1\n{line}\n")
    with pytest.raises(RecipeError, match=rf"typed\.yaml: {message}"):
        parse_recipe(["--config", str(path)])


def test_valid_values_of_every_kind_pass_the_type_check(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(
        "use_cpu: true\nbf16: false\nlearning_rate: 3e-4\nmax_steps: 1\nuse_peft: true\n"
        "lora_target_modules: q_proj\nsave_strategy: 'no'\n"
        "report_to: [wandb, tensorboard]\nreward_weights: [1, 0.5]\ncolumn_mapping: {img: image}\n"
        "reward_funcs: [accuracy, {reward: iou, tasks: [g]}]\n"
    )
    _, data, rewards, training, _ = parse_recipe(["--config", str(path)])
    assert training.learning_rate == 3e-4 and training.report_to == ["wandb", "tensorboard"]
    assert data.column_mapping == {"img": "image"} and rewards.reward_funcs[1] == {"reward": "iou", "tasks": ["g"]}


def test_cli_reports_a_recipe_mistake_in_one_line(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("learning_rat: 0.1\n")
    vlm_rl = Path(sys.executable).with_name("vlm-rl")
    result = subprocess.run([str(vlm_rl), "train", "--config", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("unknown key 'learning_rat'. Did you mean 'learning_rate'?")
    result = subprocess.run(
        [str(vlm_rl), "train", "--config", str(path.with_name("missing.yaml")), "--max_steps", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "missing.yaml not found" in result.stderr and "Traceback" not in result.stderr


def test_bad_reward_fails_at_start_up_before_any_model_is_built(tmp_path):
    recipe = write_recipe(tmp_path, reward_funcs=["accuracy", "rewards/missing.py:score"])
    with pytest.raises(RewardSpecError, match=r"rewards/missing\.py"):
        train_main(["--config", str(recipe)])
    assert not (tmp_path / "run").exists()


def test_cli_stops_in_one_line_when_a_reward_needs_a_column_the_data_lacks(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "solution": str(i + 1)} for i in range(4)]  # VLM-R1's column name
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    synthetic_only = ("dataset", "train_size", "eval_size", "text_fraction")
    recipe_fields = {key: value for key, value in SMALL_RUN.items() if key not in synthetic_only}
    recipe_fields["output_dir"] = str(tmp_path / "run")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**recipe_fields, "dataset": "train.jsonl", "prompt_template": "{question}"}))
    vlm_rl = Path(sys.executable).with_name("vlm-rl")
    result = subprocess.run(
        [str(vlm_rl), "train", "--config", str(recipe)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("vlm-rl train: error: Reward 'accuracy' needs a dataset column 'answer'")
    assert "['prompt', 'images', 'question', 'solution']" in error and "column_mapping: {solution: answer}" in error
    assert not (tmp_path / "run").exists()


def test_cli_run_writes_checkpoints_state_plot_and_eval(tmp_path):
    recipe = write_recipe(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    vlm_rl = Path(sys.executable).with_name("vlm-rl")
    command = [str(vlm_rl), "train", "--config", str(recipe), "--hub_token", "hf_never_in_the_card"]
    subprocess.run(command, check=True, env=env, cwd=tmp_path, timeout=300)

    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert trainer_state(run)["global_step"] == 2
    with Image.open(run / "training_curves.png") as plot:
        assert plot.size[0] >= 600 and plot.size[1] >= 300
    # `vlm-rl plot` redraws it from trainer_state.json.
    (run / "training_curves.png").unlink()
    subprocess.run([str(vlm_rl), "plot", str(run)], check=True, env=env, timeout=120)
    assert (run / "training_curves.png").stat().st_size > 10_000
    results = json.loads((run / "eval_results.json").read_text())
    assert results["chance"] == 0.25 and results["num_rows"] == 8
    assert 0.0 <= results["accuracy"] <= 1.0 and 0.0 <= results["blind_accuracy"] <= 1.0
    assert set(results["rewards"]) == {"accuracy", "think_answer_format"}
    assert len((run / "eval_samples.jsonl").read_text().splitlines()) == 8
    # The model card: the recipe as run, its rewards with their weights, the data, the final metrics.
    card = (run / "README.md").read_text()
    assert "`tiny:qwen2_vl` post-trained with GRPO" in card and "pipeline_tag: image-text-to-text" in card
    assert "| `accuracy` | 1 | all rows |" in card and "| `think_answer_format` | 0.5 | all rows |" in card
    assert f"| accuracy | {results['accuracy']:.4g} |" in card and "| chance | 0.25 |" in card
    assert "| dataset | synthetic:shapes |" in card and "| held-out rows | 8 |" in card
    assert "max_steps: 2\n" in card and "learning_rate:" not in card  # only what the run was given
    assert "hub_token: <redacted>" in card and "hf_never_in_the_card" not in card
    assert "![Training curves](training_curves.png)" in card
    # The saved model reloads as a normal model directory.
    from vlm_rl.models import load_model_and_processor

    model, processor = load_model_and_processor(str(run))
    assert model.config.model_type == "qwen2_vl" and processor.tokenizer is not None


@pytest.mark.scale  # `accelerate launch` (about 18 s): with the launcher and multi-process tests
def test_accelerate_launch_runs_the_module_entry_point(tmp_path):
    recipe = write_recipe(tmp_path, final_eval=False, plot=False, save_strategy="no", max_steps=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(REPO / "launch/single_process.yaml")]
    subprocess.run([*command, "-m", "vlm_rl.train", "--config", str(recipe)], check=True, env=env, timeout=300)
    assert trainer_state(tmp_path / "run")["global_step"] == 1


def test_resume_from_path_and_auto_continue_the_step_count(tmp_path, caplog):
    recipe = str(write_recipe(tmp_path, final_eval=False, plot=False))
    run = tmp_path / "run"
    train_main(["--config", recipe])  # steps 1-2, checkpoints 1 and 2
    assert logged_steps(trainer_state(run)) == [1, 2]

    # From an explicit (older) checkpoint: steps 2-3 are trained again on top of checkpoint-1.
    train_main(["--config", recipe, "--resume_from_checkpoint", str(run / "checkpoint-1"), "--max_steps", "3"])
    state = trainer_state(run)
    assert state["global_step"] == 3 and logged_steps(state) == [1, 2, 3]

    # `auto` takes the newest complete checkpoint, skipping a broken newer one and saying so.
    broken = run / "checkpoint-9"
    broken.mkdir()
    (broken / "trainer_state.json").write_text("{truncated")
    with caplog.at_level("INFO", logger="vlm_rl"):
        train_main(["--config", recipe, "--resume_from_checkpoint", "auto", "--max_steps", "4"])
    assert "Skipping damaged checkpoint" in caplog.text and "checkpoint-9" in caplog.text
    assert "resuming from" in caplog.text and "checkpoint-3" in caplog.text
    state = trainer_state(run)
    assert state["global_step"] == 4 and logged_steps(state) == [1, 2, 3, 4]


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path, caplog):
    recipe = str(write_recipe(tmp_path, final_eval=False, plot=False, save_strategy="no", max_steps=1))
    with caplog.at_level("INFO", logger="vlm_rl"):
        train_main(["--config", recipe, "--resume_from_checkpoint", "auto"])
    assert "starting from scratch" in caplog.text
    assert trainer_state(tmp_path / "run")["global_step"] == 1


def test_resume_from_a_missing_checkpoint_is_an_error(tmp_path):
    recipe = str(write_recipe(tmp_path))
    with pytest.raises(FileNotFoundError, match="checkpoint-404"):
        train_main(["--config", recipe, "--resume_from_checkpoint", str(tmp_path / "checkpoint-404")])


def test_tiny_model_command_builds_a_reloadable_model(tmp_path):
    from vlm_rl.cli import main as cli_main
    from vlm_rl.models import load_model_and_processor

    cli_main(["tiny-model", "--family", "qwen2_5_vl", "--output_dir", str(tmp_path / "m")])
    model, processor = load_model_and_processor(str(tmp_path / "m"))
    assert model.config.model_type == "qwen2_5_vl"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    shutil.rmtree(tmp_path / "m")


FLAKY_REWARDS = '''
import time

CALLS = {"flaky": 0, "sleepy": 0}


def flaky(prompts, completions, **kwargs):
    """Raises on every third call."""
    CALLS["flaky"] += 1
    if CALLS["flaky"] % 3 == 0:
        raise RuntimeError("flaky reward is down")
    return [0.5] * len(completions)


def sleepy(prompts, completions, **kwargs):
    """Sleeps far past its time limit on every other call."""
    CALLS["sleepy"] += 1
    if CALLS["sleepy"] % 2 == 0:
        time.sleep(60)
    return [0.25] * len(completions)
'''


def test_failing_and_hanging_rewards_do_not_stop_the_run(tmp_path, caplog):
    (tmp_path / "lab_rewards.py").write_text(FLAKY_REWARDS)
    recipe = write_recipe(
        tmp_path,
        reward_funcs=["accuracy", "lab_rewards.py:flaky", {"reward": "lab_rewards.py:sleepy", "timeout": 0.5}],
        reward_weights=None,
        max_steps=4,
        save_strategy="no",
        final_eval=False,
    )
    with caplog.at_level("WARNING"):
        train_main(["--config", str(recipe)])
    state = trainer_state(tmp_path / "run")
    assert logged_steps(state) == [1, 2, 3, 4]
    last = [entry for entry in state["log_history"] if "loss" in entry][-1]
    assert last["rewards/flaky/failures"] > 0
    assert last["rewards/flaky/failures_error"] == last["rewards/flaky/failures"]
    assert last["rewards/sleepy/failures_timeout"] == 2 * 4  # calls 2 and 4, a batch of 4 samples each
    assert last["rewards/accuracy/failures"] == 0
    reports = [r.getMessage() for r in caplog.records]
    assert any("Reward 'flaky' failed on sample" in m and "flaky reward is down" in m for m in reports)
    assert any("Reward 'sleepy' failed on sample" in m and "time limit of 0.5 s" in m for m in reports)
    assert any("Reward 'flaky' failed on" in m and "samples during training" in m for m in reports)


def test_mixed_recipe_scores_each_row_only_with_its_own_rewards(tmp_path):
    recipe = REPO / "recipes/grounding_math_cpu.yaml"
    overrides = ["--train_size", "32", "--eval_size", "8", "--max_steps", "2", "--logging_steps", "1"]
    overrides += ["--max_completion_length", "8", "--save_strategy", "no", "--output_dir", str(tmp_path / "run")]
    train_main(["--config", str(recipe), *overrides])
    steps = [entry for entry in trainer_state(tmp_path / "run")["log_history"] if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:
        # Each reward scored only the rows of its own task, and some of them...
        assert entry["rewards/iou/math/count"] == 0 < entry["rewards/iou/grounding/count"]
        assert entry["rewards/math_accuracy/grounding/count"] == 0 < entry["rewards/math_accuracy/math/count"]
        # ...while the unrouted format reward scored every row.
        total = entry["rewards/answer_format/grounding/count"] + entry["rewards/answer_format/math/count"]
        assert entry["rewards/answer_format/count"] == total == 16
        assert entry["rewards/iou/count"] + entry["rewards/math_accuracy/count"] == total
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert set(results["rewards"]) == {"iou", "math_accuracy", "answer_format"}


@pytest.mark.scale  # two processes under `accelerate launch` (about 20 s): with the other multi-process tests
def test_per_task_reward_counts_over_two_processes(tmp_path):
    """Two CPU processes over gloo: counts cover the gathered batch once, not once per process."""
    recipe = write_recipe(
        tmp_path,
        text_fraction=0.0,  # every rank gets image rows (mixed multi-process batches: see issue 5's note)
        reward_funcs=[{"reward": "accuracy", "tasks": ["image"]}, "think_answer_format"],
        reward_weights=None,
        save_strategy="no",
        final_eval=False,
        plot=False,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "-m", "vlm_rl.train"]
    subprocess.run([*command, "--config", str(recipe)], check=True, env=env, timeout=300)
    steps = [entry for entry in trainer_state(tmp_path / "run")["log_history"] if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:  # 2 processes x 4 completions, each counted once
        assert entry["rewards/accuracy/count"] == entry["rewards/accuracy/image/count"] == 8
        assert entry["rewards/think_answer_format/image/count"] == 8


def test_recipe_freezing_and_pixel_bounds_reach_the_trained_model(tmp_path):
    """`freeze_vision_tower` and `max_pixels` from a recipe: the saved vision tower is the initial one, the saved
    processor keeps the bound, and the language model trained."""
    import torch

    from vlm_rl.models import adapter_for, load_model_and_processor

    # A reward with spread on a random policy, so that the step has non-zero advantages.
    (tmp_path / "spread.py").write_text(
        "def longer(completions, **kwargs):\n    return [float(len(c[0]['content'])) for c in completions]\n"
    )
    recipe = write_recipe(
        tmp_path, freeze_vision_tower=True, max_pixels=28 * 28, final_eval=False, plot=False, save_strategy="no",
        text_fraction=0.0, learning_rate=1e-2, reward_funcs=["spread.py:longer"], reward_weights=None,
    )  # fmt: skip
    train_main(["--config", str(recipe)])
    run = tmp_path / "run"
    initial, _ = load_model_and_processor(str(run / "tiny-qwen2_vl"))
    trained, processor = load_model_and_processor(str(run))
    adapter = adapter_for(trained.config)
    before = dict(initial.named_parameters())
    changed = {adapter.parameter_group(n) for n, p in trained.named_parameters() if not torch.equal(p, before[n])}
    assert "vision" not in changed and "language" in changed
    assert processor.image_processor.size["longest_edge"] == 28 * 28
    grid = processor.image_processor(images=[Image.new("RGB", (224, 224))], return_tensors="pt")["image_grid_thw"]
    assert int(grid.prod()) * 14 * 14 <= 28 * 28


def write_rows(directory: Path, prompts: list[str], images: list[int] | None = None) -> Path:
    """A JSONL data file with an image per row (`images`: how many per row; default one), and its images."""
    Image.new("RGB", (28, 28), (200, 30, 30)).save(directory / "red.png")
    images = images or [1] * len(prompts)
    rows = [{"prompt": p, "image": ["red.png"] * n, "answer": "red"} for p, n in zip(prompts, images, strict=True)]
    path = directory / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_prompt_longer_than_the_context_fails_at_its_row(tmp_path):
    """Unset `max_prompt_length` is the model's context length less `max_completion_length`."""
    from transformers import AutoConfig

    from vlm_rl.data import DataError
    from vlm_rl.models import build_tiny_model

    model = build_tiny_model("qwen2_vl", tmp_path / "model")
    config = AutoConfig.from_pretrained(model)
    config.get_text_config().max_position_embeddings = 200  # a 200-token context
    config.save_pretrained(model)
    write_rows(tmp_path, ["What colour is it?"] * 3 + ["What colour is it? " + "Look closely. " * 60])
    recipe = write_recipe(
        tmp_path,
        model_name_or_path=str(model),
        dataset="rows.jsonl",
        eval_size=None,
        train_size=None,
        final_eval=False,
    )
    with pytest.raises(
        DataError,
        match=r"rows\.jsonl.*line 4.*over the model's context length less "
        r"max_completion_length=197",
    ):
        train_main(["--config", str(recipe)])


def test_a_lora_card_says_so_records_resolved_settings_and_absolute_paths(tmp_path, monkeypatch):
    from vlm_rl.models import build_tiny_model

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    build_tiny_model("qwen2_vl", recipes / "models" / "tiny")
    write_rows(recipes, ["What colour is it?"] * 4)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths start from the recipe's directory
    recipe = write_recipe(
        recipes,
        model_name_or_path="models/tiny",  # relative, as data paths are
        dtype="auto",
        dataset="rows.jsonl",
        eval_size=None,
        train_size=None,
        reward_funcs=["accuracy", "iou"],
        reward_weights=None,
        use_peft=True,
        resume_from_checkpoint="auto",
        max_steps=1,
        save_strategy="no",
        final_eval=False,
        plot=False,
    )
    train_main(["--config", str(recipe)])
    run = recipes / "run"
    card = (run / "README.md").read_text()
    assert "holds a **LoRA adapter**" in card and "vlm-rl export --checkpoint path/to/run" in card
    assert "| `dtype: auto` | float32 |" in card
    assert "| `iou: box_format auto` | norm1000 (qwen2_vl) |" in card  # Qwen2-VL answers in 0-1000 coordinates
    assert "| `resume_from_checkpoint: auto` | none found: trained from the start |" in card
    assert "| `max_prompt_length: unset` | 4093 (the context length less max_completion_length) |" in card
    assert (
        f"`{recipes / 'models' / 'tiny'}` post-trained" in card and f"| dataset | {recipes / 'rows.jsonl'} |" in card
    )
    assert f"Relative paths in it start from the recipe's directory, `{recipes}`" in card
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(recipes / "models" / "tiny")  # exports from anywhere


def test_vllm_serve_reads_the_rows_training_reads_with_data_seed(tmp_path):
    """`vllm_limit_mm_per_prompt` comes from the rows in use: with `data_seed`, the same rows as training's."""
    from vlm_rl.config import parse_recipe
    from vlm_rl.data import load_task, most_images_per_row
    from vlm_rl.rollout.serve import server_args

    write_rows(tmp_path, ["What colour is it?"] * 4, images=[1, 1, 1, 3])  # only the last row has three
    recipe = write_recipe(tmp_path, dataset="rows.jsonl", eval_size=1, train_size=1)
    data_args = parse_recipe(["--config", str(recipe)])[1]

    def limit(seed: int) -> int:  # the rows training uses, held out with `seed`
        task = load_task(data_args, seed=seed, base_dir=tmp_path)
        return most_images_per_row(task.train, task.eval)

    seed = next(s for s in range(100) if limit(s) == 1)
    data_seed = next(s for s in range(100) if limit(s) == 3)
    args = server_args(["--config", str(recipe), "--seed", str(seed), "--data_seed", str(data_seed)])
    assert args[args.index("--limit-mm-per-prompt") + 1] == json.dumps({"image": 3})
