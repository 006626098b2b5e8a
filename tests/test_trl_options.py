"""TRL 1.16's GRPO options through `VLMGRPOTrainer`, with `share_prompt_prefix` and `encode_images_once` on.

Each option trains on a batch that mixes image and text-only rows. With both switches on, the run must log the numbers
and leave the weights of the same run with both off (the plain forward, as stock TRL scores), and must actually take
the shared forward; the switches change where the work is done, never the result. Stock `trl.GRPOTrainer` runs each
option on image-only rows (it fails on mixed batches), which shows the option is one stock TRL supports there.
"""

import math
import re
from dataclasses import dataclass, field

import pytest
import torch
from accelerate.utils import is_peft_model
from conftest import small_config
from peft import LoraConfig
from test_sharing import completion_length_reward
from transformers import Qwen2Config, Qwen2ForSequenceClassification
from transformers.utils import is_torchvision_available
from trl import GRPOConfig, GRPOTrainer
from trl.chat_template_utils import qwen3_vl_chat_template

from vlm_rl.data import make_shapes_dataset
from vlm_rl.trainers import VLMGRPOTrainer

FAMILY = "qwen2_vl"
TOOL_CALL = '<tool_call>\n{"name": "lookup", "arguments": {}}\n</tool_call>'


def documented_values(option: str) -> list[str]:
    """The values TRL's `GRPOConfig` docstring lists for `option`, one per bullet (`- `"dapo"` (default): ...`)."""
    block = re.search(rf"\n        {option} \(.*?\n(.*?)\n        \w+ \(", GRPOConfig.__doc__, re.DOTALL).group(1)
    return sorted(re.findall(r'^\s*- (?:`\w+` or )?`"(\w+)"`', block, re.MULTILINE))


LOSS_TYPES = ["bnpo", "cispo", "dapo", "dr_grpo", "grpo", "luspo", "sapo", "vespo"]
SCALE_REWARDS = ["batch", "group", "none"]
AGGREGATIONS = ["normalize_then_sum", "sum_then_normalize"]


def first_character_reward(completions, **kwargs) -> list[float]:
    """A second objective, on another scale than `completion_length_reward`, for the multi-reward options."""
    return [float(ord(str(completion)[-3]) % 3) for completion in completions]


def lookup() -> str:
    """Look up the answer.

    Returns:
        The answer.
    """
    return "red"


class LookupEnvironment:
    """An `environment_factory` environment: its `lookup` method is the tool, and it owns a reward (calls made)."""

    def reset(self, **row) -> str | None:
        self.calls = 0
        return "Use the tool." if row.get("images") else None

    def lookup(self) -> str:
        """Look up the answer.

        Returns:
            The answer.
        """
        self.calls += 1
        return "blue"

    def get_reward(self) -> float:
        return float(self.calls)


