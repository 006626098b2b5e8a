"""`synthetic:zoom`: the task that needs the `zoom_in` tool, its SFT rows, and SFT on multi-turn tool completions."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from PIL import Image
from test_sft import SFT_RUN
from trl.data_utils import prepare_multimodal_messages

from vlm_rl.config import DataArguments
from vlm_rl.data import DataError, load_task
from vlm_rl.data.zoom import GRID, TOOL_NAME, ZOOM_COLORS, make_zoom_dataset
from vlm_rl.errors import InvalidValueError
from vlm_rl.models import adapter_for, load_model_and_processor
from vlm_rl.models.collator import IGNORE_INDEX, PromptCompletionCollator
from vlm_rl.models.families.qwen_vl import CHAT_TEMPLATE
from vlm_rl.sft import main as sft_main
from vlm_rl.tools import ZoomEnvironment
from vlm_rl.zooming import crop_region

SIZE = 336  # 42-pixel cells: small images, fast tests


def colors_in(image: Image.Image) -> set[str]:
    """The palette colours `image` has pixels of."""
    pixels = set(image.getdata())
    return {name for name, rgb in ZOOM_COLORS.items() if rgb in pixels}


def named_cell(question: str, size: int) -> list[int]:
    """The cell the question names, in 0-1000 coordinates there, back in pixels of a `size`-pixel image."""
    box = json.loads(re.search(r"the cell (\[[\d, ]+\])", question).group(1))
    return [round(v * size / 1000) for v in box]


def test_rows_are_deterministic_per_seed_and_split():
    first, again = make_zoom_dataset(3, image_size=SIZE, seed=1), make_zoom_dataset(3, image_size=SIZE, seed=1)
    assert first["answer"] == again["answer"] and first["box"] == again["box"]
    assert all(a[0].tobytes() == b[0].tobytes() for a, b in zip(first["images"], again["images"], strict=True))
    other = make_zoom_dataset(3, image_size=SIZE, seed=2)
    held_out = make_zoom_dataset(3, "test", image_size=SIZE, seed=1)
    assert first["box"] != other["box"] and first["box"] != held_out["box"]


def test_the_named_cell_holds_the_dot_of_the_answer_colour():
    """`box` is the dot (its pixels are the answer's colour) inside `region`, the cell the question names; cropped
    there from the original image, only that colour shows: one zoom answers the question."""
    rows = make_zoom_dataset(12, image_size=SIZE, seed=0)
    assert set(rows["answer"]) <= set(ZOOM_COLORS)
    cell = SIZE // GRID
    for row in rows:
        image, box, region = row["images"][0], json.loads(row["box"]), json.loads(row["region"])
        assert region == named_cell(row["prompt"][0]["content"], SIZE)
        assert region[2] - region[0] == region[3] - region[1] == cell and region[0] % cell == region[1] % cell == 0
        assert region[0] <= box[0] <= box[2] < region[2] and region[1] <= box[1] <= box[3] < region[3]
        assert image.getpixel((box[0], box[1])) == image.getpixel((box[2], box[3])) == ZOOM_COLORS[row["answer"]]
        crop, shrunk = crop_region(image, tuple(region), max_pixels=224 * 224)
        assert not shrunk and colors_in(crop) == {row["answer"]}
        assert len(colors_in(image)) > 1  # other dots, other colours, elsewhere


def test_the_teachers_call_its_crop_and_its_answer_agree():
    """The SFT row: a `zoom_in` call on a cell (0-1000 coordinates), the tool turn with that cell's crop from the
    original image, and the colour that crop shows; the biased teacher zooms one cell off at `bias_rate`."""
    for bias_rate, off in ((0.0, 0), (1.0, 1)):
        rows = make_zoom_dataset(6, "sft", image_size=SIZE, call_rate=1.0, bias_rate=bias_rate, seed=0)
        for row in rows:
            call, tool, reply = row["completion"]
            (tool_call,) = call["tool_calls"]
            assert tool_call["function"]["name"] == TOOL_NAME and tool["role"] == "tool"
            box = json.loads(tool_call["function"]["arguments"])["bbox_2d"]
            pixels = [round(v * SIZE / 1000) for v in box]
            region = json.loads(row["region"])
            assert abs(pixels[0] - region[0]) == off * SIZE // GRID and pixels[1:4:2] == region[1:4:2]
            image, crop = row["images"]
            # The zoom tool's crop: the 0-1000 box to pixels, unrounded (`ZoomEnvironment.zoom_in`).
            exact = tuple(v * SIZE / 1000 for v in box)
            assert crop.tobytes() == crop_region(image, exact, 128 * 128)[0].tobytes()
            (seen,) = colors_in(crop)
            assert reply["content"][0]["text"].endswith(f"<answer>{seen}</answer>")
            if not off:
                assert seen == row["answer"]
            assert [tool["function"]["name"] for tool in json.loads(row["tools"])] == [TOOL_NAME]


def test_load_task_serves_train_sft_and_held_out_rows():
    args = DataArguments(dataset="synthetic:zoom", split="sft", image_size=SIZE, train_size=2, eval_size=6)
    task = load_task(args, seed=0)
    assert "completion" in task.train.column_names and "completion" not in task.eval.column_names
    assert task.chance == max(task.eval["answer"].count(a) for a in ZOOM_COLORS) / 6
    with pytest.raises(DataError, match="image_size: synthetic:zoom needs cells of 12 pixels"):
        load_task(DataArguments(dataset="synthetic:zoom", image_size=56), seed=0)


@pytest.fixture(scope="module")
def qwen3_vl(tiny_dirs):
    return load_model_and_processor(str(tiny_dirs["qwen3_vl"]), dtype="float32")


def test_sft_trains_the_assistant_turns_with_the_tool_image_in_place(qwen3_vl):
    """Labels: the `zoom_in` call up to its end-of-turn token, then the answer; the tool turn (its image tokens and
    text) and the prompt are -100. The crop's pixels follow the scene's in `pixel_values`, as its image tokens
    follow the scene's in the sequence."""
    model, processor = qwen3_vl
    rows = list(make_zoom_dataset(2, "sft", image_size=SIZE, call_rate=1.0, seed=0))
    batch = PromptCompletionCollator(processor, adapter_for(model.config))(rows)
    tokenizer, image_token = processor.tokenizer, model.config.image_token_id
    merge = processor.image_processor.merge_size**2
    grids = batch["image_grid_thw"]
    assert len(grids) == 4 and batch["pixel_values"].shape[0] == int(grids.prod(-1).sum())
    for i, row in enumerate(rows):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        call, _, reply = row["completion"]
        arguments = call["tool_calls"][0]["function"]["arguments"]
        trained = tokenizer.decode(labels[labels != IGNORE_INDEX])
        expected_call = f'<tool_call>\n{{"name": "{TOOL_NAME}", "arguments": {arguments}}}\n</tool_call><|im_end|>'
        assert trained == expected_call + reply["content"][0]["text"] + "<|im_end|>\n"
        text = tokenizer.decode(ids[mask == 1])
        assert "<tool_response>\n<|vision_start|><|image_pad|>" in text and "</tool_response>" in text
        scene, crop = grids[2 * i], grids[2 * i + 1]
        assert int((ids == image_token).sum()) == int(scene.prod() + crop.prod()) // merge
        assert not (labels == image_token).any()
        assert batch["mm_token_type_ids"][i][ids == image_token].eq(1).all()
    crop_pixels = processor.image_processor(images=[rows[0]["images"][1]], return_tensors="pt")["pixel_values"]
    start = int(grids[0].prod())
    assert torch.equal(batch["pixel_values"][start : start + len(crop_pixels)], crop_pixels)
    assert torch.isfinite(model(**batch).loss)


def test_tool_rows_need_a_template_that_renders_tool_calls(tiny_dirs):
    model, processor = load_model_and_processor(str(tiny_dirs["qwen2_vl"]), dtype="float32")
    rows = list(make_zoom_dataset(1, "sft", image_size=SIZE, seed=0))
    with pytest.raises(InvalidValueError, match="chat template cannot render tool calls"):
        PromptCompletionCollator(processor, adapter_for(model.config))(rows)


def test_vlm_rl_sft_steps_on_zoom_rows(tmp_path):
    """One `vlm-rl sft` step on the tiny Qwen3-VL with `synthetic:zoom`'s SFT rows; the loss is finite."""
    argv = ["--model_name_or_path", "tiny:qwen3_vl", "--dataset", "synthetic:zoom", "--image_size", str(SIZE),
            "--min_pixels", str(112 * 112), "--max_pixels", str(112 * 112), "--train_size", "2", "--eval_size", "0",
            "--max_steps", "1", "--per_device_train_batch_size", "2", "--max_length", "2048",
            "--output_dir", str(tmp_path / "run")]  # fmt: skip
    fixed = {k: str(v) for k, v in SFT_RUN.items() if k not in {"model_name_or_path", "dataset", "image_size"}}
    fixed |= {"max_steps": "1", "train_size": "2", "eval_size": "0", "per_device_train_batch_size": "2"}
    for key, value in fixed.items():
        if f"--{key}" not in argv:
            argv += [f"--{key}", value]
    sft_main(argv)
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    (step,) = [entry for entry in history if "loss" in entry]
    assert math.isfinite(step["loss"])


def test_the_tiny_qwen3_vl_template_renders_plain_conversations_as_before(qwen3_vl):
    """The tiny Qwen3-VL carries TRL's tool-capable Qwen3-VL template; conversations without tools render exactly as
    the plain template the other tiny Qwen-VL models keep."""
    _, processor = qwen3_vl
    plain = CHAT_TEMPLATE.replace("DEFAULT_SYSTEM", '""')
    image = Image.new("RGB", (32, 32))
    conversations = [
        ([{"role": "user", "content": "hi"}], [image, image], {"add_generation_prompt": True}),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         [], {}),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>"}], [image],
         {"continue_final_message": True}),
    ]  # fmt: skip
    for messages, images, settings in conversations:
        messages = prepare_multimodal_messages(messages, images=images)
        rendered = processor.apply_chat_template(messages, tokenize=False, **settings)
        assert rendered == processor.apply_chat_template(messages, chat_template=plain, tokenize=False, **settings)


