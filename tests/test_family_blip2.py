"""BLIP-2 and InstructBLIP: query tokens prepended to every row, one image per row, the Q-Former's own text."""

import random

import pytest
import torch
from conftest import small_config
from test_training import select_micro_batch
from trl.data_utils import prepare_multimodal_messages

from vlm_rl.data import make_shapes_dataset
from vlm_rl.data.synthetic import draw_shape
from vlm_rl.models import adapter_for
from vlm_rl.rewards.accuracy import accuracy
from vlm_rl.trainers import VLMGRPOTrainer

FAMILIES = ["blip2", "instructblip"]


def conversations(image_counts):
    rng = random.Random(0)
    images = [draw_shape("circle", "red", 56, rng), draw_shape("square", "blue", 84, rng)]
    return [
        prepare_multimodal_messages([{"role": "user", "content": "What color is the shape?"}], images=images[:n])
        for n in image_counts
    ]


def trainer_for(family, load_tiny, tmp_path):
    model, processor = load_tiny(family)
    args = small_config(tmp_path, num_generations=2, per_device_train_batch_size=4)
    dataset = make_shapes_dataset(4, text_fraction=0.0)
    return VLMGRPOTrainer(
        model=model, reward_funcs=[accuracy], args=args, train_dataset=dataset, processing_class=processor
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_prepends_query_tokens_to_every_row(family, load_tiny):
    """Why rows must hold exactly one image: the query tokens go before BOS of each row, whatever its images."""
    model, processor = load_tiny(family)
    batch = processor.apply_chat_template(
        conversations([1, 0]), add_generation_prompt=True, tokenize=True, return_dict=True, padding=True,
        return_tensors="pt",
    )  # fmt: skip
    queries = model.config.num_query_tokens
    tokenizer = processor.tokenizer
    assert batch["pixel_values"].size(0) == 1
    for row in range(2):  # the text-only row too
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        assert ids[:queries].eq(model.config.image_token_id).all()
        assert ids[queries] == tokenizer.bos_token_id and ids[queries + 1 :].ne(model.config.image_token_id).all()
    assert "Question: What color is the shape? Answer:" in tokenizer.decode(ids)


def test_instructblip_qformer_reads_the_rendered_prompt(load_tiny):
    _, processor = load_tiny("instructblip")
    batch = processor.apply_chat_template(
        conversations([1]), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    qformer = processor.qformer_tokenizer
    ids = batch["qformer_input_ids"][0].tolist()
    assert ids[0] == qformer.cls_token_id and ids[-1] == qformer.sep_token_id
    assert qformer.decode(ids[1:-1]) == "Question: What color is the shape? Answer:"


@pytest.mark.parametrize("family", ["blip2", "instructblip"])
@pytest.mark.parametrize(
    ("counts", "message"), [((2, 2, 1, 1), "row 0 of this batch has 2"), ((1, 0, 1, 0), "row 1 of this batch has 0")]
)
def test_rows_without_exactly_one_image_are_refused(family, counts, message, load_tiny, tmp_path):
    """Unchecked, BLIP-2 would train silently on two-image rows (it scatters image features in batch order, into
    the next row's tokens) and both families fail with shape errors on text-only rows."""
    trainer = trainer_for(family, load_tiny, tmp_path)
    trainer.model.train()
    rng = random.Random(0)
    rows = [
        {"prompt": [{"role": "user", "content": "Same color?"}], "answer": "no", "task": "image",
         "images": [draw_shape("circle", "red", 56, rng), draw_shape("square", "blue", 84, rng)][:count]}
        for count in counts
    ]  # fmt: skip
    with pytest.raises(ValueError, match=rf"rows take one image; {message} image\(s\)"):
        trainer._prepare_inputs(rows)


def test_instructblip_qformer_inputs_reach_generation_scoring_and_loss(load_tiny, tmp_path):
    """TRL would left-pad `qformer_input_ids` for generation (shifting the Q-Former's absolute positions) and
    leave them out of the training batch; the trainer pads them on the right and carries them to the loss."""
    trainer = trainer_for("instructblip", load_tiny, tmp_path)
    seen = []
    trainer.model.qformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    rows = [row for row in make_shapes_dataset(2, text_fraction=0.0, seed=5) for _ in range(2)]
    longer = [{"role": "user", "content": "Name the color of this shape, in one word."}]
    rows[2:] = [{**rows[2], "prompt": longer}] * 2
    batch = trainer._generate_and_score_completions(rows)

    ids, mask = batch["qformer_input_ids"], batch["qformer_attention_mask"]
    assert ids.size(0) == 4 and mask[:, 0].all() and not mask[:, -1].all() and (mask.diff(dim=1) <= 0).all()
    assert seen and all(torch.equal(call, ids) for call in seen), "generation and scoring read these rows"

    seen.clear()
    micro_batch = select_micro_batch(trainer, batch, [3, 0])
    trainer.compute_loss(trainer.model, micro_batch)
    assert len(seen) == 1 and torch.equal(seen[0], ids[[3, 0]])


@pytest.mark.parametrize("family", FAMILIES)
def test_image_size_bounds_are_refused_with_the_fixed_size(family, load_tiny):
    model, processor = load_tiny(family)
    with pytest.raises(ValueError, match=r"one fixed size \(28×28 for this model\)"):
        adapter_for(model.config).set_image_size_bounds(processor, None, 100_000)
