"""With prompts shared, micro-batches hold whole prompt groups; the shuffle still reorders prompts and rows."""

from collections import Counter

import pytest
import torch
from conftest import small_config

from vlm_rl.data import make_shapes_dataset
from vlm_rl.rewards.accuracy import accuracy
from vlm_rl.trainers import VLMGRPOTrainer


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
