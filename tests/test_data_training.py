"""Training from local files with the real trainer: the recipe end to end, lazy loading, counted skips."""

import json
from pathlib import Path

import pytest
import yaml
from test_data import png, write_jsonl

from vlm_rl.data.export import main as export_main
from vlm_rl.train import main as train_main

REPO = Path(__file__).resolve().parent.parent
TINY_RUN = {
    "dtype": "float32",
    "reward_funcs": ["accuracy"],
    "num_generations": 2,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "max_completion_length": 2,
    "max_steps": 1,
    "logging_steps": 1,
    "use_cpu": True,
    "bf16": False,
    "gradient_checkpointing": False,
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
    "plot": False,
    "seed": 0,
}


def skipped_reasons(log_entry: dict) -> dict[str, int]:
    """The `data/skipped_rows_<reason>` counts of a logged step."""
    return {key.removeprefix("data/skipped_rows_"): n for key, n in log_entry.items() if "skipped_rows_" in key}


def run_recipe(directory: Path, **fields) -> dict:
    """Train from a recipe written to `directory`; returns trainer_state.json."""
    recipe = directory / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_RUN, "output_dir": str(directory / "run"), **fields}))
    train_main(["--config", str(recipe)])
    return json.loads((directory / "run" / "trainer_state.json").read_text())


def test_local_jsonl_recipe_trains_and_evaluates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's data paths start from the working directory here
    export_main(["--output_dir", "data/shapes_jsonl", "--train_size", "8", "--eval_size", "4"])
    small = [
        "--max_steps",
        "2",
        "--logging_steps",
        "1",
        "--num_generations",
        "2",
        "--per_device_train_batch_size",
        "4",
    ]
    small += ["--per_device_eval_batch_size", "4", "--output_dir", "run"]
    train_main(["--config", str(REPO / "recipes/local_jsonl_cpu.yaml"), *small])

    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    steps = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in steps] == [1, 2]
    assert all(entry["data/skipped_rows"] == 0 for entry in steps)
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert results["num_rows"] == 4 and results["chance"] is None
    assert 0 < results["num_image_rows"] <= 4 and set(results["rewards"]) == {"accuracy"}


def test_rows_load_lazily_so_unsampled_corrupt_images_never_matter(tmp_path, tiny_dirs):
    """200 rows whose image files are all corrupt but those of the first batches: training starts and steps.

    Up-front checks (a stat per path) pass; a single decode of an unsampled row, by TRL at init, by the reward
    routing check or by the data loader, would fail the run under `bad_rows: raise`.
    """
    rows = []
    for i in range(200):
        path = tmp_path / "images" / f"{i}.png"
        png(path) if i < 8 else path.write_bytes(b"not an image")
        rows.append({"question": f"Colour {i}?", "image": f"images/{i}.png", "answer": "red", "task": "image"})
    write_jsonl(tmp_path / "train.jsonl", rows)
    state = run_recipe(
        tmp_path,
        model_name_or_path=str(tiny_dirs["qwen2_vl"]),
        dataset=str(tmp_path / "train.jsonl"),
        prompt_template="{question}",
        reward_funcs=[{"reward": "accuracy", "tasks": ["image"]}],  # routed: the `task` column is read up front
        shuffle_dataset=False,  # the first batches are rows 0-3 (and the data loader's look-ahead)
        final_eval=False,
    )
    assert state["global_step"] == 1


