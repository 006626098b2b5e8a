"""Generation on the policy leaves rows that have emitted EOS out of the decoding forwards, with the same tokens and
the same logits for the rows still going."""

import pytest
import torch
from conftest import ALL_FAMILIES, shapes_trainer
from test_prefill import generate_inputs, language_model_calls, repeated_prompts
from transformers import LogitsProcessorList

from vlm_rl.rollout.finished_rows import finished_rows_left_out
from vlm_rl.rollout.prefill import prompts_prefilled_once

# BLIP-2 and InstructBLIP hand `inputs_embeds` to their language model's own `generate`: they decode every row.
DECODING_FAMILIES = [family for family in ALL_FAMILIES if family not in ("blip2", "instructblip")]


class EndsAt:
    """Ends row i's completion with EOS at `lengths[i]` tokens (EOS ruled out before), whatever the weights say."""

    def __init__(self, prompt_length: int, lengths: torch.Tensor, eos: int):
        self.prompt_length, self.lengths, self.eos = prompt_length, lengths, eos

    def __call__(self, input_ids, scores):
        position = input_ids.size(1) - self.prompt_length
        scores[position < self.lengths - 1, self.eos] = -float("inf")
        at_end = position == self.lengths - 1
        scores[at_end] = -float("inf")
        scores[at_end, self.eos] = 0.0
        return scores


def uneven_generate(model, processor, inputs, lengths: torch.Tensor, sample: bool):
    eos = processor.tokenizer.eos_token_id
    torch.manual_seed(0)
    return model.generate(
        **inputs,
        do_sample=sample,
        max_new_tokens=int(lengths.max()) + 2,
        logits_processor=LogitsProcessorList([EndsAt(inputs["input_ids"].size(1), lengths, eos)]),
        eos_token_id=eos,
        pad_token_id=processor.tokenizer.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )


def assert_same_generation(ours, stock, lengths: torch.Tensor) -> None:
    """The same tokens as stock `generate`, and the same logits for each row until its EOS."""
    assert torch.equal(ours.sequences, stock.sequences)
    for step, (mine, theirs) in enumerate(zip(ours.logits, stock.logits, strict=True)):
        going = step < lengths
        torch.testing.assert_close(mine[going], theirs[going], atol=1e-5, rtol=0, msg=f"token {step}")


@pytest.mark.parametrize("family", DECODING_FAMILIES)
def test_ended_rows_leave_the_decoding_forwards_with_the_same_tokens_and_logits(family, load_tiny, tmp_path):
    model, processor = load_tiny(family)
    trainer = shapes_trainer(model, processor, tmp_path)
    inputs, images = generate_inputs(trainer, processor)
    rows = inputs["input_ids"].size(0)
    lengths = torch.tensor([2 + 3 * (i % 4) for i in range(rows)])  # 2, 5, 8, 11 tokens
    before = (vars(model).get("forward"), vars(model).get("generate"))
    for sample in (True,):  # sampled with a fixed seed: the same logits also give the same greedy tokens
        stock = uneven_generate(model, processor, inputs, lengths, sample)
        calls, hook = language_model_calls(model)
        try:
            with finished_rows_left_out(model, model, trainer.adapter):
                ours = uneven_generate(model, processor, inputs, lengths, sample)
        finally:
            hook.remove()
        assert_same_generation(ours, stock, lengths)
        # After the prefill, forward i runs the rows whose EOS comes later than token i.
        decoded = [batch for batch, tokens in calls[1:]]
        assert decoded == [max(1, int((lengths > step).sum())) for step in range(1, len(decoded) + 1)]
    assert (vars(model).get("forward"), vars(model).get("generate")) == before, "the wrappers are removed on exit"


