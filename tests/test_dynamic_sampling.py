"""DAPO dynamic sampling (`vlm_rl/trainers/dynamic_sampling.py`): the group filter, the per-process choice of
segments, the merge of generation rounds, and real training steps of the tiny model with it on."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import small_config

from vlm_rl.config import VLMGRPOConfig
from vlm_rl.data import make_shapes_dataset
from vlm_rl.rewards.accuracy import accuracy
from vlm_rl.trainers import VLMGRPOTrainer
from vlm_rl.trainers.dynamic_sampling import (
    GroupFilter,
    Layout,
    Round,
    concat_rows,
    everyone_full,
    fresh_rows,
    pick_segments,
)

NAN = math.nan


def yellow_length(completions, answer, **kwargs):
    """Varies between completions of the yellow shapes' prompts only: every other group has all-equal rewards."""
    return [float(len(c[0]["content"])) if a == "yellow" else 0.0 for c, a in zip(completions, answer, strict=True)]


def test_groups_whose_total_reward_does_not_vary_are_dropped():
    # Two rewards, weights 1 and 0.5; groups of 2.
    rewards = torch.tensor(
        [
            [1.0, 0.0], [1.0, 0.0],  # all equal: dropped
            [1.0, 0.0], [0.0, 2.0],  # totals 1 and 1: equal after weighting, dropped
            [0.0, 1.0], [0.0, 0.0],  # varies
            [NAN, NAN], [1.0, 0.0],  # one unscorable row, one scored: nothing varies, dropped
            [NAN, 1.0], [NAN, 0.0],  # a reward that did not score: the other one varies
        ]
    )  # fmt: skip
    keep, spread = GroupFilter(torch.tensor([1.0, 0.5]), num_generations=2)(rewards)
    assert keep.tolist() == [False, False, True, False, True]
    assert spread[2] > 0 and spread[0] == 0
    # Eight equal totals of 1.2 (a right answer and a 0.2-weighted format reward): float32 `nanstd` gives 1.3e-7.
    right_and_formatted = torch.tensor([[1.0, 1.0]] * 8 + [[1.0, 1.0]] * 7 + [[0.0, 1.0]])
    keep, _ = GroupFilter(torch.tensor([1.0, 0.2]), num_generations=8)(right_and_formatted)
    assert keep.tolist() == [False, True]


def test_the_accuracy_band_keeps_groups_whose_mean_accuracy_is_inside_it_inclusive():
    accuracy_then_length = torch.tensor(
        [[0.0, 1.0], [0.0, 2.0], [1.0, 1.0], [0.0, 1.0], [1.0, 3.0], [1.0, 1.0], [1.0, 2.0], [NAN, 1.0]]
    )
    group_filter = GroupFilter(torch.ones(2), num_generations=2, band=(0.5, 1.0), accuracy_index=0)
    keep, _ = group_filter(accuracy_then_length)
    # Mean accuracies 0 (its length varies, but outside the band), 0.5, 1, 1 (NaN left out).
    assert keep.tolist() == [False, True, True, True]


def rounds_of(keeps: list[list[bool]], spreads: list[list[float]] | None = None) -> list[Round]:
    spreads = spreads or [[0.0] * len(keep) for keep in keeps]
    return [Round({}, torch.tensor(k), torch.tensor(s)) for k, s in zip(keeps, spreads, strict=True)]


def test_a_short_batch_is_padded_with_the_dropped_groups_of_largest_spread():
    layout = Layout(num_processes=1, process_index=0, rows_per_process=6, num_generations=2)  # 3 groups a round
    rounds = rounds_of([[True, False, False], [False, False, False]], [[1.0, 0.0, 0.5], [0.0, 0.7, 0.0]])
    assert not everyone_full(rounds, layout)
    picked, padded = pick_segments(rounds, layout, 0)
    assert picked == [(0, 0), (1, 1), (0, 2)] and padded == 2  # kept first, then spreads 0.7 and 0.5
    full = rounds_of([[True, False, True], [False, True, True]])
    assert everyone_full(full, layout)
    assert pick_segments(full, layout, 0) == ([(0, 0), (0, 2), (1, 1)], 0)  # in generation order, the rest unused


