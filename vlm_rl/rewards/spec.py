"""One entry of a recipe's `reward_funcs`: which reward, under what name, weight, keyword arguments and tasks.

An entry is either a bare reference (`accuracy`, `pkg.mod:func`, `file.py:func`, an entry-point name) or a
mapping:

    - reward: iou                 # the reference
      name: iou@0.5               # logged as rewards/iou@0.5/... (default: the function's name)
      weight: 2.0                 # default 1.0
      kwargs: {threshold: 0.5}    # the function's own keyword parameters
      tasks: [grounding]          # score only rows whose route column is one of these (default: every row)
      timeout: 10                 # seconds per call, overriding `reward_timeout`
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any

import yaml


class RewardSpecError(ValueError):
    """A recipe names or configures a reward in a way that cannot work."""


@dataclass
class RewardSpec:
    """A parsed `reward_funcs` entry."""

    reward: str
    name: str | None = None
    weight: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] | None = None
    timeout: float | None = None

    @classmethod
    def parse(cls, entry: str | dict, position: int) -> RewardSpec:
        """Read entry number `position` (0-based) of `reward_funcs`; a `{...}` string is read as YAML (CLI use)."""
        where = f"reward_funcs[{position}]"
        if isinstance(entry, str) and entry.lstrip().startswith("{"):
            try:
                entry = yaml.safe_load(entry)
            except yaml.YAMLError as error:
                raise RewardSpecError(f"{where}: {entry!r} is not a valid mapping: {error}") from error
        if isinstance(entry, str):
            if not entry.strip():
                raise RewardSpecError(f"{where} is empty.")
            return cls(reward=entry.strip())
        if not isinstance(entry, dict):
            raise RewardSpecError(f"{where} must be a reward reference or a mapping, not {type(entry).__name__}.")
        known = [f.name for f in fields(cls)]
        for key in entry:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else f" Keys: {known}."
                raise RewardSpecError(f"{where}: unknown key {key!r}.{hint}")
        if not isinstance(entry.get("reward"), str) or not entry["reward"].strip():
            raise RewardSpecError(f"{where}: `reward` (the name or path of the function) is required.")
        spec = cls(**{**entry, "reward": entry["reward"].strip()})
        spec._check(where)
        return spec

    def _check(self, where: str) -> None:
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip() or "/" in self.name):
            raise RewardSpecError(f"{where}: `name` must be a non-empty string without '/', got {self.name!r}.")
        if self.weight is not None and not (isinstance(self.weight, int | float) and math.isfinite(self.weight)):
            raise RewardSpecError(f"{where}: `weight` must be a finite number, got {self.weight!r}.")
        if self.kwargs is None:
            self.kwargs = {}
        if not isinstance(self.kwargs, dict):
            raise RewardSpecError(f"{where}: `kwargs` must be a mapping of keyword to value, got {self.kwargs!r}.")
        if isinstance(self.tasks, str | int):
            self.tasks = [self.tasks]
        if self.tasks is not None and (not self.tasks or not all(isinstance(t, str | int) for t in self.tasks)):
            raise RewardSpecError(f"{where}: `tasks` must be a non-empty list of task names, got {self.tasks!r}.")
        if self.tasks is not None:
            self.tasks = [str(task) for task in self.tasks]  # route values are compared as text: 1 and "1" agree
        if self.timeout is not None and not (isinstance(self.timeout, int | float) and self.timeout > 0):
            raise RewardSpecError(f"{where}: `timeout` must be a positive number of seconds, got {self.timeout!r}.")
