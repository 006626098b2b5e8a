"""Gemma 3: `token_type_ids` mark the image soft tokens, which attend to each other bidirectionally.

They are per-token inputs, so they must line up with `input_ids` in every forward: left-padded with the
prompt, zero over the completion. TRL 1.16 builds them with a second processor call on the rendered prompt,
where Gemma's tokenizer adds its BOS in front of the template's: they come out one column wider than the prompt
ids, and used as they are, they mark the tokens one place to the right of the image tokens.
"""

import random

import pytest
import torch
from conftest import small_config
from PIL import Image
from trl.data_utils import prepare_multimodal_messages

from vlm_rl.data import make_shapes_dataset
from vlm_rl.data.synthetic import draw_shape
from vlm_rl.models import adapter_for, load_model_and_processor
from vlm_rl.trainers import VLMGRPOTrainer

IMAGE_SIZE = 28  # the tiny model's fixed image size


def mixed_rows() -> list[dict]:
    """Image, text-only, two-image and longer text-only rows (different prompt lengths), each twice."""
    rng = random.Random(0)
    images = [draw_shape("circle", "red", 56, rng), draw_shape("square", "blue", 40, rng)]
    rows = [
        ("What colour is the shape?", images[:1]),
        ("The circle is red. What colour is the circle? Answer with one word.", []),
        ("Are the two shapes the same colour?", images),
        ("Say yes.", []),
    ]
    return [{"prompt": [{"role": "user", "content": text}], "images": imgs, "answer": "red", "task": "image"}
            for text, imgs in rows for _ in range(2)]  # fmt: skip


def make_trainer(model, processor, tmp_path):
    args = small_config(tmp_path, per_device_train_batch_size=8, num_generations=2)
    return VLMGRPOTrainer(
        model=model, reward_funcs=[lambda completions, **kwargs: [0.0] * len(completions)], args=args,
        train_dataset=make_shapes_dataset(4), processing_class=processor,
    )  # fmt: skip


def reference_logps(model, processor, row, ids, prompt_length, *, bidirectional=True):
    """Completion log-probs of one unpadded row, `token_type_ids` taken from the image tokens themselves."""
    inputs = {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]}
    if row["images"]:
        conversation = prepare_multimodal_messages(row["prompt"], images=row["images"])
        text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        inputs["pixel_values"] = processor(text=[text], images=[row["images"]], return_tensors="pt")["pixel_values"]
    if bidirectional:
        inputs["token_type_ids"] = (ids == model.config.image_token_id).long()[None]
    with torch.no_grad():
        logits = model(**inputs).logits[0, prompt_length - 1 : -1]
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[prompt_length:, None])[:, 0]


def test_token_type_ids_line_up_with_left_padded_mixed_batches(load_tiny, tmp_path):
    model, processor = load_tiny("gemma3")
    trainer = make_trainer(model, processor, tmp_path)
    rows = mixed_rows()
    batch = trainer._generate_and_score_completions(rows)
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
    assert (prompt_mask[:, 0] == 0).any() and (prompt_mask[:, -1] == 1).all(), "prompts must be left-padded"
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    image_tokens = input_ids == model.config.image_token_id
    assert image_tokens.sum(-1).tolist() == [4, 4, 0, 0, 8, 8, 0, 0]  # 4 soft tokens per image

    # TRL's quirk: one leading column too many (the second BOS), all zeros; right-aligned, they mark exactly the
    # image tokens, and nothing in the completion.
    token_type_ids = batch["token_type_ids"]
    assert token_type_ids.size(1) == input_ids.size(1) + 1 and not token_type_ids[:, 0].any()
    assert torch.equal(token_type_ids[:, 1:].bool(), image_tokens)
    assert not token_type_ids[:, -completion_ids.size(1) :].any()

    # The trainer's log-probs, over chunks with and without images, equal unpadded forwards whose
    # token_type_ids come from the image tokens themselves, and differ from purely causal ones.
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    vision = {key: batch[key] for key in ("pixel_values", "token_type_ids", "num_images")}
    for chunk in (None, 2, 3):
        with torch.no_grad():
            logps, _, _ = trainer._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_ids.size(1), batch_size=chunk, **vision
            )
        for i, row in enumerate(rows):
            keep = completion_mask[i].bool()
            prompt = prompt_ids[i][prompt_mask[i].bool()]
            ids = torch.cat([prompt, completion_ids[i][keep]])
            expected = reference_logps(model, processor, row, ids, prompt.size(0))
            torch.testing.assert_close(logps[i][keep], expected, atol=1e-5, rtol=0, msg=f"row {i}, chunk {chunk}")
            if row["images"] and chunk is None:
                causal = reference_logps(model, processor, row, ids, prompt.size(0), bidirectional=False)
                assert (causal - expected).abs().max() > 1e-4, "the image block's attention must matter"


def test_pan_and_scan_stays_off_and_crops_are_refused(load_tiny):
    model, processor = load_tiny("gemma3")
    # The processor's own default (off) wins over the image processor's setting; TRL passes no per-call option.
    processor.image_processor.do_pan_and_scan = True
    processor.image_processor.pan_and_scan_min_crop_size = 8
    image = Image.new("RGB", (300, 60), "red")
    text = "<start_of_image>What colour?"
    assert processor(text=[text], images=[[image]], return_tensors="pt")["pixel_values"].size(0) == 1
    crops = processor(
        text=[text], images=[[image]], return_tensors="pt", do_pan_and_scan=True, pan_and_scan_min_crop_size=8
    )
    assert crops["pixel_values"].size(0) > 1
    with pytest.raises(ValueError, match="does not match this family's adapter"):
        adapter_for(model.config).split_vision_inputs(dict(crops), [1])


def test_pixel_bounds_are_refused_naming_the_fixed_size(tiny_dirs):
    with pytest.raises(ValueError, match=rf"one fixed size \({IMAGE_SIZE}×{IMAGE_SIZE} for this model\)"):
        load_model_and_processor(str(tiny_dirs["gemma3"]), max_pixels=64 * 64)
    load_model_and_processor(str(tiny_dirs["gemma3"]), min_pixels=None, max_pixels=None)
