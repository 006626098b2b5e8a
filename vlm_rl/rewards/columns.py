"""The dataset columns a reward needs, checked against the data before training starts.

TRL passes a reward every dataset column of the batch as a keyword argument. A reward whose parameter names a
column the data lacks (the built-ins want `answer`; VLM-R1 and R1-V data call it `solution`; a custom reward's
parameter has a typo) would fail on every sample, and training would run to the end with that reward at `null`.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from datasets import Dataset
from torch import nn

from vlm_rl.data.rows import IMAGES, PROMPT, RESERVED_COLUMNS, trainer_columns
from vlm_rl.rewards.configured import CONTEXT_KEYS, ConfiguredReward
from vlm_rl.rewards.spec import RewardSpecError

# What TRL 1.16's `_calculate_rewards` passes besides the dataset columns (and, with environments, `environments`).
TRL_REWARD_KEYS = (*RESERVED_COLUMNS, "environments")
NOT_PASSED = ("prompt", "completion")  # TRL passes these as `prompts` and `completions`
# Names other GRPO code bases give the ground truth, offered as the column to map when the data has one.
GROUND_TRUTH_NAMES = ("solution", "ground_truth", "gt", "label", "target", "reference", "answers")


def required_columns(func: Callable) -> list[str]:
    """The columns `func` cannot run without: those it declares (`register_reward(..., columns=...)`) and its
    parameters with no default. For a `ConfiguredReward`, minus its recipe kwargs and the trainer's context."""
    target = func.func if isinstance(func, ConfiguredReward) else func
    given = set(TRL_REWARD_KEYS) | set(CONTEXT_KEYS)
    if isinstance(func, ConfiguredReward):
        given |= set(func.kwargs)
    needed = list(getattr(target, "required_columns", ()))
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # builtins and C callables have no signature
        parameters = []
    keywords = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    needed += [p.name for p in parameters if p.kind in keywords and p.default is inspect.Parameter.empty]
    return [name for name in dict.fromkeys(needed) if name not in given]


def check_reward_columns(reward_funcs: Iterable[Any], data: Any, *, split: str = "training") -> None:
    """Stop, in one line, when a reward needs a column `data` lacks: a dataset, a dict of them (TRL's several
    `eval_dataset`s), or a list of column names.

    A reward routed to `tasks` needs the column on its tasks' rows only: when `data` is a `Dataset`, a column that
    is there but empty on every row of those tasks fails too (mixed data merged from files with different keys).
    """
    if data is None:
        return
    if isinstance(data, dict):
        for each in data.values():
            check_reward_columns(reward_funcs, each, split=split)
        return
    if isinstance(data, Dataset):
        columns = trainer_columns(data)
    else:
        columns = data if isinstance(data, list | tuple) else getattr(data, "column_names", None)
    if columns is None:  # an iterable dataset that does not know its columns
        return
    passed = [c for c in columns if c not in NOT_PASSED]
    for func in reward_funcs:
        if isinstance(func, str | nn.Module) or not callable(func):
            continue  # reward models: TRL scores the prompt and completion text
        name = getattr(func, "__name__", type(func).__name__)
        for column in required_columns(func):
            if column not in passed:
                raise RewardSpecError(
                    f"Reward {name!r} needs a dataset column {column!r}, which the {split} data lacks (columns: "
                    f"{columns}). {_fix(column, passed)}"
                )
            tasks = getattr(func, "tasks", None)
            if isinstance(data, Dataset) and column not in (PROMPT, IMAGES) and tasks is not None:
                _check_filled(data, column, name, tasks, func.route_column, split)


def _fix(column: str, columns: list[str]) -> str:
    """How to give the reward its column: a typo'd parameter, or the data's column that most likely holds it."""
    if column in NOT_PASSED:
        return f"TRL passes {column!r} to rewards as {column + 's'!r}: name the parameter that."
    close = difflib.get_close_matches(column, columns, n=1)
    if close:
        return (
            f"Did you mean {close[0]!r}? Fix the parameter's name if the reward is yours, or rename the column with "
            f"column_mapping: {{{close[0]}: {column}}}."
        )
    source = next((c for c in GROUND_TRUTH_NAMES if c in columns), "your_column")
    return (
        f"Rename the column that holds it with column_mapping: {{{source}: {column}}} (in Python: "
        f"dataset.rename_column), or give the reward's parameter a default."
    )


def _check_filled(data: Dataset, column: str, name: str, tasks: list[str], route_column: str, split: str) -> None:
    """Where the data has rows of the reward's tasks, the column holds a value on at least one of them (its raw values:
    no image is decoded)."""
    raw = data.with_format("arrow")
    if route_column not in raw.column_names or column not in raw.column_names:
        return  # a missing route column is `check_routes`' to report
    routes, values = raw[route_column].to_pylist(), raw[column].to_pylist()
    mine = [value for route, value in zip(routes, values, strict=True) if str(route) in tasks]
    # No row of those tasks in this split (a held-out split without that task) is fine: nothing to score.
    if mine and all(value is None for value in mine):
        raise RewardSpecError(
            f"Reward {name!r} is routed to tasks {tasks}, but the {split} data's column {column!r} is empty on every "
            f"row of those tasks; fill it on those rows."
        )
