"""Tools the policy calls in its rollouts: the built-in `zoom_in`, user tools, the recipe fields, and every failure
kind through TRL's real tool loop in `VLMGRPOTrainer` (tiny models, a `sequence_bias` that makes the random policy
write the call, as in tests/test_trl_options.py)."""

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import small_config
from datasets import concatenate_datasets
from PIL import Image
from trl.chat_template_utils import qwen3_vl_chat_template, supports_tool_calling

from vlm_rl.config import DataArguments, ModelArguments, RewardArguments, VLMGRPOConfig
from vlm_rl.data import make_shapes_dataset
from vlm_rl.recipe_check import RecipeError
from vlm_rl.rewards import RewardSpecError
from vlm_rl.tools import ZoomEnvironment, crop_budget, crop_region, resolve_tool, toolbox
from vlm_rl.train import main as train_main
from vlm_rl.trainers import VLMGRPOTrainer

USER_TOOLS = '''
def boom(x: int) -> str:
    """Always fails.

    Args:
        x: Anything.
    """
    raise RuntimeError("the tool broke\\non two lines")


class Counter:
    """An environment: `count` is its tool, and it owns a reward."""

    def reset(self, **row):
        self.n = 0

    def count(self) -> str:
        """Count one.

        Returns:
            The count so far.
        """
        self.n += 1
        return str(self.n)

    def get_reward(self) -> float:
        return float(self.n)
'''


def test_crop_region_cuts_the_original_pixels_and_fits_the_budget():
    image = Image.new("RGB", (400, 300), "white")
    image.paste((255, 0, 0), (100, 100, 110, 110))  # a 10x10 red patch
    crop, shrunk = crop_region(image, (95, 95, 115, 115), max_pixels=10_000)
    assert not shrunk and crop.size == (20, 20)
    assert crop.getpixel((10, 10)) == (255, 0, 0) and crop.getpixel((1, 1)) == (255, 255, 255)

    crop, shrunk = crop_region(image, (0, 0, 400, 300), max_pixels=1200)
    assert shrunk and crop.width * crop.height <= 1200 and crop.size == (40, 30)  # the aspect kept


def test_crop_region_ignores_floating_point_noise_at_pixel_edges():
    # A 0-1000 box on a 336-pixel image: 625 and 750 scale to 210.00000000000003 and 252.00000000000003.
    image = Image.new("RGB", (336, 336))
    box = tuple(v * (336 / 1000) for v in (625, 625, 750, 750))
    assert crop_region(image, box, max_pixels=10_000)[0].size == (42, 42)
    assert crop_region(image, (10.4, 10.4, 20.6, 20.6), max_pixels=10_000)[0].size == (11, 11)  # partly covered


def test_crop_region_clamps_to_the_image_and_refuses_an_empty_box():
    image = Image.new("RGB", (64, 48))
    crop, _ = crop_region(image, (50, 40, 90, 90), max_pixels=10_000)
    assert crop.size == (14, 8)
    with pytest.raises(ValueError, match=r"no area inside the 64x48 image"):
        crop_region(image, (70, 10, 90, 20), max_pixels=10_000)


def patched_image() -> Image.Image:
    """A 1000x800 white image with a 10x10 red patch at (600, 400): a target too small to see downscaled."""
    image = Image.new("RGB", (1000, 800), "white")
    image.paste((255, 0, 0), (600, 400, 610, 410))
    return image


@pytest.mark.parametrize(
    ("family", "box"),
    [
        ("qwen2_vl", [595, 495, 615, 517.5]),  # norm1000: x / 1000 * 1000 px, y / 1000 * 800 px
        ("qwen3_vl", [595, 495, 615, 517.5]),
        ("llava", [595, 396, 615, 414]),  # pixels of the original image
    ],
)
def test_zoom_in_takes_the_familys_boxes_and_cuts_the_original_image(family, box, load_tiny):
    _, processor = load_tiny(family)
    environment = ZoomEnvironment(processor, model_type=family)
    environment.reset(prompt=[], images=[patched_image()])
    image, text = environment.zoom_in(box)
    crop = image["image"]
    assert crop.size == (20, 18) and crop.getpixel((10, 10)) == (255, 0, 0) and crop.getpixel((1, 1)) == (255,) * 3
    assert text == {"type": "text", "text": f"Zoomed into {[float(v) for v in box]} of image 0."}