def test_bad_rows_skip_keeps_training_and_counts_each_bad_row_once(tmp_path, tiny_dirs, caplog):
    for name in ("a", "b", "c"):
        png(tmp_path / f"{name}.png", size=(28, 28))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    long_question = "Count: " + " ".join(["one two three"] * 60)
    rows = [
        {"question": "Colour?", "image": "a.png", "answer": "red"},  # line 1
        {"question": "Colour?", "image": "gone.png", "answer": "red"},  # line 3: missing image (up front)
        {"question": "Colour?", "image": "broken.png", "answer": "red"},  # line 4: corrupt image (when loaded)
        {"question": "Say red.", "image": None, "answer": "red"},  # line 5: text-only
        {"question": long_question, "image": "b.png", "answer": "red"},  # line 6: over max_prompt_length
        {"question": "Colours?", "image": ["a.png", "c.png"], "answer": "red"},  # line 7: two images
        {"question": None, "image": "a.png", "answer": "red"},  # line 8: no question (up front)
        {"question": "Colour?", "image": "c.png", "answer": "red"},  # line 9
    ]
    write_jsonl(tmp_path / "train.jsonl", rows, extra_lines=[(1, '{"question": "Colour?", "image": ')])
    write_jsonl(tmp_path / "eval.jsonl", [rows[0], rows[2], rows[3], rows[5]])
    with caplog.at_level("INFO", logger="vlm_rl"):
        state = run_recipe(
            tmp_path,
            model_name_or_path=str(tiny_dirs["qwen2_vl"]),
            dataset=str(tmp_path / "train.jsonl"),
            eval_dataset=str(tmp_path / "eval.jsonl"),
            prompt_template="{question}",
            bad_rows="skip",
            max_prompt_length=100,
            per_device_train_batch_size=12,  # all 6 rows left after the up-front checks, twice each
            shuffle_dataset=False,
        )
    (step,) = [entry for entry in state["log_history"] if "loss" in entry]
    assert step["data/skipped_rows"] == 5
    reasons = skipped_reasons(step)
    assert reasons == {
        "unreadable_row": 1,
        "missing_image": 1,
        "missing_value": 1,
        "corrupt_image": 1,
        "prompt_too_long": 1,
    }
    messages = [record.getMessage() for record in caplog.records]
    assert any("train.jsonl line 4: image 'broken.png' cannot be decoded" in m for m in messages)
    assert any("train.jsonl line 6: the prompt is" in m for m in messages)
    # The final evaluation leaves the bad held-out row out (it does not score a replacement twice), and says so.
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert results["num_rows"] == 3 and results["num_image_rows"] == 2
    assert any(m.startswith("Data: Skipped 1 eval rows: 1 corrupt_image") for m in messages)
    assert any(m.startswith("Data: Skipped 5 train rows") for m in messages)


def test_rows_the_model_family_cannot_take_fail_before_the_model_loads(tmp_path, tiny_dirs):
    """BLIP-2 takes exactly one image per row: a text-only row and a two-image row are named at start-up."""
    png(tmp_path / "a.png")
    rows = [{"question": "Colour?", "image": "a.png", "answer": "red"}] * 2
    write_jsonl(tmp_path / "train.jsonl", [*rows, {"question": "Colour?", "image": None, "answer": "red"}])
    fields = {"model_name_or_path": str(tiny_dirs["blip2"]), "prompt_template": "{question}", "final_eval": False}
    with pytest.raises(ValueError, match=r"BLIP-2 rows take one image; .*train\.jsonl line 3 has 0 image\(s\)"):
        run_recipe(tmp_path, dataset=str(tmp_path / "train.jsonl"), **fields)
    write_jsonl(tmp_path / "two.jsonl", [*rows, {"question": "Same?", "image": ["a.png", "a.png"], "answer": "yes"}])
    with pytest.raises(ValueError, match=r"two\.jsonl line 3 has 2 image\(s\)"):
        run_recipe(tmp_path, dataset=str(tmp_path / "two.jsonl"), **fields)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_rows_with_image_markers_train_mixed_with_text_only_rows(tmp_path, tiny_dirs, family):
    """EasyR1-style prompts (`<image>` in the text) through the trainer, with both image fast paths on."""
    png(tmp_path / "a.png")
    rows = [
        {"prompt": "Look: <image> Which colour is it?", "image": "a.png", "answer": "red"},
        {"prompt": "<image>\nName the colour.", "image": "a.png", "answer": "red"},
        {"prompt": "What is 2 + 2?", "image": None, "answer": "4"},
        {"prompt": "What is 3 + 3?", "answer": "6"},
    ]
    write_jsonl(tmp_path / "marked.jsonl", rows)
    state = run_recipe(
        tmp_path,
        model_name_or_path=str(tiny_dirs[family]),
        dataset=str(tmp_path / "marked.jsonl"),
        max_steps=2,
        final_eval=False,
        share_prompt_prefix=True,
        encode_images_once=True,
    )
    assert state["global_step"] == 2
