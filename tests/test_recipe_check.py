"""The recipe check that runs before TRL is imported: its field table, and `vlm-rl train`'s answers that use it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_rl import recipe_check
from vlm_rl.cli import main
from vlm_rl.config import RECIPE_DATACLASSES, parse_recipe
from vlm_rl.recipe_check import FIELD_TABLE, RecipeError, build_field_table, check_recipe, installed_versions

REPO = Path(__file__).resolve().parent.parent


def test_the_field_table_equals_the_recipe_dataclasses():
    stored = json.loads(FIELD_TABLE.read_text())
    expected = {"versions": installed_versions(), "fields": build_field_table(RECIPE_DATACLASSES)}
    assert stored == expected, (
        f"{FIELD_TABLE.name} is out of date with vlm_rl/config.py or the installed TRL/transformers: regenerate it "
        "with `python -m vlm_rl.config`."
    )


def stale_table(tmp_path: Path, versions: dict) -> Path:
    """A field table that lacks `max_steps`, as if generated before the field existed."""
    fields = build_field_table(RECIPE_DATACLASSES)
    del fields["max_steps"]
    path = tmp_path / "recipe_fields.json"
    path.write_text(json.dumps({"versions": versions, "fields": fields}))
    return path


def test_the_stored_table_is_used_only_under_the_releases_it_was_made_with(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("max_steps: 3\n")
    monkeypatch.setattr(recipe_check, "FIELD_TABLE", stale_table(tmp_path, installed_versions()))
    with pytest.raises(RecipeError, match="unknown key 'max_steps'"):  # the table is what the check reads
        check_recipe(recipe)
    other = {**installed_versions(), "transformers": "0.0.1"}
    monkeypatch.setattr(recipe_check, "FIELD_TABLE", stale_table(tmp_path, other))
    check_recipe(recipe)  # another transformers: the stale table is not used, and no early check runs
    recipe.write_text("max_step: 3\n")
    check_recipe(recipe)
    with pytest.raises(RecipeError, match="unknown key 'max_step'. Did you mean 'max_steps'"):
        parse_recipe(["--config", str(recipe)])  # the recipe parser checks against the dataclasses themselves


def vlm_rl_train(*argv: str) -> subprocess.CompletedProcess:
    """`vlm-rl train ARGV` in a fresh interpreter that prints, last, the heavy packages it imported."""
    script = (
        "import sys\nfrom vlm_rl.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
        "    print('imported:', sorted({'trl', 'transformers'} & set(sys.modules)))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", script, "train", *argv], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("max_step: 3", r"unknown key 'max_step'. Did you mean 'max_steps'?"),
        ("max_steps: 2.5", "max_steps must be an integer, got 2.5 (float)."),
    ],
)
def test_a_recipe_mistake_is_reported_before_trl_is_imported(tmp_path, line, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"{line}\n")
    result = vlm_rl_train("--config", str(recipe), "--output_dir", str(tmp_path / "run"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"vlm-rl train: error: Recipe file {recipe}: {message}"
    assert result.stdout.splitlines()[-1] == "imported: []"


def test_train_help_is_short_and_help_all_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    short = capsys.readouterr().out
    assert exit_info.value.code == 0 and short.startswith("usage: vlm-rl train --config")
    for option in ("--config", "--output_dir", "--max_steps", "--resume_from_checkpoint", "--help-all"):
        assert f"  {option} " in short, option
    assert "docs/recipes.md" in short and len(short.splitlines()) <= 20
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help-all"])
    full = capsys.readouterr().out
    assert exit_info.value.code == 0
    for name in build_field_table(RECIPE_DATACLASSES):
        assert f"--{name} " in full or f"--{name}\n" in full, name
