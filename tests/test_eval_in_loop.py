"""In-loop evaluation: every `eval_steps`, TRL's evaluation loop samples on the held-out rows and logs each reward's
mean and `eval_accuracy`, from the held-out rows only."""

import json

import yaml
from test_data import png, write_jsonl
from test_data_training import TINY_RUN

from vlm_rl.train import main as train_main

MARKER_REWARD = '''
def held_out(completions, split, **kwargs):
    """1.0 for a held-out row, 0.0 for a training row: shows which rows a logged mean came from."""
    return [1.0 if s == "eval" else 0.0 for s in split]
'''


def test_eval_steps_log_per_reward_means_and_accuracy_from_the_held_out_rows(tmp_path):
    for split in ("train", "eval"):
        rows = [
            {"question": "Which color?", "answer": color, "split": split, "images": [f"img/{split}{i}.png"]}
            if i % 2
            else {"question": f"Say {color}.", "answer": color, "split": split}
            for i, color in enumerate(["red", "green", "blue", "red"])
        ]
        for i, row in enumerate(rows):
            if "images" in row:
                png(tmp_path / f"img/{split}{i}.png", row["answer"])
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    (tmp_path / "marker.py").write_text(MARKER_REWARD)
    recipe = {
        **TINY_RUN,
        "model_name_or_path": "tiny:qwen2_vl",
        "dataset": "train.jsonl",
        "eval_dataset": "eval.jsonl",
        "prompt_template": "{question}",
        "reward_funcs": ["accuracy", "marker.py:held_out"],
        "eval_strategy": "steps",
        "eval_steps": 1,
        "max_steps": 2,
        "final_eval": False,
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    train_main(["--config", str(tmp_path / "recipe.yaml")])

    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    evals = [entry for entry in history if "eval_reward" in entry]
    trains = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in evals] == [1, 2] and [entry["step"] for entry in trains] == [1, 2]
    for entry in evals:
        assert entry["eval_rewards/held_out/mean"] == 1.0  # every scored row was a held-out row
        assert entry["eval_rewards/accuracy/mean"] == entry["eval_accuracy"]
        assert 0.0 <= entry["eval_accuracy"] <= 1.0
        assert entry["eval_rewards/accuracy/count"] == 4  # per eval batch: 2 held-out prompts x num_generations
    for entry in trains:
        assert entry["rewards/held_out/mean"] == 0.0
        assert entry["accuracy"] == entry["rewards/accuracy/mean"]


def test_eval_on_start_evaluates_before_the_first_step_without_eval_steps(tmp_path):
    """transformers runs `eval_on_start` whatever `eval_strategy` says; the trainer must get the held-out rows for it
    (they were left out with `eval_strategy: no`, and the run failed: "evaluation requires an eval_dataset")."""
    recipe = {
        **TINY_RUN,
        "model_name_or_path": "tiny:qwen2_vl",
        "dataset": "synthetic:shapes",
        "train_size": 8,
        "eval_size": 2,
        "eval_strategy": "no",
        "eval_on_start": True,
        "final_eval": False,
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    train_main(["--config", str(tmp_path / "recipe.yaml")])
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_accuracy" in entry] == [0]
