"""Idefics3 / SmolVLM: per-sample padded `pixel_values`, which stock TRL 1.16 can hand from one row to another.

Their processors return `pixel_values` [rows, most tiles of any row, C, H, W] (each row's tiles, then all-zero
padding tiles) and `pixel_attention_mask` [rows, tiles, H, W]. TRL's `split_pixel_values_by_grid` treats that
tensor as one entry per image whenever its length equals the batch's image count, e.g. rows with 0, 1, 1 and 2
images. It then gives row 2 the tiles of row 1, and row 3 those of rows 2 and 3; a micro-batch of rows 0 and 3
runs without error on the wrong tiles (the model fills row 3's `<image>` tokens with row 2's image first).
"""

import random

import pytest
import torch
from conftest import small_config
from PIL import Image
from test_logprobs import single_sample_logps
from trl import GRPOTrainer
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

from vlm_rl.data import make_shapes_dataset
from vlm_rl.data.synthetic import draw_shape
from vlm_rl.models import adapter_for, load_model_and_processor
from vlm_rl.trainers import VLMGRPOTrainer

FAMILIES = ["idefics3", "smolvlm"]
TILE = 32  # the tiny models' tile (vision tower input); their processors resize the longest edge to 64
SQUARE_TILES, WIDE_TILES = 5, 3  # 2×2 tiles + global; 1×2 tiles + global (for an image at least twice as wide)


def rows_with(counts: list[int]) -> list[dict]:
    """Rows with `counts[i]` images each (square and wide ones, so rows differ in tiles), told apart by prompt."""
    rng = random.Random(0)
    rows = []
    for i, count in enumerate(counts):
        images = [draw_shape("circle", "red", 56, rng), Image.new("RGB", (96, 32), "blue")][:count]
        rows.append({"prompt": [{"role": "user", "content": f"Row {i}: which colours?"}], "images": images,
                     "answer": "red", "task": "image"})  # fmt: skip
    return rows


def make_trainer(model, processor, tmp_path, **overrides):
    args = small_config(tmp_path, **{"per_device_train_batch_size": 4, **overrides})
    return VLMGRPOTrainer(
        model=model, reward_funcs=[lambda completions, **kwargs: [0.0] * len(completions)], args=args,
        train_dataset=make_shapes_dataset(4), processing_class=processor,
    )  # fmt: skip


def select(inputs: dict, rows: list[int], size: int) -> dict:
    """Rows `rows` of a (split) batch, as TRL's shuffle and `split_tensor_dict` pick them."""
    selected = {}
    for key, value in inputs.items():
        if isinstance(value, list) and len(value) == size:
            selected[key] = [value[i] for i in rows]
        elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == size:
            selected[key] = value[rows]
        else:
            selected[key] = value
    return selected


def own_tiles(processor, row: dict) -> torch.Tensor:
    """The tiles of `row`'s images alone ([tiles, C, H, W]), from a processor call on that row only."""
    text = processor.apply_chat_template(
        prepare_multimodal_messages(row["prompt"], images=row["images"]), add_generation_prompt=True, tokenize=False
    )
    return processor(text=[text], images=[row["images"]], return_tensors="pt")["pixel_values"][0]


