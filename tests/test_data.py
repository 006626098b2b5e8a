"""Data from files: every source format, column mapping and templates, image forms, and each bad input.

Real files on disk, read by `load_task` as a recipe would; rows are loaded the way the trainer's data
loader loads them (`Dataset.__getitems__` with TRL's repeated indices).
"""

import io
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import small_config
from datasets import Dataset, DatasetDict, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image
from trl.data_utils import prepare_multimodal_messages

from vlm_rl.config import DataArguments
from vlm_rl.data import DataError, load_rows, load_task
from vlm_rl.models.processing import load_processor
from vlm_rl.rewards.accuracy import accuracy

DATA_DOC = Path(__file__).resolve().parent.parent / "docs" / "data.md"

TEMPLATE = "{question}\nAnswer in <answer></answer>."
SYSTEM = "You are a careful assistant."


def png(path, color="red", size=(24, 16), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def png_bytes(color="blue", size=(20, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(path, rows, extra_lines=()):
    lines = [json.dumps(row) for row in rows]
    for index, line in extra_lines:
        lines.insert(index, line)
    path.write_text("\n".join(lines) + "\n")
    return path


def load(dataset, **fields):
    return load_task(DataArguments(dataset=str(dataset), **fields), seed=0)


def mapped(dataset, **fields):
    return load(dataset, column_mapping={"solution": "answer"}, prompt_template=TEMPLATE, **fields)


def qa_rows(n=3):
    """Rows in a typical file's own names: `question`, `solution`, an image path, and a `task`."""
    return [
        {"question": f"What is {i} + {i}?", "solution": str(2 * i), "image": f"images/{i}.png", "task": "math"}
        for i in range(n)
    ]


def check_qa_row(row, i=0):
    assert row["prompt"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"What is {i} + {i}?\nAnswer in <answer></answer>."},
    ]
    assert row["answer"] == str(2 * i) and row["task"] == "math" and row["question"] == f"What is {i} + {i}?"
    assert "image" not in row and "_row_id" not in row
    (image,) = row["images"]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (24, 16)


@pytest.fixture
def qa_dir(tmp_path):
    for i in range(3):
        png(tmp_path / "images" / f"{i}.png", color=(10 * i, 0, 0))
    return tmp_path


def write_format(directory, rows, fmt):
    if fmt == "jsonl":
        return write_jsonl(directory / "data.jsonl", rows)
    if fmt == "json":
        path = directory / "data.json"
        path.write_text(json.dumps(rows, indent=1))
        return path
    if fmt == "csv":
        path = directory / "data.csv"
        path.write_text(
            "question,solution,image,task\n"
            + "".join(f'"{r["question"]}",{r["solution"]},{r["image"]},math\n' for r in rows)
        )
        return path
    if fmt == "parquet":
        path = directory / "data.parquet"
        Dataset.from_list(rows).to_parquet(str(path))
        return path
    path = directory / "saved"  # save_to_disk: image paths start from the directory that holds it
    Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "save_to_disk"])
def test_each_source_format_loads_with_mapping_template_and_system_prompt(qa_dir, fmt):
    path = write_format(qa_dir, qa_rows(), fmt)
    task = mapped(path, system_prompt=SYSTEM)
    assert len(task.train) == 3 and task.eval is None
    rows = task.train.__getitems__([2, 2, 0, 0])  # as TRL's sampler asks: each index num_generations times
    check_qa_row(rows[0], 2)
    assert rows[0] == rows[1]
    check_qa_row(rows[2], 0)


def test_a_saved_dataset_dict_gives_train_and_eval_splits(qa_dir):
    rows = qa_rows()
    DatasetDict({"train": Dataset.from_list(rows[:2]), "test": Dataset.from_list(rows[2:])}).save_to_disk(
        str(qa_dir / "dd")
    )
    task = mapped(qa_dir / "dd", eval_split="test", system_prompt=SYSTEM)
    assert len(task.train) == 2 and len(task.eval) == 1
    check_qa_row(task.eval[0], 2)
    with pytest.raises(DataError, match=r"has splits \['train', 'test'\]; eval_split 'validation' is not one of them"):
        mapped(qa_dir / "dd", eval_split="validation")
    with pytest.raises(DataError, match=r"data\.jsonl has no splits, so eval_split 'test' cannot be read"):
        mapped(write_jsonl(qa_dir / "data.jsonl", rows), eval_split="test")


