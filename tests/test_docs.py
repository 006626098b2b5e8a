"""The code in the README and docs/ runs: Python blocks are executed, `vlm-rl train` commands parse."""

import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import small_config
from PIL import Image

from vlm_rl.config import parse_recipe
from vlm_rl.data import make_shapes_dataset
from vlm_rl.rewards import REWARD_REGISTRY, load_rewards, resolve_reward
from vlm_rl.rewards.accuracy import accuracy

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.DOTALL)


def test_rewards_doc_examples_run():
    namespace = {}
    for block in code_blocks(REPO / "docs/rewards.md", "python"):
        exec(block, namespace)
    try:
        completions = [[{"role": "assistant", "content": "It is red."}], [{"role": "assistant", "content": "blue"}]]
        assert namespace["mentions_answer"](prompts=[], completions=completions, answer=["red", "red"]) == [1.0, 0.0]
        assert resolve_reward("answer_is_short") is namespace["answer_is_short"]
        assert namespace["answer_is_short"](completions=completions) == [1.0, 1.0]
        boxes = [
            [{"role": "assistant", "content": "[1, 2, 30, 40]"}],
            [{"role": "assistant", "content": "[0, 0, 99, 9]"}],
        ]
        images = [[Image.new("RGB", (56, 40))], [Image.new("RGB", (56, 40))]]
        assert namespace["box_inside_image"](prompts=[], completions=boxes, images=images) == [1.0, 0.0]
        assert namespace["box_inside_image"](prompts=[], completions=boxes[:1], images=[[]]) == [None]
    finally:
        REWARD_REGISTRY.pop("answer_is_short", None)


def test_rewards_doc_recipes_of_built_ins_load():
    """Every `reward_funcs` example made of built-ins loads as written (names, keys and keywords checked)."""
    checked = 0
    for block in code_blocks(REPO / "docs/rewards.md", "yaml"):
        entries = yaml.safe_load(block).get("reward_funcs", [])
        references = [entry if isinstance(entry, str) else entry.get("reward") for entry in entries]
        if entries and all(reference in REWARD_REGISTRY for reference in references):
            load_rewards(entries)
            checked += 1
    assert checked >= 3


def test_trainer_doc_example_runs(load_tiny, tmp_path):
    (block,) = code_blocks(REPO / "docs/trainer.md", "python")
    model, processor = load_tiny("qwen2_vl")
    namespace = {
        "model": model,
        "processor": processor,
        "rewards": [accuracy],
        "config": small_config(tmp_path, max_steps=1),
        "dataset": make_shapes_dataset(4, text_fraction=0.5),
    }
    exec(block, namespace)
    namespace["trainer"].train()
    assert namespace["trainer"].state.global_step == 1


TRAIN_COMMANDS = [
    (path.name, line)
    for path in DOCS
    for block in code_blocks(path, "bash")
    for line in block.splitlines()
    if "vlm_rl.train" in line or line.startswith("vlm-rl train")
]


@pytest.mark.parametrize(("doc", "command"), TRAIN_COMMANDS)
def test_documented_train_commands_parse(doc, command, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = shlex.split(command)
    argv = argv[argv.index("vlm_rl.train") + 1 :] if "vlm_rl.train" in argv else argv[2:]
    # Raises on an unknown flag, value or recipe key. The GPU recipes' bf16 cannot be set up on this CPU.
    parse_recipe([*argv, "--bf16", "false", "--use_cpu", "true"])


def test_there_are_documented_commands_to_check():
    assert len(TRAIN_COMMANDS) >= 4


def test_models_doc_support_table_matches_the_adapters():
    from vlm_rl.models.support import documented_table, support_table

    assert documented_table(REPO / "docs/models.md") == support_table()


def test_models_doc_examples_run(tmp_path):
    for block in code_blocks(REPO / "docs/models.md", "python"):
        exec(block.replace("/tmp/vlm-rl-docs", str(tmp_path)), {})
    for block in code_blocks(REPO / "docs/models.md", "yaml"):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(block)
        model_args = parse_recipe(["--config", str(recipe), "--use_cpu", "true", "--bf16", "false"])[0]
        assert model_args.max_pixels is not None


def test_python_doc_examples_run(tmp_path, monkeypatch):
    """docs/python.md's blocks run in order, in one namespace, each training the tiny model it built."""
    monkeypatch.chdir(tmp_path)
    blocks = code_blocks(REPO / "docs/python.md", "python")
    assert len(blocks) >= 6
    namespace = {}
    try:
        for block in blocks:
            exec(block, namespace)
            trainer = namespace.get("trainer")
            assert trainer is None or trainer.state.global_step == 1
    finally:
        REWARD_REGISTRY.pop("is_short", None)
    assert [reward.__name__ for reward in namespace["trainer"].reward_funcs] == [
        "says_a_colour",
        "is_short",
        "short",
        "text_accuracy",
        "think_answer_format",
    ]
