"""Video rows: the default install decodes and processes them, the loader decodes a row's clip lazily (a file through
transformers' `load_video` with PyAV, or a list of frames), bad clips are named or skipped and counted, and the
Qwen-VL families train on batches mixing text-only, image and video rows.

Clips are tiny and written by each test: 8 frames of 56×56, a bar growing left to right.
"""

import json

import av
import numpy as np
import pytest
from PIL import Image

from vlm_rl.config import DataArguments
from vlm_rl.data import DataError, load_task
from vlm_rl.data.video import Clip
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
