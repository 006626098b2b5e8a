"""Block-sparse attention masks for the packed shared-prompt forward (`shared_prefix.py`), for torch's flex attention.

The packed sequence `prompt[:-1] | prompt[-1] c¹ | … | prompt[-1] cᴳ` is described by its segment ids (0 the shared
prompt, k the k-th completion segment, -1 padding). `Packing.attention_mask` turns them into a dense `L × L` mask, so
SDPA computes every (query, key) pair of the square, the cost the packed forward's cost guard charges. A flex
`BlockMask` holds the same mask per 128 × 128 tile: tiles no query of which may see any key (one completion against
another, anything against padding) are skipped, tiles that are wholly visible (a completion against the prompt) run
without evaluating the mask. Attention then costs about `P² / 2 + Σ (P·Cᵢ + Cᵢ² / 2)` pairs, not `(P + Σ Cᵢ)²`.

The tile tables are computed here from the segment ids, in `O(tiles²)` (23 ms for 66k tokens), rather than by
`create_block_mask`, which evaluates the mask over the whole square (4 GB of booleans at 66k tokens) or compiles it.

torch 2.13 has no flex attention backward on CPU (`NotImplementedError`): there the block mask serves only the
forwards without gradients (old and reference log-probs); CUDA has both. Flex attention runs compiled (eager, it
computes the whole square), which needs Triton on CUDA and a C++ compiler on CPU (`block_sparse_unavailable`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

BLOCK_SIZE = 128
"""flex attention's default tile size, in queries and keys."""

KERNEL = "sdpa_or_block_sparse"
"""The attention implementation (`config._attn_implementation`) that runs SDPA, or flex attention for a `BlockMask`."""


