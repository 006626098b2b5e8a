"""With prompts shared, micro-batches hold whole prompt groups; the shuffle still reorders prompts and rows."""

from collections import Counter

import pytest
import torch
from conftest import small_config

from vlm_rl.data import make_shapes_dataset
from vlm_rl.rewards.accuracy import accuracy
from vlm_rl.trainers import VLMGRPOTrainer
from vlm_rl.trainers.shared_prefix import balanced_by_tokens


@pytest.mark.parametrize("shared", [True, False])
def test_micro_batches_hold_whole_prompt_groups(shared, load_tiny, tmp_path):
    model, processor = load_tiny("qwen2_vl")
    args = small_config(
        tmp_path,
        num_generations=4,
        per_device_train_batch_size=4,
        steps_per_generation=4,  # 16 rows: 4 prompts x 4 completions, cut into 4 micro-batches of 4
        share_prompt_prefix=shared,
    )
    dataset = make_shapes_dataset(8, seed=1)
    trainer = VLMGRPOTrainer(
        model=model, reward_funcs=[accuracy], args=args, train_dataset=dataset, processing_class=processor
    )
    model.train()
    # Distinct questions, so that a row's prompt ids tell which prompt it is.
    rows = [
        {**dataset[i], "prompt": [{"role": "user", "content": f"Question {i}: what color is the shape?"}]}
        for i in range(4)
        for _ in range(4)
    ]
    together = 0
    for seed in range(3):
        torch.manual_seed(seed)
        trainer._step, trainer._buffered_inputs = 0, None
        trainer._prepare_inputs(rows)
        micro_batches = trainer._buffered_inputs
        prompts = [[tuple(ids.tolist()) for ids in batch["prompt_ids"]] for batch in micro_batches]
        assert sorted(len(batch) for batch in prompts) == [4, 4, 4, 4]
        counts = Counter(prompt for batch in prompts for prompt in batch)
        assert sorted(counts.values()) == [4, 4, 4, 4]  # every prompt, with its 4 rows
        together += sum(len(set(batch)) == 1 for batch in prompts)
    if shared:
        assert together == 12, "every micro-batch must hold one prompt's 4 rows"
    else:
        assert together < 12, "TRL's row shuffle scatters a prompt's rows"


def test_groups_are_dealt_to_micro_batches_by_tokens(load_tiny, tmp_path):
    """4 prompts × G = 2 with completions of 40, 30, 6 and 2 tokens, in 2 micro-batches of 2 prompts: each holds a
    long group and a short one, whatever the shuffle (a row shuffle of whole groups pairs the two long ones in a
    third of the cases)."""
    model, processor = load_tiny("qwen2_vl")
    args = small_config(tmp_path, num_generations=2, per_device_train_batch_size=4, steps_per_generation=2)
    trainer = VLMGRPOTrainer(
        model=model, reward_funcs=[accuracy], args=args, train_dataset=make_shapes_dataset(4),
        processing_class=processor,
    )  # fmt: skip
    lengths = [40, 40, 30, 30, 6, 6, 2, 2]  # rows of prompt i are 2i and 2i + 1
    prompt_ids = torch.arange(8)[:, None].div(2, rounding_mode="floor").expand(8, 5) + 10
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones(8, 5, dtype=torch.long),
        "completion_ids": torch.ones(8, 40, dtype=torch.long),
        "completion_mask": (torch.arange(40)[None] < torch.tensor(lengths)[:, None]).long(),
        "advantages": torch.arange(8.0),
    }
    for seed in range(4):
        torch.manual_seed(seed)
        shuffled = trainer._shuffle_rows(batch)
        tokens = shuffled["completion_mask"].sum(dim=1)
        halves = sorted([int(tokens[:4].sum()), int(tokens[4:].sum())])
        assert halves == [72, 84], (seed, tokens.tolist())  # {30, 6} and {40, 2}, each group's 2 rows together
        assert torch.equal(shuffled["advantages"].div(2, rounding_mode="floor"), shuffled["prompt_ids"][:, 0] - 10)


def test_balanced_by_tokens_keeps_whole_groups_and_equal_counts():
    groups = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    torch.manual_seed(0)
    dealt = balanced_by_tokens(groups, [100, 90, 10, 5, 50, 45], per_micro_batch=2)
    assert sorted(map(tuple, dealt)) == sorted(map(tuple, groups))
    tokens = {0: 100, 2: 90, 4: 10, 6: 5, 8: 50, 10: 45}
    totals = sorted(sum(tokens[group[0]] for group in dealt[i : i + 2]) for i in range(0, 6, 2))
    assert totals == [95, 100, 105]  # 100 + 5, 90 + 10, 50 + 45: the largest first into the lightest
