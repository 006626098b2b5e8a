"""Generation on the policy prefills each distinct prompt once: same completions and logits as stock `generate`."""

import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ALL_FAMILIES, shapes_trainer
from test_logprobs import mixed_rows
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.utils import pad

from vlm_rl.models import tiny_families
from vlm_rl.models.adapters import PER_TOKEN_KEYS
from vlm_rl.rollout.prefill import prompts_prefilled_once

SHARED_FAMILIES = [family for family in ALL_FAMILIES if tiny_families()[family].shares_prompts]
COPIES = 3


def repeated_prompts(trainer):
    """The family's mixed rows, each prompt `COPIES` times, shuffled so that copies are not adjacent."""
    rows = [row for row in mixed_rows(trainer.adapter)[::2] for _ in range(COPIES)]
    random.Random(0).shuffle(rows)
    return rows, [prepare_multimodal_messages(row["prompt"], images=row["images"]) for row in rows]


def language_model_calls(model):
    """(rows, tokens) of every forward of the language model, recorded while the returned hook is registered."""
    calls = []

    def record(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        calls.append(tuple((embeds if embeds is not None else kwargs["input_ids"]).shape[:2]))

    return calls, model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)


@pytest.mark.parametrize("family", SHARED_FAMILIES)
def test_generation_prefills_each_prompt_once_with_the_same_completions(family, load_tiny, tmp_path):
    model, processor = load_tiny(family)
    trainer = shapes_trainer(
        model, processor, tmp_path, max_completion_length=5, generation_kwargs={"do_sample": False}
    )
    rows, prompts = repeated_prompts(trainer)
    completions, calls = {}, {}
    for shared in (False, True):
        trainer.options = replace(trainer.options, share_prompt_prefix=shared)
        prompt_ids, images, fields = trainer._tokenize_prompts(prompts)
        calls[shared], hook = language_model_calls(model)
        try:
            completions[shared], _ = trainer._generate_single_turn(prompt_ids, images, fields, COPIES)
        finally:
            hook.remove()
    assert completions[True] == completions[False]
    distinct = len({id(row) for row in rows})  # the copies of a prompt are one row object
    assert calls[False][0][0] == len(rows)
    # The prefill: one row per distinct prompt, all of it but its last token; then every row goes on.
    assert calls[True][0] == (distinct, calls[False][0][1] - 1)
    assert calls[True][1] == (len(rows), 1)


def generate_inputs(trainer, processor, prompts: list | None = None) -> tuple[dict, list]:
    """`generate`'s inputs for `prompts` (by default the family's repeated mixed rows), left-padded as TRL pads them;
    and the rows' images."""
    prompts = prompts if prompts is not None else repeated_prompts(trainer)[1]
    prompt_ids, images, fields = trainer._tokenize_prompts(prompts)
    inputs = {
        "input_ids": pad([torch.tensor(ids) for ids in prompt_ids], processor.tokenizer.pad_token_id, "left"),
        "attention_mask": pad([torch.ones(len(ids), dtype=torch.long) for ids in prompt_ids], 0, "left"),
    }
    assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch must mix prompt lengths (left padding)"
    for key, value in fields.items():
        if key in PER_TOKEN_KEYS:
            inputs[key] = pad([torch.tensor(row) for row in value], 0, "left")
        elif key in (*trainer.adapter.image_keys, *trainer.adapter.video_keys):
            inputs[key] = value if isinstance(value, torch.Tensor) else torch.tensor(np.array(value))
    return inputs, images


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_prefilled_generation_has_the_logits_of_stock_generate(family, load_tiny, tmp_path):
    """M-RoPE offsets (Qwen-VL) and left-padding positions (LLaVA) carry over from the prefill exactly."""
    model, processor = load_tiny(family)
    trainer = shapes_trainer(model, processor, tmp_path)
    inputs, images = generate_inputs(trainer, processor)
    settings = {"do_sample": False, "max_new_tokens": 4, "output_logits": True, "return_dict_in_generate": True}
    stock = model.generate(**inputs, **settings)
    with prompts_prefilled_once(model, model, trainer.adapter, [len(row) for row in images]):
        prefilled = model.generate(**inputs, **settings)
    assert torch.equal(prefilled.sequences, stock.sequences)
    for step, (ours, theirs) in enumerate(zip(prefilled.logits, stock.logits, strict=True)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0, msg=f"logits of generated token {step}")


