"""LLaVA-1.5 / NeXT / OneVision: per-image `image_sizes` and tiles follow their rows; fixed-size image rules."""

import random

import pytest
import torch
from conftest import small_config
from PIL import Image
from transformers import AutoConfig
from trl.data_utils import prepare_multimodal_messages

from vlm_rl.data import make_shapes_dataset
from vlm_rl.models import adapter_for, load_model_and_processor
from vlm_rl.models.processing import load_processor
from vlm_rl.trainers import VLMGRPOTrainer

TILED = ["llava_next", "llava_onevision"]
# (width, height) of each row's images: a wide image, none, two of different shapes, a tall one.
ROW_SIZES = [[(84, 56)], [], [(56, 84), (30, 90)], [(28, 112)]]


def noise(width: int, height: int, rng: random.Random) -> Image.Image:
    """An image whose pixels are its own, so a tile handed to another image would show."""
    return Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))


def make_rows(sizes=ROW_SIZES) -> list[dict]:
    rng = random.Random(0)
    return [
        {"prompt": [{"role": "user", "content": f"What is shape {k}?"}], "images": [noise(*s, rng) for s in images],
         "answer": "red", "task": "image"}
        for k, images in enumerate(sizes)
    ]  # fmt: skip


def encode(processor, rows: list[dict]) -> dict:
    """One processor call for `rows`, with one image list per text, as TRL calls it."""
    texts = [
        processor.apply_chat_template(
            prepare_multimodal_messages(row["prompt"], images=row["images"]),
            add_generation_prompt=True,
            tokenize=False,
        )
        for row in rows
    ]
    return dict(processor(text=texts, images=[row["images"] for row in rows], padding=True, return_tensors="pt"))


def longer_is_better(completions, **kwargs):
    return [float(len(completion[0]["content"])) for completion in completions]


def pad_tiles(pixel_values: torch.Tensor, tiles: int) -> torch.Tensor:
    missing = tiles - pixel_values.size(1)
    return torch.cat([pixel_values, pixel_values.new_zeros(pixel_values.size(0), missing, *pixel_values.shape[2:])], 1)


@pytest.mark.parametrize("family", TILED)
def test_image_sizes_and_tiles_stay_with_their_rows_through_the_trainers_split(family, load_tiny, tmp_path):
    """Micro-batches cut from a shuffled generation batch hold exactly their own rows' sizes and tiles."""
    model, processor = load_tiny(family)
    rows = [row for row in make_rows() for _ in range(2)]
    args = small_config(tmp_path, per_device_train_batch_size=4, steps_per_generation=2)
    trainer = VLMGRPOTrainer(
        model=model, reward_funcs=[longer_is_better], args=args, train_dataset=make_shapes_dataset(4),
        processing_class=processor,
    )  # fmt: skip
    model.train()
    micro_batches = [trainer._prepare_inputs(rows)]
    trainer._step += 1
    micro_batches.append(trainer._prepare_inputs(rows))  # the buffered second micro-batch of the same generation

    seen = []
    for micro in micro_batches:
        offset = 0
        tiles = micro["pixel_values"].size(1)
        for ids, mask, count in zip(micro["prompt_ids"], micro["prompt_mask"], micro["num_images"], strict=True):
            prompt = processor.tokenizer.decode(ids[mask.bool()])
            k = next(k for k in range(len(ROW_SIZES)) if f"shape {k}?" in prompt)
            seen.append(k)
            own = slice(offset, offset + count)
            expected_sizes = torch.tensor([[h, w] for w, h in ROW_SIZES[k]], dtype=torch.long).reshape(-1, 2)
            assert torch.equal(micro["image_sizes"][own], expected_sizes), (k, micro["image_sizes"])
            if count:
                alone = encode(processor, [make_rows()[k]])["pixel_values"]
                assert torch.equal(micro["pixel_values"][own], pad_tiles(alone, tiles)), k
            offset += count
        assert offset == micro["image_sizes"].size(0) == micro["pixel_values"].size(0)
        if family == "llava_onevision":  # rebuilt per micro-batch: TRL drops it from the batch it trains on
            assert micro["batch_num_images"].tolist() == [n for n in micro["num_images"] if n]
    assert sorted(seen) == sorted(k for k in range(len(ROW_SIZES)) for _ in range(2))
    # Both micro-batches make a valid loss through the trainer's own path, text-only rows included.
    model.eval()  # (TRL's training-mode loss reads the trainer loop's gradient-accumulation state)
    for micro in micro_batches:
        assert torch.isfinite(trainer.compute_loss(model, micro))


