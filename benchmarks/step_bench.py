"""GRPO step time and peak memory: `VLMGRPOTrainer` against stock `trl.GRPOTrainer`, same model, data and seed.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step_bench.py            # G = 8
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step_bench.py --sweep    # G = 2, 4, 8, 16
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step_bench.py --shape reasoning

The model is a Qwen2-VL with random weights built locally (`--hidden_size`, `--layers`, `--vision_*`). `--shape`
picks the data (flags given explicitly override it):

- `short` (default): one synthetic image per prompt resized to `--image_size`² pixels (448 → 256 visual tokens) and a
  short question, each completion exactly `--completion_length` tokens (EOS held off with `min_new_tokens`).
- `grounding`: two 896² images per prompt (1,024 visual tokens each after merging, 4,096 patches into the vision
  tower), answers of 20–60 tokens (uniform).
- `reasoning`: one 448² image, 2 prompts per step, completions of 16–512 tokens from a log-normal whose median is the
  geometric mean of the bounds and whose bounds lie at ±2σ, clipped to them.

Drawn lengths come from a seeded stream, one draw per completion in the order `generate` sees its rows, and a logits
processor forces EOS at the drawn length (and forbids it before): both trainers get the same lengths.
Each trainer runs in its own child process (so neither inherits the other's allocator state), `--warmup` steps then
`--steps` timed steps of `--prompts` prompts × G completions (one micro-batch, plain `generate` rollouts).

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` over the timed steps. On CPU there is no allocator counter;
the child frees large tensors straight back to the OS (`MALLOC_MMAP_THRESHOLD_`), resets the kernel's peak-RSS mark
before the timed steps and reports that peak minus the RSS before the model was loaded: weights, gradients, optimizer
state and the step's activations, as `max_memory_allocated` counts them, without the interpreter and libraries.

Token counts are read by forward hooks from what entered the vision tower (images and patches) and the language model
(rows × positions, padding included) per step, in generation and in the log-prob/training forwards, next to the real
prompt and completion tokens of the step's rows (without padding); "generation" time is the step's time inside the
rollout (`_generate_single_turn`: `generate`, and our prompt prefill), the rest of the step is scoring and training.
The last line of output is one JSON object: the `shape`, `step_time_ratio` and `peak_mem_ratio` (ours / stock) at
the default G, with `--sweep` the same per G, and every run's measurements.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PRESETS = {
    # Layer sizes of Qwen2.5-VL-3B (random weights; the tiny tokenizer's vocabulary, not the real 151k one).
    "qwen2_5_vl_3b": {
        "family": "qwen2_5_vl",
        "hidden_size": 2048,
        "layers": 36,
        "heads": 16,
        "kv_heads": 2,
        "intermediate_size": 11008,
        "vision_depth": 32,
        "vision_width": 1280,
        "vision_heads": 16,
        "vision_intermediate_size": 3420,
        "vision_window": 112,
        "vision_full_attention_blocks": "7,15,23,31",
        "dtype": "bfloat16",
    },
}


SHAPES = {
    "short": {},
    "grounding": {"image_size": 896, "images_per_prompt": 2, "lengths": "uniform", "min_length": 20, "max_length": 60},
    "reasoning": {"prompts": 2, "lengths": "lognormal", "min_length": 16, "max_length": 512},
}
GROUNDING_QUESTION = "Which of these images shows the larger shape? Give its box as [x1, y1, x2, y2]."


def rss_kib(field: str = "VmRSS") -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def length_stream(kind: str, low: int, high: int, seed: int = 0) -> Callable[[], int]:
    """Completion lengths in [low, high], drawn one per call from a stream fixed by `seed`.

    `uniform`: every length equally likely. `lognormal`: the long tail of reasoning completions, with the median at
    the geometric mean of the bounds and the bounds at ±2σ (clipped to them: about 2 % of draws at each bound).
    """
    rng = random.Random(f"step-bench-lengths-{seed}")
    if kind == "uniform":
        return lambda: rng.randint(low, high)
    mu, sigma = (math.log(low) + math.log(high)) / 2, (math.log(high) - math.log(low)) / 4
    return lambda: min(high, max(low, round(rng.lognormvariate(mu, sigma))))


class ForcedLengths:
    """A logits processor that ends each row's completion with EOS at its drawn length: EOS is ruled out before that
    token and is the only choice at it, so the rollout's lengths are the draws whatever the (random) weights say."""

    def __init__(self, prompt_length: int, lengths, eos_token_ids: list[int]):
        self.prompt_length, self.lengths, self.eos_token_ids = prompt_length, lengths, eos_token_ids

    def __call__(self, input_ids, scores):
        position = input_ids.size(1) - self.prompt_length  # the completion token being chosen, from 0
        eos, first_eos = scores.new_zeros(scores.size(1)).bool(), scores.new_zeros(scores.size(1)).bool()
        eos[self.eos_token_ids] = True
        first_eos[self.eos_token_ids[0]] = True
        scores.masked_fill_((position < self.lengths - 1)[:, None] & eos, -math.inf)
        return scores.masked_fill_((position == self.lengths - 1)[:, None] & ~first_eos, -math.inf)


