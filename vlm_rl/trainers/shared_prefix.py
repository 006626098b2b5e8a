"""Shared-prompt scoring: the G completions of a prompt in one sequence that holds the prompt once.

GRPO scores G completions per prompt, and in VLM RL the prompt is the long part (hundreds of image tokens). The
plain forward runs it G times; here the rows whose prompt is the same (token ids, images and video) become one sequence

    prompt[:-1] | prompt[-1] c¹ | prompt[-1] c² | … | prompt[-1] cᴳ

under a block mask: the prompt is causal as usual, and each segment attends to the prompt and, causally, to itself,
never to another segment. A segment starts with its own copy of the prompt's last token because that token's output
predicts the first completion token, which differs between segments. The position ids are the plain forward's own
(M-RoPE included), gathered into this layout. So every scored token sees exactly the keys, values and positions it
sees in the plain forward: the same log-probs, and the same gradients (the prompt's activations receive the sum of
the G segments' gradients, as the G copies of the prompt do in the plain forward). The language model processes
P + G·(C + 1) tokens per group instead of G·(P + C), and the vision tower sees the group's images and video once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class Packing:
    """Where each token of the packed sequences comes from in the plain `(rows, length)` batch, and back."""

    source: torch.Tensor
    """`(groups, packed_length)`: flat index into the plain batch of the token at each packed position."""
    segment: torch.Tensor
    """`(groups, packed_length)`: 0 for the shared prompt, k for the k-th completion segment, -1 for padding."""
    labels: torch.Tensor
    """`(groups, packed_length)`: the next token inside a segment, `IGNORE_INDEX` elsewhere."""
    scored_at: torch.Tensor
    """`(rows, completion_length)`: flat packed index whose output scores each completion token."""
    scored: torch.Tensor
    """`(rows, completion_length)`: which completion tokens are scored (the completion mask)."""

    def gather(self, per_token: torch.Tensor) -> torch.Tensor:
        """A per-token tensor of the plain batch, `(..., rows, length)`, in the packed layout."""
        return per_token.flatten(-2)[..., self.source]

    def scatter(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed per-position outputs `(groups, packed_length)` as `(rows, completion_length)`; 0 where unscored."""
        return packed.flatten()[self.scored_at].masked_fill(~self.scored, 0)

    def flops(self, hidden_size: int, intermediate_size: int, block_sparse: bool = False) -> int:
        """The FLOPs per layer of this packing's forward (`forward_flops`), padding included: under the dense mask
        attention computes the whole square, under the block mask (`block_sparse`) only the tiles it visits."""
        groups, length = self.segment.shape
        if not block_sparse:
            return forward_flops(groups, length, hidden_size, intermediate_size)
        from vlm_rl.trainers.block_mask import BLOCK_SIZE, visited_tiles  # lazy: flex and inductor load on first use

        pairs = visited_tiles(self.segment) * BLOCK_SIZE**2
        return forward_flops(groups, length, hidden_size, intermediate_size, pairs=pairs)

    def cheaper_than_plain(
        self, rows: int, length: int, hidden_size: int, intermediate_size: int, block_sparse: bool = False
    ) -> bool:
        """Whether this packing costs fewer FLOPs per layer than the plain forward of `rows` × `length` tokens.

        Packing saves tokens (the prompt once) and, under the dense mask, pays in attention pairs (all completions
        of a prompt in one square): with long completions and many of them (say 16 of 4k tokens after a 1k prompt)
        the square outgrows the saving. Under the block mask (`block_sparse`) the completions' tiles against each
        other are skipped, and that shape packs.
        """
        sizes = (hidden_size, intermediate_size)
        return self.flops(*sizes, block_sparse) < forward_flops(rows, length, *sizes)

    def attention_mask(self, dtype: torch.dtype | None) -> torch.Tensor:
        """`(groups, 1, L, L)` mask: boolean (True = attend) for `dtype=None`, else additive in `dtype`."""
        segment = self.segment
        positions = torch.arange(segment.size(1), device=segment.device)
        causal = positions[None, :] <= positions[:, None]
        query, key = segment[:, :, None], segment[:, None, :]
        allowed = causal & (key >= 0) & ((key == 0) | (key == query))
        # A padding position attends to itself: a query with no key at all would be a softmax over nothing.
        allowed |= torch.eye(segment.size(1), dtype=torch.bool, device=segment.device) & (query < 0)
        allowed = allowed[:, None]
        if dtype is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )


