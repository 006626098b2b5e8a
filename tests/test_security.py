"""What a run trusts: a model's own code only when the recipe says so, reward code only from the files the recipe
names, and secrets (tokens, API keys) never written to logs, checkpoints, tracker files or model cards."""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
import transformers
import transformers.dynamic_module_utils
import yaml
from test_data import write_jsonl
from test_data_training import TINY_RUN
from test_rewards_judge import KEY as JUDGE_KEY
from test_rewards_judge import server  # noqa: F401  (the fixture: a real judge endpoint on 127.0.0.1)

from vlm_rl.cli import main as cli_main
from vlm_rl.config import VLMGRPOConfig, parse_recipe
from vlm_rl.models.loading import RemoteCodeError, load_config, load_model_and_processor
from vlm_rl.redaction import REDACTED, is_secret_name, redacted_argv, redacted_mapping, redacted_secrets
from vlm_rl.rewards import RewardSpecError, load_rewards, resolve_reward
from vlm_rl.train import main as train_main

# ---------------------------------------------------------------- a model's own code


def marker_code(marker: Path, what: str) -> str:
    return f"with open({str(marker)!r}, 'a') as _marker:\n    _marker.write({what!r} + '\\n')\n"


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """Transformers copies a model's code into its modules cache (put on `sys.path`) and imports it from there:
    a cache of this test's own, out of `sys.path` and `sys.modules` again afterwards."""
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in [name for name in sys.modules if name.startswith("transformers_modules") and name not in before]:
        del sys.modules[name]


@pytest.fixture
def remote_code_model(tiny_dirs, tmp_path, modules_cache):
    """`make(model_type)`: the tiny Qwen2-VL model with an `auto_map` naming code in its directory, which appends
    to `marker` when imported and when the model is built."""
    marker = tmp_path / "remote_code_ran.txt"

    def make(model_type: str) -> Path:
        directory = tmp_path / f"remote-{model_type}"
        shutil.copytree(tiny_dirs["qwen2_vl"], directory)
        config = json.loads((directory / "config.json").read_text())
        config["model_type"] = model_type
        config["auto_map"] = {
            "AutoConfig": "configuration_remote.RemoteConfig",
            "AutoModelForImageTextToText": "modeling_remote.RemoteModel",
        }
        (directory / "config.json").write_text(json.dumps(config))
        (directory / "configuration_remote.py").write_text(
            "from transformers import Qwen2VLConfig\n"
            + marker_code(marker, "configuration imported")
            + f"\n\nclass RemoteConfig(Qwen2VLConfig):\n    model_type = {model_type!r}\n"
        )
        (directory / "modeling_remote.py").write_text(
            "from transformers import Qwen2VLForConditionalGeneration\n"
            "from transformers.conversion_mapping import get_checkpoint_conversion_mapping as mapping\n"
            "from transformers.conversion_mapping import register_checkpoint_conversion_mapping as register\n\n"
            "from .configuration_remote import RemoteConfig\n"
            + marker_code(marker, "modeling imported")
            # Custom code gets no checkpoint key renaming unless it registers some: Qwen2-VL's, for its weights.
            + "register('RemoteModel', mapping('Qwen2VLForConditionalGeneration'), overwrite=True)\n"
            + "\n\nclass RemoteModel(Qwen2VLForConditionalGeneration):\n"
            "    config_class = RemoteConfig\n\n"
            "    def __init__(self, config):\n"
            "        super().__init__(config)\n"
            "        " + marker_code(marker, "model built").replace("\n    ", "\n            ")
        )
        return directory

    make.marker = marker
    return make


def test_trust_remote_code_is_off_unless_the_recipe_sets_it(tmp_path):
    assert VLMGRPOConfig.__dataclass_fields__["trust_remote_code"].default is False
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("use_cpu: true\nbf16: false\n")
    assert parse_recipe(["--config", str(recipe)])[3].trust_remote_code is False
    recipe.write_text("use_cpu: true\nbf16: false\ntrust_remote_code: true\n")
    assert parse_recipe(["--config", str(recipe)])[3].trust_remote_code is True
    assert parse_recipe(["--config", str(recipe), "--trust_remote_code", "false"])[3].trust_remote_code is False


