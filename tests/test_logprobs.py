"""The trainer's per-token log-probs equal a direct single-sample forward, row by row, on mixed batches."""

import random

import pytest
import torch
from conftest import ALL_FAMILIES, small_config
from trl.data_utils import prepare_multimodal_messages

from vlm_rl.data import make_shapes_dataset
from vlm_rl.data.synthetic import draw_shape
from vlm_rl.models.adapters import PER_TOKEN_KEYS
from vlm_rl.rewards.accuracy import accuracy
from vlm_rl.trainers import VLMGRPOTrainer

NUM_GENERATIONS = 2


def mixed_rows(adapter):
    """Image, text-only and two-image rows of different prompt lengths (as the family allows), each repeated."""
    images = make_shapes_dataset(2, text_fraction=0.0, seed=3)
    texts = make_shapes_dataset(2, text_fraction=1.0, seed=4)
    rng = random.Random(0)
    two_images = {
        "prompt": [{"role": "user", "content": "Are the two shapes the same color?"}],
        "images": [draw_shape("circle", "red", 56, rng), draw_shape("square", "blue", 84, rng)],
        "answer": "no",
        "task": "image",
    }
    if not adapter.multi_image:  # one image, but still a prompt of another length
        two_images = {**two_images, "images": two_images["images"][:1]}
    rows = [images[0], texts[0], two_images, texts[1], images[1]]
    rows = [row for row in rows if (adapter.text_only or row["images"]) and (adapter.multi_image or
                                                                             len(row["images"]) < 2)]  # fmt: skip
    return [row for row in rows for _ in range(NUM_GENERATIONS)]


def single_sample_logps(model, processor, row, completion_ids):
    """Log-probs of `completion_ids` after `row`'s prompt, from one unpadded forward of that sample alone."""
    conversation = prepare_multimodal_messages(row["prompt"], images=row["images"])
    encoded = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    prompt_ids = encoded.pop("input_ids")
    encoded.pop("attention_mask")
    input_ids = torch.cat([prompt_ids, completion_ids[None]], dim=1)
    for key in PER_TOKEN_KEYS:
        if key in encoded:
            encoded[key] = torch.cat([encoded[key], torch.zeros_like(completion_ids)[None]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **encoded).logits
    logits = logits[0, prompt_ids.size(1) - 1 : -1].float()
    return prompt_ids[0], torch.log_softmax(logits, dim=-1).gather(-1, completion_ids[:, None])[:, 0]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_logprobs_match_single_sample_forward(family, load_tiny, tmp_path):
    model, processor = load_tiny(family)
    args = small_config(tmp_path, num_generations=NUM_GENERATIONS, per_device_train_batch_size=10)
    dataset = make_shapes_dataset(4)
    trainer = VLMGRPOTrainer(
        model=model, reward_funcs=[accuracy], args=args, train_dataset=dataset, processing_class=processor
    )
    rows = mixed_rows(trainer.adapter)
    batch = trainer._generate_and_score_completions(rows)

    prompt_mask = batch["prompt_mask"]
    assert (prompt_mask[:, 0] == 0).any() and (prompt_mask[:, -1] == 1).all(), "prompts must be left-padded"
    assert batch["num_images"] == [len(row["images"]) for row in rows]
    adapter = trainer.adapter
    vision_inputs = {key: batch[key] for key in (*adapter.image_keys, *adapter.row_keys, "num_images", "num_tiles")
                     if key in batch}  # fmt: skip

    # One chunk for the whole batch, chunks of two (some without any image) and chunks of three.
    assert_chunks_match_single_samples(trainer, model, processor, rows, batch, vision_inputs)


def assert_chunks_match_single_samples(
    trainer, model, processor, rows, batch, inputs, single_sample=None
) -> torch.Tensor:
    """The batch's log-probs, in one chunk and in chunks of 2 and 3, equal each row's single-sample forward (1e-5;
    `single_sample(model, processor, row, completion)`, by default `single_sample_logps`); returns the last
    chunking's log-probs."""
    single_sample = single_sample or single_sample_logps
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    for chunk_size in (None, 2, 3):
        with torch.no_grad():
            logps, _, _ = trainer._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_ids.size(1), batch_size=chunk_size, **inputs
            )
        for i, row in enumerate(rows):
            row_completion = completion_ids[i][completion_mask[i].bool()]
            ref_prompt, ref_logps = single_sample(model, processor, row, row_completion)
            assert torch.equal(prompt_ids[i][prompt_mask[i].bool()], ref_prompt)
            ours = logps[i][completion_mask[i].bool()]
            torch.testing.assert_close(ours, ref_logps, atol=1e-5, rtol=0, msg=f"row {i}, chunk size {chunk_size}")
    return logps
