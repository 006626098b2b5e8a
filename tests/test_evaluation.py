"""The held-out evaluation calls rewards as training does, token ids included."""

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