@pytest.mark.parametrize(("rows_per_process", "num_generations"), [(4, 2), (2, 2), (2, 4), (2, 8)])
def test_every_process_ends_with_the_same_number_of_segments_and_whole_groups(rows_per_process, num_generations):
    """Every process computes the rounds from the same gathered decisions, so they run the same rounds, and each
    keeps `segments_needed` segments; processes that share a group (G > N) keep the same groups."""
    processes = 4
    groups = processes * rows_per_process // num_generations
    generator = torch.Generator().manual_seed(0)
    any_layout = Layout(processes, 0, rows_per_process, num_generations)
    for _ in range(20):
        rounds = []
        while not rounds or (len(rounds) <= 3 and not everyone_full(rounds, any_layout)):
            keep = torch.rand(groups, generator=generator) < 0.4
            rounds.append(Round({}, keep, torch.rand(groups, generator=generator)))
        chosen = []
        for p in range(processes):
            layout = Layout(processes, p, rows_per_process, num_generations)
            picked, _ = pick_segments(rounds, layout, p)
            assert len(picked) == layout.segments_needed
            chosen.append([(r, layout.groups_of(p)[j]) for r, j in picked])
        sharing = max(1, num_generations // rows_per_process)  # processes holding parts of the same groups
        for first in range(0, processes, sharing):
            assert all(chosen[p] == chosen[first] for p in range(first, first + sharing))


def test_fresh_rows_are_one_draw_of_prompts_split_over_processes_as_trl_splits_them():
    per_process = [fresh_rows(Layout(2, p, 4, 2), seed=3, step=5, round_=1, dataset_size=100) for p in range(2)]
    rows = per_process[0] + per_process[1]
    assert rows[::2] == rows[1::2]  # each prompt repeated num_generations times, in a row
    assert per_process == [fresh_rows(Layout(2, p, 4, 2), 3, 5, 1, 100) for p in range(2)]  # as after a resume
    assert rows != fresh_rows(Layout(1, 0, 8, 2), 3, 5, 2, 100)  # another round draws other prompts


def test_rounds_of_image_and_text_rows_merge_into_one_batch_that_trains(load_tiny, tmp_path):
    """Two real scored rounds (one with images, one text-only, of other prompt and completion widths) merged as
    dynamic sampling merges them: every row as it was, and the trainer's loss runs on the merged batch."""
    model, processor = load_tiny("qwen2_vl")
    trainer = VLMGRPOTrainer(
        model=model,
        reward_funcs=[accuracy, yellow_length],
        args=small_config(tmp_path, dynamic_sampling=True),
        train_dataset=make_shapes_dataset(4),
        processing_class=processor,
    )
    trainer.model.train()
    images = trainer._scored_rows(list(make_shapes_dataset(4)))
    text = [{**row, "prompt": [{"role": "user", "content": "Name a colour, any colour at all."}]} for row in
            make_shapes_dataset(4, text_fraction=1.0)]  # fmt: skip
    text = trainer._scored_rows(text)
    assert images["prompt_ids"].size(1) != text["prompt_ids"].size(1) and "num_images" not in text
    merged = concat_rows([images, text], trainer._tokenizer.pad_token_id)
    assert merged["num_images"] == images["num_images"] + [0] * 4
    assert [tuple(t.shape) for t in merged["pixel_values"][4:]] == [(0, images["pixel_values"][0].size(1))] * 4
    for rows, part in ((range(4), images), (range(4, 8), text)):
        for i, row in zip(rows, range(4), strict=True):
            prompt = merged["prompt_ids"][i][merged["prompt_mask"][i].bool()]
            assert torch.equal(prompt, part["prompt_ids"][row][part["prompt_mask"][row].bool()])
            width = part["completion_ids"].size(1)
            assert torch.equal(merged["completion_ids"][i, :width], part["completion_ids"][row])
            assert torch.equal(merged["advantages"][i], part["advantages"][row])
    merged["num_items_in_batch"] = merged["completion_mask"].sum()
    trainer.current_gradient_accumulation_steps = 1  # set by `train()` before every step
    loss = trainer.compute_loss(trainer.model, trainer._merge_micro_batch(merged))
    assert torch.isfinite(loss)


def test_a_training_run_trains_only_on_groups_with_a_reward_spread(load_tiny, tmp_path):
    model, processor = load_tiny("qwen2_vl")
    trainer = VLMGRPOTrainer(
        model=model,
        reward_funcs=[accuracy, yellow_length],  # accuracy: all 0 on the random model; only yellow prompts vary
        args=small_config(tmp_path, dynamic_sampling=True, max_steps=3, max_resample_rounds=2),
        train_dataset=make_shapes_dataset(4),  # 2 of 4 prompts yellow
        processing_class=processor,
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    assert all(entry["dynamic_sampling/kept_fraction"] < 1 for entry in logged)
    assert any(entry["dynamic_sampling/rounds"] >= 1 for entry in logged)
    consumed = [entry["dynamic_sampling/prompts_consumed"] for entry in logged]
    generated = [2 * (1 + entry["dynamic_sampling/rounds"]) for entry in logged]  # 2 prompts a round
    assert consumed == list(itertools.accumulate(generated))
    # The last step's batch: 2 groups of 2; a row with zero advantage belongs to a group padded back in.
    batch = trainer._buffered_inputs[0]
    assert batch["advantages"].numel() == 4
    zero = int((batch["advantages"] == 0).sum())
    assert zero == 2 * logged[-1]["dynamic_sampling/padded_groups"]
    assert batch["num_items_in_batch"] == batch["completion_mask"].sum()


def test_without_dynamic_sampling_nothing_is_logged_or_regenerated(load_tiny, tmp_path):
    model, processor = load_tiny("qwen2_vl")
    trainer = VLMGRPOTrainer(
        model=model,
        reward_funcs=[accuracy, yellow_length],
        args=small_config(tmp_path, max_steps=1),
        train_dataset=make_shapes_dataset(4),
        processing_class=processor,
    )
    trainer.train()
    assert trainer.dynamic_sampling is None
    assert not any(key.startswith("dynamic_sampling/") for entry in trainer.state.log_history for key in entry)


def test_settings_it_cannot_honour_are_refused_in_one_line(load_tiny, tmp_path, monkeypatch):
    # Two processes of 3 rows each: 6 rows are 3 groups of 2, but a process would hold one and a half.
    monkeypatch.setattr(VLMGRPOConfig, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match=r"x steps_per_generation \(3\) to be a multiple or a divisor of num_gen"):
        VLMGRPOConfig(output_dir=str(tmp_path), dynamic_sampling=True, per_device_train_batch_size=3,
                      num_generations=2, use_cpu=True)  # fmt: skip
    VLMGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, num_generations=2, use_cpu=True)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"must be \[low, high\]"):
        small_config(tmp_path, dynamic_sampling_accuracy_band=[0.9, 0.1])
    model, processor = load_tiny("qwen2_vl")
    with pytest.raises(ValueError, match="scores the reward 'accuracy', which is not among the rewards"):
        VLMGRPOTrainer(
            model=model,
            reward_funcs=[yellow_length],
            args=small_config(tmp_path, dynamic_sampling=True, dynamic_sampling_accuracy_band=[0.1, 0.9]),
            train_dataset=make_shapes_dataset(4),
            processing_class=processor,
        )


def test_the_documented_dapo_recipe_is_valid(tmp_path):
    text = (Path(__file__).resolve().parent.parent / "docs" / "trainer.md").read_text()
    (block,) = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    config = VLMGRPOConfig(output_dir=str(tmp_path), use_cpu=True, **yaml.safe_load(block))
    assert config.dynamic_sampling and config.epsilon_high == 0.28