def tool_call_bias(tokenizer) -> list:
    """`sequence_bias` that makes every first turn call `lookup` and end, and the turn after the result free text.

    A random tiny policy never writes a tool call by itself. Each token of the call gets a bias that grows with the
    prefix already written, so the call is written whole; it starts only right after the generation prompt, and not
    after a tool result. A mild EOS bias makes the free turns end at different lengths.
    """
    call = [*tokenizer.encode(TOOL_CALL, add_special_tokens=False), tokenizer.eos_token_id]
    turn = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    after_result = tokenizer.encode("</tool_response><|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    forced = [[turn + call[:1], 50.0]] + [[call[: k + 1], 50.0 * (k + 1)] for k in range(1, len(call))]
    return [*forced, [after_result + call[:1], -100.0], [[tokenizer.eos_token_id], 3.0]]


@dataclass(frozen=True)
class Option:
    """One option to test: config overrides, and what else it needs (`rewards`, or `kind` of trainer argument)."""

    config: dict = field(default_factory=dict)
    kind: str = "config"  # or "reward_model", "peft", "tools", "environment"
    rewards: tuple = (completion_length_reward,)
    stock_rows: str = "image"  # the rows stock TRL runs the option on
    differs: str = ""  # why the logged numbers of the two runs differ by design (they must still train)


OPTIONS = {
    # Two iterations per generation batch: in the second, the importance ratios (and the clipping) are not all 1.
    **{
        f"loss_type={loss}": Option(
            {"loss_type": loss, "num_iterations": 2, "max_steps": 2}
            | ({"importance_sampling_level": "sequence"} if loss == "luspo" else {})
        )
        for loss in LOSS_TYPES
    },
    "importance_sampling_level=sequence": Option(
        {"importance_sampling_level": "sequence", "num_iterations": 2, "max_steps": 2}
    ),
    **{f"scale_rewards={scale}": Option({"scale_rewards": scale}) for scale in SCALE_REWARDS},
    **{
        f"multi_objective_aggregation={aggregation}": Option(
            {"multi_objective_aggregation": aggregation, "reward_weights": [1.0, 0.5]},
            rewards=(completion_length_reward, first_character_reward),
        )
        for aggregation in AGGREGATIONS
    },
    "top_entropy_quantile": Option({"top_entropy_quantile": 0.5}),
    "entropy_coef, adaptive": Option(
        {"entropy_coef": 0.01, "use_adaptive_entropy": True, "entropy_target": 6.0, "max_steps": 2}
    ),
    "mask_truncated_completions": Option({"mask_truncated_completions": True}),
    "num_iterations=2": Option({"num_iterations": 2, "max_steps": 2}),
    "num_iterations=2, delta, epsilon_high, off_policy_mask": Option(
        {"num_iterations": 2, "max_steps": 2, "delta": 1.5, "epsilon_high": 0.28, "off_policy_mask_threshold": 0.01}
    ),
    "gradient_accumulation_steps=2": Option({"gradient_accumulation_steps": 2}),
    "steps_per_generation=2": Option(
        {"steps_per_generation": 2, "max_steps": 2},
        differs="with prompts shared, a prompt's rows stay in one micro-batch (`_micro_batches`), so each optimizer "
        "step sees other rows than in the plain run",
    ),
    "sampling": Option({"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.01, "repetition_penalty": 1.3}),
    "beta, sync_ref_model": Option(
        {"beta": 0.1, "sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.5, "max_steps": 2}
    ),
    "sequence-classification reward model": Option(kind="reward_model"),
    "peft_config": Option(kind="peft"),
    "peft_config, beta": Option({"beta": 0.1}, kind="peft"),
    # Stock TRL 1.16 fails on a tool call in any batch with an image (see `VLMGRPOTrainer._tokenize_prompts`).
    "tools": Option(kind="tools", stock_rows="text"),
    "environment_factory": Option(kind="environment", stock_rows="text"),
}


@pytest.fixture(scope="module")
def reward_model_dir(tiny_dirs, tmp_path_factory):
    """A tiny random sequence-classification reward model (one label), saved with the policy's tokenizer."""
    from vlm_rl.models import load_model_and_processor

    _, processor = load_model_and_processor(str(tiny_dirs[FAMILY]), dtype="float32")
    tokenizer = processor.tokenizer
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    directory = tmp_path_factory.mktemp("reward_model")
    Qwen2ForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_trainer(trainer_class, option: Option, load_tiny, output_dir, rows: str, reward_model_dir=None, **switches):
    """A trainer for `option` on 4 rows (2 prompts × 2 completions per step) of `rows`: mixed, image or text."""
    model, processor = load_tiny(FAMILY)
    rewards, kwargs = list(option.rewards), {}
    config = {"max_steps": 1, "learning_rate": 1e-4, "max_completion_length": 6}
    # A mild EOS bias: completions end at different lengths, some truncated (the random policy rarely ends).
    config["generation_kwargs"] = {"sequence_bias": [[[processor.tokenizer.eos_token_id], 3.0]]}
    if option.kind == "reward_model":
        rewards = [str(reward_model_dir)]
    elif option.kind == "peft":
        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    elif option.kind in ("tools", "environment"):
        # The tiny model's template cannot render tool calls; TRL parses them for the Qwen3-VL template.
        processor.chat_template = processor.tokenizer.chat_template = qwen3_vl_chat_template
        config["generation_kwargs"] = {"sequence_bias": tool_call_bias(processor.tokenizer)}
        config.update(max_completion_length=128, max_tool_calling_iterations=1)
        if option.kind == "tools":
            kwargs["tools"] = [lookup]
        else:
            kwargs["environment_factory"] = LookupEnvironment
    fraction = {"mixed": 0.5, "image": 0.0, "text": 1.0}[rows]
    return trainer_class(
        model=model,
        reward_funcs=rewards,
        args=small_config(output_dir, **{**config, **option.config, **switches}),
        train_dataset=make_shapes_dataset(4, text_fraction=fraction, seed=5),
        processing_class=processor,
        **kwargs,
    )


def count_shared_forwards(trainer) -> dict[str, int]:
    """Counts, as training runs, the log-prob forwards that took the shared-prompt path and the image encodings
    done once per distinct image (without them, equal numbers would prove nothing about the switches)."""
    counts = {"shared": 0, "encoded": 0}
    shared, encoded = trainer._shared_prompt_logps, trainer._images_encoded_once

    def shared_prompt_logps(*args, **kwargs):
        output = shared(*args, **kwargs)
        counts["shared"] += output is not None
        return output

    def images_encoded_once(*args, **kwargs):
        output = encoded(*args, **kwargs)
        counts["encoded"] += output is not None
        return output

    trainer._shared_prompt_logps, trainer._images_encoded_once = shared_prompt_logps, images_encoded_once
    return counts


def numbers(row: dict) -> dict[str, float]:
    """A log row's numbers, without the wall-clock timings."""
    return {key: value for key, value in row.items() if not key.startswith(("timing/", "step_time"))}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_with_both_switches_logs_the_plain_runs_numbers(name, load_tiny, reward_model_dir, tmp_path):
    option = OPTIONS[name]
    logs, weights = {}, {}
    for on in (False, True):
        trainer = make_trainer(
            VLMGRPOTrainer,
            option,
            load_tiny,
            tmp_path / str(on),
            "mixed",
            reward_model_dir,
            share_prompt_prefix=on,
            encode_images_once=on,
        )
        counts = count_shared_forwards(trainer)
        trainer.train()
        logs[on] = [numbers(row) for row in trainer.state.log_history if "loss" in row]
        weights[on] = {key: value.detach().clone() for key, value in trainer.model.named_parameters()}
        if on:
            assert counts["shared"] > 0 and counts["encoded"] > 0, counts
        assert option.kind != "peft" or is_peft_model(trainer.model)
    assert len(logs[True]) == len(logs[False]) == trainer.args.max_steps
    for row in logs[True]:
        assert all(math.isfinite(value) for value in row.values()), row
    for kind in ("image", "text"):  # per-task reward counts (`_log_reward_breakdown`)
        assert any(key.endswith(f"/{kind}/count") and value for key, value in logs[False][0].items()), kind
    if option.kind in ("tools", "environment"):
        assert logs[True][0]["tools/call_frequency"] == 1.0 and logs[True][0]["tools/failure_frequency"] == 0.0
    if option.differs:
        return
    for plain, shared in zip(logs[False], logs[True], strict=True):
        assert shared.keys() == plain.keys()
        for key, value in plain.items():
            assert shared[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (plain["step"], key)
    for key, value in weights[False].items():
        torch.testing.assert_close(weights[True][key], value, atol=1e-5, rtol=0, msg=key)
    assert any(row["grad_norm"] > 0 for row in logs[False]), "the comparison needs non-zero updates"


@pytest.mark.parametrize("name", list(OPTIONS))
def test_stock_trl_takes_the_option(name, load_tiny, reward_model_dir, tmp_path):
    option = OPTIONS[name]
    trainer = make_trainer(GRPOTrainer, option, load_tiny, tmp_path, option.stock_rows, reward_model_dir)
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert rows and all(math.isfinite(value) for row in rows for value in numbers(row).values())
    if option.kind in ("tools", "environment"):
        assert rows[0]["tools/call_frequency"] == 1.0


@pytest.mark.xfail(
    # With torchvision importable (the scale extras install it), transformers' image processors return tensors
    # and stock TRL's loop works; without it (the default install) they return NumPy arrays.
    condition=not is_torchvision_available(),
    raises=(TypeError, AttributeError),
    strict=True,
    reason="TRL 1.16's tool loop splits the processor's NumPy vision inputs as tensors; when this passes, TRL has "
    "fixed it and `VLMGRPOTrainer._tokenize_prompts` need not convert them",
)
def test_stock_trl_fails_on_a_tool_call_with_an_image(load_tiny, reward_model_dir, tmp_path):
    make_trainer(GRPOTrainer, OPTIONS["tools"], load_tiny, tmp_path, "image", reward_model_dir).train()


@pytest.mark.parametrize(
    ("option", "listed"),
    [
        ("loss_type", LOSS_TYPES),
        ("scale_rewards", SCALE_REWARDS),
        ("multi_objective_aggregation", AGGREGATIONS),
    ],
)
def test_every_value_trl_lists_is_tested(option, listed):
    """Fails when a TRL upgrade adds a value (a loss type, say) that the options above do not cover."""
    assert documented_values(option) == listed