def test_globs_and_directories_of_files_load_as_one_dataset_naming_each_file(qa_dir):
    rows = qa_rows(3)
    (qa_dir / "shards").mkdir()
    write_jsonl(qa_dir / "shards" / "a.jsonl", rows[:2])
    write_jsonl(qa_dir / "shards" / "b.jsonl", [rows[2], {**rows[2], "image": "images/missing.png"}])
    for spec in (qa_dir / "shards", qa_dir / "shards" / "*.jsonl"):
        with pytest.raises(DataError, match=r"shards/b\.jsonl line 2: image 'images/missing\.png' not found"):
            mapped(spec, image_root=str(qa_dir))
    task = mapped(qa_dir / "shards", image_root=str(qa_dir), bad_rows="skip")
    assert len(task.train) == 3 and task.skipped_train.counts == {"missing_image": 1}


def test_images_as_paths_bytes_pil_and_image_features(tmp_path):
    png(tmp_path / "gray.png", color=128, mode="L")
    png(tmp_path / "rgba.png", color=(0, 0, 255, 128), mode="RGBA")
    paths = [{"prompt": "paths", "images": [str(tmp_path / "gray.png"), "rgba.png"]}]  # absolute, then relative
    Dataset.from_list([{"prompt": "bytes", "images": [png_bytes()]}, {"prompt": "none", "images": []}]).to_parquet(
        str(tmp_path / "bytes.parquet")
    )
    # PIL images become a `datasets` Image feature: one per row, and lists of them.
    Dataset.from_list([{"prompt": "pil", "image": Image.new("RGB", (8, 8), "green")}]).save_to_disk(
        str(tmp_path / "single")
    )
    features = Features({"prompt": Value("string"), "images": List(ImageFeature())})
    pil_rows = [{"prompt": "pils", "images": [Image.new("RGB", (6, 6)), Image.new("L", (5, 5))]}]
    Dataset.from_list(pil_rows, features=features).save_to_disk(str(tmp_path / "listed"))

    (row,) = load(write_jsonl(tmp_path / "paths.jsonl", paths)).train
    assert [(image.size, image.mode) for image in row["images"]] == [((24, 16), "RGB"), ((24, 16), "RGB")]
    assert row["images"][1].getpixel((0, 0)) == (0, 0, 255)
    embedded, none = load(tmp_path / "bytes.parquet").train
    assert embedded["images"][0].getpixel((0, 0)) == (0, 0, 255) and none["images"] == []
    (single,) = load(tmp_path / "single").train
    assert single["images"][0].getpixel((0, 0)) == (0, 128, 0) and "image" not in single
    (listed,) = load(tmp_path / "listed").train
    assert [(i.size, i.mode) for i in listed["images"]] == [((6, 6), "RGB"), ((5, 5), "RGB")]


def test_multi_image_text_only_and_single_image_rows_mix_in_one_column(tmp_path):
    for name in ("a", "b", "c"):
        png(tmp_path / "pics" / f"{name}.png")
    rows = [
        {"q": "two", "img": ["a.png", "b.png"], "a": "1"},
        {"q": "none", "img": None, "a": "2"},
        {"q": "one", "img": "c.png", "a": "3"},
        {"q": "no key", "a": "4"},
    ]
    write_jsonl(tmp_path / "d.jsonl", rows)
    args = DataArguments(
        dataset=str(tmp_path / "d.jsonl"),
        column_mapping={"img": "images", "a": "answer"},
        prompt_template="{q}",
        image_root=str(tmp_path / "pics"),
    )
    batch = load_task(args, seed=0).train.__getitems__([0, 1, 2, 3])
    assert [len(row["images"]) for row in batch] == [2, 0, 1, 0]
    assert [row["prompt"][0]["content"] for row in batch] == ["two", "none", "one", "no key"]
    assert [row["answer"] for row in batch] == ["1", "2", "3", "4"]


