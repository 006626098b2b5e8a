"""The `vlm-rl` command's own surface: its commands, their help, and `vlm-rl recipes`."""

from pathlib import Path

import pytest

from vlm_rl.cli import TINY_FAMILIES, build_parser, main
from vlm_rl.models import tiny_families

REPO = Path(__file__).resolve().parent.parent
COMMANDS = {"train", "eval", "plot", "tiny-model", "export", "recipes", "vllm-serve"}


def test_help_lists_every_command_with_a_line_each(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert f"    {command}" in text, command
    assert set(build_parser()._subparsers._group_actions[0].choices) == COMMANDS


@pytest.mark.parametrize("command", sorted(COMMANDS - {"train", "vllm-serve"}))
def test_each_command_has_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and f"usage: vlm-rl {command}" in capsys.readouterr().out


def test_recipes_lists_every_shipped_recipe_with_its_first_line(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    main(["recipes"])
    out = capsys.readouterr().out.splitlines()
    recipes = sorted(REPO.glob("recipes/*.yaml"))
    assert len(out) == 1 + len(recipes)
    for line, path in zip(out[1:], recipes, strict=True):
        summary = path.read_text().splitlines()[0].removeprefix("#").strip()
        assert line.split()[0] == path.name and line.rstrip().endswith(summary)


def test_recipes_reports_a_directory_without_recipes(tmp_path):
    with pytest.raises(SystemExit, match="holds no \\*.yaml recipe"):
        main(["recipes", "--dir", str(tmp_path)])


def test_tiny_model_help_lists_every_tiny_family(capsys):
    assert tuple(sorted(tiny_families())) == TINY_FAMILIES, "cli.TINY_FAMILIES must list the registered families"
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny-model", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    for family in TINY_FAMILIES:
        assert f"{family}," in text or f"{family} (docs/models.md)" in text, family


def test_tiny_model_refuses_an_unknown_family_before_building_anything(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny-model", "--family", "qwen9_vl", "--output_dir", str(tmp_path / "tiny")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'qwen9_vl'" in capsys.readouterr().err and not (tmp_path / "tiny").exists()