def segment_mask_mod(segment: torch.Tensor) -> Callable[..., torch.Tensor]:
    """flex's `mask_mod(batch, head, query, key)` for `segment` `(groups, L)`: the mask of `Packing.attention_mask`.

    A query sees a key at or before it that is the shared prompt (segment 0) or in its own segment. A padding
    position sees only itself (so that no softmax runs over nothing), where the dense mask also lets it see the
    prompt: its output is never read, and this way no tile is computed for it.
    """

    def mask_mod(batch: torch.Tensor, head: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        query_segment, key_segment = segment[batch, query], segment[batch, key]
        visible = (key <= query) & (query_segment >= 0) & ((key_segment == 0) | (key_segment == query_segment))
        return visible | ((key == query) & (query_segment < 0))

    return mask_mod


def packed_block_mask(segment: torch.Tensor) -> BlockMask:
    """The flex `BlockMask` `(groups, 1, L, L)` of the packed layout with segment ids `segment` `(groups, L)`.

    The tile tables follow from each tile's lowest and highest segment id, because along a packed row the ids never
    decrease (prompt, completions in order, then padding): a key tile before a query tile holds a visible pair where
    it holds prompt keys or shares a completion with the query tile, and is wholly visible where all its keys are
    prompt or both tiles lie inside one completion. That is `O(tiles²)` work, never the `L × L` square.
    """
    groups, length = segment.shape
    tiles = -(-length // BLOCK_SIZE)
    pad = (0, tiles * BLOCK_SIZE - length)
    above = int(segment.max()) + 1

    def per_tile(ids: torch.Tensor, fill: int) -> torch.Tensor:
        return F.pad(ids, pad, value=fill).view(groups, tiles, BLOCK_SIZE)

    # Per tile: its lowest id and lowest completion id, padding (and the positions past the end) counted above every
    # segment; its highest id, padding counted as -1 (an all-padding tile has lowest > highest); whether all is real.
    lowest = per_tile(segment.masked_fill(segment < 0, above), above).amin(dim=-1)
    lowest_completion = per_tile(segment.masked_fill(segment <= 0, above), above).amin(dim=-1)
    highest = per_tile(segment, -1).amax(dim=-1)
    real = per_tile(segment >= 0, False).all(dim=-1)
    query, key = (slice(None), slice(None), None), (slice(None), None, slice(None))
    index = torch.arange(tiles, device=segment.device)
    before = index[None, None, :] < index[None, :, None]
    # A key tile before the query tile: some pair is visible where it holds prompt keys and the query tile a real
    # query, or both hold one completion (ids are contiguous, so overlapping ranges share one) ...
    first_shared = torch.maximum(torch.maximum(lowest[query], lowest[key]), torch.ones_like(lowest[key]))
    some = (lowest[key] == 0) & (lowest[query] < above) | (first_shared <= torch.minimum(highest[query], highest[key]))
    # ... and every pair where all its keys are prompt, or the query tile is inside one completion and the key tile
    # holds only the prompt and that completion.
    inside = (lowest == highest)[query] & (lowest_completion[key] == lowest[query]) & (highest[key] == lowest[query])
    full = before & real[query] & real[key] & ((highest[key] == 0) | inside)
    # The diagonal tile always holds a visible pair: each position sees itself.
    partial = ((before & some) | torch.eye(tiles, dtype=torch.bool, device=segment.device)) & ~full
    return BlockMask.from_kv_blocks(
        *_ordered(partial),
        *_ordered(full),
        BLOCK_SIZE=BLOCK_SIZE,
        mask_mod=segment_mask_mod(segment),
        seq_lengths=(length, length),
    )


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`tiles` `(groups, q_tiles, kv_tiles)` as flex's `(num_blocks, indices)`, `(groups, 1, q_tiles[, kv_tiles])`:
    per query tile, how many key tiles it visits, and which, those first."""
    tiles = tiles[:, None].to(torch.int32)
    indices = torch.argsort(tiles, dim=-1, descending=True, stable=True).to(torch.int32)
    return tiles.sum(dim=-1, dtype=torch.int32), indices


def block_sparse_unavailable(device: torch.device) -> str | None:
    """Why compiled flex attention cannot run on `device`, or None where it can. A check of what the compile needs,
    not a compile: a test compile costs ~13 s on a CPU and does not spare the first real one."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton  # lazy: CUDA only

        return None if has_triton() else "Triton is not installed"
    if device.type != "cpu":
        return f"torch compiles flex attention for CPU and CUDA only, not {device.type}"
    from torch._inductor.cpp_builder import get_cpp_compiler  # lazy: inductor loads only where it is asked

    try:
        get_cpp_compiler()
    except Exception as error:  # torch raises RuntimeError, or a subprocess error, when no compiler runs
        return f"no C++ compiler for torch.compile ({error})"
    return None


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """flex attention compiled once for every sequence length (`dynamic=True`): transformers' compiled copy
    specializes on the first shapes and recompiles for each new packed length, ~8 s each on a CPU."""
    return torch.compile(flex_attention, dynamic=True)


def block_sparse_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: BlockMask,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """One layer's attention under the packed forward's `block_mask`, laid out as transformers' kernels return it
    (`batch, length, heads, head_dim`)."""
    if dropout > 0:
        raise ValueError("The block-sparse packed forward has no attention dropout: set packed_attention: dense.")
    output = _compiled_flex_attention()(
        query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=query.size(1) != key.size(1)
    )
    return output.transpose(1, 2).contiguous(), None


def sdpa_or_flex_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | BlockMask | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block-sparse flex attention for the packed forward's `BlockMask`, transformers' SDPA for every other mask.

    transformers 5.19 refuses `attn_implementation="flex_attention"` for the Qwen-VL families (no
    `_supports_flex_attn`), and one kernel per model must serve both the plain and the packed forward, including the
    packed forward's recomputation under gradient checkpointing: so the mask, not the config, picks the kernel.
    """
    attention = block_sparse_attention if isinstance(attention_mask, BlockMask) else sdpa_attention_forward
    return attention(module, query, key, value, attention_mask, **kwargs)


def visited_tiles(segment: torch.Tensor) -> int:
    """How many 128 × 128 tiles flex attention computes for the packed layout `segment`, over all its groups."""
    block_mask = packed_block_mask(segment)
    return int(block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum())


AttentionInterface.register(KERNEL, sdpa_or_flex_attention)
AttentionMaskInterface.register(KERNEL, sdpa_mask)