def make_dataset(args, num_rows: int):
    """`num_rows` prompts of `args.images_per_prompt` synthetic `args.image_size`² images each (the shapes task's
    images; with one image its rows as they are)."""
    from datasets import Dataset

    from vlm_rl.data import make_shapes_dataset
    from vlm_rl.data.synthetic import FEATURES

    per_prompt = args.images_per_prompt
    single = make_shapes_dataset(num_rows * per_prompt, image_size=args.image_size, seed=0)
    if per_prompt == 1:
        return single
    rows = [
        {
            "prompt": [{"role": "user", "content": GROUNDING_QUESTION}],
            "images": [image for row in single.select(range(i, i + per_prompt)) for image in row["images"]],
            "answer": "[0, 0, 0, 0]",
            "task": "image",
        }
        for i in range(0, len(single), per_prompt)
    ]
    return Dataset.from_list(rows, features=FEATURES)


def build_model(args, directory: Path) -> None:
    """A Qwen-VL tiny model (real classes, offline tokenizer and processor) resized to the benchmark's layer sizes."""
    import torch
    import transformers

    from vlm_rl.models import build_tiny_model

    with torch.device(args.device):  # the tokenizer, processor and config; its weights are drawn again below
        build_tiny_model(args.family, directory, hidden_size=args.hidden_size, num_hidden_layers=args.layers)
    config = transformers.AutoConfig.from_pretrained(directory)
    text, vision = config.text_config, config.vision_config
    if args.heads:
        text.num_attention_heads = args.heads
        text.num_key_value_heads = args.kv_heads or args.heads
        text.head_dim = args.hidden_size // args.heads
        half = text.head_dim // 2
        text.rope_parameters["mrope_section"] = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    text.intermediate_size = args.intermediate_size or 4 * args.hidden_size
    vision.depth = args.vision_depth
    vision.num_heads = args.vision_heads
    if args.family == "qwen2_vl":
        vision.embed_dim, vision.mlp_ratio = args.vision_width, 4
    else:
        vision.hidden_size = args.vision_width
        vision.intermediate_size = args.vision_intermediate_size or 4 * args.vision_width
        vision.window_size = args.vision_window
        blocks = args.vision_full_attention_blocks
        vision.fullatt_block_indexes = (
            [int(b) for b in blocks.split(",")] if blocks else list(range(args.vision_depth))
        )
    torch.manual_seed(0)
    # On CUDA the random weights are drawn there and saved in the run's dtype: for a 3B preset, seconds instead of
    # minutes of CPU initialisation and half the bytes to write and read back.
    with torch.device(args.device):
        model = transformers.AutoModelForImageTextToText.from_config(config)
    if args.device == "cuda":
        model.to(getattr(torch, args.dtype))
    model.save_pretrained(directory)


