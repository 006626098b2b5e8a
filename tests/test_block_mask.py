"""The flex attention block mask of the packed layout is the dense mask SDPA takes (`trainers/block_mask.py`)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from vlm_rl.trainers.block_mask import KERNEL, packed_block_mask
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
