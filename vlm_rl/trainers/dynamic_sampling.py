"""DAPO dynamic sampling: train only on groups whose rewards differ, refilled with groups of fresh prompts.

A group whose completions all got the same reward has zero advantage: it costs a training forward and teaches
nothing. With `dynamic_sampling` on, `VLMGRPOTrainer` scores a generation batch as TRL does, drops those groups (or,
with `dynamic_sampling_accuracy_band`, the groups whose mean accuracy lies outside the band), and generates up to
`max_resample_rounds` more batches for prompts drawn afresh from the training set until every process has a full
batch of kept groups. verl calls it `filter_groups`, EasyR1 `online_filtering`; TRL 1.16 has none.

Processes. TRL spreads a generation batch over processes in contiguous slices (process p holds rows
[p·N, (p+1)·N) of every round) and gathers the rewards of all of them, so every process sees the same rewards and
takes the same decisions here without a collective of its own. A process keeps whole *segments*: the part of a
group it holds, `min(N, G)` rows (the config requires N a multiple of G or G of N). Each process fills its batch
with its own kept segments; a round runs while any process is short, so every process runs the same rounds, calls
the same collectives, and ends with the same number of segments. Rows never move between processes.

Resume. The extra rounds' prompts are drawn by an RNG seeded by (seed, global step, round), the same on every
process; nothing about them needs saving. The cumulative count of prompts generated for is saved with the rollout
state (`rollout_state.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from trl.trainer.utils import nanstd

# How each per-row tensor of a scored batch is padded when rounds of different widths are merged: the prompt on
# the left, like TRL's, per-token inputs that span prompt and completion split at the prompt's width, the rest on
# the right. Pad values other than 0: the pad token (`None` here) and TRL's `tool_mask` padding.
_LEFT_PADDED = ("prompt_ids", "prompt_mask")
_PROMPT_AND_COMPLETION = ("token_type_ids", "mm_token_type_ids")
_PAD_VALUES: dict[str, int | None] = {"prompt_ids": None, "completion_ids": None, "tool_mask": 1}
# Per-row counts that a round without images leaves out.
_COUNT_KEYS = ("num_images", "num_tiles")


@dataclass(frozen=True)
class GroupFilter:
    """Which groups of a scored round carry a learning signal, and how good a dropped one is as padding.

    Without `band`: a group whose total (weighted) reward varies, as verl's `filter_groups`. With `band = (low,
    high)`: a group whose mean `accuracy_index` reward lies in [low, high].
    """

    weights: torch.Tensor
    num_generations: int
    band: tuple[float, float] | None = None
    accuracy_index: int | None = None

    def __call__(self, rewards_per_func: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group: kept (bool) and its padding score, the spread (std) of its total reward.

        `rewards_per_func` is TRL's gathered (rows, rewards) tensor, NaN where a reward did not score a row.
        """
        rewards = rewards_per_func.float().cpu()
        unscorable = torch.isnan(rewards).all(dim=1)
        total = (rewards * self.weights.float().cpu()).nansum(dim=1)
        total[unscorable] = torch.nan
        grouped = total.view(-1, self.num_generations)
        spread = torch.nan_to_num(nanstd(grouped, dim=1), nan=0.0)
        if self.band is None:
            # Whether the totals differ, from their range: `nanstd` of eight equal totals of 1.2 (a right answer plus a
            # 0.2-weighted format reward) is 1.3e-7 in float32, not 0, and such a group would never be dropped.
            highest = torch.nan_to_num(grouped, nan=-torch.inf).amax(dim=1)
            lowest = torch.nan_to_num(grouped, nan=torch.inf).amin(dim=1)
            varies = (highest - lowest) > 1e-6 * torch.clamp(highest.abs(), min=1.0)
            return varies & torch.isfinite(highest - lowest), spread
        accuracy = torch.nanmean(rewards[:, self.accuracy_index].view(-1, self.num_generations), dim=1)
        low, high = self.band
        return (accuracy >= low) & (accuracy <= high), spread


@dataclass(frozen=True)
class Layout:
    """Where the rows of one generation round live: `rows_per_process` (N) rows on each of `num_processes`."""

    num_processes: int
    process_index: int
    rows_per_process: int
    num_generations: int

    @property
    def segment(self) -> int:
        """Rows of one group on one process."""
        return min(self.rows_per_process, self.num_generations)

    @property
    def segments_needed(self) -> int:
        return self.rows_per_process // self.segment

    def groups_of(self, process: int) -> list[int]:
        """The group of each of `process`'s segments in a round, in row order."""
        start = process * self.rows_per_process
        return [(start + j * self.segment) // self.num_generations for j in range(self.segments_needed)]


@dataclass(frozen=True)
class Round:
    """One scored generation round: this process's rows, and every group's decision (the same on all processes)."""

    batch: dict[str, Any]
    keep: torch.Tensor
    spread: torch.Tensor


def pick_segments(rounds: Sequence[Round], layout: Layout, process: int) -> tuple[list[tuple[int, int]], int]:
    """`process`'s segments to train on, as (round, segment) pairs, and how many of them are padding.

    Kept segments come first, in generation order. A process still short after the last round is filled with the
    best of its dropped segments: the highest reward spread first (they still carry some signal; a group with none
    has zero advantage and only keeps the step's shape), earliest first among equals.
    """
    groups = layout.groups_of(process)
    kept = [(r, j) for r, round_ in enumerate(rounds) for j, g in enumerate(groups) if round_.keep[g]]
    picked = kept[: layout.segments_needed]
    short = layout.segments_needed - len(picked)
    if short:
        dropped = [(r, j) for r, round_ in enumerate(rounds) for j, g in enumerate(groups) if not round_.keep[g]]
        dropped.sort(key=lambda pair: -rounds[pair[0]].spread[groups[pair[1]]].item())  # stable: earliest first
        picked += dropped[:short]
    return picked, short


def everyone_full(rounds: Sequence[Round], layout: Layout) -> bool:
    """Whether every process has enough kept segments (computed alike on every process: no collective)."""
    return all(
        sum(bool(round_.keep[g]) for round_ in rounds for g in layout.groups_of(p)) >= layout.segments_needed
        for p in range(layout.num_processes)
    )


def fresh_rows(layout: Layout, seed: int, step: int, round_: int, dataset_size: int) -> list[int]:
    """This process's training rows for an extra round: a round's prompts, drawn by an RNG seeded by (seed, step,
    round), each repeated `num_generations` times as TRL's sampler repeats them, and sliced per process as TRL's
    dataloader slices them. The same on every process and in a resumed run."""
    prompts = layout.num_processes * layout.rows_per_process // layout.num_generations
    indices = np.random.default_rng([seed, step, round_]).integers(dataset_size, size=prompts)
    start = layout.process_index * layout.rows_per_process
    return np.repeat(indices, layout.num_generations)[start : start + layout.rows_per_process].tolist()


def take_rows(batch: dict[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """The rows `rows` of a scored batch whose vision inputs are split per row (scalars stay as they are)."""
    index = torch.tensor(list(rows), dtype=torch.long)

    def take(value):
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return value[index.to(value.device)]
        return [value[i] for i in rows] if isinstance(value, list) else value

    return {key: take(value) for key, value in batch.items()}


def _pad_width(tensor: torch.Tensor, width: int, left: bool, value: int) -> torch.Tensor:
    missing = width - tensor.size(1)
    if missing == 0:
        return tensor
    padding = (0, 0) * (tensor.ndim - 2) + ((missing, 0) if left else (0, missing))
    return F.pad(tensor, padding, value=value)


def _widths(batch: dict[str, Any]) -> tuple[int, int]:
    return batch["prompt_ids"].size(1), batch["completion_ids"].size(1)


def concat_rows(batches: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Scored batches (vision inputs split per row) as one, each per-row tensor padded as TRL pads it.

    A round without images has no vision inputs: its rows get empty ones, as `split_vision_inputs` gives a row
    without an image, and all-text token types.
    """
    if len(batches) == 1:
        return dict(batches[0])
    sizes = [b["prompt_ids"].size(0) for b in batches]
    prompt_widths = [b["prompt_ids"].size(1) for b in batches]
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for b in batches for k in b):
        values = [b.get(key) for b in batches]
        present = [v for v in values if v is not None]
        if key in _PROMPT_AND_COMPLETION:  # a round without images: every token is text (type 0)
            values = [
                v if v is not None else present[0].new_zeros(b["prompt_ids"].size(0), sum(_widths(b)))
                for v, b in zip(values, batches, strict=True)
            ]
            present = values
        if isinstance(present[0], list):
            if key in _COUNT_KEYS:
                empty = [0]
            else:
                sample = next(t for v in present for t in v)
                empty = [sample.new_zeros((0, *sample.shape[1:]))]
            merged[key] = [x for v, n in zip(values, sizes, strict=True) for x in (v if v is not None else empty * n)]
        elif len(present) != len(values):
            raise ValueError(f"Dynamic sampling cannot merge rounds where only some have {key!r}; turn it off.")
        elif present[0].ndim == 0:
            continue  # `num_items_in_batch`: recomputed by the caller for the rows kept
        elif present[0].ndim == 1:
            merged[key] = torch.cat(present)
        else:
            value = _PAD_VALUES.get(key, 0)
            value = pad_token_id if value is None else value
            if key in _PROMPT_AND_COMPLETION:
                prompts = [v[:, :w] for v, w in zip(present, prompt_widths, strict=True)]
                completions = [v[:, w:] for v, w in zip(present, prompt_widths, strict=True)]
                width = max(prompt_widths), max(c.size(1) for c in completions)
                merged[key] = torch.cat(
                    [
                        torch.cat([_pad_width(p, width[0], True, 0), _pad_width(c, width[1], False, 0)], dim=1)
                        for p, c in zip(prompts, completions, strict=True)
                    ]
                )
            else:
                width = max(v.size(1) for v in present)
                merged[key] = torch.cat([_pad_width(v, width, key in _LEFT_PADDED, value) for v in present])
    return merged


@dataclass
class DynamicSampling:
    """One trainer's dynamic sampling: the filter, the layout, and the prompts generated for so far."""

    group_filter: GroupFilter
    layout: Layout
    max_rounds: int
    pad_token_id: int
    prompts_consumed: int = 0

    def fill(
        self,
        first: Callable[[], tuple[dict[str, Any], torch.Tensor]],
        extra: Callable[[int], tuple[dict[str, Any], torch.Tensor]],
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """This process's batch (without `num_items_in_batch`, which needs a collective), and the step's metrics.

        `first()` scores the dataloader's batch and `extra(round)` one of fresh prompts; each returns this process's
        scored rows (vision inputs split per row) and the gathered per-reward rewards of all processes' rows.
        """
        rounds: list[Round] = []
        while not rounds or (len(rounds) <= self.max_rounds and not everyone_full(rounds, self.layout)):
            batch, rewards_per_func = extra(len(rounds)) if rounds else first()
            rounds.append(Round(batch, *self.group_filter(rewards_per_func)))
        picked, _ = pick_segments(rounds, self.layout, self.layout.process_index)
        segment = self.layout.segment
        parts = [
            take_rows(rounds[r].batch, [j * segment + i for (rr, j) in picked if rr == r for i in range(segment)])
            for r in range(len(rounds))
            if any(rr == r for rr, _ in picked)
        ]
        generated = sum(len(round_.keep) for round_ in rounds)
        self.prompts_consumed += generated
        # Padding counted in groups over all processes (a group spans G / segment processes).
        padded = sum(pick_segments(rounds, self.layout, p)[1] for p in range(self.layout.num_processes))
        metrics = {
            "dynamic_sampling/kept_fraction": sum(int(r.keep.sum()) for r in rounds) / generated,
            "dynamic_sampling/rounds": float(len(rounds) - 1),
            "dynamic_sampling/prompts_consumed": float(self.prompts_consumed),
            "dynamic_sampling/padded_groups": padded * segment / self.layout.num_generations,
        }
        return concat_rows(parts, self.pad_token_id), metrics
