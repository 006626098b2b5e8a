"""The reward registry, and loading rewards from a recipe's `reward_funcs` list.

A reward is a plain function with TRL's calling convention: `f(prompts, completions, **kwargs)`, where the
kwargs carry every dataset column of the batch (e.g. `answer`), and it returns one float per completion.
A recipe names it in one of three ways:

- a registered name: `accuracy`
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
from pathlib import Path

RewardFunc = Callable[..., list[float | None]]

REWARD_REGISTRY: dict[str, RewardFunc] = {}


class RewardSpecError(ValueError):
    """A recipe names a reward that cannot be loaded."""


def register_reward(name: str) -> Callable[[RewardFunc], RewardFunc]:
    """Register `func` under `name`, so recipes can list it by that name."""

    def decorator(func: RewardFunc) -> RewardFunc:
        if name in REWARD_REGISTRY and REWARD_REGISTRY[name] is not func:
            raise ValueError(f"A reward named {name!r} is already registered ({REWARD_REGISTRY[name].__module__}).")
        REWARD_REGISTRY[name] = func
        return func

    return decorator


def _load_from_file(path_text: str, func_name: str, search_dirs: list[Path], spec: str) -> RewardFunc:
    candidates = [Path(path_text)] if Path(path_text).is_absolute() else [d / path_text for d in search_dirs]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        tried = ", ".join(str(p) for p in candidates)
        raise RewardSpecError(f"Reward {spec!r}: file {path_text!r} not found (looked at: {tried}).")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    module_name = f"vlm_rl_user_rewards.{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # so pickling and dataclasses inside the file work
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise RewardSpecError(f"Reward {spec!r}: importing {path} failed: {error!r}") from error
    return _get_function(module, func_name, spec, where=str(path))


def _load_from_module(module_name: str, func_name: str, spec: str) -> RewardFunc:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise RewardSpecError(
            f"Reward {spec!r}: module {module_name!r} cannot be imported ({error}). For a file, write "
            "'path/to/file.py:function'."
        ) from error
    return _get_function(module, func_name, spec, where=f"module {module_name!r}")


def _get_function(module, func_name: str, spec: str, where: str) -> RewardFunc:
    func = getattr(module, func_name, None)
    if func is None:
        functions = [
            name for name, obj in vars(module).items() if inspect.isfunction(obj) and not name.startswith("_")
        ]
        close = difflib.get_close_matches(func_name, functions, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else f" Functions there: {functions}."
        raise RewardSpecError(f"Reward {spec!r}: {where} has no function {func_name!r}.{hint}")
    if not callable(func):
        raise RewardSpecError(f"Reward {spec!r}: {func_name!r} in {where} is not callable.")
    return func


def resolve_reward(spec: str, base_dir: str | Path | None = None) -> RewardFunc:
    """The reward function a recipe entry names (see the module docstring for the accepted forms)."""
    import vlm_rl.rewards  # noqa: F401  (registers the built-ins)

    spec = spec.strip()
    if spec in REWARD_REGISTRY:
        return REWARD_REGISTRY[spec]
    if ":" in spec:
        target, func_name = spec.rsplit(":", 1)
        if not func_name:
            raise RewardSpecError(f"Reward {spec!r}: no function name after ':'.")
        if target.endswith(".py") or "/" in target or "\\" in target:
            search_dirs = [Path(base_dir)] if base_dir is not None else []
            return _load_from_file(target, func_name, [*search_dirs, Path.cwd()], spec)
        return _load_from_module(target, func_name, spec)
    close = difflib.get_close_matches(spec, REWARD_REGISTRY, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RewardSpecError(
        f"Unknown reward {spec!r}.{hint} Registered rewards: {sorted(REWARD_REGISTRY)}. A custom reward is named "
        "'package.module:function' or 'path/to/file.py:function'."
    )


def load_rewards(specs: list[str], base_dir: str | Path | None = None) -> list[RewardFunc]:
    """Resolve every entry of a recipe's `reward_funcs`, failing on the first that cannot be loaded."""
    if not specs:
        raise RewardSpecError("The recipe lists no rewards: set `reward_funcs`, e.g. `reward_funcs: [accuracy]`.")
    return [resolve_reward(spec, base_dir) for spec in specs]
