"""Keeping secrets out of what a run writes: checkpoints, saved configs, model cards and tracker metadata.

A secret is a field, key or flag whose name says so: `hub_token` and any other `*_token`, `*_key` (`*_api_key`),
`*password*` or `*secret*` (transformers' own `TrainingArguments.to_dict` hides the `*_token` fields). Secrets
that come from the environment (`HF_TOKEN`, `WANDB_API_KEY`, a judge's API key variable) are read where they are
used and never copied into the arguments, so only the named fields and flags need hiding.

(Not `vlm_rl/secrets.py`: a script run from inside the package directory would shadow the standard library's
`secrets`, which wandb imports.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

SECRET_NAME = re.compile(r"(^|_)(token|key|apikey)$|password|secret", re.IGNORECASE)
REDACTED = "<redacted>"


def is_secret_name(name: str) -> bool:
    """Whether a field, key or flag called `name` holds a secret (`hub_token`, `judge_api_key`, ...)."""
    return bool(SECRET_NAME.search(name))


@contextlib.contextmanager
def redacted_secrets(args: Any) -> Iterator[None]:
    """Within the block, `args` (a dataclass, e.g. the training arguments) has its secret fields set to None;
    their values are restored after it, even on an error.

    For writers that save the whole object: HF's Trainer pickles its arguments into `training_args.bin` in every
    checkpoint and in the output directory. None rather than a placeholder string, so that arguments loaded back
    from such a file fall back to `HF_TOKEN` or the saved login instead of sending a fake token.
    """
    saved = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(args)
        if is_secret_name(field.name) and getattr(args, field.name, None) not in (None, "")
    }
    try:
        for name in saved:
            setattr(args, name, None)
        yield
    finally:
        for name, value in saved.items():
            setattr(args, name, value)


def redacted_mapping(value: Any) -> Any:
    """`value` with every secret-named key's value (at any depth of mappings and lists, e.g. a reward entry's
    `kwargs`) written as `<redacted>`; unset values (None, "") are kept, so a card shows a secret was not given."""
    if isinstance(value, dict):
        return {
            key: REDACTED
            if isinstance(key, str) and is_secret_name(key) and item not in (None, "")
            else redacted_mapping(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redacted_mapping(item) for item in value)
    return value


def redacted_argv(argv: list[str]) -> list[str]:
    """`argv` with the value of every secret flag (`--hub_token X`, `--hub_token=X`) written as `<redacted>`.

    Trackers record the command line: wandb stores `sys.argv` in its run metadata, uploaded with the run. Assign
    the result to `sys.argv[:]` once the arguments are parsed.
    """
    result = list(argv)
    for index, arg in enumerate(result):
        if not arg.startswith("--"):
            continue
        name, equals, _ = arg[2:].partition("=")
        if not is_secret_name(name.replace("-", "_")):
            continue
        if equals:
            result[index] = f"--{name}={REDACTED}"
        elif index + 1 < len(result) and not result[index + 1].startswith("--"):
            result[index + 1] = REDACTED
    return result
