"""The one-shot GPU check: equivalence on the GPU, then `step_bench` at Qwen2.5-VL-3B sizes in the three shapes.

    bash benchmarks/gpu_check.sh        # one CUDA GPU, unattended, about 8 minutes; the last line is one JSON object

1. Equivalence (`equivalence`): a tiny Qwen2-VL on the device, fp32, a GRPO batch of 3 prompts × 3 completions of
   different lengths; the packed (shared-prompt) log-prob forward with images encoded once against the plain forward:
   the largest log-prob difference and the largest gradient difference relative to the gradient's norm, with each
   attention kernel of the packed forward that runs on this device.
2. `step_bench.py --preset qwen2_5_vl_3b` (random weights, bf16, gradient checkpointing for both trainers) in the
   `short`, `grounding` and `reasoning` shapes, each under its own time limit; per trainer and shape: step time,
   completion tokens per second, `max_memory_allocated`, and an MFU estimate: 2 FLOPs per parameter per token
   forward and 4 more backward, over the language model's and the vision tower's tokens as the benchmark counted
   them (padding included; attention's own FLOPs left out), per second, over the GPU's dense bf16 peak.

A part that fails or runs out of time is reported with its error and the rest goes on. With `--device cpu` the same
runs at tiny sizes (the test suite checks the script that way).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Seconds each part may take on one H100: 8 minutes in all, at most.
LIMITS = {"build": 80, "equivalence": 90, "short": 80, "grounding": 100, "reasoning": 130}
# Dense bf16 peak FLOP/s (no sparsity) by device name.
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
TINY = ["--hidden_size", "64", "--layers", "2", "--vision_width", "32", "--vision_depth", "1", "--vision_heads", "2"]
TINY += ["--image_size", "56", "--generations", "2", "--warmup", "0", "--steps", "1", "--max_length", "24"]


def equivalence(device: str) -> dict:
    """Packed against plain log-probs and gradients of a tiny Qwen2-VL on `device`, per `packed_attention`."""
    return {
        "device": torch_device_name(device),
        "packed_attention": {setting: packed_against_plain(device, setting) for setting in ("dense", "auto")},
    }


def torch_device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def packed_against_plain(device: str, packed_attention: str) -> dict:
    """The packed forward's largest differences from the plain one, and the attention kernel it ran on."""
    import torch

    import vlm_rl  # noqa: F401  (before transformers: torchvision's Python side, see docs/vllm.md)
    from vlm_rl.config import VLMGRPOConfig
    from vlm_rl.data import make_shapes_dataset
    from vlm_rl.models import build_tiny_model
    from vlm_rl.models.loading import load_model_and_processor
    from vlm_rl.trainers import VLMGRPOTrainer

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true fp32 on the GPU too
    directory = Path(tempfile.mkdtemp())
    build_tiny_model("qwen2_vl", directory)
    model, processor = load_model_and_processor(str(directory), dtype="float32")
    rows = list(make_shapes_dataset(3, seed=3))
    config = VLMGRPOConfig(
        output_dir=tempfile.mkdtemp(),
        num_generations=3,
        per_device_train_batch_size=9,
        max_completion_length=8,
        use_cpu=device == "cpu",
        bf16=False,  # fp32 throughout: the tolerances are fp32's
        packed_attention=packed_attention,
        report_to=[],
        final_eval=False,
        plot=False,
        seed=0,
    )
    trainer = VLMGRPOTrainer(
        model=model,
        reward_funcs=[lambda completions, **kwargs: [0.0] * len(completions)],
        args=config,
        train_dataset=make_shapes_dataset(9, seed=3),
        processing_class=processor,
    )
    model = trainer.model
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([row for row in rows for _ in range(3)])
    width = batch["completion_ids"].size(1)
    lengths = torch.tensor([random.Random(i).randint(1, width) for i in range(9)], device=batch["prompt_ids"].device)
    completion_mask = (torch.arange(width, device=lengths.device)[None] < lengths[:, None]).long()
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], completion_mask], dim=1)
    keys = (*trainer.adapter.image_keys, *trainer.adapter.row_keys, "num_images")
    inputs = {key: batch[key] for key in keys if batch.get(key) is not None}

    def score(shared: bool) -> tuple[torch.Tensor, dict]:
        trainer.options = dataclasses.replace(trainer.options, share_prompt_prefix=shared, encode_images_once=shared)
        model.zero_grad()
        logps, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, width, **inputs)
        (logps * completion_mask).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return (logps * completion_mask).detach(), grads

    plain_logps, plain_grads = score(False)
    kernel = getattr(model.config.get_text_config(), "_attn_implementation", None)
    logps, grads = score(True)
    with torch.no_grad():  # the old/reference passes: under the block mask wherever flex runs (CPU too)
        no_grad_logps, _, _ = trainer._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, width, **inputs
        )
    no_grad_diff = float((no_grad_logps * completion_mask - plain_logps).abs().max())
    # As tests/test_sharing.py checks them: |difference| <= 1e-4 |gradient| + 1e-7 (some exact gradients are zero).
    errors = {name: float((grad - plain_grads[name]).norm()) for name, grad in grads.items()}
    sizes = {name: float(plain_grads[name].norm()) for name in grads}
    return {
        "kernel": kernel,
        "max_logp_diff": float((logps - plain_logps).abs().max()),
        "max_logp_diff_without_gradients": no_grad_diff,
        "max_grad_rel_diff": max(errors[name] / sizes[name] for name in grads if sizes[name] > 1e-6),
        "ok": bool((logps - plain_logps).abs().max() <= 1e-5 and no_grad_diff <= 1e-5)
        and all(errors[name] <= 1e-4 * sizes[name] + 1e-7 for name in grads),
    }


