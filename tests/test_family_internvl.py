"""InternVL 3: tile-indexed `pixel_values` [total tiles, C, H, W], which must be cut per sample by tile counts.

Which tiles belong to which sample is not in the model inputs: TRL 1.16 recomputes the tiles per sample
(`num_tiles`) from the image processor, and only when some image has more than one tile. The adapter splits by
`num_tiles` when present and by `num_images` otherwise (then every image is exactly one tile).
"""

import pytest
import torch
from conftest import small_config
from PIL import Image
from test_logprobs import single_sample_logps
from trl.data_utils import prepare_multimodal_messages

from vlm_rl.data import make_shapes_dataset
from vlm_rl.models import adapter_for, load_model_and_processor
from vlm_rl.trainers import VLMGRPOTrainer

TILE = 28  # the tiny model's tile; at most 4 tiles per grid, plus a thumbnail for a grid of several
# (width, height) → tiles: a 2×1 grid + thumbnail, a 2×2 grid + thumbnail, one tile.
WIDE, SQUARE, SMALL = (56, 28), (56, 56), (28, 28)
TILES = {WIDE: 3, SQUARE: 5, SMALL: 1}


def rows_with(sizes: list[list[tuple[int, int]]]) -> list[dict]:
    """One row per entry, with images of the given sizes (none: text-only), told apart by their prompts."""
    colors = ["red", "blue", "green"]
    return [
        {"prompt": [{"role": "user", "content": f"Row {i}: which colours?"}], "answer": "red", "task": "image",
         "images": [Image.new("RGB", size, colors[k]) for k, size in enumerate(row_sizes)]}
        for i, row_sizes in enumerate(sizes)
    ]  # fmt: skip


MIXED = [[WIDE], [], [SQUARE], [SMALL, WIDE], [], [SQUARE, SMALL]]


def make_trainer(model, processor, tmp_path, **overrides):
    args = small_config(tmp_path, **{"per_device_train_batch_size": 6, "num_generations": 2, **overrides})
    return VLMGRPOTrainer(
        model=model, reward_funcs=[lambda completions, **kwargs: [0.0] * len(completions)], args=args,
        train_dataset=make_shapes_dataset(6), processing_class=processor,
    )  # fmt: skip


def own_tiles(processor, row: dict) -> torch.Tensor:
    """The tiles of `row`'s images alone, from a processor call on that row only."""
    text = processor.apply_chat_template(
        prepare_multimodal_messages(row["prompt"], images=row["images"]), add_generation_prompt=True, tokenize=False
    )
    return processor(text=[text], images=[row["images"]], return_tensors="pt")["pixel_values"]


def row_of(processor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> int:
    text = processor.tokenizer.decode(prompt_ids[prompt_mask.bool()])
    return int(text.split("Row ", 1)[1].split(":", 1)[0])


def test_rows_of_different_tile_counts_keep_their_own_tiles(load_tiny, tmp_path):
    model, processor = load_tiny("internvl")
    trainer = make_trainer(model, processor, tmp_path, steps_per_generation=3)
    rows = rows_with(MIXED)
    tiles = [sum(TILES[size] for size in sizes) for sizes in MIXED]
    batch = trainer._generate_and_score_completions(rows)
    assert batch["num_images"] == [1, 0, 1, 2, 0, 2]
    assert batch["num_tiles"] == tiles == [3, 0, 5, 4, 0, 6]
    assert batch["pixel_values"].shape == (sum(tiles), 3, TILE, TILE)
    # Each tile is `image_seq_length` tokens: the prompt holds exactly its row's tiles' worth.
    image_tokens = (batch["prompt_ids"] == model.config.image_token_id).sum(-1).tolist()
    assert image_tokens == [processor.image_seq_length * n for n in tiles]

    split = trainer.adapter.split_vision_inputs(batch, batch["num_images"])
    for i, row in enumerate(rows):
        if row["images"]:
            assert torch.equal(split["pixel_values"][i], own_tiles(processor, row)), f"row {i}"
        else:
            assert split["pixel_values"][i].size(0) == 0

    # The trainer's shuffle and micro-batches of two rows: each row carries exactly its own tiles, in order.
    model.train()
    trainer._prepare_inputs(rows)
    model.eval()  # the loss below, outside a training loop
    seen = []
    for micro in trainer._buffered_inputs:
        own = []
        for k in range(micro["prompt_ids"].size(0)):
            i = row_of(processor, micro["prompt_ids"][k], micro["prompt_mask"][k])
            seen.append(i)
            assert micro["num_images"][k] == len(rows[i]["images"]) and micro["num_tiles"][k] == tiles[i]
            if rows[i]["images"]:
                own.append(own_tiles(processor, rows[i]))
        if own:
            assert torch.equal(micro["pixel_values"], torch.cat(own))
        else:
            assert "pixel_values" not in micro
        loss = trainer.compute_loss(model, micro)  # the model checks image tokens against tile features
        assert torch.isfinite(loss)
    assert sorted(seen) == list(range(len(rows)))


def test_logps_match_single_sample_forward_on_mixed_tile_counts(load_tiny, tmp_path):
    model, processor = load_tiny("internvl")
    trainer = make_trainer(model, processor, tmp_path)
    rows = rows_with(MIXED)
    batch = trainer._generate_and_score_completions(rows)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    vision = {key: batch[key] for key in ("pixel_values", "num_images", "num_tiles")}
    # Chunks of 1, 4 and 5 rows: chunks of text rows only, and chunks cutting between rows of 3, 5 and 4 tiles.
    for chunk in (1, 4, 5):
        with torch.no_grad():
            logps, _, _ = trainer._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, batch["completion_ids"].size(1), batch_size=chunk, **vision
            )
        for i, row in enumerate(rows):
            keep = batch["completion_mask"][i].bool()
            _, expected = single_sample_logps(model, processor, row, batch["completion_ids"][i][keep])
            torch.testing.assert_close(logps[i][keep], expected, atol=1e-5, rtol=0, msg=f"row {i}, chunk {chunk}")


