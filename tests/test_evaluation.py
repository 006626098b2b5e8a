"""The held-out evaluation calls rewards as training does, token ids included, for every family."""

import pytest
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
    assert [record["has_images"] for record in records] == [bool(row["images"]) for row in dataset]
    blind = evaluate_policy(
        model, processor, dataset, load_rewards(["accuracy"]), max_new_tokens=2, batch_size=4, blind=True
    )
    assert len(blind) == len(records)