def mfu(run: dict, peak: float | None) -> float | None:
    """Model FLOPs per second over the device's peak (see the module docstring)."""
    if not peak:
        return None
    tokens, parameters = run["tokens_per_step"], run["parameters"]
    per_step = sum(
        parameters[part] * (2 * tokens["generation"][key] + 6 * tokens["scoring"][key])
        for part, key in (("language", "language"), ("vision", "vision"))
    )
    return round(per_step / run["step_time_s"] / peak, 4)


def last_json(command: list[str], limit: float) -> dict:
    """The JSON object on the last line `command` prints, or {"error": ...} where it fails or runs past `limit`."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"ran past its {limit:.0f} s"}
    if result.returncode != 0:
        return {"error": (result.stderr or result.stdout)[-800:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def step_bench(device: str, model_dir: Path, *flags: str) -> list[str]:
    sizes = ["--preset", "qwen2_5_vl_3b", "--gradient_checkpointing"] if device == "cuda" else TINY
    command = [sys.executable, str(HERE / "step_bench.py"), "--device", device, *sizes, *flags]
    return command + ["--model_dir", str(model_dir)]


def bench(shape: str, device: str, model_dir: Path, peak: float | None) -> dict:
    """One `step_bench.py` run (both trainers) in `shape`; its ratios, each run with tokens/s, memory and MFU."""
    steps = ["--warmup", "1", "--steps", "1" if shape == "reasoning" else "2"] if device == "cuda" else []
    summary = last_json(step_bench(device, model_dir, "--shape", shape, *steps), LIMITS[shape])
    if "error" in summary:
        return summary
    runs = {}
    for run in summary["runs"]:
        runs[run["trainer"]] = {
            "step_time_s": round(run["step_time_s"], 3),
            "completion_tokens_per_s": round(run["completion_tokens_per_s"], 1),
            "max_memory_allocated_mib": round(run["peak_mem_mib"], 1),
            "mfu": mfu(run, peak),
            "tokens_per_step": run["tokens_per_step"],
        }
    return {"step_time_ratio": summary["step_time_ratio"], "peak_mem_ratio": summary["peak_mem_ratio"], "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--equivalence_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.equivalence_only:  # in a child process: a CUDA failure there cannot take the benchmarks down with it
        print(json.dumps(equivalence(args.device)))
        return
    start = time.monotonic()
    report: dict = {"check": "gpu_check", "device": args.device}
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(json.dumps({**report, "error": "no CUDA device: nothing to check here"}))
            return
        name = torch.cuda.get_device_name()
        report |= {"gpu": name, "torch": torch.__version__}
        peak = next((value for key, value in PEAKS.items() if key in name), None)
    else:
        peak = None
    report["peak_bf16_flops"] = peak
    command = [sys.executable, __file__, "--device", args.device, "--equivalence_only"]
    report["equivalence"] = last_json(command, LIMITS["equivalence"])
    print(f"equivalence: {json.dumps(report['equivalence'])[:300]}", flush=True)
    with tempfile.TemporaryDirectory() as directory:
        model_dir = Path(directory) / "model"
        built = last_json(step_bench(args.device, model_dir, "--build_only"), LIMITS["build"])
        report["shapes"] = {}
        for shape in ("short", "grounding", "reasoning"):
            report["shapes"][shape] = bench(shape, args.device, model_dir, peak) if "error" not in built else built
            print(f"{shape}: {json.dumps(report['shapes'][shape])[:300]}", flush=True)
    report["minutes"] = round((time.monotonic() - start) / 60, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
