"""A recipe's `tools`, as the one environment TRL's `environment_factory` builds per rollout.

Each tool is the built-in `zoom_in`, or a user's function or environment class named `package.module:name` or
`path/to/file.py:name` (as rewards are). They are put together in one class so that every call, whatever its tool,
passes through `_run_tool`: a raising tool, wrong arguments and calls past `max_turns` come back to the model as a
one-line `Error: ...` reply instead of stopping the run, and the trainer counts them (`trainers/tool_metrics.py`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlm_rl.models.families import family_adapter
from vlm_rl.recipe_check import RecipeError
from vlm_rl.rewards.registry import load_named
from vlm_rl.tools.replies import error_reply
from vlm_rl.tools.zoom import ZoomEnvironment

BUILTIN_TOOLS: dict[str, type] = {"zoom_in": ZoomEnvironment}
"""Tools a recipe names by name; an environment class here is built with the processor and the model type."""


def resolve_tool(spec: str, base_dir: str | Path | None = None) -> Callable | type:
    """The function or environment class a recipe's `tools` entry names."""
    spec = spec.strip()
    if spec in BUILTIN_TOOLS:
        return BUILTIN_TOOLS[spec]
    if ":" in spec:
        return load_named(spec, base_dir, kind="Tool")
    raise RecipeError(
        f"tools: unknown tool {spec!r}. Built-in tools: {sorted(BUILTIN_TOOLS)}; a custom tool is named "
        "'package.module:function' or 'path/to/file.py:function' (a function or an environment class)."
    )


class _NoEnvironment:
    """The base of a toolbox made of plain functions only: nothing to keep per rollout."""

    def reset(self, **row: Any) -> None:
        return None


class _Toolbox:
    """What every toolbox adds to its environment: the turn count of the rollout, and the guard around each call."""

    max_turns: int | None = None

    def reset(self, **row: Any) -> Any:
        self._turns, self._in_turn = 0, False
        return super().reset(**row)

    def _end_turn(self) -> None:
        """The model is about to generate: the next call starts a new tool turn (the trainer calls this)."""
        self._in_turn = False

    def _run_tool(self, name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
        if not self._in_turn:
            self._turns, self._in_turn = self._turns + 1, True
        if self.max_turns is not None and self._turns > self.max_turns:
            return error_reply(f"no more tool calls: at most {self.max_turns} tool turns per answer. Answer now.")
        try:
            inspect.signature(func).bind(*args, **kwargs)
        except TypeError as error:
            return error_reply(f"{name} got wrong arguments ({error}); its arguments are {_arguments(func)}.")
        try:
            return func(*args, **kwargs)
        except Exception as error:
            return error_reply(f"{name} failed: {type(error).__name__}: {error}")


def _arguments(func: Callable) -> str:
    """A tool's signature as the model sees it (without `self`)."""
    parameters = [p for p in inspect.signature(func).parameters.values() if p.name != "self"]
    return "(" + ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in parameters) + ")"


def _guarded(name: str, func: Callable, is_method: bool) -> Callable:
    """`func` as a toolbox method that runs through `_run_tool`, with the name, signature and docstring TRL renders
    into the tool schema (an environment's methods already take `self`; a plain function gets it added)."""

    @functools.wraps(func)
    def method(self, *args: Any, **kwargs: Any) -> Any:
        return self._run_tool(name, func, (self, *args) if is_method else args, kwargs)

    if not is_method:
        signature = inspect.signature(func)
        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        method.__signature__ = signature.replace(parameters=[self_parameter, *signature.parameters.values()])
    return method


def toolbox(
    tools: list[Callable | type],
    *,
    processor: Any = None,
    model_type: str | None = None,
    max_turns: int | None = None,
) -> Callable[[], Any]:
    """An `environment_factory` for TRL: each call builds one rollout's environment with every tool of `tools`.

    At most one of `tools` may be an environment class (the built-in `zoom_in` is one); its `reset` and
    `get_reward` are kept. A built-in environment is built with the policy's `processor` and `model_type`.
    """
    classes = [tool for tool in tools if inspect.isclass(tool)]
    if len(classes) > 1:
        names = [cls.__name__ for cls in classes]
        raise RecipeError(f"tools: at most one environment class per run, got {names}; merge them into one class.")
    base = classes[0] if classes else _NoEnvironment
    members = [
        (name, member, True)
        for name, member in inspect.getmembers(base, predicate=inspect.isfunction)
        if name not in ("reset", "get_reward") and not name.startswith("_")
    ]
    members += [(tool.__name__, tool, False) for tool in tools if not inspect.isclass(tool)]
    names = [name for name, _, _ in members]
    if len(set(names)) < len(names):
        raise RecipeError(f"tools: two tools share a name in {names}; each tool needs its own name.")
    namespace = {name: _guarded(name, member, is_method) for name, member, is_method in members}
    namespace["max_turns"] = max_turns
    cls = type(base.__name__, (_Toolbox, base), namespace)
    if base in BUILTIN_TOOLS.values():
        return functools.partial(cls, processor=processor, model_type=model_type)
    return cls


def recipe_toolbox(
    tools: list[Callable | type], processor: Any, model_type: str | None, max_turns: int | None
) -> Callable[[], Any] | None:
    """The `environment_factory` of a run's resolved `tools` for its policy (None without tools), after checking
    that the policy's template can render them: the one the trainer and the held-out evaluation use."""
    if not tools:
        return None
    check_tool_template(processor, model_type)
    return toolbox(tools, processor=processor, model_type=model_type, max_turns=max_turns)


def check_tool_template(processor: Any, model_type: str | None) -> None:
    """Refuse, before training, a policy whose chat template cannot render a tool call and its result.

    TRL raises the same refusal from inside the trainer without naming the model; this one says what to do.
    """
    from trl.chat_template_utils import supports_tool_calling  # lazy: TRL is slow to import

    if not supports_tool_calling(processor):
        adapter = family_adapter(model_type)
        family = adapter.label if adapter is not None else model_type
        raise RecipeError(
            f"tools: the chat template of this {family} model cannot render tool calls; use a model whose template "
            "can (e.g. Qwen3-VL), save such a template as `chat_template.jinja` in the model's directory, or remove "
            "`tools`."
        )
