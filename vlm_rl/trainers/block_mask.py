"""Block-sparse attention masks for the packed shared-prompt forward (`shared_prefix.py`), for torch's flex attention.

The packed sequence `prompt[:-1] | prompt[-1] c¹ | … | prompt[-1] cᴳ` is described by its segment ids (0 the shared
prompt, k the k-th completion segment, -1 padding). `Packing.attention_mask` turns them into a dense `L × L` mask, so
SDPA computes every (query, key) pair of the square, the cost the packed forward's cost guard charges. A flex
`BlockMask` holds the same mask per 128 × 128 tile: tiles no query of which may see any key (one completion against
another, anything against padding) are skipped, tiles that are wholly visible (a completion against the prompt) run
without evaluating the mask. Attention then costs about `P² / 2 + Σ (P·Cᵢ + Cᵢ² / 2)` pairs, not `(P + Σ Cᵢ)²`.

The tile tables are computed here from the segment ids with plain tensor ops, one row of query tiles at a time,
rather than by `create_block_mask`, which evaluates the mask through `vmap` over the whole square (about 1.2 s for
a 3k-token sequence on one CPU thread) or compiles it (about 8 s the first time).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask

BLOCK_SIZE = 128
"""flex attention's default tile size, in queries and keys."""


def segment_mask_mod(segment: torch.Tensor) -> Callable[..., torch.Tensor]:
    """flex's `mask_mod(batch, head, query, key)` for `segment` `(groups, L)`: the mask of `Packing.attention_mask`.

    A query sees a key at or before it that is the shared prompt (segment 0) or in its own segment; a padding
    position sees only itself, so that no softmax runs over nothing.
    """

    def mask_mod(batch: torch.Tensor, head: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        query_segment, key_segment = segment[batch, query], segment[batch, key]
        visible = (key <= query) & (key_segment >= 0) & ((key_segment == 0) | (key_segment == query_segment))
        return visible | ((key == query) & (query_segment < 0))

    return mask_mod


def packed_block_mask(segment: torch.Tensor) -> BlockMask:
    """The flex `BlockMask` `(groups, 1, L, L)` of the packed layout with segment ids `segment` `(groups, L)`."""
    groups, length = segment.shape
    mask_mod = segment_mask_mod(segment)
    tiles = -(-length // BLOCK_SIZE)
    padded = tiles * BLOCK_SIZE
    positions = torch.arange(padded, device=segment.device)
    # Positions past the end take part in no pair (flex pads the last tile the same way).
    in_range = positions < length
    clamped = positions.clamp(max=length - 1)
    batch = torch.arange(groups, device=segment.device)[:, None, None]
    partial, full = [], []
    for start in range(0, padded, BLOCK_SIZE):
        query = clamped[start : start + BLOCK_SIZE]
        visible = mask_mod(batch, None, query[None, :, None], clamped[None, None, :])
        visible &= in_range[start : start + BLOCK_SIZE, None] & in_range[None, :]
        counts = visible.view(groups, BLOCK_SIZE, tiles, BLOCK_SIZE).sum(dim=(1, 3))
        full.append(counts == BLOCK_SIZE * BLOCK_SIZE)
        partial.append((counts > 0) & ~full[-1])
    return BlockMask.from_kv_blocks(
        *_ordered(torch.stack(partial, dim=1)),
        *_ordered(torch.stack(full, dim=1)),
        BLOCK_SIZE=BLOCK_SIZE,
        mask_mod=mask_mod,
        seq_lengths=(length, length),
    )


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`tiles` `(groups, q_tiles, kv_tiles)` as flex's `(num_blocks, indices)`, `(groups, 1, q_tiles[, kv_tiles])`:
    per query tile, how many key tiles it visits, and which, those first."""
    tiles = tiles[:, None].to(torch.int32)
    indices = torch.argsort(tiles, dim=-1, descending=True, stable=True).to(torch.int32)
    return tiles.sum(dim=-1, dtype=torch.int32), indices