def child(args) -> dict:
    """One trainer's timed steps, in this process; returns its measurements."""
    import torch

    torch.set_num_threads(1)
    import vlm_rl  # noqa: F401, I001  (before transformers: makes torchvision's Python side importable, docs/vllm.md)
    import trl
    from transformers import LogitsProcessorList, TrainerCallback

    from vlm_rl.config import VLMGRPOConfig
    from vlm_rl.models.loading import load_model_and_processor
    from vlm_rl.trainers import VLMGRPOTrainer

    cuda = args.device == "cuda"
    baseline = 0 if cuda else rss_kib()
    dtype = args.dtype if cuda else "float32"
    model, processor = load_model_and_processor(args.model_dir, dtype=dtype)
    model.to(args.device)
    side = args.image_size
    processor.image_processor.size = {"shortest_edge": side * side, "longest_edge": side * side}
    dataset = make_dataset(args, args.prompts * (args.warmup + args.steps))
    fixed = args.lengths == "fixed"

    def reward(completions, **kwargs):  # cheap and varied, so that advantages are not all zero
        return [float(len(str(completion)) % 3) for completion in completions]

    settings = {
        "output_dir": tempfile.mkdtemp(),
        "num_generations": args.generations,
        "per_device_train_batch_size": args.prompts * args.generations,
        "max_completion_length": args.completion_length if fixed else args.max_length,
        "generation_kwargs": {"min_new_tokens": args.completion_length} if fixed else {},
        "max_steps": args.warmup + args.steps,
        "learning_rate": 1e-5,
        "bf16": cuda and dtype == "bfloat16",
        "gradient_checkpointing": args.gradient_checkpointing,
        "use_cpu": not cuda,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
    }
    if args.trainer == "stock":
        config, trainer_class = trl.GRPOConfig(**settings), trl.GRPOTrainer
    else:
        switches = args.trainer == "ours"
        config = VLMGRPOConfig(
            **settings, final_eval=False, plot=False, share_prompt_prefix=switches, encode_images_once=switches
        )
        trainer_class = VLMGRPOTrainer

    counts = {phase: {"images": 0, "vision": 0, "language": 0} for phase in ("generation", "scoring")}
    real = {"prompt": 0, "completion": 0}  # the rows' tokens without padding, prompts counted once per completion
    completion_lengths: list[int] = []
    phase = ["scoring"]
    generation_seconds = [0.0]  # the timed steps' time inside `_generate_single_turn` (rollouts, prefill included)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, train_args, state, control, **kwargs):
            if state.global_step == args.warmup:  # the timed steps start: reset the peak marks and counts
                for value in counts.values():
                    value.update(images=0, vision=0, language=0)
                real.update(prompt=0, completion=0)
                completion_lengths.clear()
                generation_seconds[0] = 0.0
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                else:
                    Path("/proc/self/clear_refs").write_text("5")
            self.start = time.perf_counter()

        def on_step_end(self, train_args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    trainer = trainer_class(
        model=model,
        reward_funcs=[reward],
        args=config,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[timer],
    )

    def count_vision(module, hook_args, kwargs):
        patches = hook_args[0] if hook_args else kwargs["hidden_states"]
        grid = hook_args[1] if len(hook_args) > 1 else kwargs["grid_thw"]
        counts[phase[0]]["vision"] += patches.size(0)
        counts[phase[0]]["images"] += grid.size(0)

    def count_language(module, hook_args, kwargs):
        first = kwargs.get("inputs_embeds")
        if first is None:
            first = hook_args[0] if hook_args else kwargs["input_ids"]
        counts[phase[0]]["language"] += first.shape[:2].numel()  # rows × positions: padding counts

    model.model.visual.register_forward_pre_hook(count_vision, with_kwargs=True)
    model.model.language_model.register_forward_pre_hook(count_language, with_kwargs=True)
    draw = None if fixed else length_stream(args.lengths, args.min_length, args.max_length)
    eos_token_ids = trainer.eos_token_ids
    plain_generate = model.generate  # both trainers end in it (ours after its prefill), with keyword arguments

    def generate_with_lengths(**kwargs):
        input_ids, prompt_length = kwargs["input_ids"], kwargs["input_ids"].size(1)
        if draw is not None:
            lengths = torch.tensor([draw() for _ in range(input_ids.size(0))], device=input_ids.device)
            kwargs["logits_processor"] = LogitsProcessorList([ForcedLengths(prompt_length, lengths, eos_token_ids)])
        output = plain_generate(**kwargs)
        completions = output[:, prompt_length:]
        is_eos = torch.isin(completions, torch.tensor(eos_token_ids, device=completions.device))
        ends = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, completions.size(1))
        real["prompt"] += int(kwargs["attention_mask"].sum())
        real["completion"] += int(ends.sum())
        completion_lengths.extend(ends.tolist())
        return output

    model.generate = generate_with_lengths
    generate = trainer._generate_single_turn

    def generate_counted(*generate_args, **kwargs):
        phase[0] = "generation"
        start = time.perf_counter()
        try:
            return generate(*generate_args, **kwargs)
        finally:
            if cuda:
                torch.cuda.synchronize()
            generation_seconds[0] += time.perf_counter() - start
            phase[0] = "scoring"

    trainer._generate_single_turn = generate_counted
    trainer.train()
    timed = timer.times[args.warmup :]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else (rss_kib("VmHWM") - baseline) / 1024
    return {
        "trainer": args.trainer,
        "generations": args.generations,
        "step_time_s": sum(timed) / len(timed),
        "generation_time_s": generation_seconds[0] / len(timed),
        "generation_share": generation_seconds[0] / sum(timed),
        "peak_mem_mib": peak,
        "completion_tokens_per_s": real["completion"] / sum(timed),
        "tokens_per_step": {phase: {k: v // args.steps for k, v in c.items()} for phase, c in counts.items()},
        "real_tokens_per_step": {k: v // args.steps for k, v in real.items()},
        "completion_lengths": completion_lengths,
        "parameters": {  # without embeddings: what each token's forward multiplies by (MFU estimates)
            "language": sum(
                p.numel() for name, p in model.model.language_model.named_parameters() if "embed" not in name
            ),
            "vision": sum(p.numel() for p in model.model.visual.parameters()),
        },
    }


def run_child(args, trainer: str, generations: int) -> dict:
    command = [sys.executable, __file__, "--child", "--trainer", trainer, "--generations", str(generations)]
    keys = ("model_dir", "device", "dtype", "image_size", "images_per_prompt", "prompts", "completion_length")
    for key in (*keys, "lengths", "min_length", "max_length", "warmup", "steps"):
        command += [f"--{key}", str(getattr(args, key))]
    command += ["--gradient_checkpointing"] * args.gradient_checkpointing
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # large tensors come from mmap and go back to the OS when freed
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"The {trainer} run (G={generations}) failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with `--preset` and `--shape` filling in the flags not given explicitly."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="short", choices=list(SHAPES), help="The data of a step (see above).")
    parser.add_argument("--generations", type=int, default=8, help="G, completions per prompt.")
    parser.add_argument("--sweep", action="store_true", help="Also G = 2, 4, 8, 16.")
    parser.add_argument("--ablation", action="store_true", help="Also our trainer with both switches off.")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="Layer sizes of a released model (GPU).")
    parser.add_argument("--family", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=0, help="Attention heads (0: hidden_size / 32).")
    parser.add_argument("--kv_heads", type=int, default=0)
    parser.add_argument("--intermediate_size", type=int, default=0, help="0: 4 × hidden_size.")
    parser.add_argument("--vision_depth", type=int, default=4)
    parser.add_argument("--vision_width", type=int, default=256)
    parser.add_argument("--vision_heads", type=int, default=4)
    parser.add_argument("--vision_intermediate_size", type=int, default=0)
    parser.add_argument("--vision_window", type=int, default=112, help="Qwen2.5-VL window attention size.")
    parser.add_argument("--vision_full_attention_blocks", default="", help="Qwen2.5-VL: e.g. 7,15,23,31 (all).")
    parser.add_argument("--image_size", type=int, default=448, help="Image side in pixels (448: 256 visual tokens).")
    parser.add_argument("--images_per_prompt", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=1, help="Distinct prompts per step.")
    parser.add_argument("--completion_length", type=int, default=32, help="With --lengths fixed.")
    parser.add_argument(
        "--lengths",
        default="fixed",
        choices=["fixed", "uniform", "lognormal"],
        help="fixed: every completion --completion_length tokens; else drawn in [--min_length, --max_length].",
    )
    parser.add_argument("--min_length", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bfloat16", help="Model dtype on CUDA (CPU runs in float32).")
    parser.add_argument(
        "--model_dir", help="Build the model here and keep it (reused when it is there); default: a temporary folder."
    )
    parser.add_argument(
        "--gradient_checkpointing", action="store_true", help="For both trainers (large presets on one GPU)."
    )
    parser.add_argument("--build_only", action="store_true", help="Build the model into --model_dir and stop.")
    parser.add_argument("--trainer", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.child:
        parser.set_defaults(**PRESETS.get(args.preset, {}), **SHAPES[args.shape])
        args = parser.parse_args(argv)
    return args


def ratios(results: dict, generations: int) -> dict[str, float | None]:
    """Ours / stock at `generations`; None where stock's number is not positive (a CPU peak measured inside a process
    that had already been larger, as in the tests' in-process runs: nothing to divide by)."""
    ours, stock = results["ours", generations], results["stock", generations]
    return {
        f"{name}_ratio": round(ours[key] / stock[key], 3) if stock[key] > 0 else None
        for name, key in (("step_time", "step_time_s"), ("peak_mem", "peak_mem_mib"))
    }


def summarize(args, results: dict) -> dict:
    """The last line's JSON object from the runs, keyed by (trainer, G)."""
    sweep = sorted({generations for _, generations in results})
    default = args.generations if args.generations in sweep else sweep[-1]
    summary = {"shape": args.shape, "generations": default, **ratios(results, default)}
    if args.sweep:
        summary["by_generations"] = {str(g): ratios(results, g) for g in sweep}
    summary["runs"] = [results[key] for key in sorted(results, key=lambda key: (key[1], key[0]))]
    return summary


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(args.model_dir or temporary)
        args.model_dir = str(directory)
        if not (directory / "config.json").exists():
            build_model(args, directory)
        if args.build_only:
            print(json.dumps({"model_dir": str(directory)}))
            return
        lengths = (
            f"of {args.completion_length} tokens"
            if args.lengths == "fixed"
            else f"of {args.min_length}–{args.max_length} tokens ({args.lengths})"
        )
        print(
            f"{args.shape} shape, {args.family}: LM hidden {args.hidden_size} × {args.layers} layers, vision "
            f"{args.vision_width} × {args.vision_depth}, {args.images_per_prompt} × {args.image_size}² image(s) per "
            f"prompt, {args.prompts} prompt(s) × G completions {lengths}, {args.device}, {args.steps} timed steps "
            f"after {args.warmup}",
            flush=True,
        )
        trainers = ["stock", "ours"] + ["ours_off"] * args.ablation
        results = {}
        for generations in [2, 4, 8, 16] if args.sweep else [args.generations]:
            for trainer in trainers:
                results[trainer, generations] = run = run_child(args, trainer, generations)
                tokens, real = run["tokens_per_step"], run["real_tokens_per_step"]
                print(
                    f"G={generations:2d} {trainer:8s} step {run['step_time_s']:7.3f} s "
                    f"(generation {run['generation_time_s']:7.3f} s, {run['generation_share']:.0%})   "
                    f"peak {run['peak_mem_mib']:8.1f} MiB   {run['completion_tokens_per_s']:8.1f} completion tok/s   "
                    "images/patches gen/score "
                    f"{tokens['generation']['images']}/{tokens['generation']['vision']} "
                    f"{tokens['scoring']['images']}/{tokens['scoring']['vision']}   LM tokens gen/score "
                    f"{tokens['generation']['language']}/{tokens['scoring']['language']}   real prompt/completion "
                    f"{real['prompt']}/{real['completion']}",
                    flush=True,
                )
    summary = summarize(args, results)
    for generations in sorted({generations for _, generations in results}):
        print(f"G={generations:2d} ours/stock: {ratios(results, generations)}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
