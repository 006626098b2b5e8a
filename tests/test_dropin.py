"""`VLMGRPOTrainer` used the way TRL documents `GRPOTrainer`: a model path, reward names, prefilled prompts; and the
saved model card's "Use" snippet run as written."""

import json
import re
import shutil

import pytest
from conftest import ALL_FAMILIES, TEXT_MIX_FAMILIES, small_config
from datasets import Dataset

from vlm_rl.config import DataArguments
from vlm_rl.data import DataError, load_task, make_shapes_dataset
from vlm_rl.model_card import write_model_card
from vlm_rl.rewards import RewardSpecError
from vlm_rl.rewards.accuracy import accuracy
from vlm_rl.rewards.registry import reward_or_model
from vlm_rl.trainers import VLMGRPOTrainer

PREFILL = "<think>"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_a_model_path_and_a_reward_name_train_without_a_processing_class(family, tiny_dirs, tmp_path):
    """TRL would load `AutoProcessor`, which needs torchvision for the Qwen-VL families, and a Hub reward model."""
    trainer = VLMGRPOTrainer(
        model=str(tiny_dirs[family]),
        reward_funcs="accuracy",
        args=small_config(tmp_path, max_steps=1),
        train_dataset=make_shapes_dataset(4),
    )
    assert trainer.reward_funcs[0].func is accuracy
    assert trainer.processing_class.tokenizer.padding_side == "left"
    trainer.train()
    assert trainer.state.global_step == 1


def test_a_loaded_model_without_a_processing_class_gets_its_directorys_processor(load_tiny, tmp_path):
    model, _ = load_tiny("qwen2_5_vl")
    trainer = VLMGRPOTrainer(
        model=model,
        reward_funcs=accuracy,
        args=small_config(tmp_path, max_steps=1),
        train_dataset=make_shapes_dataset(4),
    )
    assert type(trainer.processing_class).__name__ == "Qwen2_5_VLProcessor"
    trainer.train()
    assert trainer.state.global_step == 1


def test_reward_strings_name_a_reward_or_a_reward_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text("def short(completions, **kwargs):\n    return [1.0] * len(completions)\n")
    (tmp_path / "reward-model").mkdir()
    (tmp_path / "accuracy").mkdir()
    assert reward_or_model("accuracy") is accuracy  # a registered name, even beside a directory of that name
    assert reward_or_model("vlm_rl.rewards.accuracy:accuracy") is accuracy
    assert reward_or_model("my_rewards.py:short").__name__ == "short"
    assert reward_or_model("reward-model") == "reward-model"  # a local directory: TRL loads a reward model
    assert reward_or_model("owner/reward-model") == "owner/reward-model"  # a Hub id
    with pytest.raises(RewardSpecError, match="Unknown reward 'acuracy'. Did you mean 'accuracy'?"):
        reward_or_model("acuracy")


def prefilled(dataset: Dataset) -> Dataset:
    """`dataset` with every prompt ending in an assistant message the completion is to continue."""
    return Dataset.from_list(
        [{**row, "prompt": [*row["prompt"], {"role": "assistant", "content": PREFILL}]} for row in dataset]
    )


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_prefilled_prompts_train_and_the_completion_continues_the_assistant_message(family, load_tiny, tmp_path):
    model, processor = load_tiny(family)
    rows = make_shapes_dataset(4, text_fraction=0.5 if family in TEXT_MIX_FAMILIES else 0.0)
    trainer = VLMGRPOTrainer(
        model=model,
        reward_funcs=accuracy,
        args=small_config(tmp_path, max_steps=1),
        train_dataset=prefilled(rows),
        processing_class=processor,
    )
    rendered = []
    tokenize = trainer._tokenize_prompts

    def recording_tokenize(prompts):
        output = tokenize(prompts)
        rendered.extend(processor.tokenizer.decode(ids) for ids in output[0])
        return output

    trainer._tokenize_prompts = recording_tokenize
    trainer.train()
    assert trainer.state.global_step == 1
    assert rendered and all(text.endswith(PREFILL) for text in rendered), rendered


def test_a_dataset_mixing_prefilled_and_open_prompts_is_refused_at_start_up(load_tiny, tmp_path):
    model, processor = load_tiny("qwen2_vl")
    rows = make_shapes_dataset(4)
    mixed = Dataset.from_list([*rows.select(range(2)), *prefilled(rows.select(range(2, 4)))])
    with pytest.raises(DataError, match=r"train_dataset row 2: .* ends with an assistant message .* row 0's does not"):
        VLMGRPOTrainer(
            model=model,
            reward_funcs=accuracy,
            args=small_config(tmp_path),
            train_dataset=mixed,
            processing_class=processor,
        )


def test_file_data_mixing_prefilled_and_open_prompts_is_refused_before_the_model_loads(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "How many?"}], "answer": "1"},
        {
            "prompt": [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": PREFILL}],
            "answer": "2",
        },
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = load_task(DataArguments(dataset=str(path)), seed=0)  # rows loaded lazily, as every recipe's are
    with pytest.raises(DataError, match=r"train_dataset row \d: .* ends with an assistant message"):
        VLMGRPOTrainer(
            model=str(tmp_path / "never_loaded"),
            reward_funcs=accuracy,
            args=small_config(tmp_path),
            train_dataset=task.train,
        )


def test_the_model_cards_use_snippet_runs_as_written(tiny_dirs, tmp_path):
    run = shutil.copytree(tiny_dirs["qwen2_5_vl"], tmp_path / "run")
    card = write_model_card(
        run,
        base_model="tiny:qwen2_5_vl",
        reward_rows=[],
        data={},
        log_history=[],
        eval_results=None,
        recipe={},
        versions={"vlm-rl": "0", "trl": "0", "transformers": "0", "torch": "0"},
        has_plot=False,
    )
    (snippet,) = re.findall(r"## Use\n\n```python\n(.*?)```", card.read_text(), flags=re.DOTALL)
    namespace = {}
    exec(snippet.replace("path/to/run", str(run)), namespace)
    assert type(namespace["model"]).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert namespace["processor"].apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_evaluation_and_prompt_lengths_render_a_prefill_as_the_trainer_does(load_tiny):
    from vlm_rl.data.rows import prompt_length
    from vlm_rl.models import adapter_for
    from vlm_rl.models.inputs import prompt_inputs

    model, processor = load_tiny("qwen2_vl")
    rows = list(prefilled(make_shapes_dataset(2, text_fraction=0.5)))
    inputs = prompt_inputs(
        adapter_for(model.config), processor, [row["prompt"] for row in rows], [row["images"] for row in rows]
    )
    texts = processor.tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=False)
    assert all(text.endswith(PREFILL) for text in texts), texts
    assert prompt_length(processor, rows[0]["prompt"], rows[0]["images"]) == int(inputs["attention_mask"][0].sum())
