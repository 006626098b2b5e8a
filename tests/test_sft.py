"""`vlm-rl sft`: supervised warm start on prompt-completion rows with TRL's `SFTTrainer`, real tiny models on CPU."""

from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ALL_FAMILIES
from datasets import Dataset
from PIL import Image
from safetensors.torch import load_file
from test_recipes import SFT_RECIPES, SUMMARY_MAX_CHARS

from vlm_rl.cli import main as cli_main
from vlm_rl.config import SFT_RECIPE_DATACLASSES, VLMSFTConfig, parse_sft_recipe
from vlm_rl.errors import InvalidValueError
from vlm_rl.models import adapter_for, tiny_families
from vlm_rl.models.collator import IGNORE_INDEX, PromptCompletionCollator
from vlm_rl.models.inputs import prompt_inputs
from vlm_rl.recipe_check import SFT_FIELD_TABLE, build_field_table, check_recipe, installed_versions
from vlm_rl.sft import build_trainer
from vlm_rl.sft import main as sft_main
from vlm_rl.train import main as train_main

REPO = Path(__file__).resolve().parent.parent
# A few steps of the counting task's SFT split on the tiny Qwen2-VL.
SFT_RUN = {
    "model_name_or_path": "tiny:qwen2_vl",
    "dtype": "float32",
    "dataset": "synthetic:counting",
    "split": "sft",
    "image_size": 112,
    "train_size": 8,
    "eval_size": 4,
    "per_device_train_batch_size": 2,
    "learning_rate": 1.0e-3,
    "max_steps": 2,
    "seed": 0,
    "use_cpu": True,
    "bf16": False,
    "gradient_checkpointing": False,
    "report_to": "none",
    "logging_steps": 1,
    "save_strategy": "no",
    "disable_tqdm": True,
}


def image(color: str, size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def row(question: str, answer: str, images: list) -> dict:
    return {
        "prompt": [{"role": "user", "content": question}],
        "completion": [{"role": "assistant", "content": f"<answer>{answer}</answer>"}],
        "images": images,
    }


def mixed_rows(family: str) -> list[dict]:
    """A batch's rows as the family takes them: one image each, plus text-only rows and two-image rows where the
    family takes them."""
    adapter = tiny_families()[family]
    rows = [row("What colour is the shape?", "red", [image("red")]), row("And this one?", "blue", [image("blue")])]
    if adapter.text_only:
        rows.append(row("What is 2 + 2?", "4", []))
    if adapter.multi_image:
        rows.append(row("Which two colours are shown?", "red, green", [image("red"), image("green")]))
    return rows


def sft_config(output_dir: Path, **overrides) -> VLMSFTConfig:
    settings = {k: v for k, v in SFT_RUN.items() if k in {f for f in VLMSFTConfig.__dataclass_fields__}}
    return VLMSFTConfig(output_dir=str(output_dir), **{**settings, "report_to": [], **overrides})


def write_recipe(directory: Path, **fields) -> Path:
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump({**SFT_RUN, "output_dir": str(directory / "run"), **fields}))
    return path


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_sft_steps_on_mixed_rows_train_each_family(family, load_tiny, tmp_path):
    model, processor = load_tiny(family)
    rows = mixed_rows(family)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    args = sft_config(tmp_path, per_device_train_batch_size=len(rows), max_steps=2)
    trainer = build_trainer(model, processor, args, Dataset.from_list(rows))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    changed = [name for name, p in model.named_parameters() if name in before and not torch.equal(p, before[name])]
    groups = {adapter_for(model.config).parameter_group(name) for name in changed}
    assert {"vision", "projector", "language"} <= groups, groups  # the images reached the loss