def forward_flops(rows: int, length: int, hidden_size: int, intermediate_size: int, pairs: int | None = None) -> int:
    """About the FLOPs per layer of a forward of `rows` × `length` positions under a custom mask. Per position, the
    projections and the MLP cost about `hidden · (4·hidden + 3·intermediate)`; per (query, key) pair, attention costs
    about `2·hidden`. `pairs`, over all rows, are the pairs attention computes: with a dense mask (the default) every
    pair of each row's square."""
    token, pair = hidden_size * (4 * hidden_size + 3 * intermediate_size), 2 * hidden_size
    pairs = rows * length**2 if pairs is None else pairs
    return rows * length * token + pairs * pair


def pack(
    groups: Sequence[Sequence[int]], input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_length: int
) -> Packing | None:
    """The packing of `groups` (row indices into `input_ids`), or None where a row's completion mask has a gap.

    `input_ids` / `attention_mask` are TRL's scoring batch: left-padded prompts, then right-padded completions of
    `completion_length` tokens. Rows in no group are not scored by this packing (`scored` is False for them): several
    packings of one batch, one per group, score it without padding.
    """
    num_rows, length = input_ids.shape
    prompt_length = length - completion_length
    mask = attention_mask.bool().cpu()
    completion_mask = mask[:, prompt_length:]
    lengths = completion_mask.sum(dim=1)
    # TRL's completion masks run up to the first EOS; a gap would need a position the packing does not have.
    if not torch.equal(completion_mask, torch.arange(completion_length)[None, :] < lengths[:, None]):
        return None
    prompt_starts = mask[:, :prompt_length].int().argmax(dim=1)  # left padding: the first prompt token
    if not mask[:, :prompt_length].any(dim=1).all():
        return None
    sources, segments, scored_at = [], [], torch.zeros(num_rows, completion_length, dtype=torch.long)
    for group in groups:
        first = group[0]
        last = first * length + prompt_length - 1  # the prompt's last token, in the plain batch's flat layout
        source = [torch.arange(first * length + int(prompt_starts[first]), last)]
        segment = [torch.zeros(len(source[0]), dtype=torch.long)]
        offset = len(source[0])
        for k, row in enumerate(group, start=1):
            n = int(lengths[row])
            source.append(torch.cat([torch.tensor([row * length + prompt_length - 1]), row * length + prompt_length +
                                     torch.arange(n)]))  # fmt: skip
            segment.append(torch.full((n + 1,), k))
            # Completion token t is scored by the output at the position before it: segment start + t.
            scored_at[row, :n] = offset + torch.arange(n)
            offset += n + 1
        sources.append((torch.cat(source), last))
        segments.append(torch.cat(segment))
    packed_length = max(len(segment) for segment in segments)
    source = torch.empty(len(groups), packed_length, dtype=torch.long)
    segment = torch.full((len(groups), packed_length), -1, dtype=torch.long)
    for index, ((group_source, last), group_segment) in enumerate(zip(sources, segments, strict=True)):
        source[index] = last  # padding repeats the prompt's last token: plain text, never an image placeholder
        source[index, : len(group_source)] = group_source
        segment[index, : len(group_segment)] = group_segment
        scored_at[list(groups[index])] += index * packed_length
    tokens = input_ids.flatten().cpu()[source]
    # Inside a segment each position predicts the next token of the same segment.
    continues = (segment[:, 1:] == segment[:, :-1]) & (segment[:, 1:] > 0)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:, :-1] = tokens[:, 1:].masked_fill(~continues, IGNORE_INDEX)
    device = input_ids.device
    in_groups = torch.zeros(num_rows, dtype=torch.bool)
    in_groups[[row for group in groups for row in group]] = True
    return Packing(
        source=source.to(device),
        segment=segment.to(device),
        labels=labels.to(device),
        scored_at=scored_at.to(device),
        scored=(completion_mask & in_groups[:, None]).to(device),
    )


def image_runs(ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Per row of `ids`, the number of runs of consecutive `image_token_id` tokens: its images, for families that
    expand each image into one run of placeholders (Qwen-VL)."""
    is_image = ids == image_token_id
    starts = is_image.clone()
    starts[:, 1:] &= ~is_image[:, :-1]
    return starts.sum(dim=1)