def test_ended_rows_leave_a_prefilled_generation_too(load_tiny, tmp_path):
    """With each prompt prefilled once (Qwen-VL: M-RoPE offsets kept per row), in `_generate_single_turn`."""
    model, processor = load_tiny("qwen2_vl")
    trainer = shapes_trainer(model, processor, tmp_path)
    inputs, images = generate_inputs(trainer, processor)
    lengths = torch.tensor([1 + 4 * (i % 3) for i in range(inputs["input_ids"].size(0))])  # 1, 5, 9 tokens
    stock = uneven_generate(model, processor, inputs, lengths, sample=True)
    prefilled = prompts_prefilled_once(model, model, trainer.adapter, [len(row) for row in images])
    with finished_rows_left_out(model, model, trainer.adapter), prefilled:
        ours = uneven_generate(model, processor, inputs, lengths, sample=True)
    assert torch.equal(ours.sequences, stock.sequences)
    for step, (mine, theirs) in enumerate(zip(ours.logits, stock.logits, strict=True)):
        going = step < lengths
        torch.testing.assert_close(mine[going], theirs[going], atol=1e-5, rtol=0, msg=f"token {step}")


def test_the_trainer_decodes_only_the_rows_still_going(load_tiny, tmp_path):
    model, processor = load_tiny("qwen2_vl")
    eos = processor.tokenizer.eos_token_id
    trainer = shapes_trainer(model, processor, tmp_path, max_completion_length=12)
    rows, prompts = repeated_prompts(trainer)
    prompt_ids, images, fields = trainer._tokenize_prompts(prompts)
    longest = max(len(ids) for ids in prompt_ids)
    lengths = torch.tensor([3 + 4 * (i % 2) for i in range(len(rows))])  # 3 and 7 tokens
    trainer.generation_config.eos_token_id = eos
    original = model.generate

    def generate(*args, **kwargs):
        return original(*args, logits_processor=LogitsProcessorList([EndsAt(longest, lengths, eos)]), **kwargs)

    model.generate = generate
    calls, hook = language_model_calls(model)
    try:
        completions, _ = trainer._generate_single_turn(prompt_ids, images, fields, 3)
    finally:
        hook.remove()
    assert [len(ids) for ids in completions] == lengths.tolist()
    half = int((lengths > 3).sum())
    # The prefill of the distinct prompts, each prompt's last token for every row, then rows as they go on.
    assert [batch for batch, _ in calls[1:]] == [len(rows)] * 3 + [half] * 4


def test_steps_per_generation_prefill_once_and_long_completions_end_early(load_tiny, tmp_path):
    """With `steps_per_generation = 2` one rollout serves two steps: it prefills each of its distinct prompts once,
    and with completions of up to 24 tokens, rows leave the decoding forwards as they end."""
    model, processor = load_tiny("qwen2_vl")
    eos = processor.tokenizer.eos_token_id
    trainer = shapes_trainer(model, processor, tmp_path, steps_per_generation=2, max_completion_length=24, max_steps=2)
    trainer.generation_config.eos_token_id = eos
    original, rollouts = model.generate, []

    def generate(*args, **kwargs):
        rows, prompt_length = kwargs["input_ids"].shape
        lengths = torch.tensor([2 + 7 * (row % 4) for row in range(rows)])  # 2, 9, 16 and 23 tokens
        rollouts.append(rows)
        return original(*args, logits_processor=LogitsProcessorList([EndsAt(prompt_length, lengths, eos)]), **kwargs)

    model.generate = generate
    calls, hook = language_model_calls(model)
    try:
        trainer.train()
    finally:
        hook.remove()
    # One rollout of 2 steps × 4 rows = 4 prompts × G = 2; generation's calls are the ones before the first scoring.
    assert rollouts == [8]
    prefill, *decoding = calls[: calls.index(next(call for call in calls[1:] if call[1] > 1))]
    assert prefill[0] == 4 and prefill[1] > 1
    assert [rows for rows, _ in decoding] == [8] * 2 + [6] * 7 + [4] * 7 + [
        2
    ] * 7  # a row runs as many forwards as it has tokens
