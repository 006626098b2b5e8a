"""The flex attention block mask of the packed layout is the dense mask SDPA takes (`trainers/block_mask.py`)."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import shapes_trainer, small_config
from test_sharing import COPIES, assert_grads_close, score, scoring_batch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from vlm_rl.trainers.block_mask import KERNEL, block_sparse_unavailable, packed_block_mask
from vlm_rl.trainers.shared_prefix import pack


def _packed_layout(seed: int):
    """A TRL-style scoring batch of 3 prompts (left-padded, of uneven lengths) × 3 completions of uneven lengths
    (right-padded; one empty, one spanning whole tiles), packed: groups of different lengths, so the shorter ones end
    in padding."""
    generator = torch.Generator().manual_seed(seed)
    prompt_lengths, completion_length = [150, 90, 300], 300
    rows, prompt_length = 9, max(prompt_lengths)
    input_ids = torch.randint(1, 100, (rows, prompt_length + completion_length), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    lengths = torch.randint(0, completion_length + 1, (rows,), generator=generator)
    lengths[4], lengths[1] = 0, completion_length
    for row in range(rows):
        prompt = prompt_lengths[row // 3]
        input_ids[row, :prompt_length] = input_ids[3 * (row // 3), :prompt_length]
        attention_mask[row, prompt_length - prompt : prompt_length + int(lengths[row])] = 1
    return pack([[0, 1, 2], [3, 4, 5], [6, 7, 8]], input_ids, attention_mask, completion_length)


@pytest.mark.parametrize("seed", range(4))
def test_block_mask_is_the_dense_mask(seed):
    packing = _packed_layout(seed)
    block_mask = packed_block_mask(packing.segment)
    groups, length = packing.segment.shape
    assert block_mask.shape == (groups, 1, length, length)
    # Its mask_mod is `Packing.attention_mask` at every real query, position by position; padding sees itself ...
    batch, positions = torch.arange(groups)[:, None, None], torch.arange(length)
    dense = block_mask.mask_mod(batch, None, positions[None, :, None], positions[None, None, :])
    real = packing.segment >= 0
    assert torch.equal(dense[real], packing.attention_mask(None)[:, 0][real])
    assert torch.equal(dense[~real], torch.eye(length, dtype=torch.bool).expand(groups, -1, -1)[~real])
    # ... and its tile tables are torch's own construction from that mask_mod.
    reference = create_block_mask(block_mask.mask_mod, groups, None, length, length, device="cpu")
    assert torch.equal(block_mask.to_dense(), reference.to_dense())
    assert torch.equal(block_mask.full_kv_num_blocks, reference.full_kv_num_blocks)
    assert torch.equal(block_mask.kv_num_blocks, reference.kv_num_blocks)
    assert block_mask.sparsity() > 40  # the completions never see each other: most tiles are skipped


@pytest.mark.parametrize(
    "compiled",
    # Compiled (~10 s on one CPU thread), flex runs only the tiles the tables list, and evaluates the mask only in the
    # partial ones: a wrong table shows there, not in eager mode, which computes the whole square.
    [False, pytest.param(True, marks=pytest.mark.slow)],
)
def test_flex_attention_with_the_block_mask_equals_sdpa_with_the_dense_mask(compiled):
    packing = _packed_layout(3 if compiled else 1)
    groups, length = packing.segment.shape
    generator = torch.Generator().manual_seed(2)
    query, key, value = (torch.randn(groups, 2, length, 16, generator=generator) for _ in range(3))
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=packing.attention_mask(None))
    attend = torch.compile(flex_attention) if compiled else flex_attention
    got = attend(query, key, value, block_mask=packed_block_mask(packing.segment))
    real = packing.segment >= 0  # padding's outputs are never read (and see less here)
    assert (got - expected).transpose(1, 2)[real].abs().max() <= 1e-5


@pytest.mark.slow  # transformers compiles flex attention on its first call: ~15 s on one CPU thread
def test_language_model_with_the_block_mask_equals_sdpa_with_the_dense_mask(load_tiny):
    """A tiny Qwen2-VL on `KERNEL`: the packed forward with the block mask gives SDPA's logits with the dense mask,
    and the plain forward (a 2D mask) SDPA's own."""
    model, _ = load_tiny("qwen2_vl")
    model.eval()
    packing = _packed_layout(5)
    groups, length = packing.segment.shape
    input_ids = torch.randint(1, 100, (groups, length), generator=torch.Generator().manual_seed(6))
    positions = torch.arange(length).expand(groups, length)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=packing.attention_mask(None), position_ids=positions)
        plain = model(input_ids=input_ids[:, :64], attention_mask=torch.ones(groups, 64, dtype=torch.long))
        model.set_attn_implementation({"text_config": KERNEL})
        got = model(input_ids=input_ids, attention_mask=packed_block_mask(packing.segment), position_ids=positions)
        plain_got = model(input_ids=input_ids[:, :64], attention_mask=torch.ones(groups, 64, dtype=torch.long))
    real = packing.segment >= 0
    assert (got.logits - expected.logits)[real].abs().max() <= 1e-5
    assert torch.equal(plain_got.logits, plain.logits)