def test_sft_rows_show_the_tool_and_its_reply_as_a_rollout_gets_them(load_tiny):
    from transformers.utils import get_json_schema

    from vlm_rl.tools import toolbox
    from vlm_rl.tools.multiturn import tool_methods

    _, processor = load_tiny("qwen3_vl")
    environment = toolbox([ZoomEnvironment], processor=processor, model_type="qwen3_vl")()
    row = make_zoom_dataset(1, "sft", call_rate=1.0, seed=3)[0]
    # The schema in the prompt is the one training renders from the toolbox's `zoom_in`.
    assert json.loads(row["tools"]) == [get_json_schema(tool_methods(environment)["zoom_in"])]
    # The tool turn is what the built-in tool returns for the row's call (the recipe's 128x128 budget).
    environment.reset(images=row["images"][:1])
    arguments = json.loads(row["completion"][0]["tool_calls"][0]["function"]["arguments"])
    crop, text = environment.zoom_in(**arguments)
    assert row["completion"][1]["content"][1]["text"] == text["text"]
    assert list(row["images"][1].getdata()) == list(crop["image"].getdata())


def test_the_reluctant_teacher_calls_on_a_share_of_the_rows_and_always_answers_right(qwen3_vl):
    model, processor = qwen3_vl
    rows = make_zoom_dataset(40, "sft", image_size=SIZE, call_rate=0.3, seed=2)
    calls = [len(row["completion"]) == 3 for row in rows]
    assert 0 < sum(calls) < len(rows)  # about 30 %
    for row, called in zip(rows, calls, strict=True):
        assert len(row["images"]) == 1 + called and json.loads(row["tools"])[0]["function"]["name"] == TOOL_NAME
        assert row["completion"][-1]["content"][0]["text"].endswith(f"<answer>{row['answer']}</answer>")
    # A batch mixing both kinds of row trains: the answer-only rows are plain assistant replies.
    batch = PromptCompletionCollator(processor, adapter_for(model.config))([rows[calls.index(False)], rows[0]])
    assert torch.isfinite(model(**batch).loss)


def test_no_tools_rows_have_the_same_teachers_answer_without_a_call():
    with_tool = make_zoom_dataset(8, "sft", image_size=SIZE, seed=2)
    without = make_zoom_dataset(8, "sft_no_tools", image_size=SIZE, seed=2)
    assert "tools" not in without.column_names
    for a, b in zip(with_tool, without, strict=True):
        assert a["prompt"] == b["prompt"] and a["answer"] == b["answer"] and len(b["images"]) == 1
        (reply,) = b["completion"]
        assert reply["role"] == "assistant" and reply["content"].endswith(f"<answer>{a['answer']}</answer>")