def completion_logps(trainer, model, batch, rows, stock=False, **kwargs):
    """Per-token log-probs of `rows` of a scored batch, by our trainer or by stock TRL's method."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)[rows]
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)[rows]
    method = (
        GRPOTrainer._get_per_token_logps_and_entropies if stock else type(trainer)._get_per_token_logps_and_entropies
    )
    with torch.no_grad():
        logps, _, _ = method(trainer, model, input_ids, attention_mask, batch["completion_ids"].size(1), **kwargs)
    return logps


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_trl_gives_a_row_another_rows_tiles_and_the_adapter_does_not(family, load_tiny, tmp_path):
    model, processor = load_tiny(family)
    trainer = make_trainer(model, processor, tmp_path)
    rows = rows_with([0, 1, 1, 2])
    batch = trainer._generate_and_score_completions(rows)
    pixel_values, mask = batch["pixel_values"], batch["pixel_attention_mask"]
    tiles = [0, SQUARE_TILES, SQUARE_TILES, SQUARE_TILES + WIDE_TILES]
    # Per-sample layout whose length happens to equal the image count: TRL takes it for one entry per image.
    assert batch["num_images"] == [0, 1, 1, 2] and pixel_values.shape[:2] == (4, max(tiles))
    assert mask.flatten(2).any(-1).sum(-1).tolist() == tiles

    stock = split_pixel_values_by_grid(batch)["pixel_values"]
    assert torch.equal(stock[2], pixel_values[1:2]), "TRL gives row 2 the tiles of row 1"
    assert torch.equal(stock[3], pixel_values[2:4]), "TRL gives row 3 the tiles of rows 2 and 3"
    ours = trainer.adapter.split_vision_inputs(batch, batch["num_images"])
    for i, row in enumerate(rows):
        assert torch.equal(ours["pixel_values"][i], pixel_values[i, : tiles[i]])
        assert torch.equal(ours["pixel_attention_mask"][i], mask[i, : tiles[i]])
        assert not pixel_values[i, tiles[i] :].any() and not mask[i, tiles[i] :].any()
        if row["images"]:
            assert torch.equal(ours["pixel_values"][i], own_tiles(processor, row))

    # A micro-batch of rows 0 and 3, as `_prepare_inputs` builds it after a shuffle that puts them together.
    micro_rows = [0, 3]
    stock_micro = unsplit_pixel_values_by_grid(select(split_pixel_values_by_grid(batch), micro_rows, 4))
    our_micro = trainer._merge_micro_batch(select(ours, micro_rows, 4))
    assert torch.equal(stock_micro["pixel_values"], pixel_values[[2, 3]]), "TRL's micro-batch holds row 2's tiles"
    assert torch.equal(our_micro["pixel_values"][1], pixel_values[3]) and not our_micro["pixel_values"][0].any()

    vision = {key: stock_micro[key] for key in ("pixel_values", "pixel_attention_mask", "num_images")}
    stock_logps = completion_logps(trainer, model, batch, micro_rows, stock=True, **vision)  # runs: no error
    vision = {key: our_micro[key] for key in ("pixel_values", "pixel_attention_mask", "num_images")}
    our_logps = completion_logps(trainer, model, batch, micro_rows, **vision)
    completion = batch["completion_ids"][3][batch["completion_mask"][3].bool()]
    _, expected = single_sample_logps(model, processor, rows[3], completion)
    keep = batch["completion_mask"][3].bool()
    torch.testing.assert_close(our_logps[1][keep], expected, atol=1e-5, rtol=0)
    assert (stock_logps[1][keep] - expected).abs().max() > 1e-3, "stock TRL scores row 3 with row 2's image"


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_logps_and_micro_batches_keep_each_rows_own_tiles(family, load_tiny, tmp_path):
    model, processor = load_tiny(family)
    trainer = make_trainer(model, processor, tmp_path, steps_per_generation=2)
    rows = rows_with([0, 1, 1, 2])
    batch = trainer._generate_and_score_completions(rows)
    vision = {key: batch[key] for key in ("pixel_values", "pixel_attention_mask", "num_images")}

    # Stock TRL slices `pixel_values` by image counts but the mask by rows: this chunking fails outright.
    with pytest.raises(RuntimeError):
        completion_logps(trainer, model, batch, [0, 1, 2, 3], stock=True, batch_size=2, **vision)
    for chunk in (None, 1, 2, 3):
        logps = completion_logps(trainer, model, batch, [0, 1, 2, 3], batch_size=chunk, **vision)
        for i, row in enumerate(rows):
            keep = batch["completion_mask"][i].bool()
            _, expected = single_sample_logps(model, processor, row, batch["completion_ids"][i][keep])
            torch.testing.assert_close(logps[i][keep], expected, atol=1e-5, rtol=0, msg=f"row {i}, chunk {chunk}")

    # The trainer's own shuffle and micro-batches: every row carries exactly its own tiles, then zero padding.
    model.train()
    trainer._prepare_inputs(rows)
    expected_tiles = {i: own_tiles(processor, row) for i, row in enumerate(rows) if row["images"]}
    seen = []
    for micro in trainer._buffered_inputs:
        for k in range(micro["prompt_ids"].size(0)):
            text = processor.tokenizer.decode(micro["prompt_ids"][k][micro["prompt_mask"][k].bool()])
            i = next(i for i in range(len(rows)) if f"Row {i}:" in text)
            seen.append(i)
            assert micro["num_images"][k] == len(rows[i]["images"])
            if i not in expected_tiles:
                assert "pixel_values" not in micro or not micro["pixel_values"][k].any()
                continue
            n = expected_tiles[i].size(0)
            assert torch.equal(micro["pixel_values"][k, :n], expected_tiles[i]), f"row {i} got other tiles"
            assert not micro["pixel_values"][k, n:].any() and not micro["pixel_attention_mask"][k, n:].any()
    assert sorted(seen) == [0, 1, 2, 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_pads_per_sample_and_keeps_text_only_rows(family, load_tiny):
    model, processor = load_tiny(family)
    images = [
        [Image.new("RGB", (56, 56), "red")],
        [],
        [Image.new("RGB", (96, 32), "blue"), Image.new("RGB", (84, 84))],
    ]
    texts = [
        processor.apply_chat_template(
            prepare_multimodal_messages([{"role": "user", "content": "Colour?"}], images=row),
            add_generation_prompt=True,
            tokenize=False,
        )
        for row in images
    ]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    tiles = [SQUARE_TILES, 0, WIDE_TILES + SQUARE_TILES]
    assert inputs["pixel_values"].shape == (3, max(tiles), 3, TILE, TILE)
    assert inputs["pixel_attention_mask"].flatten(2).any(-1).sum(-1).tolist() == tiles
    assert not inputs["pixel_values"][1].any(), "a text-only row holds only padding tiles"
    # Pixel shuffle: (32 / 8)² patches / 2² = 4 tokens per tile, so a square image costs 20 `<image>` tokens.
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist()
    assert image_tokens == [processor.image_seq_len * n for n in tiles] and processor.image_seq_len == 4
    for name in ("<global-img>", "<row_2_col_2>", "<fake_token_around_image>"):
        assert processor.tokenizer.convert_tokens_to_ids(name) in inputs["input_ids"][0]


def tiles_for(processor, width: int, height: int) -> int:
    output = processor.image_processor(images=[[Image.new("RGB", (width, height), "red")]], return_tensors="pt")
    return int(output["pixel_attention_mask"].flatten(2).any(-1).sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_max_pixels_sets_the_longest_edge_in_whole_tiles(family, tiny_dirs, tmp_path):
    path = str(tiny_dirs[family])
    _, default = load_model_and_processor(path)
    assert tiles_for(default, 200, 200) == 2 * 2 + 1
    model, bounded = load_model_and_processor(path, max_pixels=100 * 100)  # edge 96: 3×3 tiles + global
    assert bounded.image_processor.size["longest_edge"] == 96
    assert tiles_for(bounded, 200, 200) == tiles_for(bounded, 20, 20) == 3 * 3 + 1  # small images are enlarged
    _, one_tile = load_model_and_processor(path, max_pixels=TILE * TILE)
    assert tiles_for(one_tile, 200, 120) == 1  # fits one tile: no split, no global copy
    bounded.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    _, reloaded = load_model_and_processor(str(tmp_path))
    assert tiles_for(reloaded, 200, 200) == 3 * 3 + 1

    adapter = adapter_for(model.config)
    with pytest.raises(ValueError, match="`min_pixels` has no counterpart"):
        adapter.set_image_size_bounds(bounded, 64 * 64, None)
    with pytest.raises(ValueError, match=f"max_pixels must be at least {TILE * TILE}"):
        adapter.set_image_size_bounds(bounded, None, TILE * TILE - 1)
    bounded.image_processor.do_image_splitting = False
    with pytest.raises(ValueError, match="does not split images"):
        adapter.set_image_size_bounds(bounded, None, 100 * 100)
