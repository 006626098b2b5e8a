"""The `vlm-rl` command's own surface: its commands, their help, `vlm-rl recipes`, and mistakes in one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_data_training import TINY_RUN

from vlm_rl.cli import TINY_FAMILIES, build_parser, main
from vlm_rl.models import tiny_families

REPO = Path(__file__).resolve().parent.parent
COMMANDS = {"train", "sft", "eval", "plot", "tiny-model", "export", "recipes", "vllm-serve"}


def test_help_lists_every_command_with_a_line_each(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert f"    {command}" in text, command
    assert set(build_parser()._subparsers._group_actions[0].choices) == COMMANDS


@pytest.mark.parametrize("command", sorted(COMMANDS - {"train", "vllm-serve"}))
def test_each_command_has_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and f"usage: vlm-rl {command}" in capsys.readouterr().out


def test_recipes_lists_every_shipped_recipe_with_its_first_line(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    main(["recipes"])
    out = capsys.readouterr().out.splitlines()
    recipes = sorted(REPO.glob("recipes/*.yaml"))
    assert len(out) == 1 + len(recipes)
    for line, path in zip(out[1:], recipes, strict=True):
        summary = path.read_text().splitlines()[0].removeprefix("#").strip()
        assert line.split()[0] == path.name and line.rstrip().endswith(summary)


def test_recipes_reports_a_directory_without_recipes(tmp_path):
    with pytest.raises(SystemExit, match="holds no \\*.yaml recipe"):
        main(["recipes", "--dir", str(tmp_path)])


def test_tiny_model_help_lists_every_tiny_family(capsys):
    assert tuple(sorted(tiny_families())) == TINY_FAMILIES, "cli.TINY_FAMILIES must list the registered families"
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny-model", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    for family in TINY_FAMILIES:
        assert f"{family}," in text or f"{family} (docs/models.md)" in text, family


def test_tiny_model_refuses_an_unknown_family_before_building_anything(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny-model", "--family", "qwen9_vl", "--output_dir", str(tmp_path / "tiny")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'qwen9_vl'" in capsys.readouterr().err and not (tmp_path / "tiny").exists()


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "vlm_rl.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def recipe(directory: Path, **fields) -> str:
    path = directory / "recipe.yaml"
    path.write_text(
        yaml.safe_dump({**TINY_RUN, "dataset": "synthetic:shapes", "train_size": 4, "eval_size": 2, **fields})
    )
    return str(path)


# (command line, recipe fields, the error line's start); {tmp}: the test's directory, {model}: a full tiny model,
# {recipe}: a recipe of the fields given.
MISTAKES = [
    ("plot {tmp}/nowhere", {}, "vlm-rl plot: error: {tmp}/nowhere is not a directory: pass a run's output_dir."),
    ("plot {tmp}", {}, "vlm-rl plot: error: {tmp} has no trainer_state.json and no complete checkpoint-N"),
    (
        "export --checkpoint {model} --output_dir {tmp}/merged",
        {},
        "vlm-rl export: error: {model} holds no LoRA adapter (no adapter_config.json)",
    ),
    ("eval --model {tmp} --config {recipe}", {}, "vlm-rl eval: error: --model {tmp} holds no model"),
    (
        "train --config {recipe} --per_device_train_batch_size 3",
        {},
        "vlm-rl train: error: per_device_train_batch_size (3) x 1 process(es) x steps_per_generation (1) = 3 "
        "completions per generation, not a multiple of num_generations (2): set per_device_train_batch_size to 4",
    ),
    (
        "train --config {recipe}",
        {"model_name_or_path": "./models/missing"},
        "vlm-rl train: error: model_name_or_path './models/missing': no such directory (looked for "
        "{tmp}/models/missing",
    ),
    (
        "train --config {recipe}",
        {"model_name_or_path": "someone/missing"},
        "vlm-rl train: error: Model 'someone/missing' is neither a model directory (with a config.json) nor a model "
        "the Hugging Face Hub serves here",
    ),
    (
        "train --config {recipe} --eval_accuracy_reward acc",
        {},
        "vlm-rl train: error: eval_accuracy_reward='acc' is not among the recipe's rewards",
    ),
    (
        "vllm-serve --config {recipe}",
        {"model_name_or_path": "./models/missing"},
        "vlm-rl vllm-serve: error: model_name_or_path './models/missing': no such directory",
    ),
]


@pytest.mark.parametrize(
    ("command", "fields", "message"),
    MISTAKES,
    ids=[
        "plot-missing-dir",
        "plot-not-a-run",
        "export-full-model",
        "eval-no-model",
        "train-batch-size",
        "train-missing-model-dir",
        "train-model-nowhere",
        "train-eval-accuracy-reward",
        "serve-missing-model-dir",
    ],
)
def test_mistakes_are_reported_in_one_line_without_a_traceback(command, fields, message, tiny_dirs, tmp_path):
    places = {"tmp": tmp_path, "model": tiny_dirs["qwen2_vl"]}
    if "{recipe}" in command:
        places["recipe"] = recipe(tmp_path, **fields)
    result = run_cli(*command.format(**places).split(), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(message.format(**places)), last


def test_the_suggested_generation_batch_size_is_one_trl_accepts(tmp_path):
    from vlm_rl.config import RecipeError, VLMGRPOConfig

    settings = {"output_dir": str(tmp_path), "use_cpu": True, "bf16": False, "per_device_train_batch_size": 5}
    with pytest.raises(RecipeError, match=r"set generation_batch_size to 10\.") as error:
        VLMGRPOConfig(**settings, num_generations=2, generation_batch_size=7)
    assert "Traceback" not in str(error.value)
    VLMGRPOConfig(**settings, num_generations=2, generation_batch_size=10)  # the suggestion is accepted
