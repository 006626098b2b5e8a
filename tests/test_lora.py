"""LoRA from recipes: where adapters land per family, the adapter-disabled reference, checkpoints, resume, export."""

import gc
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ALL_FAMILIES, small_config
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn

from vlm_rl.cli import main as cli_main
from vlm_rl.config import ModelArguments, parse_recipe
from vlm_rl.data import make_shapes_dataset
from vlm_rl.export import export_merged
from vlm_rl.models import adapter_for, build_tiny_model, load_model_and_processor, lora_target_modules, wrap_with_lora
from vlm_rl.models.inputs import prompt_inputs
from vlm_rl.train import run
from vlm_rl.trainers import VLMGRPOTrainer

# Families whose projector has no linear layer for LoRA to wrap (Gemma 3's is a bare weight matrix).
NO_LINEAR_PROJECTOR = {"gemma3"}
REPO = Path(__file__).resolve().parent.parent
MAX_PIXELS = 4096  # recorded on the run's processor; the export must carry it


def lora_groups(model) -> set[str]:
    adapter = adapter_for(model.config)
    return {adapter.parameter_group(name) for name, _ in model.named_parameters() if "lora_" in name}


def linears_by_part(model) -> dict[str, set[str]]:
    """Names of an unwrapped model's linear layers per part, its LM head left out."""
    adapter = adapter_for(model.config)
    parts: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not model.get_output_embeddings():
            parts.setdefault(adapter.parameter_group(name), set()).add(name)
    return parts


def wrapped_by_part(model) -> dict[str, set[str]]:
    """Names of a PEFT model's LoRA-wrapped layers per part."""
    adapter = adapter_for(model.config)
    parts: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            name = name.removeprefix("base_model.model.")
            parts.setdefault(adapter.parameter_group(name), set()).add(name)
    return parts


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_lora_lands_only_in_the_parts_asked_for(family, load_tiny):
    model = load_tiny(family)[0]
    linears = linears_by_part(model)
    model = wrap_with_lora(model, ModelArguments(use_peft=True, lora_r=2))
    assert wrapped_by_part(model) == {"language": linears["language"]}, "every language linear layer but the head"
    assert lora_groups(model) == {"language"}
    assert not isinstance(model.get_output_embeddings(), LoraLayer)
    assert all(p.requires_grad == ("lora_" in name) for name, p in model.named_parameters())

    everywhere = ModelArguments(use_peft=True, lora_r=2, lora_vision_tower=True, lora_projector=True)
    if family in NO_LINEAR_PROJECTOR:
        assert "projector" not in linears
        with pytest.raises(ValueError, match=r"no linear layer in \['projector'\] \(lora_projector\)"):
            wrap_with_lora(load_tiny(family)[0], everywhere)
        return
    model = wrap_with_lora(load_tiny(family)[0], everywhere)
    assert wrapped_by_part(model) == linears and set(linears) == {"language", "vision", "projector"}
    assert lora_groups(model) == {"language", "vision", "projector"}


def test_freezing_the_language_model_moves_lora_to_the_parts_asked_for(load_tiny):
    args = ModelArguments(use_peft=True, lora_r=2, freeze_language_model=True, lora_vision_tower=True)
    assert lora_groups(wrap_with_lora(load_tiny("qwen2_vl")[0], args)) == {"vision"}
    with pytest.raises(ValueError, match="puts LoRA nowhere"):
        wrap_with_lora(load_tiny("qwen2_vl")[0], ModelArguments(use_peft=True, freeze_language_model=True))


def test_target_modules_by_name_and_names_that_match_nothing(load_tiny):
    model, _ = load_tiny("qwen2_vl")
    targets = lora_target_modules(model, ["language"], ["q_proj", "self_attn.v_proj"])
    assert targets and {name.rsplit(".", 1)[-1] for name in targets} == {"q_proj", "v_proj"}
    assert all(name.startswith("model.language_model.") for name in targets)
    with pytest.raises(ValueError, match=r"lora_target_modules \['qproj'\] match no linear layer.*'q_proj'"):
        lora_target_modules(model, ["language"], ["q_proj", "qproj"])
    # The language model's MLP names do not exist in Qwen2-VL's vision tower: the vision tower would get nothing.
    with pytest.raises(ValueError, match=r"matching lora_target_modules \['gate_proj'\] in \['vision'\]"):
        lora_target_modules(model, ["language", "vision"], ["gate_proj"])


