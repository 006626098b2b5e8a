"""`benchmarks/step_bench.py`: the whole script on both trainers, ending with its JSON summary, and its `grounding`
and `reasoning` shapes in process (smallest settings): drawn lengths, and token counts that include padding."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_bench.py"
spec = importlib.util.spec_from_file_location("step_bench", SCRIPT)
step_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step_bench)

TINY = ["--hidden_size", "64", "--layers", "2", "--vision_width", "32", "--vision_depth", "1", "--vision_heads", "2"]
TINY += ["--image_size", "56", "--generations", "2", "--warmup", "0", "--steps", "1"]


@pytest.mark.slow  # about 30 s: both trainers in child processes (the in-process shape tests below are the fast ones)
def test_step_bench_runs_and_ends_with_the_ratios():
    tiny = ["--hidden_size", "64", "--layers", "2", "--vision_width", "32", "--vision_depth", "1"]
    tiny += ["--vision_heads", "2", "--image_size", "112", "--generations", "2", "--steps", "1"]
    tiny += ["--completion_length", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), *tiny], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["shape"] == "short"
    assert summary["generations"] == 2 and summary["step_time_ratio"] > 0 and summary["peak_mem_ratio"] > 0
    runs = {run["trainer"]: run for run in summary["runs"]}
    assert runs.keys() == {"stock", "ours"}
    for run in runs.values():  # the rollout is part of the step; every completion is exactly 3 tokens
        assert 0 < run["generation_time_s"] < run["step_time_s"], run
        assert 0 < run["generation_share"] < 1 and run["completion_lengths"] == [3, 3]
    # Ours sends each prompt's image through the vision tower once instead of G = 2 times, in every phase, and runs
    # fewer language-model tokens.
    for phase in ("generation", "scoring"):
        stock, ours = runs["stock"]["tokens_per_step"][phase], runs["ours"]["tokens_per_step"][phase]
        assert ours["vision"] * 2 == stock["vision"] > 0 and ours["images"] * 2 == stock["images"] == 2, phase
        assert ours["language"] < stock["language"], phase


def run_shape(shape: str, directory: Path, *flags: str) -> tuple[dict, dict]:
    """Both trainers' runs in this process (the script runs each in a child process) and the summary."""
    args = step_bench.parse_args(["--shape", shape, *TINY, *flags])
    args.model_dir = str(directory)
    step_bench.build_model(args, directory)
    results, threads = {}, torch.get_num_threads()
    try:
        for trainer in ("stock", "ours"):
            args.trainer = trainer
            results[trainer, args.generations] = step_bench.child(args)
    finally:
        torch.set_num_threads(threads)
    summary = step_bench.summarize(args, results)
    return summary, {run["trainer"]: run for run in summary["runs"]}


def test_grounding_shape_sends_two_images_per_prompt_and_draws_answer_lengths(tmp_path):
    summary, runs = run_shape("grounding", tmp_path, "--min_length", "2", "--max_length", "6")
    assert summary["shape"] == "grounding" and summary["step_time_ratio"] > 0
    draw = step_bench.length_stream("uniform", 2, 6)
    assert runs["stock"]["completion_lengths"] == runs["ours"]["completion_lengths"] == [draw(), draw()]
    # 2 images of 56² per prompt: 4 × 4 patches of 14 pixels each; stock encodes them once per completion (G = 2).
    for phase in ("generation", "scoring"):
        stock, ours = runs["stock"]["tokens_per_step"][phase], runs["ours"]["tokens_per_step"][phase]
        assert stock["images"] == 4 and stock["vision"] == 4 * 16, phase
        assert ours["images"] == 2 and ours["vision"] == 2 * 16, phase