def test_one_tile_per_image_needs_no_tile_counts(load_tiny, tmp_path):
    model, processor = load_tiny("internvl")
    trainer = make_trainer(model, processor, tmp_path, per_device_train_batch_size=4)
    rows = rows_with([[SMALL], [], [SMALL, SMALL], []])
    batch = trainer._generate_and_score_completions(rows)
    # Every image is one tile, so TRL computes no `num_tiles`: `num_images` says which tiles are whose.
    assert "num_tiles" not in batch and batch["pixel_values"].size(0) == 3
    split = trainer.adapter.split_vision_inputs(batch, batch["num_images"])
    assert [t.size(0) for t in split["pixel_values"]] == [1, 0, 2, 0]
    assert torch.equal(split["pixel_values"][2], own_tiles(processor, rows[2]))

    # More tiles than images and no tile counts: refused, rather than guessed.
    with pytest.raises(ValueError, match="no `num_tiles`"):
        trainer.adapter.split_vision_inputs({"pixel_values": torch.zeros(4, 3, TILE, TILE)}, [1, 0, 1])


def tiles_for(processor, width: int, height: int) -> int:
    return int(
        processor.image_processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["num_patches"]
    )


def test_pixel_bounds_bound_the_tile_grid(tiny_dirs, tmp_path):
    path = str(tiny_dirs["internvl"])
    model, default = load_model_and_processor(path)
    assert (default.image_processor.min_patches, default.image_processor.max_patches) == (1, 4)
    assert tiles_for(default, 112, 112) == 2 * 2 + 1 and tiles_for(default, 56, 28) == 2 + 1

    # max_pixels rounds down to whole tiles: 2 tiles, so a square image can only be one tile.
    _, bounded = load_model_and_processor(path, max_pixels=2 * TILE * TILE + 100)
    assert bounded.image_processor.max_patches == 2
    assert tiles_for(bounded, 112, 112) == 1 and tiles_for(bounded, 56, 28) == 2 + 1
    # min_pixels rounds up: at least 2 tiles, so even a one-tile square image is enlarged to a 2×2 grid.
    _, at_least_two = load_model_and_processor(path, min_pixels=TILE * TILE + 1)
    assert at_least_two.image_processor.min_patches == 2 and tiles_for(at_least_two, 28, 28) == 2 * 2 + 1
    # The processor and TRL's tile count both read the bounds from the image processor.
    row = rows_with([[SQUARE]])[0]
    text = bounded.apply_chat_template(prepare_multimodal_messages(row["prompt"], images=row["images"]),
                                       add_generation_prompt=True, tokenize=False)  # fmt: skip
    assert bounded(text=[text], images=[row["images"]], return_tensors="pt")["pixel_values"].size(0) == 1
    bounded.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    _, reloaded = load_model_and_processor(str(tmp_path))
    assert reloaded.image_processor.max_patches == 2

    adapter = adapter_for(model.config)
    with pytest.raises(ValueError, match=f"max_pixels must be at least {TILE * TILE}"):
        adapter.set_image_size_bounds(default, None, TILE * TILE - 1)
    with pytest.raises(ValueError, match="at least 3 and at most 2 tiles"):
        adapter.set_image_size_bounds(default, 2 * TILE * TILE + 1, 2 * TILE * TILE)