def test_lora_doc_example_runs(tmp_path):
    (block,) = re.findall(r"```python\n(.*?)```", (REPO / "docs/lora.md").read_text(), flags=re.DOTALL)
    exec(block.replace("/tmp/vlm-rl-docs", str(tmp_path)), {})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"use_peft": True, "lora_vision_tower": True, "freeze_vision_tower": True}, "lora_vision_tower: true and"),
        ({"use_peft": True, "lora_projector": True, "freeze_projector": True}, "lora_projector: true and"),
        ({"lora_vision_tower": True}, "lora_vision_tower set without use_peft"),
        ({"lora_target_modules": ["q_proj"]}, "lora_target_modules set without use_peft"),
        ({"use_peft": True, "lora_r": 0}, "lora_r must be >= 1"),
    ],
)
def test_contradictory_lora_fields_fail_when_the_recipe_is_parsed(fields, message, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(fields))
    with pytest.raises(ValueError, match=message):
        parse_recipe(["--config", str(recipe)])


def test_target_modules_parse_from_yaml_scalars_lists_and_flags(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("use_peft: true\nlora_target_modules: q_proj\n")
    cpu = ["--use_cpu", "true", "--bf16", "false"]
    assert parse_recipe(["--config", str(recipe), *cpu])[0].lora_target_modules == ["q_proj"]
    args = parse_recipe(["--config", str(recipe), *cpu, "--lora_target_modules", "q_proj", "v_proj"])[0]
    assert args.lora_target_modules == ["q_proj", "v_proj"]


# ----- one LoRA run with beta > 0, shared by the tests below ------------------------------------------------------

RUN = {
    "dtype": "float32",
    "dataset": "synthetic:shapes",
    "train_size": 16,
    "eval_size": 4,
    "max_pixels": MAX_PIXELS,
    "reward_funcs": ["rewards.py:length"],  # varies between completions, so every step has an advantage
    "num_generations": 2,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "max_completion_length": 4,
    "max_steps": 2,
    "learning_rate": 0.05,
    "lr_scheduler_type": "constant",  # a linear decay restored from a 2-step run would be 0 at step 3
    "beta": 0.1,
    "use_cpu": True,
    "bf16": False,
    "gradient_checkpointing": True,  # LoRA inside checkpointed vision blocks must still get gradients
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 1,
    "report_to": "none",
    "disable_tqdm": True,
    "plot": False,
    "final_eval": False,
    "eval_accuracy_reward": "length",
    "use_peft": True,
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_vision_tower": True,
    "lora_projector": True,
}


def run_recipe(directory: Path, name: str, **overrides):
    (directory / "rewards.py").write_text(
        "def length(completions, **kwargs):\n    return [float(len(c[0]['content'])) for c in completions]\n"
    )
    recipe = directory / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({**RUN, "output_dir": str(directory / name), **overrides}))
    return run(*parse_recipe(["--config", str(recipe)])[:4], recipe_dir=directory)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 2-step LoRA run (checkpoints 1 and 2) of a tiny Qwen2-VL, from a recipe, with a final evaluation."""
    directory = tmp_path_factory.mktemp("lora")
    base = build_tiny_model("qwen2_vl", directory / "base")
    trainer = run_recipe(directory, "run", model_name_or_path=str(base), final_eval=True)
    return trainer, directory, base


def log_probs(model, batch: dict, temperature: float) -> torch.Tensor:
    """Per-token log-probs of the completions in a generation batch, from one plain forward of `model`."""
    completion = batch["completion_ids"]
    with torch.no_grad():
        logits = model(
            input_ids=torch.cat([batch["prompt_ids"], completion], dim=1),
            attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
            mm_token_type_ids=batch["mm_token_type_ids"],  # prompt and completion
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
        ).logits
    logits = logits[:, -completion.size(1) - 1 : -1] / temperature
    return logits.log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)


def test_reference_is_the_adapter_disabled_base_not_a_copy(lora_run):
    trainer, _, base_path = lora_run
    policy = trainer.model
    assert trainer.ref_model is None
    assert list(policy.peft_config) == ["default"], "no second (reference) adapter"
    base_parameters = sum(p.numel() for p in policy.get_base_model().parameters() if not p.requires_grad)
    lora_parameters = sum(p.numel() for name, p in policy.named_parameters() if ".default." in name)
    assert sum(p.numel() for p in policy.parameters()) == base_parameters + lora_parameters
    gc.collect()
    model_class = type(policy.get_base_model())
    copies = [o for o in gc.get_objects() if isinstance(o, model_class) and o.name_or_path == str(base_path)]
    assert len(copies) == 1, "one full model in memory: the policy's base"

    # Training changed the adapter; the reference log-probs of a fresh generation batch still equal the untouched
    # base model's.
    trainer.model.train()
    batch = trainer._generate_and_score_completions(list(make_shapes_dataset(4, seed=1)))
    mask = batch["completion_mask"].bool()
    base, _ = load_model_and_processor(str(base_path), dtype="float32")
    expected = log_probs(base.eval(), batch, trainer.temperature)
    torch.testing.assert_close(batch["ref_per_token_logps"][mask], expected[mask], atol=1e-5, rtol=0)
    trained = log_probs(policy.eval(), batch, trainer.temperature)
    assert (trained - expected)[mask].abs().max() > 1e-3, "the adapter trained, so the policy left the base"


def test_checkpoints_hold_the_adapter_and_resume_from_it(lora_run, tmp_path):
    trainer, directory, base_path = lora_run
    run_dir = directory / "run"
    for path in (run_dir / "checkpoint-1", run_dir / "checkpoint-2", run_dir):
        assert (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
        assert not (path / "model.safetensors").exists() and not (path / "ref").exists()
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(base_path.resolve())
    step_2 = load_file(run_dir / "checkpoint-2/adapter_model.safetensors")
    adapter = adapter_for(trainer.model.config)
    trained = {adapter.parameter_group(name) for name, value in step_2.items() if "lora_B" in name and value.any()}
    assert trained == {"language", "vision", "projector"}, "LoRA trained in every part that has it"
    final = load_file(run_dir / "adapter_model.safetensors")
    assert all(torch.equal(final[k], step_2[k]) for k in step_2)
    assert json.loads((run_dir / "eval_results.json").read_text())["num_rows"] == 4  # evaluation ran on the adapter

    # From checkpoint-1 to step 2: the same adapter as the uninterrupted run (so it started from the saved one).
    resumed = run_recipe(tmp_path, "resumed", model_name_or_path=str(base_path),
                         resume_from_checkpoint=str(run_dir / "checkpoint-1"))  # fmt: skip
    assert resumed.state.global_step == 2
    again = load_file(tmp_path / "resumed/adapter_model.safetensors")
    assert all(torch.equal(again[k], step_2[k]) for k in step_2)

    # `auto` picks checkpoint-2 and continues the step count to 3.
    shutil.copytree(run_dir / "checkpoint-2", tmp_path / "auto/checkpoint-2")
    continued = run_recipe(tmp_path, "auto", model_name_or_path=str(base_path), resume_from_checkpoint="auto",
                           max_steps=3)  # fmt: skip
    assert [entry["step"] for entry in continued.state.log_history if "loss" in entry] == [1, 2, 3]
    step_3 = load_file(tmp_path / "auto/adapter_model.safetensors")
    assert any(not torch.equal(step_3[k], step_2[k]) for k in step_2)


def test_export_merges_the_adapter_into_a_loadable_model(lora_run, tmp_path):
    trainer, directory, base_path = lora_run
    cli_main(["export", "--checkpoint", str(directory / "run/checkpoint-2"), "--output_dir", str(tmp_path / "merged")])
    assert not (tmp_path / "merged/adapter_config.json").exists()
    merged, processor = load_model_and_processor(str(tmp_path / "merged"), dtype="float32")
    assert not isinstance(merged, PeftModel)
    assert processor.image_processor.size["longest_edge"] == MAX_PIXELS, "the run's processor, not the base's"

    row = make_shapes_dataset(1, seed=2)[0]
    inputs = prompt_inputs(adapter_for(merged.config), processor, [row["prompt"]], [row["images"]])
    base, _ = load_model_and_processor(str(base_path), dtype="float32")
    with torch.no_grad():
        expected = trainer.model.eval()(**inputs).logits  # the PEFT model, adapter unmerged
        logits = merged(**inputs).logits
        base_logits = base(**inputs).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert (logits - base_logits).abs().max() > 1e-3, "the merge changed the weights"
    generated = merged.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_export_errors_name_the_path_and_the_fix(lora_run, tmp_path):
    _, directory, base_path = lora_run
    with pytest.raises(ValueError, match=r"holds no LoRA adapter .*full model already"):
        export_merged(base_path, tmp_path / "out")
    moved = tmp_path / "checkpoint"
    shutil.copytree(directory / "run/checkpoint-2", moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/nowhere/base"}))
    with pytest.raises(FileNotFoundError, match=r"/nowhere/base \(from base_model_name_or_path in .*--base_model"):
        export_merged(moved, tmp_path / "out")
    with pytest.raises(ValueError, match="must differ from --checkpoint"):
        export_merged(moved, moved, base_model=str(base_path))
    assert (export_merged(moved, tmp_path / "out", base_model=str(base_path)) / "model.safetensors").is_file()


# ----- an adapter that is already trained (after SFT, or loaded by the user) --------------------------------------


def completion_length(completions, **kwargs):
    return [float(len(completion[0]["content"])) for completion in completions]


def lora_trainer(base_path: Path, output_dir: Path, trained: bool, **overrides) -> VLMGRPOTrainer:
    """A GRPO trainer with beta > 0 on a LoRA-wrapped tiny Qwen2-VL: a fresh adapter, or one with non-zero weights."""
    model, processor = load_model_and_processor(str(base_path), dtype="float32")
    model = wrap_with_lora(model, ModelArguments(use_peft=True, lora_r=4, lora_alpha=8))
    if trained:
        generator = torch.Generator().manual_seed(0)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data = 0.05 * torch.randn(parameter.shape, generator=generator)
    settings = {"beta": 0.1, "learning_rate": 0.05, "lr_scheduler_type": "constant", **overrides}
    return VLMGRPOTrainer(
        model=model, reward_funcs=[completion_length], args=small_config(output_dir, **settings),
        train_dataset=make_shapes_dataset(8), processing_class=processor,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_model("qwen2_vl", tmp_path_factory.mktemp("base") / "qwen2_vl")


@pytest.mark.parametrize("trained", [False, True], ids=["fresh", "trained"])
def test_the_reference_is_the_policy_the_run_starts_from(trained, tiny_base, tmp_path):
    """TRL's reference for a wrapped model is its starting adapter; only a fresh (no-op) one gives way to the base."""
    trainer = lora_trainer(tiny_base, tmp_path, trained)
    policy = trainer.model
    assert ("ref" in policy.peft_config) == trained
    policy.train()
    batch = trainer._generate_and_score_completions(list(make_shapes_dataset(4, seed=1)))
    mask = batch["completion_mask"].bool()
    start = log_probs(policy.eval(), batch, trainer.temperature)
    with policy.disable_adapter():
        base = log_probs(policy, batch, trainer.temperature)
    # Step 0: the KL reference is the policy itself (stock TRL's gap is 0; with the base as reference it was ~0.04).
    assert (batch["ref_per_token_logps"] - start)[mask].abs().max() <= 1e-5
    assert ((start - base)[mask].abs().max() > 1e-3) == trained, "a trained adapter moved the policy off the base"


