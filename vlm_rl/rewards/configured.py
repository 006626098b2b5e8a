"""`ConfiguredReward`: a reward function as a recipe configures it, and the guard around every call.

A bad reward must not cost a run: a call that raises, runs past its time limit or returns NaN/inf gives the
affected samples `None` (or 0.0, by policy) instead of stopping training. Each kind of failure is counted,
and the first of each kind is logged once, with the reward's name, the sample's index and its task.
"""

from __future__ import annotations

import asyncio
import logging
import math
import numbers
import reprlib
from collections import Counter
from collections.abc import Callable
from typing import Any

from trl.trainer.utils import is_async_callable, start_event_loop_in_daemon

from vlm_rl.rewards.timeout import RewardTimeout, time_limit

logger = logging.getLogger(__name__)

ERROR_POLICIES = ("none", "zero", "raise")
FAILURE_KINDS = ("error", "timeout", "nonfinite")
# What the trainer gives every configured reward besides the batch (`bind_context`).
CONTEXT_KEYS = ("processing_class", "model_type", "max_completion_length")
# TRL stores rewards as float32: a larger finite score would become inf there, and NaN in the advantages.
FLOAT32_MAX = 3.4028234663852886e38
_short = reprlib.Repr()  # a score's repr in a message: a returned 10 MB string must not flood the log
_short.maxstring = _short.maxother = 60


class RewardError(RuntimeError):
    """A reward failed under `reward_error_policy: raise`."""


