"""The held-out evaluation calls rewards as training does, token ids included, for every family."""

import pytest
import torch
from conftest import ALL_FAMILIES, TEXT_MIX_FAMILIES

from vlm_rl.data import make_shapes_dataset
from vlm_rl.evaluation import evaluate_policy
from vlm_rl.rewards import load_rewards


def test_eval_rewards_get_completion_ids(load_tiny):
    model, processor = load_tiny("qwen2_vl")
    rewards = load_rewards(
        ["accuracy", {"reward": "overlong_penalty", "kwargs": {"max_length": 4, "cache_length": 2}}],
        error_policy="raise",  # a reward missing its inputs would stop here instead of scoring None
    )
    records = evaluate_policy(
        model, processor, make_shapes_dataset(4, text_fraction=0.5), rewards, max_new_tokens=4, batch_size=2
    )
    assert len(records) == 4
    for record in records:
        assert -1.0 <= record["rewards"]["overlong_penalty"] <= 0.0
        assert record["rewards"]["accuracy"] in (0.0, 1.0)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_eval_generates_for_every_family(family, load_tiny):
    model, processor = load_tiny(family)
    dataset = make_shapes_dataset(4, text_fraction=0.5 if family in TEXT_MIX_FAMILIES else 0.0, seed=1)
    records = evaluate_policy(model, processor, dataset, load_rewards(["accuracy"]), max_new_tokens=2, batch_size=4)
    assert [record["num_images"] for record in records] == [len(row["images"]) for row in dataset]
    blind = evaluate_policy(
        model, processor, dataset, load_rewards(["accuracy"]), max_new_tokens=2, batch_size=4, blind=True
    )
    assert len(blind) == len(records)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_eval_prompts_are_tokenized_as_in_training(family, load_tiny):
    """Each row's prompt ids (and any other per-row text input, e.g. InstructBLIP's Q-Former text) equal a
    solo call of the trainer's (TRL's) tokenization: no second BOS, no padding on the wrong side."""
    from trl.data_utils import prepare_multimodal_messages

    from vlm_rl.models import adapter_for
    from vlm_rl.models.inputs import prompt_inputs

    model, processor = load_tiny(family)
    dataset = make_shapes_dataset(4, text_fraction=0.5 if family in TEXT_MIX_FAMILIES else 0.0, seed=2)
    rows = list(dataset)
    # Prompts of different lengths, so that padding shows.
    rows[0]["prompt"] = [{"role": "user", "content": "What color is the shape in this small picture? One word."}]
    batch = prompt_inputs(
        adapter_for(model.config), processor, [r["prompt"] for r in rows], [r["images"] for r in rows]
    )
    for i, row in enumerate(rows):
        solo = processor.apply_chat_template(
            prepare_multimodal_messages(row["prompt"], images=row["images"]),
            add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        )  # fmt: skip
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        assert ids.tolist() == solo["input_ids"][0].tolist(), f"row {i}"
        assert batch["attention_mask"][i, -1] == 1, "prompts are left-padded"
        if "qformer_input_ids" in solo:
            width = solo["qformer_input_ids"].size(1)
            assert batch["qformer_input_ids"][i, :width].tolist() == solo["qformer_input_ids"][0].tolist()


def test_eval_refuses_rows_the_family_cannot_take(load_tiny):
    model, processor = load_tiny("blip2")
    dataset = make_shapes_dataset(4, text_fraction=0.5, seed=1)
    with pytest.raises(ValueError, match="BLIP-2 rows take one image"):
        evaluate_policy(model, processor, dataset, load_rewards(["accuracy"]), max_new_tokens=2, batch_size=4)


def test_eval_samples_at_a_temperature_and_is_greedy_without_one(load_tiny):
    """The learning benchmark's `sampled` scores sample at the temperature given; without one, evaluation is greedy."""
    model, processor = load_tiny("qwen2_vl")
    dataset = make_shapes_dataset(8, seed=2)
    rewards = load_rewards(["accuracy"])
    greedy = [r["completion"] for r in evaluate_policy(model, processor, dataset, rewards, max_new_tokens=6)]
    assert greedy == [r["completion"] for r in evaluate_policy(model, processor, dataset, rewards, max_new_tokens=6)]
    torch.manual_seed(0)
    first = evaluate_policy(model, processor, dataset, rewards, max_new_tokens=6, temperature=1.0)
    torch.manual_seed(1)
    second = evaluate_policy(model, processor, dataset, rewards, max_new_tokens=6, temperature=1.0)
    assert [r["completion"] for r in first] != [r["completion"] for r in second] != greedy


class LookEnvironment:
    """A tool that shows the rollout's own image again, and remembers which image each rollout was reset with."""

    seen: list = []

    def reset(self, **row) -> None:
        self.images = row["images"]
        LookEnvironment.seen.append(row["images"][0] if row["images"] else None)

    def lookup(self) -> list:
        """Look at the image again.

        Returns:
            The image.
        """
        return [{"type": "image", "image": self.images[0]}, {"type": "text", "text": "Here it is."}]


def test_eval_with_tools_runs_the_calls_and_scores_the_whole_exchange(load_tiny):
    from test_trl_options import tool_call_bias
    from trl.chat_template_utils import qwen3_vl_chat_template

    model, processor = load_tiny("qwen3_vl")
    processor.chat_template = processor.tokenizer.chat_template = qwen3_vl_chat_template
    model.generation_config.sequence_bias = {tuple(ids): bias for ids, bias in tool_call_bias(processor.tokenizer)}
    dataset = make_shapes_dataset(4, seed=1)
    rewards = load_rewards(["accuracy"])
    LookEnvironment.seen = []
    kwargs = {"max_new_tokens": 200, "environment_factory": LookEnvironment, "max_tool_turns": 1}
    records = evaluate_policy(model, processor, dataset, rewards, **kwargs)
    # Every row called the tool once, got its image back (an `<image>` in the reply) and answered after it.
    assert [r["tool_calls"] for r in records] == [1] * 4
    for record in records:
        call, answer = record["completion"].split("\ntool: <image>Here it is.\n")
        assert call.startswith("assistant: <tool_call>") and answer.startswith("assistant: ")
        assert "<tool_call>" not in answer  # one tool turn at most
    assert LookEnvironment.seen == [dataset[i]["images"][0] for i in range(4)]

    LookEnvironment.seen = []
    blind = evaluate_policy(model, processor, dataset, rewards, blind=True, **kwargs)
    # The tools of a blind row see the images the row was shown: another row's.
    assert LookEnvironment.seen == [dataset[r["image_from"]]["images"][0] for r in blind]

    # A policy that calls the tool in every turn stops at `max_tool_turns`.
    always = [(ids, bias) for ids, bias in tool_call_bias(processor.tokenizer) if bias > -100]
    model.generation_config.sequence_bias = {tuple(ids): bias for ids, bias in always}
    records = evaluate_policy(model, processor, dataset, rewards, **{**kwargs, "max_tool_turns": 2})
    assert [r["tool_calls"] for r in records] == [2] * 4