@pytest.mark.parametrize("family", TILED)
def test_rows_encoded_by_different_processor_calls_merge(family, load_tiny):
    """The processor pads tiles to the most of its own call; merged rows are padded again and keep their features.

    A wide (1×3 tiles + base) and a square (2×2 + base) image in one call, a small one (fewer tiles) in another.
    """
    model, processor = load_tiny(family)
    adapter = adapter_for(model.config)
    rows = make_rows([[(84, 28)], [(56, 56)], [(28, 28)]])
    first, second = encode(processor, rows[:2]), encode(processor, rows[2:])
    assert first["pixel_values"].size(1) != second["pixel_values"].size(1)  # torch.cat alone would fail

    first, second = ({key: inputs[key] for key in adapter.image_keys if key in inputs} for inputs in (first, second))
    a, b = adapter.split_vision_inputs(first, [1, 1]), adapter.split_vision_inputs(second, [1])
    merged = adapter.merge_vision_inputs({key: [b[key][0], a[key][0], a[key][1]] for key in a})
    assert merged["image_sizes"].tolist() == [[28, 28], [28, 84], [56, 56]]

    with torch.no_grad():
        features = model.model.get_image_features(**merged).pooler_output
        alone = [model.model.get_image_features(**vision).pooler_output for vision in (second, first)]
    for ours, ref in zip(features, [*alone[0], *alone[1]], strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_onevision_tiles_a_lone_image_and_not_one_of_several(load_tiny):
    """OneVision's rule: a row with one image gets anyres tiles, a row with several one square tile each."""
    model, processor = load_tiny("llava_onevision")
    rows = make_rows([[(84, 56)], [(84, 56), (84, 56)]])
    encoded = encode(processor, rows)
    image_tokens = (encoded["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert encoded["batch_num_images"].tolist() == [1, 2]
    # Each image of the two-image row: one 2×2-feature tile and a newline.
    assert image_tokens[1] == 2 * (4 + 1) and image_tokens[0] > image_tokens[1]
    split = adapter_for(model.config).split_vision_inputs(encoded, [1, 2])
    assert [value.tolist() for value in split["batch_num_images"]] == [[1], [2]]
    with pytest.raises(ValueError, match="does not match the images per sample"):
        adapter_for(model.config).split_vision_inputs(encoded, [2, 1])


def test_onevision_processor_keeps_its_settings_without_torchvision(tiny_dirs, tmp_path):
    """The image-only processor (no video processor) still saves and loads OneVision's own settings."""
    processor = load_processor(str(tiny_dirs["llava_onevision"]))
    settings = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")
    assert [getattr(processor, name) for name in settings] == [4, "full", "anyres_max_9"]
    processor.save_pretrained(tmp_path)
    AutoConfig.from_pretrained(tiny_dirs["llava_onevision"]).save_pretrained(tmp_path)  # names the model type
    reloaded = load_processor(str(tmp_path))
    assert [getattr(reloaded, name) for name in settings] == [4, "full", "anyres_max_9"]


@pytest.mark.parametrize(
    ("family", "message"),
    [
        ("llava", r"one fixed size \(56×56 for this model\)"),
        ("llava_next", r"`image_grid_pinpoints` \(here 5 resolutions, up to 56×56\)"),
        ("llava_onevision", r"`image_grid_pinpoints` \(here 9 resolutions, up to 84×84\)"),
    ],
)
def test_min_max_pixels_are_refused_with_the_rule_that_applies(family, message, tiny_dirs):
    for bounds in ({"min_pixels": 28 * 28}, {"max_pixels": 56 * 56}):
        with pytest.raises(ValueError, match=message):
            load_model_and_processor(str(tiny_dirs[family]), **bounds)


@pytest.mark.parametrize(
    ("family", "idle_prefixes"),
    [
        ("llava", ("model.vision_tower.encoder.layers.1.", "model.vision_tower.post_layernorm.")),
        ("llava_next", ("model.vision_tower.encoder.layers.1.", "model.vision_tower.post_layernorm.")),
        ("llava_onevision", ("model.vision_tower.post_layernorm.",)),
    ],
)
def test_vision_features_come_from_the_configured_layer(family, idle_prefixes, load_tiny):
    """CLIP families read the second-to-last of the two layers (so its last layer and post-layernorm get no
    gradient), as the real checkpoints do; OneVision reads SigLIP's last layer, before its post-layernorm."""
    model, processor = load_tiny(family)
    model(**encode(processor, make_rows([[(56, 56)]]))).logits.sum().backward()
    idle = {name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()}
    assert idle == {name for name, _ in model.named_parameters() if name.startswith(idle_prefixes)}
    assert idle