class ConfiguredReward:
    """Calls `func` on the rows it is routed to, with the recipe's keyword arguments, under a time limit.

    It keeps TRL's calling convention, so the trainer (and the held-out evaluation) call it like any reward.
    `context` holds what the trainer adds to every call (`processing_class`, `model_type`).
    """

    def __init__(
        self,
        func: Callable,
        *,
        name: str,
        kwargs: dict[str, Any] | None = None,
        tasks: list[str] | None = None,
        weight: float | None = None,
        timeout: float | None = None,
        error_policy: str = "none",
        route_column: str = "task",
    ):
        if error_policy not in ERROR_POLICIES:
            raise ValueError(f"reward_error_policy must be one of {ERROR_POLICIES}, got {error_policy!r}.")
        self.func = func
        self.__name__ = name
        self.kwargs = dict(kwargs or {})
        self.tasks = list(tasks) if tasks is not None else None
        self.weight = weight  # None: the recipe's `reward_weights`, or 1.0
        self.timeout = timeout
        self.error_policy = error_policy
        self.route_column = route_column
        self.context: dict[str, Any] = {}
        self.failures: Counter[str] = Counter()
        self._reported: set[str] = set()

    def __repr__(self) -> str:
        return f"ConfiguredReward({self.__name__!r}, tasks={self.tasks}, kwargs={self.kwargs})"

    def applicable_rows(self, num_samples: int, columns: dict[str, Any]) -> list[int]:
        """Indices of the samples this reward scores: all, or those whose route column is in `tasks`."""
        if self.tasks is None:
            return list(range(num_samples))
        routes = columns.get(self.route_column)
        if routes is None:
            raise KeyError(
                f"Reward {self.__name__!r} is routed to tasks {self.tasks}, but the batch has no "
                f"{self.route_column!r} column (columns: {sorted(columns)}). Add the column to the dataset, or "
                "set `reward_route_column`."
            )
        return [i for i, route in enumerate(routes) if route is not None and str(route) in self.tasks]

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        num_samples = len(completions)
        scores: list[float | None] = [None] * num_samples
        rows = self.applicable_rows(num_samples, columns)
        if not rows:
            return scores
        clashes = sorted(set(self.kwargs) & set(columns))
        if clashes:
            raise ValueError(
                f"Reward {self.__name__!r}: recipe kwargs {clashes} have the same names as dataset columns; rename "
                "the column or the keyword."
            )
        routes = columns.get(self.route_column)
        hooks = _BufferedHooks(columns, num_samples)
        try:
            # One limit for the whole call, the row-by-row retries included.
            with time_limit(self.timeout, what="the call"):
                self._score(rows, prompts, completions, columns, routes, scores, hooks)
        except RewardTimeout as error:
            done = set(hooks.kept_rows)
            for row in rows:
                if row not in done:
                    scores[row] = self._failed("timeout", row, routes, error)
        hooks.flush()
        return scores

    def _score(self, rows, prompts, completions, columns, routes, scores, hooks: _BufferedHooks) -> None:
        """Fill in `scores` for `rows`; when the call raises, each row is retried alone so one bad sample costs only
        itself. Only the attempts that succeed keep what they logged through `log_extra` / `log_metric`."""
        attempt = hooks.attempt(rows)
        try:
            values = self._call(rows, prompts, completions, {**columns, **attempt.hooks})
        except (RewardTimeout, RewardError):
            raise
        except Exception as error:
            if len(rows) == 1:
                scores[rows[0]] = self._failed("error", rows[0], routes, error)
                hooks.keep(attempt, record=False)
                return
            values = None
        if values is None:
            # Retried outside the `except`: a row's error would otherwise chain the batch's, and its logged
            # traceback would print the same failure twice.
            for row in rows:
                self._score([row], prompts, completions, columns, routes, scores, hooks)
            return
        for row, value in zip(rows, values, strict=True):
            scores[row] = self._checked(value, row, routes)
        hooks.keep(attempt)

    def _call(self, rows: list[int], prompts: list, completions: list, columns: dict[str, Any]) -> list:
        """One call of `func` on `rows`; returns exactly one value per row."""
        prompts, completions, columns = _select(rows, prompts, completions, columns, len(completions))
        call_kwargs = {**self.context, **columns, **self.kwargs}
        if is_async_callable(self.func):
            values = _run_coroutine(self.func(prompts=prompts, completions=completions, **call_kwargs))
        else:
            values = self.func(prompts=prompts, completions=completions, **call_kwargs)
        if not isinstance(values, list | tuple) or len(values) != len(rows):
            # A broken contract, not a bad sample: retrying row by row would hide it.
            count = f"{len(values)} values" if isinstance(values, list | tuple) else f"a {type(values).__name__}"
            raise RewardError(
                f"Reward {self.__name__!r} returned {count} for {len(rows)} completions; it must return a list with "
                "one float (or None) per completion."
            )
        return list(values)

    def _checked(self, value: Any, row: int, routes: list | None) -> float | None:
        if value is None:
            return None
        number = _real(value)
        if number is None:
            problem = f"returned {_short.repr(value)} ({type(value).__name__}), not a number"
            return self._failed("error", row, routes, TypeError(problem))
        try:
            score = float(number)
        except OverflowError:  # an int beyond float range
            score = math.inf if number > 0 else -math.inf
        if math.isfinite(score) and abs(score) <= FLOAT32_MAX:
            return score
        problem = f"returned {_short.repr(number)}" + ("" if not math.isfinite(score) else ", beyond float32's range")
        return self._failed("nonfinite", row, routes, ValueError(problem))

    def _failed(self, kind: str, row: int, routes: list | None, error: BaseException) -> float | None:
        route = f" (task {routes[row]!r})" if routes is not None else ""
        message = f"Reward {self.__name__!r} failed on sample {row}{route} [{kind}]: {error}"
        if self.error_policy == "raise":
            raise RewardError(message) from error
        self.failures[kind] += 1
        # The first failure of each kind is reported, and of errors the first of each exception type, with its
        # traceback; the rest are only counted.
        seen = f"{kind} ({type(error).__name__})" if kind == "error" else kind
        if seen not in self._reported:
            self._reported.add(seen)
            fallback = "0.0" if self.error_policy == "zero" else "None (not scored)"
            logger.warning(
                "%s. Such samples score %s; further %s failures of this reward are counted in the logged "
                "`rewards/%s/failures`, not reported. Set `reward_error_policy: raise` to stop on the first.",
                message, fallback, seen, self.__name__,
                exc_info=error if kind == "error" else None,
            )  # fmt: skip
        return 0.0 if self.error_policy == "zero" else None