VIDEO_FAMILIES = [family for family in SHARED_FAMILIES if tiny_families()[family].shares_video_prompts]


def video_trainer_and_rows(family, load_tiny, tmp_path):
    """A trainer on video, image-plus-video, image and text prompts (`test_sharing.video_prompts`), and those rows
    each `COPIES` times, shuffled, with each row's clip in its prompt."""
    from test_sharing import video_prompts
    from test_video import video_trainer

    from vlm_rl.trainers.video_rows import prompts_with_videos

    model, processor = load_tiny(family)
    rows = [row for row in video_prompts() for _ in range(COPIES)]
    random.Random(0).shuffle(rows)
    trainer = video_trainer(model, processor, tmp_path, rows, num_generations=COPIES, max_completion_length=5)
    return model, processor, trainer, prompts_with_videos(rows, trainer.adapter, processor, uses_tools=False)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_prompts_prefilled_once_with_rows_ending_early_have_the_logits_of_stock_generate(
    family, load_tiny, tmp_path
):
    """M-RoPE of the videos (Qwen2.5-VL's timing, Qwen3-VL's timestamps) carries over from the prefill; two clips
    under one question stay two prompts; rows that end leave the decoding forwards (sampled, fixed seed)."""
    from test_finished_rows import assert_same_generation, uneven_generate

    from vlm_rl.rollout.finished_rows import finished_rows_left_out
    from vlm_rl.trainers.video_rows import count_videos

    model, processor, trainer, rows = video_trainer_and_rows(family, load_tiny, tmp_path)
    prompts = [prepare_multimodal_messages(row["prompt"], images=row["images"]) for row in rows]
    inputs, images = generate_inputs(trainer, processor, prompts)
    assert "pixel_values_videos" in inputs
    lengths = torch.tensor([1 + 3 * (i % 3) for i in range(len(rows))])  # 1, 4, 7 tokens
    stock = uneven_generate(model, processor, inputs, lengths, sample=True)
    prefilled = prompts_prefilled_once(model, model, trainer.adapter, [len(row) for row in images], None,
                                       count_videos(prompts))  # fmt: skip
    calls, hook = language_model_calls(model)
    try:
        with finished_rows_left_out(model, model, trainer.adapter), prefilled:
            ours = uneven_generate(model, processor, inputs, lengths, sample=True)
    finally:
        hook.remove()
    assert_same_generation(ours, stock, lengths)
    # One prefill row per distinct prompt (5: the two clips under one question apart), then the rows still going.
    assert calls[0] == (5, inputs["input_ids"].size(1) - 1)
    assert [rows for rows, _ in calls[1:]] == [len(rows)] + [max(1, int((lengths > step).sum())) for step in
                                                              range(1, len(calls) - 1)]  # fmt: skip


def test_the_trainer_prefills_video_prompts_once_with_the_completions_of_plain_generation(load_tiny, tmp_path):
    """`_generate_and_score_completions` on a batch with videos: each distinct prompt prefilled once, and the same
    sampled completions (fixed seed) as with prompt sharing off."""
    model, processor, trainer, rows = video_trainer_and_rows("qwen2_5_vl", load_tiny, tmp_path)
    trainer.generation_config.do_sample = True
    completions, calls = {}, {}
    for shared in (False, True):
        trainer.options = replace(trainer.options, share_prompt_prefix=shared)
        calls[shared], hook = language_model_calls(model)
        torch.manual_seed(0)
        try:
            completions[shared] = trainer._generate_and_score_completions(rows)["completion_ids"]
        finally:
            hook.remove()
    assert torch.equal(completions[True], completions[False])
    assert calls[False][0][0] == len(rows)
    assert calls[True][0][0] == 5 and calls[True][1] == (len(rows), 1)
