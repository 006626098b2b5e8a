"""Micro-batches by tokens: a generation batch's prompt groups dealt to its micro-batches so that each holds about the
same number of tokens, whole groups in each.

TRL cuts a generation batch into `steps_per_generation` micro-batches of equal row counts. With completions of
uneven length, equal rows are unequal work: one micro-batch gets the long completions, and its forward and backward
set the step's peak memory. Here the groups go largest first to the micro-batch with the fewest tokens so far, so
each micro-batch's share is about 1/`steps_per_generation` of the tokens; the rows per micro-batch then differ.

Exact, where the generation batch is one accumulation window (`steps_per_generation` = `gradient_accumulation_steps`,
TRL's default), so that the optimizer step holds the same rows however they are cut: TRL's `grpo`-type losses average
over a micro-batch's rows and count every micro-batch alike, so a micro-batch of r rows, in a window of R rows over k
micro-batches, is weighted r·k/R (`row_weight`) and the step's gradient is the mean over its rows, as with equal
micro-batches. Losses normalized by the window's tokens (`dapo`, `cispo`, `vespo`) need no weight. Elsewhere (`bnpo`,
a mean over each micro-batch's own tokens; several optimizer steps per generation) the row counts stay equal.
"""

from __future__ import annotations

from typing import Any

import torch

ROW_WEIGHT = "row_weight"
"""A micro-batch's weight in its accumulation window (0-d tensor): rows × micro-batches per window / window rows."""

ROW_MEAN_LOSSES = frozenset({"grpo", "sapo", "dr_grpo", "luspo"})
TOKEN_NORMALIZED_LOSSES = frozenset({"dapo", "cispo", "vespo"})


def balanced_by_tokens(
    groups: list[list[int]], tokens: list[int], count: int, per_micro_batch: int | None = None
) -> list[list[list[int]]]:
    """`groups` dealt to `count` micro-batches: the largest first into the micro-batch with the fewest tokens (that
    has room for another group, with `per_micro_batch`), ties in the given order, so a shuffled input stays shuffled.
    The micro-batches come out in a random order; each is a list of groups."""
    bins: list[list[list[int]]] = [[] for _ in range(count)]
    totals = [0] * count
    for index in sorted(range(len(groups)), key=lambda i: -tokens[i]):
        open_bins = [b for b in range(count) if per_micro_batch is None or len(bins[b]) < per_micro_batch]
        target = min(open_bins, key=lambda b: totals[b])
        bins[target].append(groups[index])
        totals[target] += tokens[index]
    return [bins[b] for b in torch.randperm(count).tolist()]


def rows_of(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The batch's entries of `rows` (in that order): tensors and lists with one entry per row; 0-d tensors and
    anything else are shared by every row and kept."""

    def select(value):
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return value[rows]
        return [value[i] for i in rows.tolist()] if isinstance(value, list) else value

    return {key: select(value) for key, value in batch.items()}


def row_weights(sizes: list[int], window: int) -> list[float]:
    """Each micro-batch's weight (see the module docstring), for consecutive accumulation windows of `window`
    micro-batches."""
    weights = []
    for start in range(0, len(sizes), window):
        rows = sizes[start : start + window]
        weights += [size * len(rows) / sum(rows) for size in rows]
    return weights
