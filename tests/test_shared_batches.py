"""With prompts shared, micro-batches hold whole prompt groups; the shuffle still reorders prompts and rows."""

from collections import Counter

import pytest
import torch
from conftest import small_config
from trl.trainer.utils import split_tensor_dict

from vlm_rl.data import make_shapes_dataset
from vlm_rl.rewards.accuracy import accuracy
from vlm_rl.trainers import VLMGRPOTrainer
from vlm_rl.trainers.micro_batches import balanced_by_tokens, row_weights


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
        micro_batches = trainer._micro_batches(batch)
        halves = sorted(int(micro_batch["completion_mask"].sum()) for micro_batch in micro_batches)
        assert halves == [72, 84], (seed, halves)  # {30, 6} and {40, 2}, each group's 2 rows together
        for micro_batch in micro_batches:
            groups = micro_batch["advantages"].div(2, rounding_mode="floor")
            assert torch.equal(groups, micro_batch["prompt_ids"][:, 0] - 10) and "row_weight" not in micro_batch


def uneven_batch(trainer, rows: list[dict]) -> dict:
    """The trainer's scored batch of `rows` (4 prompts × 2, in that order) with every completion cut to one token but
    those of the first prompt."""
    batch = trainer._scored_generation_batch(rows)
    batch["completion_mask"][2:, 1:] = 0
    return batch


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_micro_batches_of_uneven_rows_give_the_step_the_same_gradient(loss_type, load_tiny, tmp_path):
    """One long group and three of one token, in 2 micro-batches accumulated into one optimizer step: dealt by
    tokens, the long group's micro-batch holds fewer rows; weighted by rows (`grpo`) or by TRL's token count (`dapo`),
    the step's gradient is the one of TRL's cut into equal row counts."""
    model, processor = load_tiny("qwen2_vl")
    args = small_config(
        tmp_path, num_generations=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_completion_length=64, loss_type=loss_type, generation_kwargs={"min_new_tokens": 64},
    )  # fmt: skip
    dataset = make_shapes_dataset(4, seed=2)
    trainer = VLMGRPOTrainer(
        model=model, reward_funcs=[lambda completions, **_: [float(i % 3) for i in range(len(completions))]],
        args=args, train_dataset=dataset, processing_class=processor,
    )  # fmt: skip
    model.train()
    rows = [dataset[i] for i in range(4) for _ in range(2)]
    batch = uneven_batch(trainer, rows)

    def gradient(micro_batches: list[dict]) -> torch.Tensor:
        model.zero_grad()
        trainer.current_gradient_accumulation_steps = len(micro_batches)
        for micro_batch in micro_batches:
            trainer.compute_loss(model, trainer._merge_micro_batch(micro_batch)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    torch.manual_seed(0)
    dealt = trainer._micro_batches(batch)
    assert sorted(len(micro_batch["prompt_ids"]) for micro_batch in dealt) == [2, 6]
    whole = gradient(split_tensor_dict(batch, 2))  # TRL's cut: 4 rows and 4 rows
    accumulated = gradient(dealt)
    assert (accumulated - whole).norm() <= 1e-4 * whole.norm()
    if loss_type == "grpo":  # unweighted, the long group's 2 rows would count as much as the other 6
        unweighted = gradient([{k: v for k, v in mb.items() if k != "row_weight"} for mb in dealt])
        assert (unweighted - whole).norm() > 1e-2 * whole.norm()


def test_balanced_by_tokens_keeps_whole_groups_with_or_without_equal_counts():
    groups = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    tokens = {0: 100, 2: 90, 4: 10, 6: 5, 8: 50, 10: 45}
    torch.manual_seed(0)
    dealt = balanced_by_tokens(groups, list(tokens.values()), 3, per_micro_batch=2)
    assert sorted(map(tuple, sum(dealt, []))) == sorted(map(tuple, groups))
    totals = sorted(sum(tokens[group[0]] for group in micro_batch) for micro_batch in dealt)
    assert totals == [95, 100, 105]  # 100 + 5, 90 + 10, 50 + 45: the largest first into the lightest
    free = balanced_by_tokens(groups, [300, 90, 10, 5, 50, 45], 2)
    assert sorted(len(micro_batch) for micro_batch in free) == [1, 5]  # 300 alone; 90 + 50 + 45 + 10 + 5 = 200
    assert sorted(map(tuple, sum(free, []))) == sorted(map(tuple, groups))


def test_row_weights_make_each_window_a_mean_over_its_rows():
    assert row_weights([2, 6], window=2) == [0.5, 1.5]
    assert row_weights([3, 3, 1, 5], window=2) == [1.0, 1.0, 1 / 3, 5 / 3]