def test_zoom_in_takes_qwen2_5_vl_boxes_in_resized_pixels(load_tiny):
    _, processor = load_tiny("qwen2_5_vl")
    environment = ZoomEnvironment(processor, model_type="qwen2_5_vl")
    assert environment.box_format == "resized"
    image = patched_image()
    environment.reset(images=[image])
    resized = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    scale_x, scale_y = 1000 / (resized[2].item() * 14), 800 / (resized[1].item() * 14)  # 14-pixel patches
    crop = environment.zoom_in([600 / scale_x, 400 / scale_y, 610 / scale_x, 410 / scale_y])[0]["image"]
    assert crop.getpixel((crop.width // 2, crop.height // 2)) == (255, 0, 0)


def test_the_crop_budget_is_what_the_processor_shows_the_model(load_tiny):
    _, qwen = load_tiny("qwen2_vl")
    _, llava = load_tiny("llava")
    size = llava.image_processor.crop_size  # CLIP's processor resizes, then cuts the centre at this size
    assert crop_budget(qwen, "qwen2_vl") == qwen.image_processor.size["longest_edge"] == 28 * 28 * 64
    assert crop_budget(llava, "llava") == size["height"] * size["width"]
    environment = ZoomEnvironment(qwen, model_type="qwen2_vl")
    environment.reset(images=[patched_image()])
    image, text = environment.zoom_in([0, 0, 1000, 1000])  # the whole 1000x800 image: over the budget
    assert image["image"].width * image["image"].height <= 28 * 28 * 64 and image["image"].size == (250, 200)
    assert "shrunk to 250x200 to fit the 50176-pixel budget" in text["text"]


@pytest.mark.parametrize(
    ("call", "row", "error"),
    [
        ({"bbox_2d": [1, 2, 3]}, {"images": [patched_image()]}, r"bbox_2d must be \[x1, y1, x2, y2\] .*\[1, 2, 3\]"),
        ({"bbox_2d": "0 0 5 5"}, {"images": [patched_image()]}, "four numbers"),
        ({"bbox_2d": [1, 2, 3, None]}, {"images": [patched_image()]}, "four numbers"),
        ({"bbox_2d": [1100, 0, 1200, 9]}, {"images": [patched_image()]}, r"\(pixel coordinates\) is outside image 0"),
        ({"bbox_2d": [1, 1, 5, 5]}, {"images": []}, "needs an image, and this question has none"),
        ({"bbox_2d": [1, 1, 5, 5], "image_index": 1}, {"images": [patched_image()]}, "from 0 to 0, got 1"),
        (
            {"box": [1, 1, 5, 5]},
            {"images": [patched_image()]},
            r"zoom_in got wrong arguments .*\(bbox_2d, image_index=0",
        ),
    ],
)
def test_a_mistake_in_a_call_is_a_one_line_error_reply(call, row, error, load_tiny):
    _, processor = load_tiny("llava")
    environment = toolbox([ZoomEnvironment], processor=processor, model_type="llava")()  # pixel boxes
    environment.reset(**row)
    reply = environment.zoom_in(**call)
    assert isinstance(reply, str) and reply.startswith("Error: ") and "\n" not in reply
    assert re.search(error, reply), reply


def test_user_tools_by_module_and_file_raising_and_too_many_turns(tmp_path):
    (tmp_path / "my_tools.py").write_text(USER_TOOLS)
    boom, counter = resolve_tool("my_tools.py:boom", tmp_path), resolve_tool("my_tools.py:Counter", tmp_path)
    assert resolve_tool("vlm_rl.tools.zoom:ZoomEnvironment") is ZoomEnvironment is resolve_tool("zoom_in")
    environment = toolbox([counter, boom], max_turns=2)()
    environment.reset(prompt=[])
    assert environment.boom(x=1) == "Error: boom failed: RuntimeError: the tool broke on two lines"
    assert environment.count() == "1"  # the same turn: no generation between the two calls
    environment._end_turn()
    assert environment.count() == "2" and environment.get_reward() == 2.0
    environment._end_turn()
    assert environment.count().startswith("Error: no more tool calls: at most 2 tool turns per answer")
    environment.reset()
    assert environment.count() == "1"  # a new rollout: its own turns


def test_a_wrong_tool_name_or_a_second_environment_is_refused(tmp_path):
    (tmp_path / "my_tools.py").write_text(USER_TOOLS)
    with pytest.raises(RecipeError, match=r"unknown tool 'zoom'. Built-in tools: \['zoom_in'\]"):
        resolve_tool("zoom")
    with pytest.raises(RewardSpecError, match=r"Tool 'my_tools.py:bom': .* no function 'bom'. Did you mean 'boom'"):
        resolve_tool("my_tools.py:bom", tmp_path)
    with pytest.raises(RecipeError, match=r"at most one environment class per run, got \['Counter', 'ZoomEnv"):
        toolbox([resolve_tool("my_tools.py:Counter", tmp_path), ZoomEnvironment])


def test_max_tool_turns_sets_trls_field_one_turn_past_it(tmp_path):
    assert small_config(tmp_path, max_tool_turns=3).max_tool_calling_iterations == 4
    assert small_config(tmp_path, max_tool_turns=3, max_tool_calling_iterations=9).max_tool_calling_iterations == 4
    assert small_config(tmp_path, max_tool_calling_iterations=9).max_tool_calling_iterations == 9
    with pytest.raises(ValueError, match="max_tool_turns must be at least 1, got 0"):
        small_config(tmp_path, max_tool_turns=0)
    assert VLMGRPOConfig.__dataclass_fields__["tools"].default_factory() == []


def tool_call_bias(tokenizer, call: str, again: bool) -> list:
    """`sequence_bias` that makes every first turn write `call` whole and end; after a tool's reply, write it again
    (`again`) or free text. A random tiny policy never writes a tool call by itself."""
    ids = [*tokenizer.encode(call, add_special_tokens=False), tokenizer.eos_token_id]
    turn = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    after_result = tokenizer.encode("</tool_response><|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    forced = [[turn + ids[:1], 50.0]] + [[ids[: k + 1], 50.0 * (k + 1)] for k in range(1, len(ids))]
    return forced + ([] if again else [[after_result + ids[:1], -100.0], [[tokenizer.eos_token_id], 10.0]])


def call_text(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def tool_trainer(load_tiny, tmp_path, tools, call: str, again: bool = False, max_tool_turns: int | None = None):
    """A trainer whose policy calls `call`, on one step of two prompts (one with an image, one text-only) x 2."""
    model, processor = load_tiny("qwen2_vl")
    processor.chat_template = processor.tokenizer.chat_template = qwen3_vl_chat_template
    args = small_config(
        tmp_path,
        max_steps=1,
        max_completion_length=512,  # two turns of calls (84 tokens each) and replies
        max_tool_turns=max_tool_turns,
        generation_kwargs={"sequence_bias": tool_call_bias(processor.tokenizer, call, again)},
    )
    return VLMGRPOTrainer(
        model=model,
        reward_funcs=[lambda completions, **kwargs: [float(len(str(c)) % 5) for c in completions]],
        args=args,
        train_dataset=concatenate_datasets(
            [make_shapes_dataset(1, image_size=112), make_shapes_dataset(1, text_fraction=1.0)]
        ),
        processing_class=processor,
        environment_factory=toolbox(tools, processor=processor, model_type="qwen2_vl", max_turns=max_tool_turns),
    )


def logged(trainer) -> dict:
    return next(row for row in trainer.state.log_history if "loss" in row)


def test_zoom_in_through_trls_tool_loop_on_a_mixed_batch(load_tiny, tmp_path):
    trainer = tool_trainer(load_tiny, tmp_path, [ZoomEnvironment], call_text("zoom_in", {"bbox_2d": [0, 0, 500, 500]}))
    outputs, generate = [], trainer._generate
    trainer._generate = lambda prompts: outputs.append(generate(prompts)) or outputs[-1]
    trainer.train()
    # The image rows' crops went to TRL as images: the top-left quarter of the original 112x112 image.
    tool_images = outputs[0][7]
    assert sorted(len(images) for images in tool_images) == [0, 0, 1, 1]
    assert all(image.size == (56, 56) for images in tool_images for image in images)
    row = logged(trainer)
    # Every completion zooms once: on an image row a crop comes back, on a text-only row an error.
    assert row["tools/zoom_in/calls"] == 4 and row["tools/zoom_in/errors"] == 2
    assert row["tools/turns_per_completion"] == 1.0 and row["tools/unknown/calls"] == 0
    assert row["tools/malformed_calls"] == 0


def test_a_raising_tool_an_unknown_tool_and_a_malformed_call_are_counted(load_tiny, tmp_path):
    (tmp_path / "my_tools.py").write_text(USER_TOOLS)
    tools = [resolve_tool("my_tools.py:boom", tmp_path)]
    raising = tool_trainer(load_tiny, tmp_path / "a", tools, call_text("boom", {"x": 1}))
    raising.train()
    assert logged(raising)["tools/boom/calls"] == 4 and logged(raising)["tools/boom/errors"] == 4
    unknown = tool_trainer(load_tiny, tmp_path / "b", tools, call_text("lookup", {}))
    unknown.train()
    assert logged(unknown)["tools/unknown/calls"] == 4 and logged(unknown)["tools/unknown/errors"] == 4
    malformed = tool_trainer(load_tiny, tmp_path / "c", tools, '<tool_call>\n{"name": "boom", "arg\n</tool_call>')
    malformed.train()
    assert logged(malformed)["tools/malformed_calls"] == 4 and logged(malformed)["tools/boom/calls"] == 0


def test_calls_past_max_tool_turns_get_an_error_and_the_run_goes_on(load_tiny, tmp_path):
    call = call_text("zoom_in", {"bbox_2d": [0, 0, 500, 500]})
    trainer = tool_trainer(load_tiny, tmp_path, [ZoomEnvironment], call, again=True, max_tool_turns=1)
    trainer.train()
    row = logged(trainer)
    # Turn 1 runs (a crop, or an error on a text-only row); turn 2 gets "no more tool calls"; then TRL stops.
    assert row["tools/turns_per_completion"] == 2.0
    assert row["tools/zoom_in/calls"] == 8 and row["tools/zoom_in/errors"] == 6


def tool_recipe(tmp_path, model: str, **overrides) -> str:
    recipe = {
        "model_name_or_path": model,
        "dtype": "float32",
        "dataset": "synthetic:shapes",
        "train_size": 8,
        "eval_size": 4,
        "reward_funcs": ["accuracy"],
        "tools": ["zoom_in"],
        "max_tool_turns": 1,
        "num_generations": 2,
        "per_device_train_batch_size": 4,
        "max_completion_length": 256,
        "max_steps": 1,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "final_eval": False,
        "plot": False,
        "report_to": "none",
        "output_dir": str(tmp_path / "run"),
        **overrides,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_a_recipe_with_tools_trains(load_tiny, tmp_path):
    """YAML -> prepare -> train with `tools: [zoom_in]` on `tiny:qwen3_vl`, which carries Qwen3-VL's real template."""
    _, processor = load_tiny("qwen3_vl")  # the same tokenizer as the recipe's `tiny:qwen3_vl`
    bias = tool_call_bias(processor.tokenizer, call_text("zoom_in", {"bbox_2d": [0, 0, 500, 500]}), again=False)
    recipe = tool_recipe(tmp_path, "tiny:qwen3_vl", generation_kwargs={"sequence_bias": bias}, final_eval=True)
    train_main(["--config", recipe])
    state = json.loads((tmp_path / "run/trainer_state.json").read_text())
    row = next(row for row in state["log_history"] if "loss" in row)
    assert row["tools/zoom_in/calls"] == 4 and row["tools/turns_per_completion"] == 1.0
    # The final evaluation ran with the tools (`tests/test_evaluation.py` has what it does with them).
    results = json.loads((tmp_path / "run/eval_results.json").read_text())
    assert results["num_rows"] == 4 and "tool_calls_per_completion" in results


@pytest.mark.parametrize(("family", "renders_tools"), [("qwen2_vl", False), ("qwen2_5_vl", False), ("qwen3_vl", True)])
def test_only_the_tiny_qwen3_vl_template_renders_tool_calls(family, renders_tools, load_tiny):
    """The tiny Qwen3-VL carries Qwen3-VL's real template (TRL's copy), which renders a conversation without tools
    exactly as the other tiny Qwen-VL templates do; TRL ships no Qwen2-VL or Qwen2.5-VL template that renders them."""
    _, processor = load_tiny(family)
    assert supports_tool_calling(processor) is renders_tools
    assert (processor.chat_template == qwen3_vl_chat_template) is renders_tools


def test_the_tiny_qwen3_vl_tokenizer_writes_a_call_in_few_tokens(load_tiny):
    """As in the real Qwen tokenizers, the tool tags are single tokens that decoding keeps when it skips special
    tokens, and the call's scaffolding is a few tokens: a zoom call is ~35 tokens, not ~85 one per character (at
    temperature 1 the tiny policy broke half of its 85-token calls). A number is still one token per digit."""
    _, processor = load_tiny("qwen3_vl")
    tokenizer = processor.tokenizer
    call = '<tool_call>\n{"name": "zoom_in", "arguments": {"bbox_2d": [312, 125, 375, 188]}}\n</tool_call>'
    ids = tokenizer(call).input_ids
    assert len(ids) <= 40 and tokenizer.decode(ids, skip_special_tokens=True) == call
    for tag in ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"):
        assert len(tokenizer(tag).input_ids) == 1
    digits = [t for t in tokenizer.tokenize(" [312, 125, 375, 188]") if any(c.isdigit() for c in t)]
    assert len(digits) == 12 and all(re.fullmatch(r"Ġ?\d", t) for t in digits)  # one token per digit


def test_a_family_whose_template_cannot_render_tool_calls_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"tools: the chat template of this Qwen2-VL model cannot render tool calls"):
        train_main(["--config", tool_recipe(tmp_path, "tiny:qwen2_vl")])


RECIPE_CONFIGS = (ModelArguments, DataArguments, RewardArguments, VLMGRPOConfig)


def test_tools_doc_examples_run():
    """docs/tools.md: its Python example runs, and its recipe snippets' keys are recipe fields."""
    doc = (Path(__file__).resolve().parent.parent / "docs/tools.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL):
        exec(block, {})
    fields = {name for config in RECIPE_CONFIGS for name in config.__dataclass_fields__}
    for block in re.findall(r"```yaml\n(.*?)```", doc, flags=re.DOTALL):
        assert set(yaml.safe_load(block)) <= fields


@pytest.mark.parametrize(("tools", "turns", "limit"), [(["zoom_in"], 2, 3), ([], None, 1)])
def test_vllm_makes_room_for_one_image_per_tool_turn(tools, turns, limit, tmp_path):
    """A recipe run's vLLM image limit: the data's most (one here) and, with tools, one per tool turn; without it
    the turn after a zoom fails in vLLM ("At most 1 image(s) may be provided in one prompt")."""
    from vlm_rl.config import parse_recipe
    from vlm_rl.prepare import prepare

    recipe = tool_recipe(tmp_path, "tiny:qwen3_vl", tools=tools, max_tool_turns=turns)
    model_args, data_args, reward_args, training_args, path = parse_recipe(["--config", recipe])
    prepare(model_args, data_args, reward_args, training_args, path.parent)
    assert training_args.vllm_limit_mm_per_prompt == limit
