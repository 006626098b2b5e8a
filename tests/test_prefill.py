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


def generate_inputs(trainer, processor) -> tuple[dict, list]:
    """`generate`'s inputs for the family's repeated mixed rows, left-padded as TRL pads them; and the rows' images."""
    _, prompts = repeated_prompts(trainer)
    prompt_ids, images, fields = trainer._tokenize_prompts(prompts)
    inputs = {
        "input_ids": pad([torch.tensor(ids) for ids in prompt_ids], processor.tokenizer.pad_token_id, "left"),
        "attention_mask": pad([torch.ones(len(ids), dtype=torch.long) for ids in prompt_ids], 0, "left"),
    }
    assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch must mix prompt lengths (left padding)"
    for key, value in fields.items():
        if key in PER_TOKEN_KEYS:
            inputs[key] = pad([torch.tensor(row) for row in value], 0, "left")
        elif key in trainer.adapter.image_keys:
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