def test_a_kept_reference_adapter_is_saved_and_resumed(tiny_base, tmp_path):
    """Checkpoints of a run from a trained adapter hold the trained adapter and the frozen `ref` copy, and resume."""
    trainer = lora_trainer(tiny_base, tmp_path / "run", True, max_steps=2, save_strategy="steps", save_steps=1)
    starting = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if ".ref." in name}
    trainer.train()
    run_dir = tmp_path / "run"
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        assert (run_dir / checkpoint / "adapter_model.safetensors").is_file()
        assert (run_dir / checkpoint / "ref/adapter_model.safetensors").is_file()
    step_2 = load_file(run_dir / "checkpoint-2/adapter_model.safetensors")

    resumed = lora_trainer(tiny_base, tmp_path / "resumed", True, max_steps=2)
    resumed.train(resume_from_checkpoint=str(run_dir / "checkpoint-1"))
    assert resumed.state.global_step == 2
    resumed.save_model(str(tmp_path / "resumed"))
    again = load_file(tmp_path / "resumed/adapter_model.safetensors")
    assert step_2.keys() == again.keys() and all(torch.equal(again[k], step_2[k]) for k in step_2)
    ref = {name: p for name, p in resumed.model.named_parameters() if ".ref." in name}
    assert ref.keys() == starting.keys() and all(torch.equal(ref[k], starting[k]) for k in ref), "ref unchanged"
