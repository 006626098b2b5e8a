"""Recipe keys and value types, checked without importing TRL, transformers or torch.

The recipe dataclasses (`vlm_rl.config`) subclass TRL's `GRPOConfig`, so importing them takes many seconds. A
recipe mistake should answer at once: `check_recipe` reads each field's type from `recipe_fields.json`, a table
generated from those dataclasses (`python -m vlm_rl.config` writes it; `tests/test_recipe_check.py` checks that
it equals them). Under TRL or transformers releases other than the ones it was generated with, this early check
is skipped and the recipe parser checks the same things against the dataclasses themselves (slower, never wrong).
"""

from __future__ import annotations

import difflib
import enum
import json
import types
import typing
from dataclasses import fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from vlm_rl.errors import InvalidValueError

FIELD_TABLE = Path(__file__).with_name("recipe_fields.json")
SFT_FIELD_TABLE = Path(__file__).with_name("sft_recipe_fields.json")  # `vlm-rl sft`'s fields
# The packages whose dataclasses hold most recipe fields (`GRPOConfig` and its `TrainingArguments`).
TABLE_PACKAGES = ("trl", "transformers")
# Checked by their own loaders, which say more than a type would: reward entries are names or mappings.
_CHECKED_ELSEWHERE = frozenset({"reward_funcs", "env"})
_YAML_BOOLEAN_WORDS = ("no", "yes", "on", "off", "true", "false")
_PLAIN = {bool: "bool", int: "int", float: "float", str: "str", type(None): "null", dict: "dict", Any: "any"}

# A field's type as JSON: "bool", "int", "float", "str", "null", "dict", "any", or a one-key mapping
# {"union": [types]}, {"list": type}, {"literal": [values]}, {"enum": [values]}, {"other": "ClassName"}.
Spec = str | dict[str, Any]


class RecipeError(InvalidValueError):
    """A recipe file (or a recipe field given as a flag) cannot be used as written."""


def type_spec(hint: Any) -> Spec:
    """A dataclass field's type hint as a JSON-able spec (see `Spec`)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return {"union": [type_spec(arg) for arg in args]}
    if origin is typing.Literal:
        return {"literal": list(args)}
    if origin is list:
        return {"list": type_spec(args[0]) if args else "any"}
    if origin is dict:
        return "dict"
    if hint in _PLAIN:
        return _PLAIN[hint]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [member.value for member in hint]}
    return {"other": getattr(hint, "__name__", str(hint))}


def build_field_table(dataclasses: typing.Iterable[type]) -> dict[str, Spec]:
    """{field name: type spec} for every field of `dataclasses`."""
    table = {}
    for cls in dataclasses:
        hints = typing.get_type_hints(cls)
        table.update({f.name: type_spec(hints[f.name]) for f in fields(cls)})
    return table


def installed_versions() -> dict[str, str | None]:
    """The installed release lines (major.minor) of `TABLE_PACKAGES`, read from package metadata (no import): a
    patch release keeps its dataclasses' fields, so the table stays in use across them."""
    found = {}
    for package in TABLE_PACKAGES:
        try:
            found[package] = ".".join(version(package).split(".")[:2])
        except PackageNotFoundError:
            found[package] = None
    return found


def field_table(path: Path | None = None) -> dict[str, Spec] | None:
    """The recipe fields and their types from `path` (default `recipe_fields.json`), or None when it was generated
    under other TRL or transformers releases than the installed ones."""
    stored = json.loads((path or FIELD_TABLE).read_text())
    return stored["fields"] if stored["versions"] == installed_versions() else None


def write_field_table(table: dict[str, Spec], path: Path | None = None) -> Path:
    """Write `table` (from `build_field_table`) to `path` (default `FIELD_TABLE`), stamped with the installed
    releases."""
    path = path or FIELD_TABLE
    # One field a line, so that a change of fields shows as a readable diff.
    rows = ",\n".join(f"  {json.dumps(name)}: {json.dumps(spec)}" for name, spec in table.items())
    path.write_text(f'{{\n "versions": {json.dumps(installed_versions())},\n "fields": {{\n{rows}\n }}\n}}\n')
    return path


def _accepts(value: Any, spec: Spec) -> bool:
    """Whether a YAML value can become a field of type `spec` (as the recipe parser converts it)."""
    if isinstance(spec, dict):
        [(kind, arg)] = spec.items()
        if kind == "union":
            return any(_accepts(value, option) for option in arg)
        if kind == "literal":
            return value in arg
        if kind == "list":
            items = value if isinstance(value, list) else [value]  # a single value stands for a list of one
            return all(_accepts(item, arg) for item in items)
        if kind == "enum":
            return isinstance(value, str | int | float) and not isinstance(value, bool)
        return True  # any other type: left to the parser and the field's own checks
    if spec == "null":
        return value is None
    if spec == "bool":
        return isinstance(value, bool)
    if spec == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if spec == "float":
        if isinstance(value, str):  # YAML reads `3e-4` (no dot) as a string; the parser takes it
            try:
                float(value)
            except ValueError:
                return False
            return True
        return isinstance(value, int | float) and not isinstance(value, bool)
    if spec == "str":
        return isinstance(value, str | int | float) and not isinstance(value, bool)
    if spec == "dict":
        return isinstance(value, dict)
    return True


def _describe(spec: Spec) -> str:
    """`spec` in words: `a float or null`."""
    if isinstance(spec, dict):
        [(kind, arg)] = spec.items()
        if kind == "union":
            return " or ".join(dict.fromkeys(_describe(option) for option in arg))
        if kind == "literal":
            return " or ".join(repr(value) for value in arg)
        if kind == "list":
            return "a list" if arg == "any" else f"a list of {_describe(arg).removeprefix('a ').removeprefix('an ')}s"
        if kind == "enum":
            return "one of " + ", ".join(repr(value) for value in arg)
        return arg
    names = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string", "null": "null"}
    return names.get(spec, "a mapping" if spec == "dict" else "anything")


def check_recipe(path: str | Path, table: dict[str, Spec] | None = None, stored: Path | None = None) -> None:
    """Fail on a key that no dataclass knows (naming the file, the key and the closest valid key), and on a value
    of the wrong type (naming the file, the key and the type it takes), before anything else runs. `table`: the
    fields (`build_field_table`); by default the one stored in `stored` (`FIELD_TABLE`), and no check where that is
    stale."""
    try:
        recipe = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as error:
        raise RecipeError(f"Recipe file {path} not found.") from error
    except yaml.YAMLError as error:
        raise RecipeError(f"Recipe file {path} is not valid YAML: {error}") from error
    if not isinstance(recipe, dict):
        raise RecipeError(f"Recipe file {path} must be a YAML mapping of field names to values.")
    table = table if table is not None else field_table(stored)
    if table is None:
        return
    valid = set(table) | {"env"}
    for key, value in recipe.items():
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"Recipe file {path}: unknown key {key!r}.{hint}")
        if key in _CHECKED_ELSEWHERE or _accepts(value, table[key]):
            continue
        note = ""
        if isinstance(value, bool) and _accepts("no", table[key]):
            note = f" YAML reads a bare {'/'.join(_YAML_BOOLEAN_WORDS)} as true/false: quote it, e.g. {key}: 'no'."
        raise RecipeError(
            f"Recipe file {path}: {key} must be {_describe(table[key])}, got {value!r} ({type(value).__name__}).{note}"
        )


def recipe_path(argv: list[str]) -> Path | None:
    """The recipe file a command line names with `--config`, if any."""
    return Path(argv[argv.index("--config") + 1]) if "--config" in argv[:-1] else None