def test_images_under_another_column_name_are_refused_naming_the_column_and_the_mapping(tmp_path, caplog):
    png(tmp_path / "a.png")
    write_jsonl(tmp_path / "paths.jsonl", [{"prompt": "What is it?", "image_path": "a.png", "answer": "red"}])
    with pytest.raises(DataError, match=r"column 'image_path' holds image paths \(e.g. 'a.png'\).*"
                       r"column_mapping: \{image_path: image\}"):  # fmt: skip
        load(tmp_path / "paths.jsonl")
    (row,) = load(tmp_path / "paths.jsonl", column_mapping={"image_path": "image"}).train
    assert len(row["images"]) == 1
    # Encoded bytes and `datasets` Image features under other names too; bytes that are no image are fine.
    Dataset.from_list([{"prompt": "p", "pixels": png_bytes(), "blob": b"\x00\x01"}]).to_parquet(
        str(tmp_path / "bytes.parquet")
    )
    with pytest.raises(DataError, match=r"column 'pixels' holds encoded images \(bytes\).*\{pixels: image\}"):
        load(tmp_path / "bytes.parquet")
    Dataset.from_list([{"prompt": "p", "photo": Image.new("RGB", (8, 8))}]).save_to_disk(str(tmp_path / "pil"))
    with pytest.raises(DataError, match=r"column 'photo' holds images \(a `datasets` Image feature\)"):
        load(tmp_path / "pil")
    Dataset.from_list([{"prompt": "p", "blob": b"\x00\x01", "file": "notes.txt"}]).to_parquet(
        str(tmp_path / "plain.parquet")
    )
    with caplog.at_level("WARNING", logger="vlm_rl"):
        (row,) = load(tmp_path / "plain.parquet").train
    assert row["images"] == []
    # A run with no image row at all trains, but says so loudly.
    assert "Train data: NONE of the 1 rows has an image" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlm_rl"):
        load(tmp_path / "paths.jsonl", column_mapping={"image_path": "image"})
    assert "NONE of the" not in caplog.text


# LLaVA's chat template (llava-1.5-hf's too) renders a message's images before its text, whatever their order.
@pytest.mark.parametrize(("family", "in_place"), [("qwen2_vl", True), ("llava", False)])
def test_image_markers_in_the_prompt_place_the_image_there(tmp_path, tiny_dirs, family, in_place):
    png(tmp_path / "a.png")
    rows = [{"prompt": "Look: <image> Which colour is it?", "image": "a.png"}]
    (row,) = load(write_jsonl(tmp_path / "marked.jsonl", rows)).train
    assert row["prompt"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": " Which colour is it?"}
        ]}
    ]  # fmt: skip
    processor = load_processor(str(tiny_dirs[family]))

    def input_ids(prompt):
        conversation = prepare_multimodal_messages(prompt, images=row["images"])
        inputs = processor.apply_chat_template(
            conversation=[conversation], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(inputs["input_ids"][0])

    ids = input_ids(row["prompt"])
    image = [i for i, token in enumerate(ids) if token == processor.image_token_id]
    # As many image tokens as TRL's own placement gives the image, in one run where the marker was.
    unmarked = input_ids([{"role": "user", "content": "Look:  Which colour is it?"}])
    assert len(image) == unmarked.count(processor.image_token_id) and image == list(range(image[0], image[-1] + 1))
    before, after = processor.tokenizer.decode(ids[: image[0]]), processor.tokenizer.decode(ids[image[-1] + 1 :])
    assert "<image>" not in before + after and "Which colour" not in before
    assert ("Look:" in before) == in_place and "Which colour is it?" in after
    # One marker per image, or the row is named.
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "<image> and <image>", "image": "a.png"}])
    with pytest.raises(DataError, match=r"bad.jsonl line 1: the prompt has 2 <image> marker\(s\) but the row has 1"):
        load(tmp_path / "bad.jsonl").train[0]