def test_the_loader_never_runs_a_models_own_code_unless_trusted(remote_code_model):
    # A model type transformers does not know: without its code there is no model, and the error says what to do.
    unknown = remote_code_model("vlm_rl_remote_test")
    hint = r"if you trust it, set `trust_remote_code: true` in the recipe"
    with pytest.raises(RemoteCodeError, match=hint):
        load_config(str(unknown))
    with pytest.raises(RemoteCodeError, match=hint):
        load_model_and_processor(str(unknown), dtype="float32")
    assert not remote_code_model.marker.exists()

    # A known model type that also ships code: the built-in class is used, the code is not run...
    known = remote_code_model("qwen2_vl")
    model, _ = load_model_and_processor(str(known), dtype="float32")
    assert type(model) is transformers.Qwen2VLForConditionalGeneration
    assert not remote_code_model.marker.exists()
    # ...unless asked: then it is the model's own class, from its own code.
    model, _ = load_model_and_processor(str(known), dtype="float32", trust_remote_code=True)
    assert type(model).__name__ == "RemoteModel" and type(model).__module__.startswith("transformers_modules.")
    ran = remote_code_model.marker.read_text().splitlines()
    assert set(ran) == {"configuration imported", "modeling imported", "model built"}


def test_a_run_refuses_a_models_own_code_unless_the_recipe_trusts_it(remote_code_model, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    run = {**TINY_RUN, "train_size": 4, "final_eval": False, "output_dir": str(tmp_path / "run")}
    recipe.write_text(yaml.safe_dump({**run, "model_name_or_path": str(remote_code_model("vlm_rl_remote_test"))}))
    with pytest.raises(RemoteCodeError, match=r"set `trust_remote_code: true` in the recipe"):
        train_main(["--config", str(recipe)])
    assert not remote_code_model.marker.exists()

    # `trust_remote_code: true` reaches the loader: the run trains the model's own class.
    trusted = remote_code_model("qwen2_vl")
    recipe.write_text(yaml.safe_dump({**run, "model_name_or_path": str(trusted), "trust_remote_code": True}))
    train_main(["--config", str(recipe)])
    assert "model built" in remote_code_model.marker.read_text().splitlines()
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["global_step"] == 1


# ---------------------------------------------------------------- reward files


def scoring_file(path: Path, marker: Path, score: float, body: str = "") -> Path:
    """A reward file that notes its import in `marker` and scores every completion `score`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        marker_code(marker, f"imported {path}")
        + body
        + f"\n\ndef score(prompts, completions, **kwargs):\n    return [{score!r}] * len(completions)\n"
    )
    return path


def test_a_reward_file_runs_alone_and_leaves_the_import_path_as_it_was(tmp_path, monkeypatch):
    marker = tmp_path / "imported.txt"
    directory = tmp_path / "rewards"
    lab = scoring_file(directory / "lab.py", marker, 1.0)
    scoring_file(directory / "helpers.py", marker, 0.0)
    # Beside it, a file named like a standard-library module that nothing here has imported yet.
    scoring_file(directory / "tabnanny.py", marker, 0.0)
    monkeypatch.delitem(sys.modules, "tabnanny", raising=False)
    path_before = list(sys.path)

    assert resolve_reward(f"{lab}:score")([], ["a", "b"]) == [1.0, 1.0]
    assert marker.read_text().splitlines() == [f"imported {lab}"]
    assert sys.path == path_before
    assert Path(importlib.import_module("tabnanny").__file__).parent == Path(sysconfig.get_paths()["stdlib"])
    assert marker.read_text().splitlines() == [f"imported {lab}"]

    # Its siblings are not importable from it either.
    uses_sibling = scoring_file(directory / "uses_helpers.py", marker, 1.0, body="import helpers\n")
    with pytest.raises(RewardSpecError, match=r"importing .*uses_helpers\.py failed: ModuleNotFoundError"):
        resolve_reward(f"{uses_sibling}:score")
    assert f"imported {directory / 'helpers.py'}" not in marker.read_text()


def test_relative_reward_paths_start_from_the_recipe_then_the_working_directory(tmp_path, monkeypatch):
    marker = tmp_path / "imported.txt"
    recipe_dir, work_dir, data_dir = (tmp_path / name for name in ("recipes", "work", "data"))
    scoring_file(recipe_dir / "rewards.py", marker, 1.0)
    scoring_file(work_dir / "rewards.py", marker, 0.5)
    scoring_file(work_dir / "only_here.py", marker, 0.25)
    scoring_file(data_dir / "beside_data.py", marker, 0.0)
    monkeypatch.chdir(work_dir)

    entries = [{"reward": "rewards.py:score", "name": "a"}, {"reward": "only_here.py:score", "name": "b"}]
    first, second = load_rewards(entries, base_dir=recipe_dir)
    assert first([], ["a"]) == [1.0] and second([], ["a"]) == [0.25]
    looked_at = rf"looked at: {recipe_dir / 'beside_data.py'}, {work_dir / 'beside_data.py'}\)"
    with pytest.raises(RewardSpecError, match=looked_at):
        load_rewards(["beside_data.py:score"], base_dir=recipe_dir)
    assert marker.read_text().splitlines() == [
        f"imported {recipe_dir / 'rewards.py'}",
        f"imported {work_dir / 'only_here.py'}",
    ]


def test_a_run_loads_reward_code_only_from_the_recipe_not_from_the_data(tmp_path, monkeypatch):
    marker = tmp_path / "imported.txt"
    recipe_dir, work_dir, data_dir = (tmp_path / name for name in ("recipes", "work", "data"))
    work_dir.mkdir()
    monkeypatch.chdir(work_dir)
    scoring_file(recipe_dir / "rewards.py", marker, 1.0)
    # Beside the data: a file of the same name, and one that every row names as its reward.
    scoring_file(data_dir / "rewards.py", marker, 0.0)
    scoring_file(data_dir / "row_reward.py", marker, 0.0)
    rows = [
        {
            "prompt": f"Say {word}.",
            "answer": word,
            "reward_funcs": "row_reward.py:score",
            "reward": "row_reward.py:score",
        }
        for word in ("red", "blue", "green", "red")
    ]
    write_jsonl(data_dir / "train.jsonl", rows)
    recipe = {
        **TINY_RUN,
        "dataset": "../data/train.jsonl",
        "reward_funcs": ["rewards.py:score"],
        "final_eval": False,
        "output_dir": str(tmp_path / "run"),
    }
    (recipe_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    train_main(["--config", str(recipe_dir / "recipe.yaml")])

    assert marker.read_text().splitlines() == [f"imported {recipe_dir / 'rewards.py'}"]
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    (logged,) = [entry for entry in history if "rewards/score/mean" in entry]
    assert logged["rewards/score/mean"] == 1.0


# ---------------------------------------------------------------- secrets


def test_secret_names_and_their_redaction():
    assert all(map(is_secret_name, ("hub_token", "judge_api_key", "apikey", "wandb_key", "db_password", "secret")))
    assert not any(map(is_secret_name, ("average_tokens_across_devices", "max_tokens", "api_key_env", "keys")))
    recipe = {"hub_token": "hf_x", "reward_funcs": [{"reward": "f.py:g", "kwargs": {"api_key": "sk-x", "n": 1}}]}
    assert redacted_mapping(recipe) == {
        "hub_token": REDACTED,
        "reward_funcs": [{"reward": "f.py:g", "kwargs": {"api_key": REDACTED, "n": 1}}],
    }
    assert redacted_mapping({"hub_token": None}) == {"hub_token": None}
    argv = ["train", "--config", "r.yaml", "--hub_token", "hf_x", "--hub-token=hf_y", "--max_steps", "2"]
    assert redacted_argv(argv) == [
        "train", "--config", "r.yaml", "--hub_token", REDACTED, f"--hub-token={REDACTED}", "--max_steps", "2"
    ]  # fmt: skip


def test_redacted_secrets_hides_token_fields_only_inside_the_block(tmp_path):
    import torch

    args = VLMGRPOConfig(output_dir=str(tmp_path), hub_token="hf_in_the_args", report_to=[], use_cpu=True)
    with redacted_secrets(args):
        torch.save(args, tmp_path / "training_args.bin")
    assert args.hub_token == "hf_in_the_args"
    assert b"hf_in_the_args" not in (tmp_path / "training_args.bin").read_bytes()
    loaded = torch.load(tmp_path / "training_args.bin", weights_only=False)
    assert loaded.hub_token is None and loaded.max_steps == args.max_steps
    with pytest.raises(RuntimeError), redacted_secrets(args):
        raise RuntimeError("saving failed")
    assert args.hub_token == "hf_in_the_args"


SECRETS = {
    "WANDB_API_KEY": "wandb0000secret0000in0000the0000env00",
    "HF_TOKEN": "hf_secret_in_the_environment_HF_TOKEN",
    "OPENAI_API_KEY": JUDGE_KEY,  # the judge's default `api_key_env`; the judge server checks it
}


@pytest.mark.parametrize("given_in", ["recipe", "command line"])
def test_secrets_are_never_written_by_a_run(given_in, tmp_path, monkeypatch, server, capfd, caplog):  # noqa: F811
    """A whole run (checkpoints every step, wandb offline, a judge reward, the final evaluation and model card):
    no secret appears in what it prints or logs, nor, byte for byte, in any file it writes."""
    import wandb  # the `tracking` extra, part of `test`

    out = tmp_path / "out"
    wandb_dirs = {"WANDB_DIR": "wandb", "WANDB_DATA_DIR": "wandb-data", "WANDB_CACHE_DIR": "wandb-cache"}
    for name, value in {
        **SECRETS,
        **{name: str(out / directory) for name, directory in wandb_dirs.items()},
        "WANDB_CONFIG_DIR": str(out / "wandb-config"),
        "WANDB_MODE": "offline",
        "WANDB_PROJECT": "vlm-rl-tests",
        "WANDB_SILENT": "true",
    }.items():
        monkeypatch.setenv(name, value)
    (out / "wandb").mkdir(parents=True)
    hub_token = f"hf_secret_hub_token_on_the_{given_in.replace(' ', '_')}"
    judge = {"reward": "llm_judge", "kwargs": {"base_url": server.base_url, "model": "judge", "retry_backoff": 0.01}}
    server.reply = lambda payload: "Fine.\nSCORE: 7"
    recipe = {
        **TINY_RUN,
        "train_size": 8,
        "eval_size": 4,
        "reward_funcs": ["accuracy", judge],
        "max_steps": 2,
        "save_strategy": "steps",
        "save_steps": 1,
        "report_to": ["wandb"],
        "log_completions": True,
        "output_dir": str(out / "run"),
    }
    argv = ["train", "--config", str(tmp_path / "recipe.yaml")]
    secrets = {**SECRETS, "hub_token": hub_token}
    if given_in == "recipe":
        recipe["hub_token"] = hub_token
        # A recipe's `env` mapping sets environment variables (TRL's parser): a way to hand a run a secret.
        secrets["a recipe's env value"] = "secret_in_the_recipes_env_mapping"
        recipe["env"] = {"VLM_RL_TEST_SECRET": secrets["a recipe's env value"]}
        monkeypatch.delenv("VLM_RL_TEST_SECRET", raising=False)  # unset again after the test
    else:
        argv += ["--hub_token", hub_token]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(sys, "argv", ["vlm-rl", *argv])  # as the `vlm-rl` command sees it: trackers record it
    caplog.set_level(logging.DEBUG)
    try:
        cli_main(argv)
    finally:
        wandb.finish()
        wandb.teardown()  # the next run in this process reads its settings (WANDB_DIR) afresh
    printed = capfd.readouterr()

    # The secrets were in play: the judge was called with its key, the card shows a token was given.
    assert server.auth_headers and set(server.auth_headers) == {f"Bearer {JUDGE_KEY}"}
    assert "hub_token: <redacted>" in (out / "run" / "README.md").read_text()
    if given_in == "recipe":
        assert os.environ["VLM_RL_TEST_SECRET"] == secrets["a recipe's env value"]
    assert sorted(path.name for path in (out / "run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    (run_file,) = (out / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    recorded = run_file.read_bytes()
    assert b'"<HUB_TOKEN>"' in recorded  # wandb's run config: transformers' `to_dict` hides `*_token` fields
    if given_in == "command line":  # the command line wandb records, with the flag's value hidden
        assert b"--hub_token" in recorded and REDACTED.encode() in recorded

    leaks = [
        f"{name} in {where}"
        for name, secret in secrets.items()
        for where, text in (("stdout", printed.out), ("stderr", printed.err), ("the logs", caplog.text))
        if secret in text
    ]
    files = [path for path in out.rglob("*") if path.is_file()]
    assert len(files) > 20
    for path in files:
        data = path.read_bytes()
        leaks += [f"{name} in {path.relative_to(out)}" for name, secret in secrets.items() if secret.encode() in data]
    assert not leaks, leaks