def test_labels_are_the_completion_tokens_only(load_tiny):
    """The real collator on the real processor: -100 on the prompt (image tokens included) and on the padding, the
    completion's token ids (its end-of-turn included) everywhere else; text-only, one- and two-image rows together."""
    model, processor = load_tiny("qwen2_vl")
    rows = mixed_rows("qwen2_vl")
    rows[1]["completion"] = "<answer>blue, a longer reply than the others</answer>"  # plain text is a completion too
    batch = PromptCompletionCollator(processor, adapter_for(model.config))(rows)
    tokenizer = processor.tokenizer
    image_token = model.config.image_token_id
    assert batch["pixel_values"].shape[0] > 0 and len(batch["image_grid_thw"]) == 4  # 1 + 1 + 0 + 2 images
    for i, example in enumerate(rows):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        completion = example["completion"]
        text = completion if isinstance(completion, str) else completion[0]["content"]
        expected = tokenizer(text + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        trained = labels != IGNORE_INDEX
        assert labels[trained].tolist() == expected
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # real tokens first, padding after
        assert trained[n - len(expected) : n].all() and not trained[: n - len(expected)].any()
        assert not trained[n:].any()
        assert (ids[:n] == image_token).sum() > 0 if example["images"] else (ids[:n] != image_token).all()
        assert not (labels == image_token).any()
    loss = model(**batch).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("family", ["llava", "llava_onevision", "instructblip"])
def test_sft_trains_on_the_prompt_grpo_generates_from(family, load_tiny):
    """Each row is the prompt exactly as GRPO tokenizes it (BOS included; LLaVA-OneVision's "assistant\n" turn),
    then the reply and its end-of-turn tokens: the labels. TRL's own collator differs on these families."""
    model, processor = load_tiny(family)
    rows = mixed_rows(family)
    adapter = adapter_for(model.config)
    batch = PromptCompletionCollator(processor, adapter)(rows)
    prompts = prompt_inputs(adapter, processor, [r["prompt"] for r in rows], [r["images"] for r in rows])
    for i in range(len(rows)):
        prompt_ids = prompts["input_ids"][i][prompts["attention_mask"][i] == 1].tolist()
        ids = batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist()
        labels = batch["labels"][i]
        reply = processor.tokenizer.decode(labels[labels != IGNORE_INDEX])
        assert ids[: len(prompt_ids)] == prompt_ids and (labels[: len(prompt_ids)] == IGNORE_INDEX).all()
        assert reply.strip().startswith(rows[i]["completion"][0]["content"]) and not reply.startswith(" \n")


def test_a_prompt_that_fills_max_length_is_an_error(load_tiny):
    model, processor = load_tiny("qwen2_vl")
    collator = PromptCompletionCollator(processor, adapter_for(model.config), max_length=12)
    with pytest.raises(InvalidValueError, match="leaves its completion no room within max_length=12"):
        collator([row("What is 2 + 2? " * 4, "4", [])])


def test_a_prefilled_prompt_trains_on_its_continuation(load_tiny):
    model, processor = load_tiny("qwen2_vl")
    prefilled = row("What colour is the shape?", "red", [image("red")])
    prefilled["prompt"].append({"role": "assistant", "content": "<think>"})
    prefilled["completion"] = [{"role": "assistant", "content": "It is red.</think><answer>red</answer>"}]
    batch = PromptCompletionCollator(processor, adapter_for(model.config))([prefilled])
    labels = batch["labels"][0]
    assert (
        processor.tokenizer.decode(labels[labels != IGNORE_INDEX])
        == "It is red.</think><answer>red</answer><|im_end|>\n"
    )
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert "<|im_start|>assistant\n<think>It is red.</think>" in text and text.count("<|im_start|>assistant") == 1


def test_sft_output_is_a_model_for_grpo_training(tmp_path):
    """`vlm-rl sft` (LoRA, merged on save) → its output directory is `model_name_or_path` for one GRPO step."""
    sft_main(["--config", str(write_recipe(tmp_path, use_peft=True, lora_r=4))])
    out = tmp_path / "run"
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert (out / "processor_config.json").is_file() or (out / "preprocessor_config.json").is_file()
    grpo = tmp_path / "grpo"
    train_main(
        ["--config", str(REPO / "recipes/demo_cpu.yaml"), "--model_name_or_path", str(out),
         "--dataset", "synthetic:counting", "--image_size", "112", "--train_size", "4", "--eval_size", "2",
         "--reward_funcs", "counting_accuracy", "--eval_accuracy_reward", "counting_accuracy", "--max_steps", "1",
         "--num_generations", "2", "--per_device_train_batch_size", "2", "--max_completion_length", "4",
         "--per_device_eval_batch_size", "2", "--plot", "false", "--save_strategy", "no", "--output_dir", str(grpo),
         "--disable_tqdm", "true"]
    )  # fmt: skip
    state = json.loads((grpo / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    assert json.loads((grpo / "eval_results.json").read_text())["accuracy"] is not None


def test_vlm_rl_eval_scores_the_sft_output(tmp_path, capsys):
    """Held-out greedy accuracy after SFT: `vlm-rl eval` with a GRPO recipe's rewards on the SFT output directory."""
    sft_main(["--config", str(write_recipe(tmp_path))])
    cli_main(
        ["eval", "--config", str(REPO / "recipes/demo_cpu.yaml"), "--model", str(tmp_path / "run"),
         "--dataset", "synthetic:counting", "--image_size", "112", "--eval_size", "4", "--max_new_tokens", "8",
         "--reward_funcs", "counting_accuracy", "--eval_accuracy_reward", "counting_accuracy", "--ablate-images"]
    )  # fmt: skip
    results = json.loads((tmp_path / "run" / "eval" / "eval_results.json").read_text())
    assert 0 <= results["accuracy"] <= 1 and "blind_accuracy" in results
    assert len((tmp_path / "run" / "eval" / "eval_samples.jsonl").read_text().splitlines()) == 4


def test_lora_sft_changes_the_merged_weights(tmp_path):
    sft_main(["--config", str(write_recipe(tmp_path, use_peft=True, lora_r=4))])
    base = load_file(tmp_path / "run" / "tiny-qwen2_vl" / "model.safetensors")
    merged = load_file(tmp_path / "run" / "model.safetensors")
    assert set(base) == set(merged)  # plain weight names: no `base_layer` / `lora_A`
    changed = [name for name in base if not torch.equal(base[name], merged[name])]
    # LoRA on the language model's linear layers only: the vision tower, embeddings and head keep their weights.
    assert changed and all(".layers." in name and "visual" not in name for name in changed), changed


def test_freezing_flags_keep_the_frozen_part(tmp_path):
    sft_main(["--config", str(write_recipe(tmp_path, freeze_vision_tower=True))])
    base = load_file(tmp_path / "run" / "tiny-qwen2_vl" / "model.safetensors")
    trained = load_file(tmp_path / "run" / "model.safetensors")
    changed = {name for name in base if not torch.equal(base[name], trained[name])}
    assert changed and not any(name.startswith("visual.blocks") for name in changed), sorted(changed)[:5]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resumed_sft_run_equals_an_uninterrupted_one(lora, tmp_path):
    """Stopped after step 2 (its checkpoint) and resumed with `auto`: the same weights as 4 steps in one go."""
    fields = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    if lora:
        fields |= {"use_peft": True, "lora_r": 4}
    whole = tmp_path / "whole"
    whole.mkdir()
    sft_main(["--config", str(write_recipe(whole, **fields))])
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "run").mkdir()
    shutil.copytree(whole / "run" / "checkpoint-2", resumed / "run" / "checkpoint-2")
    shutil.copytree(whole / "run" / "tiny-qwen2_vl", resumed / "run" / "tiny-qwen2_vl")
    sft_main(["--config", str(write_recipe(resumed, **fields, resume_from_checkpoint="auto"))])
    expected = load_file(whole / "run" / "model.safetensors")
    got = load_file(resumed / "run" / "model.safetensors")
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    losses = [
        [e["loss"] for e in json.loads((d / "run" / "trainer_state.json").read_text())["log_history"] if "loss" in e]
        for d in (whole, resumed)
    ]
    assert losses[0] == losses[1]
    relaunched = write_recipe(whole, **fields, resume_from_checkpoint="auto")
    sft_main(["--config", str(relaunched)])  # finished: trains nothing, leaves the model as it was
    assert all(torch.equal(expected[name], t) for name, t in load_file(whole / "run" / "model.safetensors").items())


def test_the_loss_logged_after_resuming_inside_a_logging_window_is_the_uninterrupted_runs(tmp_path):
    """HF logs the loss summed since the last logging step over the steps since, and forgets both on resume: resumed
    from step 4, the loss logged at step 6 averaged steps 5 and 6 alone. An older checkpoint without the saved window
    still resumes, as HF would."""
    fields = {"max_steps": 6, "save_strategy": "steps", "save_steps": 4, "logging_steps": 3}
    whole = tmp_path / "whole"
    whole.mkdir()
    sft_main(["--config", str(write_recipe(whole, **fields))])

    def logged(directory: Path) -> dict[int, float]:
        history = json.loads((directory / "run" / "trainer_state.json").read_text())["log_history"]
        return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}

    def resume(name: str, window: bool) -> dict[int, float]:
        run = tmp_path / name / "run"
        shutil.copytree(whole / "run" / "checkpoint-4", run / "checkpoint-4")
        shutil.copytree(whole / "run" / "tiny-qwen2_vl", run / "tiny-qwen2_vl")
        if not window:
            (run / "checkpoint-4" / "logging_window_0.pt").unlink()
        sft_main(["--config", str(write_recipe(run.parent, **fields, resume_from_checkpoint="auto"))])
        return logged(run.parent)

    expected = logged(whole)
    assert sorted(expected) == [3, 6]
    assert resume("resumed", window=True) == expected
    older = resume("older", window=False)
    assert older[3] == expected[3] and older[6] != expected[6]  # the window of steps 5 and 6 alone


def test_documented_sft_commands_parse(monkeypatch):
    monkeypatch.chdir(REPO)
    commands = [line for line in (REPO / "docs/sft.md").read_text().splitlines() if line.startswith("vlm-rl sft")]
    assert commands
    for command in commands:
        parse_sft_recipe(shlex.split(command)[2:])


def test_file_data_with_a_completion_column(tmp_path):
    """JSON Lines with an image path (or none), a prompt string and a completion conversation."""
    image("red").save(tmp_path / "red.png")
    lines = [
        {"prompt": "What colour?", "image": "red.png", "completion": [{"role": "assistant", "content": "red"}]},
        {"prompt": "2 + 2?", "completion": [{"role": "assistant", "content": "<answer>4</answer>"}]},
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    sft_main(["--config", str(write_recipe(tmp_path, dataset="train.jsonl", split="train", train_size=None,
                                           eval_size=None, image_size=56))])  # fmt: skip
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def vlm_rl_sft(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlm_rl.cli", "sft", *argv], capture_output=True, text=True, timeout=300
    )


def test_a_bad_key_is_one_line_before_trl_loads(tmp_path):
    recipe = write_recipe(tmp_path, num_generations=4)  # a GRPO field: not one of `vlm-rl sft`'s
    result = vlm_rl_sft("--config", str(recipe))
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"vlm-rl sft: error: Recipe file {recipe}: unknown key 'num_generations'.")


def test_data_without_completions_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sft", "--config", str(write_recipe(tmp_path, split="train"))])
    [line] = str(exit_info.value.code).splitlines()
    assert line.startswith("vlm-rl sft: error: synthetic:counting: the training rows have no 'completion' column")
    assert "split: sft" in line


def test_the_sft_field_table_equals_the_sft_recipe_dataclasses():
    stored = json.loads(SFT_FIELD_TABLE.read_text())
    assert stored == {"versions": installed_versions(), "fields": build_field_table(SFT_RECIPE_DATACLASSES)}, (
        "regenerate with `python -m vlm_rl.config`"
    )


@pytest.mark.parametrize("path", SFT_RECIPES, ids=lambda path: path.stem)
def test_sft_recipe_checks_and_runs_one_step(path, tmp_path):
    check_recipe(path, build_field_table(SFT_RECIPE_DATACLASSES))  # unknown keys and values of the wrong type
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) <= SUMMARY_MAX_CHARS, f"{path.name}: a one-line summary first"
    one_step = {"max_steps": "1", "train_size": "4", "eval_size": "2", "per_device_train_batch_size": "2",
                "save_strategy": "no", "logging_steps": "1", "report_to": "none", "disable_tqdm": "true"}  # fmt: skip
    argv = ["--config", str(path), "--output_dir", str(tmp_path / "run")]
    for key, value in one_step.items():
        argv += [f"--{key}", value]
    sft_main(argv)
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    (step,) = [entry for entry in history if "loss" in entry]
    assert step["step"] == 1 and math.isfinite(step["loss"])


def test_sft_help_is_short_and_help_all_lists_the_sft_fields(capsys):
    with pytest.raises(SystemExit):
        cli_main(["sft", "--help"])
    assert capsys.readouterr().out.startswith("usage: vlm-rl sft --config RECIPE.yaml")
    with pytest.raises(SystemExit):
        cli_main(["sft", "--help-all"])
    text = capsys.readouterr().out
    assert "--max_length" in text and "--use_peft" in text and "--num_generations" not in text