def test_conversational_prompts_pass_through_and_get_the_system_prompt_once(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "Hi"}], "answer": "a"},
        {"prompt": [{"role": "system", "content": "Own."}, {"role": "user", "content": "Yo"}], "answer": "b"},
    ]
    first, second = load(write_jsonl(tmp_path / "c.jsonl", rows), system_prompt=SYSTEM).train
    assert first["prompt"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    assert second["prompt"] == rows[1]["prompt"] and first["images"] == []
    with pytest.raises(DataError, match="already holds conversations, and the recipe sets prompt_template"):
        load(tmp_path / "c.jsonl", prompt_template="{answer}")


def test_held_out_rows_are_carved_deterministically_or_read_from_their_own_file(qa_dir):
    rows = [{**row, "image": None} for row in qa_rows(10)]
    path = write_jsonl(qa_dir / "d.jsonl", rows)
    task = mapped(path, eval_size=3)
    train = [r["answer"] for r in task.train]
    held = [r["answer"] for r in task.eval]
    assert len(train) == 7 and len(held) == 3 and not set(train) & set(held)
    assert held == [r["answer"] for r in mapped(path, eval_size=3).eval]  # same seed, same rows
    assert train == sorted(train, key=int) and held == sorted(held, key=int)  # file order kept
    task = mapped(path, eval_dataset=str(path), eval_size=2, train_size=4)
    assert [r["answer"] for r in task.eval] == ["0", "2"] and len(task.train) == 4


# Bad input: an actionable error under `bad_rows: raise` (the default), a counted skip under `skip`.


def test_a_bad_json_line_names_file_and_line_or_is_skipped(qa_dir):
    path = write_jsonl(qa_dir / "d.jsonl", qa_rows(3), extra_lines=[(1, '{"question": "cut off'), (3, "[1, 2]")])
    with pytest.raises(DataError, match=r"d\.jsonl line 2: not valid JSON .*set `bad_rows: skip`"):
        mapped(path)
    task = mapped(path, bad_rows="skip")
    assert len(task.train) == 3 and task.skipped_train.counts == {"unreadable_row": 2}
    assert "d.jsonl line 2" in task.skipped_train.first["unreadable_row"]


def test_a_missing_image_is_found_before_training_and_names_file_line_and_path(qa_dir):
    (qa_dir / "images" / "1.png").unlink()
    path = write_jsonl(qa_dir / "d.jsonl", qa_rows(3))
    with pytest.raises(DataError, match=r"d\.jsonl line 2: image 'images/1\.png' not found \(looked for .*1\.png\)"):
        mapped(path)
    task = mapped(path, bad_rows="skip")
    assert [row["answer"] for row in task.train] == ["0", "4"]
    assert task.skipped_train.metrics() == {"data/skipped_rows": 1.0, "data/skipped_rows_missing_image": 1.0}


def test_a_wrong_column_name_names_it_lists_the_columns_and_suggests_the_closest(qa_dir):
    path = write_jsonl(qa_dir / "d.jsonl", qa_rows(2))
    message = r"column_mapping renames 'soluton', but there is no such column\. Columns: \['question', 'solution', "
    with pytest.raises(DataError, match=message + r".*Did you mean 'solution'\?"):
        load(path, column_mapping={"soluton": "answer"}, prompt_template="{question}")
    message = r"prompt_template uses \{qestion\}, but there is no column 'qestion' .*Did you mean 'question'\?"
    with pytest.raises(DataError, match=message):
        load(path, prompt_template="{qestion}")
    with pytest.raises(DataError, match=r"no 'prompt' column, and the recipe sets no prompt_template\. Columns"):
        load(path)
    with pytest.raises(DataError, match=r"column 'completions' would clash"):
        load(path, column_mapping={"solution": "completions"}, prompt_template="{question}")


def test_an_empty_dataset_is_an_error(tmp_path, qa_dir):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows\.$"):
        load(tmp_path / "empty.jsonl", prompt_template="{question}")
    for i in range(3):
        (qa_dir / "images" / f"{i}.png").unlink()
    with pytest.raises(DataError, match=r"d\.jsonl: no train rows to use\. Skipped 3 train rows: 3 missing_image"):
        mapped(write_jsonl(qa_dir / "d.jsonl", qa_rows(3)), bad_rows="skip")


def test_missing_values_and_mixed_column_types_name_the_row(qa_dir):
    rows = qa_rows(3)
    rows[1]["question"] = None
    with pytest.raises(DataError, match=r"d\.jsonl line 2: column 'question' is empty"):
        mapped(write_jsonl(qa_dir / "d.jsonl", rows))
    rows[1]["question"] = ["not", "text"]
    with pytest.raises(DataError, match=r"d\.jsonl line 2: column 'question' holds a list here but a str"):
        mapped(write_jsonl(qa_dir / "d.jsonl", rows))


def test_a_corrupt_image_fails_when_its_row_loads_naming_file_and_line(qa_dir):
    (qa_dir / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    task = mapped(write_jsonl(qa_dir / "d.jsonl", qa_rows(3)))  # existing path: up-front checks pass
    assert task.train[0]["answer"] == "0"  # other rows load: images decode only when their row does
    message = r"d\.jsonl line 2: image 'images/1\.png' cannot be decoded \(UnidentifiedImageError: .*bad_rows: skip"
    with pytest.raises(DataError, match=message):
        task.train.__getitems__([0, 0, 1, 1])


def test_a_skipped_row_is_replaced_by_the_same_good_row_every_time_and_counted_once(qa_dir):
    (qa_dir / "images" / "1.png").write_bytes(b"garbage")
    task = mapped(write_jsonl(qa_dir / "d.jsonl", qa_rows(3)), bad_rows="skip")
    batch = task.train.__getitems__([1, 1, 0, 0])
    assert [row["answer"] for row in batch] == ["4", "4", "0", "0"]  # row 1's replacement: the next good row
    assert [row["answer"] for row in task.train.__getitems__([1, 1])] == ["4", "4"]
    assert task.skipped_train.counts == {"corrupt_image": 1}
    assert re.match(
        r".*d\.jsonl line 2: image 'images/1\.png' cannot be decoded", task.skipped_train.first["corrupt_image"]
    )
    # An evaluation scores each row once: the bad row is left out, not replaced.
    assert [(i, row["answer"]) for i, row in load_rows(task.train, [0, 1, 2])] == [(0, "0"), (2, "4")]
    assert task.skipped_train.total == 1


def test_an_over_long_prompt_is_measured_with_the_processor_images_included(qa_dir, load_tiny):
    _, processor = load_tiny("qwen2_vl")
    rows = qa_rows(3)
    rows[1]["question"] = "What is " + " + ".join(["1"] * 60) + "?"
    task = mapped(write_jsonl(qa_dir / "d.jsonl", rows), max_prompt_length=80)
    task.attach_processor(processor)
    assert task.train[0]["answer"] == "0"
    with pytest.raises(
        DataError, match=r"d\.jsonl line 2: the prompt is \d+ tokens with its images, over max_prompt_le"
    ):
        task.train[1]
    # The limit counts image tokens: a large image takes the same short question over it.
    png(qa_dir / "images" / "0.png", size=(224, 224))
    task = mapped(qa_dir / "d.jsonl", max_prompt_length=80)
    task.attach_processor(processor)
    with pytest.raises(DataError, match=r"d\.jsonl line 1: the prompt is \d+ tokens with its images"):
        task.train[0]


def test_a_hub_id_offline_is_a_clear_error():
    with pytest.raises(DataError, match=r"'someone/some-data' is not a local file or directory.*HF_HUB_OFFLINE"):
        load("someone/some-data", prompt_template="{question}")
    with pytest.raises(DataError, match=r"Data file 'data/nowhere\.jsonl' not found \(looked for: "):
        load("data/nowhere.jsonl")


def test_data_doc_examples_run_and_its_recipes_parse(tmp_path, monkeypatch, load_tiny):
    monkeypatch.chdir(tmp_path)
    model, processor = load_tiny("qwen2_vl")
    namespace = {
        "model": model,
        "processor": processor,
        "rewards": [accuracy],
        "config": small_config(tmp_path / "run"),
    }
    for block in re.findall(r"```python\n(.*?)```", DATA_DOC.read_text(), flags=re.DOTALL):
        exec(block, namespace)
    namespace["trainer"].train()
    assert namespace["trainer"].state.log_history[0]["data/skipped_rows"] == 0
    blocks = re.findall(r"```yaml\n(.*?)```", DATA_DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 4
    for block in blocks:
        DataArguments(**yaml.safe_load(block))  # every key a data field, every value accepted


def test_deepeyes_parquet_layout_answer_inside_a_struct_column(tmp_path):
    """verl / DeepEyes rows: a conversational `prompt` with an `<image>` marker, `images` as encoded bytes and the
    answer inside the `reward_model` struct, reached with `column_mapping: {reward_model.ground_truth: answer}`."""
    rows = [
        {
            "data_source": "vstar",
            "prompt": [
                {"role": "system", "content": "Zoom in when a detail is too small."},
                {"role": "user", "content": f"<image>\nWhat colour is the cup {i}?"},
            ],
            "images": [{"bytes": png_bytes((200, 10 * i, 0)), "path": None}],
            "reward_model": {"ground_truth": f"colour {i}", "style": "rule"},
            "extra_info": {"index": i},
        }
        for i in range(3)
    ]
    Dataset.from_list(rows).to_parquet(tmp_path / "train.parquet")
    task = load(tmp_path / "train.parquet", column_mapping={"reward_model.ground_truth": "answer"})
    batch = task.train.__getitems__([0, 1, 2])
    assert [row["answer"] for row in batch] == ["colour 0", "colour 1", "colour 2"]
    assert [len(row["images"]) for row in batch] == [1, 1, 1] and batch[1]["images"][0].getpixel((0, 0))[1] == 10
    system, user = batch[0]["prompt"]
    assert system["content"] == [{"type": "text", "text": "Zoom in when a detail is too small."}]
    assert user["content"][0]["type"] == "image"  # where the `<image>` marker was
    with pytest.raises(DataError, match=r"column_mapping renames 'reward_model.truth'.*reward_model.ground_truth"):
        load(tmp_path / "train.parquet", column_mapping={"reward_model.truth": "answer"})