def test_reasoning_shape_counts_the_padding_each_trainer_feeds(tmp_path):
    summary, runs = run_shape("reasoning", tmp_path, "--min_length", "2", "--max_length", "12")
    assert summary["shape"] == "reasoning"
    draw = step_bench.length_stream("lognormal", 2, 12)
    lengths = [draw() for _ in range(4)]  # 2 prompts × G = 2
    assert min(lengths) < max(lengths) and all(2 <= length <= 12 for length in lengths)
    assert runs["stock"]["completion_lengths"] == runs["ours"]["completion_lengths"] == lengths  # EOS at each draw
    stock = runs["stock"]
    real = stock["real_tokens_per_step"]
    assert real["completion"] == sum(lengths) and real["prompt"] % 4 == 0
    prompt = real["prompt"] // 4
    # Stock pads every completion to the longest: in generation it keeps decoding finished rows, in the training
    # forward every row is prompt + longest completion.
    tokens = stock["tokens_per_step"]
    assert tokens["generation"]["language"] == 4 * (prompt + max(lengths) - 1)
    assert tokens["scoring"]["language"] == 4 * (prompt + max(lengths)) > real["prompt"] + real["completion"]
    assert runs["ours"]["tokens_per_step"]["scoring"]["language"] < tokens["scoring"]["language"]


def test_lognormal_lengths_are_long_tailed_within_their_bounds_and_seeded():
    draw = step_bench.length_stream("lognormal", 16, 512)
    lengths = [draw() for _ in range(2000)]
    again = step_bench.length_stream("lognormal", 16, 512)
    assert [again() for _ in range(2000)] == lengths
    assert min(lengths) == 16 and max(lengths) == 512
    median, mean = sorted(lengths)[1000], sum(lengths) / len(lengths)
    assert 80 <= median <= 100 < mean  # median near √(16 · 512) ≈ 90.5; the long tail pulls the mean above it


DOCUMENTED = [
    line.split("step_bench.py", 1)[1].split("#")[0].split()
    for line in (SCRIPT.parents[1] / "docs" / "benchmarks.md").read_text().splitlines()
    if "python benchmarks/step_bench.py" in line  # the commands of its code blocks
]


def test_documented_commands_parse_and_shapes_fill_in_their_flags():
    assert len(DOCUMENTED) >= 4
    shapes = {step_bench.parse_args(argv).shape for argv in DOCUMENTED}  # exits on an unknown flag or value
    assert shapes == {"short", "grounding", "reasoning"}
    grounding = step_bench.parse_args(["--shape", "grounding"])
    assert (grounding.image_size, grounding.images_per_prompt, grounding.lengths) == (896, 2, "uniform")
    reasoning = step_bench.parse_args(["--shape", "reasoning", "--generations", "16", "--max_length", "256"])
    assert (reasoning.prompts, reasoning.generations, reasoning.min_length, reasoning.max_length) == (2, 16, 16, 256)
    assert step_bench.parse_args([]).lengths == "fixed"


GPU_CHECK = SCRIPT.parent / "gpu_check.sh"


def test_the_gpu_check_says_plainly_when_there_is_no_gpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "check": "gpu_check",
        "device": "cuda",
        "error": "no CUDA device: nothing to check here",
    }


@pytest.mark.slow
def test_the_gpu_check_runs_unattended_and_ends_with_one_json_line():
    """The same steps at tiny sizes on the CPU (about 2 minutes): the equivalence of the packed forward, then the
    three shapes for both trainers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["bash", str(GPU_CHECK), "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    settings = report["equivalence"]["packed_attention"]
    assert settings["dense"]["kernel"] == "sdpa" and settings["auto"]["kernel"] == "sdpa_or_block_sparse", settings
    assert all(measured["ok"] for measured in settings.values()), settings
    assert report["shapes"].keys() == {"short", "grounding", "reasoning"}
    for shape, measured in report["shapes"].items():
        assert measured["step_time_ratio"] > 0, (shape, measured)
        for run in measured["runs"].values():
            assert run["step_time_s"] > 0 and run["completion_tokens_per_s"] > 0 and run["mfu"] is None, shape


def test_the_mfu_estimate_counts_six_flops_per_parameter_per_trained_token():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT.parent / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    run = {
        "step_time_s": 2.0,
        "parameters": {"language": 1000, "vision": 100},
        "tokens_per_step": {
            "generation": {"images": 1, "vision": 10, "language": 50},
            "scoring": {"images": 1, "vision": 10, "language": 40},
        },
    }
    # language 1000 × (2·50 + 6·40) + vision 100 × (2·10 + 6·10) = 348,000 FLOPs per 2 s step, over a 1e5 peak.
    assert gpu_check.mfu(run, 1e5) == 1.74
    assert gpu_check.mfu(run, None) is None