def _masks_seen(model) -> tuple[list, object]:
    """The attention masks the first text layer gets, and the hook's handle."""
    seen = []
    layer = model.get_decoder().layers[0].self_attn
    handle = layer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    return seen, handle


@pytest.mark.slow  # compiles flex attention once for the tiny Qwen2-VL: ~15-25 s on one CPU thread
def test_trainer_scores_without_gradients_under_the_block_mask_and_with_them_under_the_dense_one(
    load_tiny, tmp_path, caplog
):
    """`packed_attention: auto` on a CPU with a C++ compiler: the packed log-prob pass without gradients runs
    block-sparse flex attention, the training forward (no flex backward on CPU) SDPA with the dense mask; both give
    the plain forward's log-probs, the latter its gradients."""
    model, processor = load_tiny("qwen2_vl")
    with caplog.at_level("INFO", logger="vlm_rl"):
        trainer = shapes_trainer(
            model, processor, tmp_path, num_generations=COPIES, per_device_train_batch_size=COPIES,
            max_completion_length=6, packed_attention="auto",
        )  # fmt: skip
    assert "Packed forward: block-sparse flex attention (sdpa_or_block_sparse, compiled) on cpu" in caplog.text
    assert model.config.get_text_config()._attn_implementation == KERNEL
    batch = scoring_batch(trainer, "mixed")
    input_ids, attention_mask, completion_mask, inputs = batch
    plain = score(trainer, model, batch, (False, False), None)
    trainer.options = replace(trainer.options, share_prompt_prefix=True, encode_images_once=True)
    seen, handle = _masks_seen(model)
    try:
        with torch.no_grad():
            logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_mask.size(1), compute_entropy=True, **inputs
            )
        assert seen and all(isinstance(mask, BlockMask) for mask in seen)
        torch.testing.assert_close(logps * completion_mask, plain[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(entropies * completion_mask, plain[1], atol=1e-5, rtol=0)
        seen.clear()
        logps, _, grads, _ = score(trainer, model, batch, (True, True), None)
    finally:
        handle.remove()
    assert seen and all(isinstance(mask, torch.Tensor) and mask.size(0) < len(input_ids) for mask in seen)
    torch.testing.assert_close(logps, plain[0], atol=1e-5, rtol=0)
    assert_grads_close(grads, plain[2], "the dense mask under the block-sparse kernel")


def test_packed_attention_dense_keeps_sdpa_and_says_so(load_tiny, tmp_path, caplog):
    model, processor = load_tiny("qwen2_vl")
    with caplog.at_level("INFO", logger="vlm_rl"):
        trainer = shapes_trainer(
            model, processor, tmp_path, num_generations=COPIES, per_device_train_batch_size=COPIES,
            max_completion_length=6, packed_attention="dense",
        )  # fmt: skip
    assert "Packed forward: sdpa attention with the dense mask (packed_attention: dense)." in caplog.text
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    batch = scoring_batch(trainer, "image")
    input_ids, attention_mask, completion_mask, inputs = batch
    seen, handle = _masks_seen(model)
    try:
        with torch.no_grad():
            trainer._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_mask.size(1), **inputs
            )
    finally:
        handle.remove()
    # The packed forwards (fewer sequences than rows) take the dense mask.
    assert seen and all(isinstance(mask, torch.Tensor) and mask.size(0) < len(input_ids) for mask in seen)


def test_block_sparse_is_refused_where_it_cannot_run(load_tiny, tmp_path):
    """Where flex attention cannot compile `auto` falls back to SDPA; `block_sparse` asked for is an error."""
    assert "CPU and CUDA only" in block_sparse_unavailable(torch.device("meta"))
    assert block_sparse_unavailable(torch.device("cpu")) is None  # this machine has a C++ compiler
    model, processor = load_tiny("qwen2_vl")
    model.set_attn_implementation("eager")
    with pytest.raises(
        ValueError, match="packed_attention: block_sparse cannot run here: the text attention is eager"
    ):
        shapes_trainer(model, processor, tmp_path, packed_attention="block_sparse")
    with pytest.raises(ValueError, match="packed_attention must be one of"):
        small_config(tmp_path, packed_attention="flex")


@pytest.mark.parametrize(
    ("copies", "completion", "dense_packs"),
    [(8, 32, True), (8, 1024, True), (16, 256, True), (16, 4096, False)],
)
def test_the_block_mask_costs_only_its_tiles_and_packs_every_shape(copies, completion, dense_packs):
    """The cost guard with Qwen2.5-VL-3B's sizes after a 1k-token prompt: under the block mask each shape packs,
    also 16 completions of 4k tokens, which the dense mask's square makes dearer than the plain forward."""
    prompt, sizes = 1000, (2048, 11008)
    input_ids = torch.ones(copies, prompt + completion, dtype=torch.long)
    packing = pack([list(range(copies))], input_ids, torch.ones_like(input_ids), completion)
    assert packing.cheaper_than_plain(copies, prompt + completion, *sizes) is dense_packs
    assert packing.cheaper_than_plain(copies, prompt + completion, *sizes, block_sparse=True)
    assert packing.flops(*sizes, block_sparse=True) < packing.flops(*sizes)
