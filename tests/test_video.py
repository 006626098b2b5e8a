"""Video rows: the default install decodes and processes them, the loader decodes a row's clip lazily (a file through
transformers' `load_video` with PyAV, or a list of frames), bad clips are named or skipped and counted, and the
Qwen-VL families train on batches mixing text-only, image and video rows.

Clips are tiny and written by each test: 8 frames of 56×56, a bar growing left to right.
"""

import copy
import json

import av
import numpy as np
import pytest
import torch
from PIL import Image
from test_logprobs import assert_chunks_match_single_samples

from vlm_rl.config import DataArguments
from vlm_rl.data import DataError, load_task
from vlm_rl.data.video import Clip
from vlm_rl.models.families import registered_adapters
from vlm_rl.models.video import configure_video

SIDE, FRAMES, RATE = 56, 8, 4  # a 2-second clip


def frame(index: int) -> np.ndarray:
    """Frame `index` of the test clip: red up to its column, so each frame differs and order shows."""
    array = np.zeros((SIDE, SIDE, 3), np.uint8)
    array[:, : (index + 1) * SIDE // FRAMES] = (255, 0, 0)
    return array


def write_video(path, codec: str = "libx264"):
    """An mp4 (or webm, with `libvpx-vp9`) of the test clip, written with PyAV."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=RATE)
        stream.width = stream.height = SIDE
        stream.pix_fmt = "yuv420p"
        for index in range(FRAMES):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame(index), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_gif(path):
    images = [Image.fromarray(frame(index)) for index in range(FRAMES)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // RATE, loop=0)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load(path, **fields):
    return load_task(DataArguments(dataset=str(path), **fields), seed=0)


def qwen_processor(load_tiny, family="qwen2_5_vl", **settings):
    _, processor = load_tiny(family)
    configure_video(processor, max_pixels=SIDE * SIDE, **settings)
    return processor


# ----- install ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_the_default_install_loads_qwen_processors_with_their_video_processor_and_builds_video_inputs(
    tmp_path, load_tiny, family
):
    _, processor = load_tiny(family)  # vlm-rl's processor loader, as training loads it
    assert processor.video_processor is not None
    rows = [{"prompt": "Which way?", "videos": [str(write_video(tmp_path / "c.mp4"))]}]
    task = load(write_jsonl(tmp_path / "d.jsonl", rows))
    configure_video(processor, num_frames=4, max_pixels=SIDE * SIDE)
    task.attach_processor(processor)
    row = task.train[0]
    inputs = processor.apply_chat_template(
        [row["prompt"][:0] + [{"role": "user", "content": [{"type": "video", "video": row["videos"][0]}]}]],
        tokenize=True,
        return_dict=True,
        add_generation_prompt=True,
    )
    temporal = processor.video_processor.temporal_patch_size
    assert inputs["video_grid_thw"].tolist()[0][0] == 4 // temporal
    assert inputs["pixel_values_videos"].shape[0] == int(inputs["video_grid_thw"].prod())
    if family == "qwen2_5_vl":  # the sampled clip's timing, not the processor's 24 fps guess
        assert inputs["second_per_grid_ts"] == pytest.approx([temporal * 2 / RATE])


# ----- data ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mp4", "webm", "gif"])
def test_a_video_file_decodes_lazily_with_pyav_at_the_processors_frame_settings(tmp_path, load_tiny, kind):
    writers = {"mp4": write_video, "webm": lambda p: write_video(p, "libvpx-vp9"), "gif": write_gif}
    path = writers[kind](tmp_path / f"clip.{kind}")
    task = load(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Which way?", "videos": f"clip.{kind}"}]))
    task.attach_processor(qwen_processor(load_tiny, num_frames=4))
    (clip,) = task.train[0]["videos"]
    assert isinstance(clip, Clip) and clip.shape[0] == 4 and clip.metadata.fps == pytest.approx(RATE)
    assert list(clip.metadata.frames_indices) == [0, 2, 4, 6]
    # The frames are the file's, in order: the red bar grows (lossy codecs: compare coarsely).
    red = [(np.asarray(f)[SIDE // 2, :, 0] > 128).sum() for f in clip]
    assert red == sorted(red) and red[0] < red[-1]
    assert path.exists()


def test_a_clip_keeps_its_timing_through_pickling_as_data_loader_workers_hand_it_over():
    import pickle

    copied = pickle.loads(pickle.dumps(clip(6)))
    assert isinstance(copied, Clip) and np.array_equal(copied, clip(6))
    assert copied.metadata.fps == RATE and list(copied.metadata.frames_indices) == list(range(6))


def test_video_fps_samples_by_rate_and_a_list_of_frames_is_one_video(tmp_path, load_tiny):
    write_video(tmp_path / "clip.mp4")
    for index in range(3):
        Image.fromarray(frame(index)).save(tmp_path / f"f{index}.png")
    rows = [
        {"prompt": "a", "videos": ["clip.mp4"]},
        {"prompt": "b", "videos": ["f0.png", "f1.png", "f2.png"]},
        {"prompt": "c", "videos": None},
    ]
    task = load(write_jsonl(tmp_path / "d.jsonl", rows))
    task.attach_processor(qwen_processor(load_tiny, fps=1))
    file_clip, frames_clip, none = (row["videos"] for row in task.train.__getitems__([0, 1, 2]))
    assert file_clip[0].shape[0] == 2 and list(file_clip[0].metadata.frames_indices) == [0, 4]  # 2 s at 1 fps
    assert frames_clip[0].shape == (3, SIDE, SIDE, 3) and frames_clip[0].metadata.fps == 1
    assert np.array_equal(frames_clip[0][1], frame(1)) and none == []


def test_video_paths_under_another_column_name_are_refused_naming_the_column_and_the_mapping(tmp_path, load_tiny):
    write_video(tmp_path / "clip.mp4")
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Which way?", "clip": "clip.mp4"}])
    with pytest.raises(DataError, match=r"column 'clip' holds video paths .*column_mapping: \{clip: videos\}"):
        load(path)
    task = load(path, column_mapping={"clip": "videos"})
    task.attach_processor(qwen_processor(load_tiny))
    assert task.train[0]["videos"][0].shape[0] == FRAMES


def test_bad_clips_name_the_file_and_row_or_are_skipped_and_counted(tmp_path, load_tiny):
    write_video(tmp_path / "good.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    rows = [
        {"prompt": "a", "videos": ["good.mp4"]},
        {"prompt": "b", "videos": ["gone.mp4"]},
        {"prompt": "c", "videos": ["broken.mp4"]},
        {"prompt": "d", "videos": ["good.mp4", "good.mp4"]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d\.jsonl line 2: video 'gone\.mp4' not found \(looked for .*gone\.mp4\)"):
        load(path)
    task = load(write_jsonl(tmp_path / "present.jsonl", rows[:1] + rows[2:]))
    task.attach_processor(qwen_processor(load_tiny))
    assert task.train[0]["videos"][0].shape[0] == FRAMES
    with pytest.raises(DataError, match=r"line 2: video 'broken\.mp4' cannot be decoded \(.*bad_rows: skip"):
        task.train[1]
    with pytest.raises(DataError, match=r"line 3: the row has 2 videos .* one video for now"):
        task.train[2]
    skipping = load(path, bad_rows="skip")
    skipping.attach_processor(qwen_processor(load_tiny))
    assert [row["prompt"][0]["content"] for row in skipping.train.__getitems__([0, 1, 2, 2])] == ["a", "a", "a", "a"]
    assert skipping.skipped_train.counts == {"missing_video": 1, "corrupt_video": 1, "bad_video": 1}


# ----- models -------------------------------------------------------------------------------------------------------

# The families whose adapters declare video inputs: the support table's "Video rows" column (docs/models.md).
VIDEO_FAMILIES = sorted(name for name, adapter in registered_adapters().items() if adapter.video_keys)
GENERATIONS = 2


def clip(frames: int = 4, rate: float = RATE) -> Clip:
    """The test clip's first `frames` frames as the loader would hand them over."""
    from transformers.video_utils import VideoMetadata

    metadata = VideoMetadata(total_num_frames=FRAMES, fps=rate, width=SIDE, height=SIDE, duration=FRAMES / rate,
                             video_backend="pyav", frames_indices=list(range(frames)))  # fmt: skip
    return Clip(np.stack([frame(i) for i in range(frames)]), metadata)


def video_frames(family: str) -> tuple[int, int]:
    """The frame counts of the two videos of `mixed_video_rows`: different where the family allows it."""
    return (4, 4) if registered_adapters()[family].uniform_frames else (4, 6)


def mixed_video_rows(frames: tuple[int, int] = (4, 6)):
    """Text-only, image, video, and image-plus-video rows of different prompt lengths, each repeated per generation."""
    import random

    from vlm_rl.data.synthetic import draw_shape

    image = draw_shape("circle", "red", 56, random.Random(0))
    rows = [
        {
            "prompt": [{"role": "user", "content": "Which way does the bar grow?"}],
            "images": [],
            "videos": [clip(frames[0])],
        },
        {"prompt": [{"role": "user", "content": "Say red."}], "images": [], "videos": []},
        {"prompt": [{"role": "user", "content": "Color?"}], "images": [image], "videos": []},
        {
            "prompt": [{"role": "user", "content": "Same color as the bar?"}],
            "images": [image],
            "videos": [clip(frames[1])],
        },
    ]
    return [{**row, "answer": "red", "task": "video"} for row in rows for _ in range(GENERATIONS)]


def varied(completions, **kwargs) -> list[float]:
    """A reward that differs between completions, so that every step has a learning signal."""
    return [float(len(str(completion))) for completion in completions]


def video_trainer(model, processor, tmp_path, rows, dataset=None, reward=None, **overrides):
    from conftest import small_config
    from datasets import Dataset

    from vlm_rl.rewards.accuracy import accuracy
    from vlm_rl.trainers import VLMGRPOTrainer

    settings = {"num_generations": GENERATIONS, "per_device_train_batch_size": len(rows), "video_max_pixels": 3136}
    args = small_config(tmp_path, **(settings | overrides))
    if dataset is None:
        dataset = Dataset.from_list([{"prompt": row["prompt"], "answer": "red"} for row in rows])
    return VLMGRPOTrainer(model=model, reward_funcs=[reward or accuracy], args=args, train_dataset=dataset,
                          processing_class=processor)  # fmt: skip


def with_clip(row) -> list[dict]:
    """`row`'s conversation with its images and video, as the trainer builds it."""
    from trl.data_utils import prepare_multimodal_messages

    from vlm_rl.data.video import with_video

    return prepare_multimodal_messages(with_video(row["prompt"], row["videos"], len(row["images"])),
                                       images=row["images"])  # fmt: skip


def single_sample_logps(model, processor, row, completion_ids):
    """Log-probs of `completion_ids` after `row`'s prompt (its image and video included), from one unpadded forward
    of that sample alone, through the processor directly."""
    conversation = with_clip(row)
    encoded = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    prompt_ids = encoded.pop("input_ids")
    encoded.pop("attention_mask")
    input_ids = torch.cat([prompt_ids, completion_ids[None]], dim=1)
    if "mm_token_type_ids" in encoded:
        types = encoded["mm_token_type_ids"]
        encoded["mm_token_type_ids"] = torch.cat([types, torch.zeros_like(completion_ids)[None]], 1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **encoded).logits
    logits = logits[0, prompt_ids.size(1) - 1 : -1].float()
    return prompt_ids[0], torch.log_softmax(logits, dim=-1).gather(-1, completion_ids[:, None])[:, 0]


def test_the_video_families_are_the_qwen_vl_generations_llava_onevision_internvl_and_smolvlm():
    assert VIDEO_FAMILIES == ["internvl", "llava_onevision", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "smolvlm"]


def video_settings(family: str) -> dict:
    """`video_max_pixels` for the families that take a frame-size budget (Qwen-VL); the others resize every frame to
    one fixed size and refuse it."""
    return {} if family.startswith("qwen") else {"video_max_pixels": None}


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_rows_logprobs_match_a_single_sample_forward_in_any_chunking_and_in_trls_scoring(
    family, load_tiny, tmp_path
):
    model, processor = load_tiny(family)
    rows = mixed_video_rows(video_frames(family))
    # Two iterations per generation: TRL's own scoring forward (its "old" log-probs) runs inside the batch's scoring.
    trainer = video_trainer(model, processor, tmp_path, rows, num_iterations=2, **video_settings(family))
    batch = trainer._generate_and_score_completions(rows)
    assert batch["num_videos"] == [len(row["videos"]) for row in rows]
    assert batch["num_images"] == [len(row["images"]) for row in rows]
    keys = (*trainer.adapter.image_keys, *trainer.adapter.video_keys, *trainer.adapter.row_keys, "num_images",
            "num_videos", "num_tiles")  # fmt: skip
    inputs = {key: batch[key] for key in keys if key in batch}
    if getattr(model.config, "video_token_id", None) is not None:  # InternVL and SmolVLM show frames as images
        video_tokens = (batch["prompt_ids"] == model.config.video_token_id).sum(dim=1)
        assert [bool(n) for n in video_tokens] == [bool(row["videos"]) for row in rows]
    # The whole batch at once, and chunks of 2 and 3: some hold no video, some no image, some neither.
    logps = assert_chunks_match_single_samples(trainer, model, processor, rows, batch, inputs, single_sample_logps)
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(batch["old_per_token_logps"][mask], logps[mask], atol=1e-5, rtol=0)


def file_rows(directory) -> list[dict]:
    """JSONL rows with a video file, text only, an image file, and an image and a video; the files in `directory`."""
    write_video(directory / "clip.mp4")
    Image.fromarray(frame(3)).save(directory / "still.png")
    return [
        {"prompt": "Which way does the bar grow?", "videos": ["clip.mp4"], "answer": "right"},
        {"prompt": "Say right.", "answer": "right"},
        {"prompt": "Where is the bar?", "images": ["still.png"], "answer": "left"},
        {"prompt": "Same bar?", "images": ["still.png"], "videos": ["clip.mp4"], "answer": "yes"},
    ]


@pytest.mark.parametrize("family", ["qwen2_5_vl", *(name for name in VIDEO_FAMILIES if not name.startswith("qwen"))])
def test_a_grpo_run_trains_on_video_files_images_and_text_loaded_lazily(tmp_path, load_tiny, family):
    rows = file_rows(tmp_path)
    task = load(write_jsonl(tmp_path / "d.jsonl", rows))
    model, processor = load_tiny(family)
    # beta > 0: TRL's scoring also runs the reference model on the video rows.
    settings = {"video_num_frames": 4, "per_device_train_batch_size": 4, "steps_per_generation": 2, "max_steps": 2,
                "beta": 0.04, **video_settings(family)}  # fmt: skip
    trainer = video_trainer(model, processor, tmp_path, [], dataset=task.train, reward=varied, **settings)
    task.attach_processor(processor)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(np.isfinite(losses))
    kls = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert kls and all(np.isfinite(kls))
    assert processor.video_processor.num_frames == 4
    assert family != "qwen2_5_vl" or processor.video_processor.size["longest_edge"] == 3136
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    vision = trainer.adapter.vision_modules
    assert any(name.startswith(vision) for name in changed)  # the vision tower saw the video (or image)


def test_a_family_without_video_refuses_a_video_row_naming_the_family_and_row(load_tiny, tmp_path):
    model, processor = load_tiny("llava")
    rows = mixed_video_rows()[2:]  # the first video row is row 4
    with pytest.raises(ValueError, match=r"^LlavaProcessor has no video processor, so video_max_pixels cannot apply"):
        video_trainer(model, processor, tmp_path, rows)
    trainer = video_trainer(model, processor, tmp_path, rows, video_max_pixels=None)
    with pytest.raises(ValueError, match=r"^LLaVA.* does not take video, but row 4 of this batch has one"):
        trainer._generate_and_score_completions(rows)


def test_the_evaluation_shows_each_row_its_video_and_refuses_video_for_a_family_without(tmp_path, load_tiny):
    from vlm_rl.evaluation import evaluate_policy

    write_video(tmp_path / "clip.mp4")
    rows = [{"prompt": "Which way?", "videos": ["clip.mp4"]}, {"prompt": "Say hi."}]
    task = load(write_jsonl(tmp_path / "d.jsonl", rows))
    model, processor = load_tiny("qwen2_vl")
    configure_video(processor, num_frames=2, max_pixels=SIDE * SIDE)
    task.attach_processor(processor)
    seen = []

    def video_blocks(prompts, completions, **kwargs) -> list[float]:
        seen.extend(sum(part.get("type") == "video" for m in p for part in m["content"] if isinstance(part, dict))
                    for p in prompts)  # fmt: skip
        return [0.0] * len(prompts)

    records = evaluate_policy(model, processor, task.train, [video_blocks], max_new_tokens=2, batch_size=2)
    assert len(records) == 2 and seen == [1, 0]
    llava, llava_processor = load_tiny("llava")
    with pytest.raises(ValueError, match=r"^LLaVA.* does not take video, but row 0 of this batch has one"):
        evaluate_policy(llava, llava_processor, task.train, [video_blocks], max_new_tokens=2, batch_size=2)


def test_video_settings_are_saved_with_the_processor_and_read_back(tmp_path, load_tiny):
    from vlm_rl.models.processing import load_processor

    processor = qwen_processor(load_tiny, "qwen3_vl", num_frames=6, total_pixels=20 * SIDE * SIDE)
    processor.save_pretrained(tmp_path)
    loaded = load_processor(str(tmp_path))
    for name in ("num_frames", "fps", "do_sample_frames", "size", "cap_pixels_per_frame", "max_video_tokens"):
        assert getattr(loaded.video_processor, name) == getattr(processor.video_processor, name), name
    assert loaded.video_processor.num_frames == 6 and loaded.video_processor.do_sample_frames is False
    assert loaded.video_processor.reads_clip_metadata


def test_video_total_pixels_shrinks_the_frames_of_a_clip_over_its_budget(load_tiny):
    large = Clip(np.zeros((4, 448, 448, 3), np.uint8), clip().metadata)

    def patches(**settings) -> int:
        _, processor = load_tiny("qwen2_vl")
        configure_video(processor, **settings)
        conversation = [{"role": "user", "content": [{"type": "video", "video": large}]}]
        inputs = processor.apply_chat_template([conversation], tokenize=True, return_dict=True)
        return int(inputs["video_grid_thw"].prod())

    unbounded, budgeted = patches(), patches(total_pixels=2 * 150_000)
    # Counted as Qwen-VL's reference code counts it: frame area times temporal patches (2 frames each).
    assert budgeted < unbounded and budgeted * 14 * 14 <= 2 * 150_000


def test_video_rows_with_tools_are_refused_naming_the_row(load_tiny):
    from vlm_rl.models import adapter_for
    from vlm_rl.trainers.video_rows import prompts_with_videos

    model, processor = load_tiny("qwen2_vl")
    rows = mixed_video_rows()[2:]  # the first video row is row 4
    with pytest.raises(ValueError, match=r"^Video rows \(row 4 of this batch\) do not work with tools yet"):
        prompts_with_videos(rows, adapter_for(model.config), processor, uses_tools=True)
    converted = prompts_with_videos(rows, adapter_for(model.config), processor, uses_tools=False)
    assert [part["type"] for part in converted[4]["prompt"][0]["content"]] == ["image", "video", "text"]


def test_the_python_api_takes_a_video_file_path_or_pil_frames_per_row(tmp_path, load_tiny):
    model, processor = load_tiny("qwen2_vl")
    path = str(write_video(tmp_path / "clip.mp4"))
    frames = [Image.fromarray(frame(index)) for index in range(4)]
    rows = [
        {"prompt": [{"role": "user", "content": "Which way?"}], "videos": path},
        {"prompt": [{"role": "user", "content": "And here?"}], "videos": frames},
        {"prompt": [{"role": "user", "content": "Say hi."}], "videos": None},
    ]
    rows = [{**row, "answer": "right"} for row in rows for _ in range(GENERATIONS)]
    trainer = video_trainer(model, processor, tmp_path, rows, video_num_frames=2)
    batch = trainer._generate_and_score_completions(rows)
    assert batch["num_videos"] == [1, 1, 1, 1, 0, 0]
    assert batch["video_grid_thw"][:, 0].tolist() == [1, 1, 2, 2]  # 2 sampled frames; the 4 frames as given
    with pytest.raises(ValueError, match=r"^row 0 of this batch: video '.*gone\.mp4' not found"):
        trainer._generate_and_score_completions([{**rows[0], "videos": str(tmp_path / "gone.mp4")}])


def test_sft_trains_on_a_video_row_with_the_prompt_and_video_inputs_grpo_generates_from(load_tiny):
    """A `vlm-rl sft` batch of text, image, video and image-plus-video rows: each row's prompt tokens and the video
    inputs are those GRPO's prompt tokenization gives; the labels are the reply only. Frames not decoded by the data
    loader (PIL images) are refused rather than trained on without their video."""
    from vlm_rl.data.video import with_video
    from vlm_rl.models import adapter_for
    from vlm_rl.models.collator import IGNORE_INDEX, PromptCompletionCollator
    from vlm_rl.models.inputs import prompt_inputs

    model, processor = load_tiny("qwen2_vl")
    configure_video(processor, max_pixels=SIDE * SIDE)
    adapter = adapter_for(model.config)
    answer = [{"role": "assistant", "content": "<answer>right</answer>"}]
    rows = [{**row, "completion": answer} for row in mixed_video_rows()[::GENERATIONS]]
    batch = PromptCompletionCollator(processor, adapter)(rows)
    prompts = [with_video(row["prompt"], row["videos"], len(row["images"])) for row in rows]
    expected = prompt_inputs(adapter, processor, prompts, [row["images"] for row in rows])
    assert torch.equal(batch["pixel_values_videos"], expected["pixel_values_videos"])
    assert torch.equal(batch["video_grid_thw"], expected["video_grid_thw"])
    for i in range(len(rows)):
        prompt_ids = expected["input_ids"][i][expected["attention_mask"][i] == 1].tolist()
        ids = batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist()
        labels = batch["labels"][i]
        assert ids[: len(prompt_ids)] == prompt_ids and (labels[: len(prompt_ids)] == IGNORE_INDEX).all()
        assert processor.tokenizer.decode(labels[labels != IGNORE_INDEX]).startswith("<answer>right</answer>")
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    frames = [Image.fromarray(frame(index)) for index in range(4)]
    with pytest.raises(ValueError, match=r"^vlm-rl sft takes a video row \(row 0 of this batch\) as decoded clips"):
        PromptCompletionCollator(processor, adapter)([{**rows[0], "videos": frames}])


def test_a_recipe_with_video_rows_for_a_family_without_video_fails_before_the_model_loads(tmp_path, tiny_dirs):
    from test_data_training import run_recipe

    write_video(tmp_path / "clip.mp4")
    rows = [{"question": "Colour?", "answer": "red"}, {"question": "Which way?", "videos": "clip.mp4", "answer": "r"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    fields = {"model_name_or_path": str(tiny_dirs["llava"]), "prompt_template": "{question}", "final_eval": False}
    with pytest.raises(ValueError, match=r"^LLaVA.* does not take video, but .*train\.jsonl line 2 has one"):
        run_recipe(tmp_path, dataset=str(tmp_path / "train.jsonl"), **fields)
    assert not (tmp_path / "run" / "trainer_state.json").exists()


def test_a_frame_strip_keeps_at_most_eight_frames_first_to_last_scaled_down_to_96_pixels():
    from vlm_rl.data.video import clip_from_frames, frame_strip

    shades = range(0, 240, 20)  # 12 frames, each one grey level
    clip = clip_from_frames([Image.new("RGB", (300, 192), (shade,) * 3) for shade in shades], "test")
    strip = frame_strip(clip)
    assert strip.size == (8 * 150, 96)
    picked = [strip.convert("L").getpixel((150 * k + 75, 48)) for k in range(8)]
    assert picked[0] == 0 and picked[-1] == 220 and picked == sorted(picked)
    small = clip_from_frames([Image.new("RGB", (40, 30))] * 2, "test")
    assert frame_strip(small).size == (2 * 40, 30)  # never scaled up


# ----- the other video families: LLaVA-OneVision, InternVL, SmolVLM --------------------------------------------------

OTHER_VIDEO_FAMILIES = [name for name in VIDEO_FAMILIES if not name.startswith("qwen")]


@pytest.mark.parametrize("family", OTHER_VIDEO_FAMILIES)
def test_a_tiny_model_saves_its_video_processor_and_reloads_it_ready_for_clips(family, tiny_dirs, tmp_path):
    from vlm_rl.models.processing import load_processor

    processor = load_processor(str(tiny_dirs[family]))
    assert processor.video_processor.reads_clip_metadata
    assert getattr(processor, "video_ready", False) == (family != "llava_onevision")  # the two processor fixes
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == type(processor).__name__
    loaded = load_processor(str(tmp_path))
    assert type(loaded.video_processor).__name__ == type(processor.video_processor).__name__
    assert loaded.video_processor.size == processor.video_processor.size


@pytest.mark.parametrize("family", OTHER_VIDEO_FAMILIES)
def test_video_families_that_stack_a_batchs_videos_refuse_two_frame_counts_naming_rows(family, load_tiny, tmp_path):
    model, processor = load_tiny(family)
    rows = mixed_video_rows((4, 6))
    trainer = video_trainer(model, processor, tmp_path, rows, **video_settings(family))
    expected = (rf"^{trainer.adapter.label} takes videos of one frame count per batch, but row 0 of this batch has 4 "
                r"frames and row 6 of this batch 6; set `video_num_frames`")  # fmt: skip
    with pytest.raises(ValueError, match=expected):
        trainer._generate_and_score_completions(rows)


@pytest.mark.parametrize("family", OTHER_VIDEO_FAMILIES)
def test_video_max_pixels_is_refused_where_every_frame_has_one_fixed_size(family, load_tiny):
    _, processor = load_tiny(family)
    with pytest.raises(ValueError, match=r"^video_max_pixels: .*VideoProcessor resizes every frame to one fixed size "
                                         r"\(\d+×\d+\), so it does not apply"):  # fmt: skip
        configure_video(processor, max_pixels=SIDE * SIDE)


def test_smolvlms_processor_keeps_the_images_of_a_call_with_videos_each_rows_frames_after_its_tiles(load_tiny):
    from transformers import SmolVLMProcessor

    _, processor = load_tiny("smolvlm")
    rows = mixed_video_rows((4, 4))[::GENERATIONS]  # video; text; image; image + video
    conversations = [with_clip(row) for row in rows]
    inputs = processor.apply_chat_template(conversations, tokenize=True, return_dict=True, padding=True,
                                           return_tensors="pt")  # fmt: skip
    tiles = inputs["pixel_attention_mask"].flatten(2).any(-1).sum(-1).tolist()
    image_tiles = 5  # a 2×2 grid and the global image
    assert tiles == [4, 0, image_tiles, image_tiles + 4]
    # Stock transformers keeps only the frames (two videos of 4): the image tiles are gone.
    stock = copy.copy(processor)
    stock.__class__ = SmolVLMProcessor
    text = processor.apply_chat_template(conversations, tokenize=False)
    images, videos = [row["images"] for row in rows], [row["videos"] for row in rows]
    kept = stock(images=images, text=text, videos=videos, return_tensors="pt", padding=True)
    assert kept["pixel_values"].shape[:2] == (2, 4)


def test_families_without_video_refuse_a_video_row_naming_family_and_row():
    refusing = {name: adapter for name, adapter in registered_adapters().items() if not adapter.video_keys}
    assert sorted(refusing) == ["blip2", "gemma3", "idefics3", "instructblip", "llava", "llava_next"]
    for adapter in refusing.values():
        with pytest.raises(
            ValueError, match=rf"^{adapter.label} does not take video, but row 2 of this batch has one"
        ):
            adapter.check_videos_per_row([0, 0, 1, 1])


def test_a_rows_video_goes_after_its_images_in_list_content_too():
    from vlm_rl.data.video import with_video

    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Same?"}]}]
    (message,) = with_video(prompt, [clip()], 1)
    assert [part["type"] for part in message["content"]] == ["image", "video", "text"]


def test_plain_text_prompts_count_no_videos():
    from vlm_rl.trainers.video_rows import count_videos

    video = [{"role": "user", "content": [{"type": "video", "video": clip()}, {"type": "text", "text": "Which?"}]}]
    assert count_videos(["A plain-text prompt.", video, [{"role": "user", "content": "Hi."}]]) == [0, 1, 0]


def test_smolvlm_frames_go_after_each_rows_tiles_padded_to_the_larger_size_where_tiles_and_frames_differ():
    from vlm_rl.models.video import merged_frames

    tiles, frames = torch.ones(2, 2, 3, 8, 8), torch.full((1, 3, 3, 4, 6), 2.0)  # rows × tiles; videos × frames
    masks = {"pixel_attention_mask": torch.ones(2, 2, 8, 8), "pixel_attention_mask_videos": torch.ones(1, 3, 4, 6)}
    merged = merged_frames({"pixel_values": tiles, "pixel_values_videos": frames, **masks}, [0, 1])
    assert merged.keys() == {"pixel_values", "pixel_attention_mask"}
    assert merged["pixel_values"].shape == (2, 5, 3, 8, 8)
    assert merged["pixel_values"][1, 2:, :, :4, :6].eq(2).all() and merged["pixel_values"][0, 2:].eq(0).all()
    mask = merged["pixel_attention_mask"]
    assert mask[1, 2:].sum() == 3 * 4 * 6 and mask[0, 2:].sum() == 0


@pytest.mark.parametrize("family", OTHER_VIDEO_FAMILIES)
def test_the_evaluation_shows_the_other_video_families_each_rows_images_and_video(family, tmp_path, load_tiny):
    from vlm_rl.evaluation import evaluate_policy

    write_video(tmp_path / "clip.mp4")
    Image.fromarray(frame(3)).save(tmp_path / "still.png")
    rows = [{"prompt": "Which way?", "videos": ["clip.mp4"]}, {"prompt": "Say hi."},
            {"prompt": "Same bar?", "images": ["still.png"], "videos": ["clip.mp4"]}]  # fmt: skip
    task = load(write_jsonl(tmp_path / "d.jsonl", rows))
    model, processor = load_tiny(family)
    configure_video(processor, num_frames=2)
    task.attach_processor(processor)

    def zero(prompts, completions, **kwargs) -> list[float]:
        return [0.0] * len(prompts)

    records = evaluate_policy(model, processor, task.train, [zero], max_new_tokens=2, batch_size=3)
    assert [record["num_videos"] for record in records] == [1, 0, 1]


def test_vllm_rollouts_refuse_video_rows_of_a_family_whose_video_vllm_does_not_take(load_tiny, tmp_path):
    """vLLM takes the Qwen-VL families' video rows (tests/test_vllm.py); another family's stop before generating."""
    model, processor = load_tiny("llava_onevision")
    rows = mixed_video_rows(video_frames("llava_onevision"))
    trainer = video_trainer(model, processor, tmp_path, rows, video_max_pixels=None)
    trainer.use_vllm = True  # what a vLLM run has; the refusal comes before any engine call
    model.train()
    with pytest.raises(ValueError, match=r"^LLaVA-OneVision video rows do not go through vLLM yet"):
        trainer._generate_and_score_completions(rows)
