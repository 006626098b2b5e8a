"""vLLM rollouts for vision-language models: TRL's vLLM backend with the VLM-specific parts filled in.

TRL 1.16's `VLLMGeneration` (colocate and server) is kept for everything it does right (gathering prompts,
ZeRO-3/PEFT-aware parameter iteration, broadcasting the results); this subclass changes what a VLM needs:

- the engine sees images and videos with the trainer's size settings (`mm_processor_kwargs`), the data's largest
  number of images per row and room for a video where the data has videos (`limit_mm_per_prompt`); both sides are
  checked to expand an image (and a video) into the same number of visual tokens before the first rollout;
- prompts reach vLLM with their image and video placeholders as the chat template writes them (vLLM 0.32 expands the
  placeholders of a token prompt itself, also ones the trainer's processor expanded already: an image would be there
  twice), and each prompt vLLM expanded must equal the trainer's, token for token;
- a video row's clip reaches vLLM as its sampled frames with the loader's timing (`clip_item`), so vLLM samples no
  frames of its own;
- image/video/vision-marker tokens can never be sampled (`bad_words`: a hard ban, whatever the policy or a
  `logit_bias` says): the next training forward would fail on them;
- colocate sends each distinct prompt once with `n` = its number of copies, so vLLM processes and encodes its images
  once (TRL sends every copy with `n=1`), and text-only rows in a mixed batch carry no image;
- weights are synced with vLLM's in-place `reload_weights` (TRL's `load_weights` path fails on CPU, where linear
  weights are repacked), and the encoder cache is reset with the prefix cache, so no stale image encoding survives an
  update; a server can take the weights through files (`vllm_weight_transport: files`) where NCCL is not available;
- a server that stops answering is waited for, given the weights again when it is back, or given up on with a
  checkpoint (`vlm_rl.rollout.server_retry`).
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from PIL import Image
from transformers.video_utils import VideoMetadata
from trl.generation.vllm_client import VLLMClient, to_openai_messages
from trl.generation.vllm_generation import VLLMGeneration, extract_logprobs

from vlm_rl.config import WEIGHT_TRANSPORTS
from vlm_rl.data import video_counts
from vlm_rl.data.video import FRAMES_FPS, Clip
from vlm_rl.rollout.server_retry import ServerRetry, VLLMServerGone, session_without_connection_retries

logger = logging.getLogger(__name__)


def same_request(ids: list[int], images: list | None, other_ids: list[int], other_images: list | None) -> bool:
    """Whether two rollout rows are the same prompt with the same images (GRPO's copies of one row)."""
    if ids != other_ids or len(images or []) != len(other_images or []):
        return False
    return all(
        a is b or (a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes())
        for a, b in zip(images or [], other_images or [], strict=True)
    )


def same_video(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether two rows hold the same clip (GRPO's copies of a row each decode it again)."""
    return a is b or (a is not None and b is not None and a.shape == b.shape and np.array_equal(a, b))


def group_copies(
    prompts: list[list[int]], images: list[list | None], videos: list[np.ndarray | None] | None = None
) -> list[tuple[int, int]]:
    """(first row, number of rows) for each run of consecutive identical rows (prompt, images and video)."""
    videos = videos or [None] * len(prompts)
    groups: list[tuple[int, int]] = []
    for row, (ids, row_images) in enumerate(zip(prompts, images, strict=True)):
        if groups:
            start, count = groups[-1]
            if same_request(prompts[start], images[start], ids, row_images) and same_video(videos[start], videos[row]):
                groups[-1] = (start, count + 1)
                continue
        groups.append((row, 1))
    return groups


def clip_item(clip: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """A clip as vLLM's video processors take one: its frames and the timing the loader recorded. The frames are
    sampled already (`do_sample_frames: False`), so vLLM keeps them as they are, as the trainer's processor does."""
    frames = np.asarray(clip)
    metadata = getattr(clip, "metadata", None) or VideoMetadata(total_num_frames=len(frames), fps=FRAMES_FPS)
    fps = float(metadata.fps or FRAMES_FPS)
    total = int(metadata.total_num_frames or len(frames))
    indices = [
        int(i) for i in (metadata.frames_indices if metadata.frames_indices is not None else range(len(frames)))
    ]
    return frames, {
        "total_num_frames": total,
        "fps": fps,
        "duration": float(metadata.duration or total / fps),
        "frames_indices": indices,
        "width": int(frames.shape[2]),
        "height": int(frames.shape[1]),
        "video_backend": metadata.video_backend or "frames",
        "do_sample_frames": False,
    }


def vllm_prompt(ids: list[int], images: list | None, video: np.ndarray | None = None) -> dict[str, Any]:
    """A token-id prompt for vLLM, with its images and video as multi-modal data when it has any."""
    prompt: dict[str, Any] = {"prompt_token_ids": list(ids)}
    data: dict[str, Any] = {}
    if images:
        data["image"] = list(images) if len(images) > 1 else images[0]
    if video is not None:
        data["video"] = clip_item(video)
    if data:
        prompt["multi_modal_data"] = data
    return prompt


def unexpanded(ids: list[int], media: Collection[int], start: int | None = None, end: int | None = None) -> list[int]:
    """`ids` with each image or video placeholder as the chat template writes it, before a processor expanded it.

    vLLM 0.32 expands the placeholders of a token prompt itself, also those already expanded (an image of N tokens
    would become 2N - 1). A `start` ... `end` span holding media tokens (nested spans: Qwen3-VL's timed frames)
    becomes `start`, one media token, `end`; elsewhere a run of one media token becomes one.
    """
    out: list[int] = []
    i = 0
    while i < len(ids):
        token = ids[i]
        if start is not None and token == start:
            depth, j = 0, i
            while j < len(ids):
                depth += (ids[j] == start) - (ids[j] == end)
                if depth == 0:
                    break
                j += 1
            inner = [t for t in ids[i + 1 : j] if t in media]
            if inner and j < len(ids):
                out += [start, inner[0], end]
                i = j + 1
                continue
        if token in media:
            while i + 1 < len(ids) and ids[i + 1] == token:
                i += 1
        out.append(token)
        i += 1
    return out


def most_videos_per_row(*datasets: Any) -> int:
    """1 when a row of `datasets` has a video (one video per row), else 0; a dataset that cannot be read ahead
    (streamed) may hold one. Nothing is decoded."""
    for dataset in datasets:
        if dataset is None:
            continue
        if not isinstance(dataset, Dataset) or video_counts(dataset)[0].any():
            return 1
    return 0


def with_video_kwargs(image_kwargs: dict[str, Any], processor) -> dict[str, Any]:
    """vLLM's `mm_processor_kwargs` for the image settings `image_kwargs` and `processor`'s video settings
    (`configure_video`), each scoped to its modality: flat settings (the image size) would apply to videos too, and
    vLLM 0.32 started with flat image settings beside scoped video ones ignores the flat ones. Frames come sampled
    (`clip_item`): vLLM samples none."""
    video_processor = getattr(processor, "video_processor", None)
    if video_processor is None:
        return image_kwargs
    settings = {"size": dict(video_processor.size), "do_sample_frames": False}
    for name in ("cap_pixels_per_frame", "max_video_tokens"):
        if getattr(video_processor, name, None) is not None:
            settings[name] = getattr(video_processor, name)
    return {**image_kwargs, "images_kwargs": dict(image_kwargs), "videos_kwargs": settings}


def probe_image() -> Image.Image:
    """An image whose token count depends on the size settings (it is larger than the tiny models' minimum)."""
    return Image.new("RGB", (320, 240), (127, 127, 127))


def probe_clip() -> Clip:
    """A 4-frame 2-second clip whose token count depends on the video size settings."""
    metadata = VideoMetadata(total_num_frames=8, fps=4.0, width=320, height=240, duration=2.0, video_backend="probe",
                             frames_indices=[0, 2, 4, 6])  # fmt: skip
    return Clip(np.full((4, 240, 320, 3), 127, np.uint8), metadata)


def trainer_visual_tokens(processor, token_id: int, media: Image.Image | np.ndarray, kind: str = "image") -> int:
    """How many `token_id` tokens the trainer's processor expands `media` (an image, or a clip: `kind="video"`)
    into."""
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": kind}]}], add_generation_prompt=False, tokenize=False
    )
    ids = processor(text=[text], **{f"{kind}s": [media]}, return_tensors="pt")["input_ids"][0]
    return int((ids == token_id).sum())


def describe(media: Image.Image | np.ndarray) -> str:
    """An image or clip as the token-count errors name it."""
    if isinstance(media, Image.Image):
        return f"a {media.width}x{media.height} image"
    return f"a {len(media)}-frame {media.shape[2]}x{media.shape[1]} video"


def video_url(clip: np.ndarray) -> tuple[dict, dict]:
    """A clip as an OpenAI message part (its frames, lossless PNG, in vLLM's `video/jpeg` frame-list data URL) and
    the request's `media_io_kwargs` that give vLLM its timing (no frames are sampled again)."""
    frames, metadata = clip_item(clip)
    encoded = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    part = {"type": "video_url", "video_url": {"url": "data:video/jpeg;base64," + ",".join(encoded)}}
    timing = {key: metadata[key] for key in ("fps", "frames_indices", "total_num_frames", "duration")}
    return part, {"video": {"num_frames": -1, **timing}}


class RowMedia(list):
    """A row's images, and its video, as one entry of the image lists TRL's server path gathers and hands to
    `VLMClient.image_features` (TRL 1.16's `VLLMGeneration.generate` knows images only)."""

    video: np.ndarray | None = None

    @classmethod
    def of(cls, images: list | None, video: np.ndarray | None) -> RowMedia:
        row = cls(images or [])
        row.video = video
        return row


class VLMClient(VLLMClient):
    """TRL's vLLM client, reading vLLM 0.32's token-id logprobs, and riding out a server outage.

    `/inference/v1/generate` (prompts with images) reports each logprob entry's token as an integer `token_id`;
    TRL 1.16 (tested against vLLM <= 0.31) reads a `"token_id:<id>"` string under `token` and fails with KeyError.
    With `retry` set, the requests a rollout makes are retried through an outage (`vlm_rl.rollout.server_retry`).
    """

    retry: ServerRetry | None = None

    def image_features(self, images: list[list | None], *args, **kwargs) -> list[dict | None]:
        if self.retry is None:
            return self._media_features(images, *args, **kwargs)
        stand_in = [None] * len(images)
        return self.retry.call("image processing", self._media_features, images, *args, stand_in=stand_in, **kwargs)

    def _media_features(self, rows: list[list | None], max_concurrent_requests: int = 64) -> list[dict | None]:
        """TRL's `image_features`, for rows that may also hold a video (`RowMedia`)."""
        if not any(getattr(row, "video", None) is not None for row in rows):
            return super().image_features(rows, max_concurrent_requests)
        from concurrent.futures import ThreadPoolExecutor  # lazy: server mode only

        def send(row: list | None) -> dict | None:
            video = getattr(row, "video", None)
            return self.render(list(row or []), video)["features"] if row or video is not None else None

        with ThreadPoolExecutor(max_workers=min(max_concurrent_requests, len(rows))) as executor:
            return list(executor.map(send, rows))

    def render(self, images: list[Image.Image], video: np.ndarray | None = None) -> dict:
        """The server's processing of one prompt's images and video (`/v1/chat/completions/render`, as TRL's
        `image_features` calls it): its token ids and features."""
        (message,) = to_openai_messages([{"role": "user", "content": [{"type": "image", "image": i} for i in images]}])
        body: dict[str, Any] = {"model": self.model, "max_tokens": 1}
        if video is not None:
            part, body["media_io_kwargs"] = video_url(video)
            message["content"].append(part)
        response = self.session.post(
            f"{self.base_url}/v1/chat/completions/render", json={**body, "messages": [message]}
        )
        if response.status_code == 404:
            raise RuntimeError(
                f"The vLLM server at {self.base_url} does not serve `/v1/chat/completions/render`, which multimodal "
                "prompts use; start it with `vlm-rl vllm-serve` (which passes `--enable-scale-out`)."
            )
        if response.status_code != 200:
            raise RuntimeError(f"vLLM server request {self.base_url}/v1/chat/completions/render failed: "
                               f"{response.status_code} {response.text[:500]}")  # fmt: skip
        return response.json()

    def generate(self, *args, **kwargs) -> dict:
        if self.retry is None:
            return super().generate(*args, **kwargs)
        # Given up on: no completions, which every process sees after TRL's broadcast (`VLMRollout.generate`).
        stand_in = {"prompt_ids": [], "completion_ids": [], "logprobs": None, "logprob_token_ids": None}
        return self.retry.call("generation", super().generate, *args, stand_in=stand_in, **kwargs)

    def _post(self, url: str, **kwargs) -> dict:
        body = super()._post(url, **kwargs)
        for choice in body.get("choices", []) if isinstance(body, dict) else []:
            for entry in (choice.get("logprobs") or {}).get("content", []):
                for item in (entry, *entry.get("top_logprobs", [])):
                    if "token" not in item and "token_id" in item:
                        item["token"] = f"token_id:{item['token_id']}"
        return body


class VLMRollout(VLLMGeneration):
    """TRL's vLLM generation backend, for rows with zero, one or several images and at most one video (see the
    module docstring)."""

    # The batch's videos, one entry per prompt (None: no video), while the trainer generates (`videos`).
    _videos: list[np.ndarray | None] | None = None

    def __init__(
        self,
        *args: Any,
        mm_processor_kwargs: dict[str, Any] | None = None,
        limit_mm_per_prompt: int = 1,
        video_limit: int = 0,
        banned_tokens: list[str] | None = None,
        image_token_id: int | None = None,
        weight_transport: str = "auto",
        weights_dir: str | None = None,
        dtype: str = "auto",
        server_retry_timeout: float = 300.0,
        **kwargs: Any,
    ):
        if weight_transport not in WEIGHT_TRANSPORTS:
            raise ValueError(f"vllm_weight_transport must be one of {WEIGHT_TRANSPORTS}, got {weight_transport!r}.")
        self.mm_processor_kwargs = dict(mm_processor_kwargs or {})
        if video_limit:
            self.mm_processor_kwargs = with_video_kwargs(self.mm_processor_kwargs, kwargs.get("processing_class"))
        self.limit_mm_per_prompt = max(1, limit_mm_per_prompt)
        self.video_limit = video_limit
        self.image_token_id = image_token_id
        self.dtype = dtype
        self.weights_dir = weights_dir
        self.server_retry_timeout = server_retry_timeout
        accelerator = kwargs.get("accelerator") or args[1]
        if weight_transport == "auto":
            weight_transport = "nccl" if accelerator.device.type == "cuda" else "files"
        self.weight_transport = weight_transport
        generation_kwargs = dict(kwargs.get("generation_kwargs") or {})
        # A hard ban (-inf logit), applied after any `logit_bias`; each token string is one id for the tokenizer.
        generation_kwargs["bad_words"] = sorted({*generation_kwargs.get("bad_words", []), *(banned_tokens or [])})
        kwargs["generation_kwargs"] = generation_kwargs
        super().__init__(*args, **kwargs)
        config = self.model.config
        self.video_token_id = getattr(config, "video_token_id", None) if video_limit else None
        tokens = {"image": self.image_token_id, "video": self.video_token_id}
        self.media_tokens = {kind: token for kind, token in tokens.items() if token is not None}
        self.vision_markers = (
            getattr(config, "vision_start_token_id", None),
            getattr(config, "vision_end_token_id", None),
        )
        if self.image_token_id is not None and self.accelerator.is_main_process:
            self.check_visual_tokens()

    @property
    def limits(self) -> dict[str, int]:
        """vLLM's `limit_mm_per_prompt`: video only where the data has videos (vLLM sets memory aside for each)."""
        return {"image": self.limit_mm_per_prompt, **({"video": self.video_limit} if self.video_limit else {})}

    @contextlib.contextmanager
    def videos(self, clips: list[np.ndarray | None] | None) -> Iterator[None]:
        """Inside, `generate` sends each prompt its clip (`clips`: one entry per prompt, None for a row without)."""
        self._videos = clips
        try:
            yield
        finally:
            self._videos = None

    # ----------------------------------------------------------------------------------------------- start-up
    def _init_vllm(self):
        if self.mode == "server":
            base_url = self.server_base_url or f"http://{self.server_host}:{self.server_port}"
            # Over NCCL the weights cannot be sent by the main process alone, from inside a step.
            resync = self._reload_synced_weights if self.weight_transport == "files" else None
            self.server_retry = ServerRetry(base_url, self.server_retry_timeout, resync)
            if self.accelerator.is_main_process:
                self.vllm_client = VLMClient(
                    base_url=base_url, group_port=self.group_port, connection_timeout=self.server_timeout
                )
                session_without_connection_retries(self.vllm_client.session, pool_size=64)
                self.vllm_client.retry = self.server_retry
                if self.weight_transport == "nccl":
                    self.vllm_client.init_communicator(device=self.accelerator.device)
            self.accelerator.wait_for_everyone()
            return None
        if self.mode != "colocate" or self.tensor_parallel_size > 1:
            raise ValueError(
                "vlm-rl's vLLM rollouts support `vllm_mode: colocate` with `vllm_tensor_parallel_size: 1`, and "
                f"`vllm_mode: server`; got mode {self.mode!r}, tensor parallel size {self.tensor_parallel_size}."
            )
        from vllm import LLM

        # As TRL builds it (vllm_generation.py, colocate), plus the image settings and the weights dtype.
        os.environ["RANK"] = str(self.accelerator.process_index)
        os.environ["LOCAL_RANK"] = str(self.accelerator.local_process_index)
        os.environ["WORLD_SIZE"] = str(self.accelerator.num_processes)
        from trl.trainer.utils import ensure_master_addr_port

        ensure_master_addr_port()
        self.llm = LLM(
            model=self.model.name_or_path,
            dtype=self.dtype,
            tensor_parallel_size=1,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_length,
            max_num_seqs=self.max_num_seqs,
            enable_sleep_mode=self.enable_sleep_mode,
            model_impl=self.model_impl,
            distributed_executor_backend="external_launcher",
            seed=self.accelerator.process_index,
            max_num_batched_tokens=4096,
            logprobs_mode="processed_logprobs",
            trust_remote_code=self.trust_remote_code,
            mm_processor_kwargs=self.mm_processor_kwargs or None,
            limit_mm_per_prompt=self.limits,
        )
        if self.enable_sleep_mode:
            self.llm.sleep(level=2)
        self._llm_weights_sleeping = self.enable_sleep_mode
        self.accelerator.wait_for_everyone()
        return None

    def engine_visual_tokens(self, media: Image.Image | np.ndarray, kind: str = "image") -> int:
        """How many image (`kind="video"`: video) tokens vLLM expands `media` into, with its own processor and
        settings."""
        if self.mode == "server":
            row = RowMedia.of([media], None) if kind == "image" else RowMedia.of([], media)
            features = self.vllm_client.image_features([row])[0]
            return int(features["mm_placeholders"][kind][0]["length"])
        from vllm import SamplingParams

        text = self.processing_class.apply_chat_template(
            [{"role": "user", "content": [{"type": kind}]}], add_generation_prompt=False, tokenize=False
        )
        item = media if kind == "image" else clip_item(media)
        output = self.llm.generate(
            [{"prompt": text, "multi_modal_data": {kind: item}}],
            sampling_params=SamplingParams(max_tokens=1),
            use_tqdm=False,
        )[0]
        return sum(token == self.media_tokens[kind] for token in output.prompt_token_ids)

    def check_visual_tokens(self, image: Image.Image | None = None, clip: np.ndarray | None = None) -> None:
        """Fail before training when vLLM and the trainer would see an image (or, with videos in the data, a video)
        as different numbers of tokens."""
        probes = [("image", image if image is not None else probe_image())]
        if "video" in self.media_tokens:
            probes.append(("video", clip if clip is not None else probe_clip()))
        for kind, media in probes:
            expected = trainer_visual_tokens(self.processing_class, self.media_tokens[kind], media, kind)
            found = self.engine_visual_tokens(media, kind)
            if found != expected:
                raise ValueError(
                    f"vLLM expands {describe(media)} into {found} {kind} tokens, the trainer's processor into "
                    f"{expected}: the prompts the trainer sends would not match the {kind}s. The trainer passes "
                    f"mm_processor_kwargs={self.mm_processor_kwargs}; a vLLM server must be started with the same "
                    "(`vlm-rl vllm-serve --config <the same recipe>` does)."
                )
            logger.info("vLLM and the trainer both expand %s into %d tokens.", describe(media), found)

    def engine_prompt(self, ids: list[int]) -> list[int]:
        """`ids` (expanded by the trainer's processor) with its placeholders as vLLM expects them (`unexpanded`)."""
        return unexpanded(ids, set(self.media_tokens.values()), *self.vision_markers)

    def check_engine_prompt(self, row: int, trainer_ids: list[int], engine_ids: list[int]) -> None:
        """Fail when vLLM expanded a prompt's images or video into other tokens than the trainer's processor did:
        the completion would be sampled for another prompt than the one trained on."""
        if list(engine_ids) == list(trainer_ids):
            return

        def counts(ids: list[int]) -> str:
            return ", ".join(f"{sum(t == token for t in ids)} {kind}" for kind, token in self.media_tokens.items())

        raise ValueError(
            f"vLLM expanded the prompt of row {row} into {len(engine_ids)} tokens ({counts(engine_ids)} tokens), "
            f"the trainer's processor into {len(trainer_ids)} ({counts(trainer_ids)}): vLLM would sample for another "
            f"prompt than the one trained on. The trainer passes mm_processor_kwargs={self.mm_processor_kwargs}; "
            "its image and video settings must be ones vLLM's processor for this model applies (docs/vllm.md)."
        )

    def _place_features(self, features: dict | None, prompt_ids: list[int]) -> dict | None:
        """TRL's placement of the server's features at the prompt's image tokens, for video tokens too.

        Each image or video is one run of its token in the prompt (Qwen2-VL, Qwen2.5-VL). Qwen3-VL's timed video
        frames are runs of their own, which vLLM 0.32's generate endpoint cannot take as one video (it receives
        offsets and lengths only).
        """
        if features is None:
            return None
        placed = {}
        for kind, ranges in features["mm_placeholders"].items():
            token = self.media_tokens.get(kind)
            runs: list[dict[str, int]] = []
            for offset, value in enumerate(prompt_ids):
                if value != token:
                    continue
                if runs and runs[-1]["offset"] + runs[-1]["length"] == offset:
                    runs[-1]["length"] += 1
                else:
                    runs.append({"offset": offset, "length": 1})
            if len(runs) != len(ranges) or [r["length"] for r in runs] != [r["length"] for r in ranges]:
                raise ValueError(
                    f"The prompt holds {len(runs)} runs of {kind} tokens ({[r['length'] for r in runs]} tokens) where "
                    f"the vLLM server processed {len(ranges)} {kind}(s) of {[r['length'] for r in ranges]} tokens; "
                    "start the server with `vlm-rl vllm-serve --config <the same recipe>`"
                    + (
                        ", or use vllm_mode: colocate (one video's frames are separate runs)"
                        if kind == "video"
                        else ""
                    )
                    + "."
                )
            placed[kind] = runs
        return {**features, "mm_placeholders": {**features["mm_placeholders"], **placed}}

    # ------------------------------------------------------------------------------------------ weight sync
    def sync_weights(self):
        if self.mode == "server" and self.weight_transport == "nccl":
            return super().sync_weights()
        if self.mode == "server":
            return self._sync_through_files()
        if self.enable_sleep_mode:
            from trl.generation.vllm_generation import empty_cache

            empty_cache()
            self.llm.wake_up(tags=["weights"])
            self._llm_weights_sleeping = False
        # Streams the (gathered, PEFT-merged) parameters straight into vLLM's in-place reload.
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": self._iter_named_params(), "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        return None

    def _sync_through_files(self) -> None:
        """Write the policy's weights as safetensors where the server can read them, and have it reload them.

        Every process walks the parameters (gathering them is a collective under ZeRO-3); the main process writes.
        The directory must be visible to the server (the same machine, or a shared file system).
        """
        from safetensors.torch import save_file

        main = self.accelerator.is_main_process
        state = {}
        for name, param in self._iter_named_params():
            if main:
                state[name] = param.detach().to("cpu", copy=True).contiguous()
        if main:
            directory = self._weights_directory()
            directory.mkdir(parents=True, exist_ok=True)
            partial = directory / "model.safetensors.partial"
            save_file(state, str(partial))
            partial.replace(directory / "model.safetensors")
            self.server_retry.call("weight sync", self._reload_synced_weights, stand_in=None)
        del state
        self._stop_if_server_gone()  # every process waits here for the main one's sync

    def _weights_directory(self) -> Path:
        return Path(self.weights_dir or "vllm_weights").resolve()

    def _reload_synced_weights(self) -> None:
        """Have the server load the weights last written to the weights directory, and forget what it cached."""
        base_url = self.vllm_client.base_url
        directory = self._weights_directory()
        self._post(
            f"{base_url}/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(directory)}}
        )
        self._post(f"{base_url}/reset_prefix_cache")
        self._post(f"{base_url}/reset_encoder_cache")

    def _stop_if_server_gone(self) -> None:
        """Raise `VLLMServerGone` on every process if the main one gave up on the server (a collective)."""
        gone = self.server_retry.gone if self.accelerator.is_main_process else None
        reason = [gone.reason if gone is not None else None]
        broadcast_object_list(reason, from_process=0)
        if reason[0] is not None:
            raise VLLMServerGone(reason[0])

    @staticmethod
    def _post(url: str, body: dict | None = None) -> None:
        import requests  # installed with vLLM

        response = requests.post(url, json=body, timeout=600)
        if response.status_code == 404:
            raise RuntimeError(
                f"The vLLM server does not serve {url}; start it with `vlm-rl vllm-serve` (which sets "
                "VLLM_SERVER_DEV_MODE=1), or `vllm serve` with VLLM_SERVER_DEV_MODE=1 in its environment."
            )
        if response.status_code != 200:
            raise RuntimeError(f"vLLM server request {url} failed: {response.status_code} {response.text[:500]}")

    # ------------------------------------------------------------------------------------------- generation
    def generate(self, prompts, images, num_generations, profiler=None):
        # The trainer marks image-less rows with an empty list; TRL's backend expects None there.
        images = [row or None for row in images] if images is not None else None
        videos = self._videos
        if self.mode == "server":
            if videos is not None:  # TRL's server path gathers and sends images only: each row's video rides along
                images = [
                    RowMedia.of(row, video) for row, video in zip(images or [None] * len(prompts), videos, strict=True)
                ]
            result = super().generate(prompts, images, num_generations, profiler)
            if prompts and not result[1]:  # no completions: the main process gave up on the server
                self._stop_if_server_gone()
            return result
        return self._generate_colocated(prompts, images or [None] * len(prompts), videos, profiler)

    def _generate_colocated(
        self, prompts: list[list[int]], images: list, videos: list | None, profiler: Callable | None
    ):
        from contextlib import nullcontext

        from vllm import SamplingParams

        if self.enable_sleep_mode and self._llm_weights_sleeping:
            self.sync_weights()
        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["kv_cache"])
        settings = {
            "repetition_penalty": self.repetition_penalty,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": 0.0 if self.min_p is None else self.min_p,
            "max_tokens": self.max_completion_length,
            "logprobs": self.logprobs,
            **self.generation_kwargs,
        }
        if self.structured_outputs_regex is not None:
            from vllm.sampling_params import StructuredOutputsParams

            settings["structured_outputs"] = StructuredOutputsParams(regex=self.structured_outputs_regex)
        videos = videos or [None] * len(prompts)
        groups = group_copies(prompts, images, videos)
        requests_ = [
            vllm_prompt(self.engine_prompt(prompts[start]), images[start], videos[start]) for start, _ in groups
        ]
        params = [SamplingParams(n=count, **settings) for _, count in groups]
        with profiler or nullcontext():
            outputs = self.llm.generate(requests_, sampling_params=params, use_tqdm=False)
        for out, (start, _) in zip(outputs, groups, strict=True):
            self.check_engine_prompt(start, prompts[start], out.prompt_token_ids)
        prompt_ids = [
            list(out.prompt_token_ids) for out, (_, count) in zip(outputs, groups, strict=True) for _ in range(count)
        ]
        completion_ids = [list(sample.token_ids) for out in outputs for sample in out.outputs]
        logprobs, logprob_token_ids = extract_logprobs(outputs)
        if self.enable_sleep_mode:
            self.llm.sleep(level=2)
            self._llm_weights_sleeping = True
        return prompt_ids, completion_ids, logprobs, logprob_token_ids
