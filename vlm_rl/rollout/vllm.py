"""vLLM rollouts for vision-language models: TRL's vLLM backend with the VLM-specific parts filled in.

TRL 1.16's `VLLMGeneration` (colocate and server) is kept for everything it does right (gathering prompts,
ZeRO-3/PEFT-aware parameter iteration, broadcasting the results); this subclass changes what a VLM needs:

- the engine sees images with the trainer's image-size settings (`mm_processor_kwargs`) and the data's largest number
  of images per row (`limit_mm_per_prompt`), and both sides are checked to expand an image into the same number of
  visual tokens before the first rollout;
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

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list
from PIL import Image
from trl.generation.vllm_client import VLLMClient
from trl.generation.vllm_generation import VLLMGeneration, extract_logprobs

from vlm_rl.config import WEIGHT_TRANSPORTS
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


def group_copies(prompts: list[list[int]], images: list[list | None]) -> list[tuple[int, int]]:
    """(first row, number of rows) for each run of consecutive identical rows."""
    groups: list[tuple[int, int]] = []
    for row, (ids, row_images) in enumerate(zip(prompts, images, strict=True)):
        if groups:
            start, count = groups[-1]
            if same_request(prompts[start], images[start], ids, row_images):
                groups[-1] = (start, count + 1)
                continue
        groups.append((row, 1))
    return groups


def vllm_prompt(ids: list[int], images: list | None) -> dict[str, Any]:
    """A token-id prompt for vLLM, with its images as multi-modal data when it has any."""
    prompt: dict[str, Any] = {"prompt_token_ids": list(ids)}
    if images:
        prompt["multi_modal_data"] = {"image": list(images) if len(images) > 1 else images[0]}
    return prompt


def probe_image() -> Image.Image:
    """An image whose token count depends on the size settings (it is larger than the tiny models' minimum)."""
    return Image.new("RGB", (320, 240), (127, 127, 127))


def trainer_visual_tokens(processor, image_token_id: int, image: Image.Image) -> int:
    """How many image tokens the trainer's processor expands `image` into."""
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}]}], add_generation_prompt=False, tokenize=False
    )
    ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0]
    return int((ids == image_token_id).sum())


class VLMClient(VLLMClient):
    """TRL's vLLM client, reading vLLM 0.32's token-id logprobs, and riding out a server outage.

    `/inference/v1/generate` (prompts with images) reports each logprob entry's token as an integer `token_id`;
    TRL 1.16 (tested against vLLM <= 0.31) reads a `"token_id:<id>"` string under `token` and fails with KeyError.
    With `retry` set, the requests a rollout makes are retried through an outage (`vlm_rl.rollout.server_retry`).
    """

    retry: ServerRetry | None = None

    def image_features(self, images: list[list | None], *args, **kwargs) -> list[dict | None]:
        if self.retry is None:
            return super().image_features(images, *args, **kwargs)
        stand_in = [None] * len(images)
        return self.retry.call("image processing", super().image_features, images, *args, stand_in=stand_in, **kwargs)

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
    """TRL's vLLM generation backend, for rows with zero, one or several images (see the module docstring)."""

    def __init__(
        self,
        *args: Any,
        mm_processor_kwargs: dict[str, Any] | None = None,
        limit_mm_per_prompt: int = 1,
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
        self.mm_processor_kwargs = mm_processor_kwargs or {}
        self.limit_mm_per_prompt = max(1, limit_mm_per_prompt)
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
        if self.image_token_id is not None and self.accelerator.is_main_process:
            self.check_visual_tokens()

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
            limit_mm_per_prompt={"image": self.limit_mm_per_prompt},
        )
        if self.enable_sleep_mode:
            self.llm.sleep(level=2)
        self._llm_weights_sleeping = self.enable_sleep_mode
        self.accelerator.wait_for_everyone()
        return None

    def engine_visual_tokens(self, image: Image.Image) -> int:
        """How many image tokens vLLM expands `image` into, with its own processor and settings."""
        if self.mode == "server":
            features = self.vllm_client.image_features([[image]])[0]
            return int(features["mm_placeholders"]["image"][0]["length"])
        from vllm import SamplingParams

        text = self.processing_class.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}]}], add_generation_prompt=False, tokenize=False
        )
        output = self.llm.generate(
            [{"prompt": text, "multi_modal_data": {"image": image}}],
            sampling_params=SamplingParams(max_tokens=1),
            use_tqdm=False,
        )[0]
        return sum(token == self.image_token_id for token in output.prompt_token_ids)

    def check_visual_tokens(self, image: Image.Image | None = None) -> None:
        """Fail before training when vLLM and the trainer would see an image as different numbers of tokens."""
        image = image or probe_image()
        expected = trainer_visual_tokens(self.processing_class, self.image_token_id, image)
        found = self.engine_visual_tokens(image)
        if found != expected:
            raise ValueError(
                f"vLLM expands a {image.width}x{image.height} image into {found} image tokens, the trainer's "
                f"processor into {expected}: the prompts the trainer sends would not match the images. The trainer "
                "passes "
                f"mm_processor_kwargs={self.mm_processor_kwargs}; a vLLM server must be started with the same "
                "(`vlm-rl vllm-serve --config <the same recipe>` does)."
            )
        logger.info("vLLM and the trainer both expand a %dx%d image into %d tokens.", image.width, image.height, found)

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
        if self.mode == "server":
            result = super().generate(prompts, images, num_generations, profiler)
            if prompts and not result[1]:  # no completions: the main process gave up on the server
                self._stop_if_server_gone()
            return result
        return self._generate_colocated(prompts, images or [None] * len(prompts), profiler)

    def _generate_colocated(self, prompts: list[list[int]], images: list, profiler: Callable | None):
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
        groups = group_copies(prompts, images)
        requests_ = [vllm_prompt(prompts[start], images[start]) for start, _ in groups]
        params = [SamplingParams(n=count, **settings) for _, count in groups]
        with profiler or nullcontext():
            outputs = self.llm.generate(requests_, sampling_params=params, use_tqdm=False)
        prompt_ids = [
            list(out.prompt_token_ids) for out, (_, count) in zip(outputs, groups, strict=True) for _ in range(count)
        ]
        completion_ids = [list(sample.token_ids) for out in outputs for sample in out.outputs]
        logprobs, logprob_token_ids = extract_logprobs(outputs)
        if self.enable_sleep_mode:
            self.llm.sleep(level=2)
            self._llm_weights_sleeping = True
        return prompt_ids, completion_ids, logprobs, logprob_token_ids