def _real(value: Any) -> numbers.Real | None:
    """`value` as a real number: Python numbers, and one-element NumPy or torch values; None for anything else
    (text, complex numbers, arrays of several values), which a reward must not return as a score."""
    if isinstance(value, numbers.Real):
        return value
    size = getattr(value, "size", None)
    size = value.numel() if callable(getattr(value, "numel", None)) else size() if callable(size) else size
    if size != 1 or not callable(getattr(value, "item", None)):
        return None
    try:
        item = value.item()  # NumPy and torch scalars, 0-d and one-element arrays and tensors
    except Exception:  # a meta tensor, an object with an unrelated `item`
        return None
    return item if isinstance(item, numbers.Real) else None


def bind_context(reward_funcs: list, *, processing_class, model_type: str | None, max_completion_length: int) -> None:
    """Give the configured rewards what every call gets besides the batch: the processor (its resize rule, for box
    coordinates), the model family and the completion length limit (for length penalties)."""
    context = dict(zip(CONTEXT_KEYS, (processing_class, model_type, max_completion_length), strict=True))
    for func in reward_funcs:
        if isinstance(func, ConfiguredReward):
            func.context.update(context)


def _select(rows: list[int], prompts: list, completions: list, columns: dict[str, Any], num_samples: int):
    """The batch restricted to `rows`: per-sample lists are subset, everything else passes through."""

    def subset(value):
        return [value[i] for i in rows] if isinstance(value, list) and len(value) == num_samples else value

    return subset(prompts), subset(completions), {key: subset(value) for key, value in columns.items()}


class _Attempt:
    """What one call logged through TRL's hooks, held back until the call is known to have succeeded."""

    def __init__(self, rows: list[int], columns: dict[str, Any]):
        self.rows = rows
        self.extra: list[tuple[str, list]] = []
        self.metrics: list[tuple[str, float]] = []
        self.hooks = {}
        if callable(columns.get("log_extra")):
            self.hooks["log_extra"] = lambda column, values: self.extra.append((column, list(values)))
        if callable(columns.get("log_metric")):
            self.hooks["log_metric"] = lambda name, value: self.metrics.append((name, value))


class _BufferedHooks:
    """TRL's `log_extra` / `log_metric` for one guarded call: a failed attempt that is retried must not log twice,
    and `log_extra` wants one value per sample of the whole batch."""

    def __init__(self, columns: dict[str, Any], num_samples: int):
        self.columns = columns
        self.num_samples = num_samples
        self.kept: list[_Attempt] = []
        self.kept_rows: list[int] = []

    def attempt(self, rows: list[int]) -> _Attempt:
        return _Attempt(rows, self.columns)

    def keep(self, attempt: _Attempt, record: bool = True) -> None:
        self.kept_rows.extend(attempt.rows)
        if record:
            self.kept.append(attempt)

    def flush(self) -> None:
        extra: dict[str, list] = {}
        for attempt in self.kept:
            for column, values in attempt.extra:
                full = extra.setdefault(column, [None] * self.num_samples)
                for row, value in zip(attempt.rows, values, strict=True):
                    full[row] = value
            for name, value in attempt.metrics:
                self.columns["log_metric"](name, value)
        for column, values in extra.items():
            self.columns["log_extra"](column, values)


_event_loop: asyncio.AbstractEventLoop | None = None


def _run_coroutine(coroutine) -> Any:
    """Await an async reward on one long-lived event loop in a daemon thread.

    A fresh loop per call (`asyncio.run`) would break clients bound to the loop they were created on, and fails
    where a loop is already running (notebooks). Waiting here stays interruptible by the time limit.
    """
    global _event_loop
    if _event_loop is None:
        _, _event_loop, ready = start_event_loop_in_daemon(name="vlm-rl-async-rewards")
        ready.wait()
    future = asyncio.run_coroutine_threadsafe(coroutine, _event_loop)
    try:
        return future.result()
    finally:
        future.cancel()  # no-op when done; stops the coroutine when the time limit interrupted the wait
