"""The reward registry, and loading rewards from a recipe's `reward_funcs` list.

A reward is a plain function with TRL's calling convention: `f(prompts, completions, **kwargs)`, where the
kwargs carry every dataset column of the batch (e.g. `answer`), and it returns one float (or None) per
completion. A recipe names it in one of four ways:

- a registered name: `accuracy`
- the name of an entry point in the `vlm_rl.rewards` group, so a pip-installed package can ship rewards
- a module path: `my_package.rewards:iou_reward`
- a file path: `path/to/rewards.py:my_reward` (relative paths are resolved from the recipe's directory,
  then from the working directory)
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from vlm_rl.rewards.configured import ConfiguredReward
from vlm_rl.rewards.spec import RewardSpec, RewardSpecError

RewardFunc = Callable[..., list[float | None]]

ENTRY_POINT_GROUP = "vlm_rl.rewards"

REWARD_REGISTRY: dict[str, RewardFunc] = {}


def register_reward(name: str, columns: tuple[str, ...] = ()) -> Callable[[RewardFunc], RewardFunc]:
    """Register `func` under `name`, so recipes can list it by that name.

    `columns` are dataset columns it cannot score without, though its parameters default them (to raise a clear
    error when called without them): the trainer checks the data has them before training.
    """

    def decorator(func: RewardFunc) -> RewardFunc:
        if name in REWARD_REGISTRY and REWARD_REGISTRY[name] is not func:
            raise ValueError(f"A reward named {name!r} is already registered ({REWARD_REGISTRY[name].__module__}).")
        REWARD_REGISTRY[name] = func
        if columns:
            func.required_columns = tuple(columns)
        return func

    return decorator


def _load_from_file(path_text: str, func_name: str, search_dirs: list[Path], spec: str, kind: str) -> Callable:
    candidates = [Path(path_text)] if Path(path_text).is_absolute() else [d / path_text for d in search_dirs]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        tried = ", ".join(str(p) for p in candidates)
        raise RewardSpecError(f"{kind} {spec!r}: file {path_text!r} not found (looked at: {tried}).")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    module_name = f"vlm_rl_user_rewards.{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # so pickling and dataclasses inside the file work
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise RewardSpecError(f"{kind} {spec!r}: importing {path} failed: {error!r}") from error
    return _get_function(module, func_name, spec, str(path), kind)


def _load_from_module(module_name: str, func_name: str, spec: str, kind: str) -> Callable:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise RewardSpecError(
            f"{kind} {spec!r}: module {module_name!r} cannot be imported ({error}). For a file, write "
            "'path/to/file.py:function'."
        ) from error
    return _get_function(module, func_name, spec, f"module {module_name!r}", kind)


def _get_function(module, func_name: str, spec: str, where: str, kind: str) -> Callable:
    func = getattr(module, func_name, None)
    if func is None:
        functions = [
            name for name, obj in vars(module).items() if inspect.isfunction(obj) and not name.startswith("_")
        ]
        close = difflib.get_close_matches(func_name, functions, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else f" Functions there: {functions}."
        raise RewardSpecError(f"{kind} {spec!r}: {where} has no function {func_name!r}.{hint}")
    if not callable(func):
        raise RewardSpecError(f"{kind} {spec!r}: {func_name!r} in {where} is not callable.")
    return func


def _load_entry_point(spec: str) -> RewardFunc | None:
    matches = entry_points(group=ENTRY_POINT_GROUP, name=spec)
    if not matches:
        return None
    entry_point = next(iter(matches))
    owner = entry_point.dist.name if entry_point.dist is not None else "an installed package"
    try:
        func = entry_point.load()
    except Exception as error:
        raise RewardSpecError(
            f"Reward {spec!r}: the {ENTRY_POINT_GROUP!r} entry point from {owner} ({entry_point.value}) failed to "
            f"load: {error!r}"
        ) from error
    if not callable(func):
        raise RewardSpecError(f"Reward {spec!r}: the entry point from {owner} ({entry_point.value}) is not callable.")
    return func


def load_named(spec: str, base_dir: str | Path | None = None, kind: str = "Reward") -> Callable:
    """What a `package.module:name` or `path/to/file.py:name` entry names; rewards and tools (`kind`) share it."""
    target, func_name = spec.strip().rsplit(":", 1)
    if not func_name:
        raise RewardSpecError(f"{kind} {spec!r}: no function name after ':'.")
    if target.endswith(".py") or "/" in target or "\\" in target:
        search_dirs = [Path(base_dir)] if base_dir is not None else []
        return _load_from_file(target, func_name, [*search_dirs, Path.cwd()], spec, kind)
    return _load_from_module(target, func_name, spec, kind)


def resolve_reward(spec: str, base_dir: str | Path | None = None) -> RewardFunc:
    """The reward function a recipe entry names (see the module docstring for the accepted forms)."""
    spec = spec.strip()
    if spec in REWARD_REGISTRY:
        return REWARD_REGISTRY[spec]
    if ":" in spec:
        return load_named(spec, base_dir)
    func = _load_entry_point(spec)
    if func is not None:
        return func
    installed = sorted(entry_point.name for entry_point in entry_points(group=ENTRY_POINT_GROUP))
    known = sorted(REWARD_REGISTRY) + installed
    close = difflib.get_close_matches(spec, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RewardSpecError(
        f"Unknown reward {spec!r}.{hint} Registered rewards: {sorted(REWARD_REGISTRY)}; installed through the "
        f"{ENTRY_POINT_GROUP!r} entry points: {installed or 'none'}. A custom reward is named "
        "'package.module:function' or 'path/to/file.py:function'."
    )


def reward_or_model(spec: str) -> RewardFunc | str:
    """What a string in `VLMGRPOTrainer(reward_funcs=...)` names: a reward function, or a reward model left for TRL.

    A registered or installed name, `module:function` or `file.py:function` resolves as in a recipe. A local
    directory or a Hub id `owner/name` (a `/` and no `:`) stays a string, which TRL loads as a sequence-classification
    reward model. Anything else is an unknown reward, and the error names the closest ones.
    """
    spec = spec.strip()
    known = spec in REWARD_REGISTRY or bool(entry_points(group=ENTRY_POINT_GROUP, name=spec))
    names_model = ":" not in spec and ("/" in spec or Path(spec).is_dir())
    return spec if names_model and not known else resolve_reward(spec)


def _check_kwargs(func: RewardFunc, kwargs: dict, where: str) -> None:
    """Recipe kwargs must name parameters the function declares: `**kwargs` alone would swallow a typo."""
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):  # some builtins and C callables have no signature; nothing to check
        return
    named = [
        name
        for name, parameter in parameters.items()
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        and name not in ("prompts", "completions")
    ]
    for key in kwargs:
        if key not in named:
            close = difflib.get_close_matches(str(key), named, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RewardSpecError(
                f"{where}: the reward has no keyword parameter {key!r}.{hint} Its keyword parameters: "
                f"{named or 'none'}."
            )


def load_rewards(
    entries: list[str | dict],
    base_dir: str | Path | None = None,
    *,
    timeout: float | None = None,
    error_policy: str = "none",
    route_column: str = "task",
) -> list[ConfiguredReward]:
    """Resolve and configure every entry of a recipe's `reward_funcs`, failing on the first that cannot work."""
    if not entries:
        raise RewardSpecError("The recipe lists no rewards: set `reward_funcs`, e.g. `reward_funcs: [accuracy]`.")
    rewards: list[ConfiguredReward] = []
    for position, entry in enumerate(entries):
        spec = RewardSpec.parse(entry, position)
        where = f"reward_funcs[{position}] ({spec.reward!r})"
        func = resolve_reward(spec.reward, base_dir)
        _check_kwargs(func, spec.kwargs, where)
        name = spec.name or getattr(func, "__name__", type(func).__name__)
        taken = [other.__name__ for other in rewards]
        if name in taken:
            raise RewardSpecError(
                f"{where} would be logged as {name!r}, like reward_funcs[{taken.index(name)}]; give one of them a "
                "distinct `name`."
            )
        reward = ConfiguredReward(
            func,
            name=name,
            kwargs=spec.kwargs,
            tasks=spec.tasks,
            weight=spec.weight,
            timeout=spec.timeout if spec.timeout is not None else timeout,
            error_policy=error_policy,
            route_column=route_column,
        )
        rewards.append(reward)
    return rewards


def recipe_rewards(reward_args, training_args, base_dir: str | Path | None = None) -> list[ConfiguredReward]:
    """The rewards a parsed recipe names (`RewardArguments`), under its guard settings (`VLMGRPOConfig`)."""
    return load_rewards(
        reward_args.reward_funcs,
        base_dir=base_dir,
        timeout=training_args.reward_timeout,
        error_policy=training_args.reward_error_policy,
        route_column=training_args.reward_route_column,
    )
