"""Start-up time of training from a large local dataset: a JSON Lines file of N rows, each pointing at a PNG.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/data_startup.py --rows 20000

Writes the rows and one PNG per row (a shape of `synthetic:shapes`) to a temporary directory, then trains
`tiny:qwen2_vl` for `--steps` steps through `vlm_rl.train.run` and prints:

- the up-front data checks (`load_task`: read the file, check columns, one stat per image path),
- time from the start of `run` to the end of the first optimizer step, and to the end of the run,
- how many rows the loader built (and so decoded) against the dataset's size,
- for scale, what decoding every image up front would have cost.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from PIL import Image

import vlm_rl.train  # before transformers: vlm_rl sets up processors without torchvision

# isort: split
from transformers import TrainerCallback

from vlm_rl.config import DataArguments, ModelArguments, RewardArguments, VLMGRPOConfig
from vlm_rl.data import LazyRows, load_task
from vlm_rl.data.synthetic import COLORS, SHAPES, draw_shape


def write_dataset(directory: Path, rows: int, image_size: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    (directory / "images").mkdir(parents=True)
    with open(directory / "train.jsonl", "w") as f:
        for i in range(rows):
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            draw_shape(shape, color, image_size, rng).save(directory / "images" / f"{i}.png")
            record = {"question": "What color is the shape?", "image": f"images/{i}.png", "label": color}
            f.write(json.dumps(record) + "\n")
    return directory / "train.jsonl"


class FirstStep(TrainerCallback):
    """Records when the first optimizer step ends."""

    at: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if FirstStep.at is None:
            FirstStep.at = time.perf_counter()


class TimedTrainer(vlm_rl.train.VLMGRPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(FirstStep())


def main() -> None:
    parser = argparse.ArgumentParser(description="Start-up time of training from a large local jsonl dataset.")
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=56, help="side of the square PNGs, in pixels")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        path = write_dataset(tmp / "data", args.rows, args.image_size)
        image_paths = sorted((tmp / "data" / "images").iterdir())
        print(f"wrote {args.rows} rows, {len(image_paths)} PNG files of {args.image_size}x{args.image_size} pixels: "
              f"{time.perf_counter() - start:.1f} s (not part of the timings)")  # fmt: skip

        data_args = DataArguments(
            dataset=str(path), column_mapping={"label": "answer"}, prompt_template="{question}", eval_size=0
        )
        start = time.perf_counter()
        task = load_task(data_args, seed=0)
        print(f"load_task (read {len(task.train)} rows, check columns, stat every image path): "
              f"{time.perf_counter() - start:.2f} s")  # fmt: skip

        built = []
        load = LazyRows._load
        LazyRows._load = lambda self, row, cache: built.append(row["_row_id"]) or load(self, row, cache)
        vlm_rl.train.VLMGRPOTrainer = TimedTrainer
        training_args = VLMGRPOConfig(
            output_dir=str(tmp / "run"), max_steps=args.steps, num_generations=2, per_device_train_batch_size=4,
            max_completion_length=4, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
            save_strategy="no", logging_steps=1, disable_tqdm=True, final_eval=False, plot=False,
        )  # fmt: skip
        start = time.perf_counter()
        vlm_rl.train.run(
            ModelArguments(model_name_or_path="tiny:qwen2_vl", dtype="float32"),
            data_args,
            RewardArguments(reward_funcs=["accuracy"]),
            training_args,
        )
        end = time.perf_counter()
        print(f"run: start to end of first optimizer step: {FirstStep.at - start:.2f} s")
        print(f"run: start to end ({args.steps} steps, model saved): {end - start:.2f} s")
        print(f"rows the loader built (the only images decoded): {len(set(built))} of {args.rows} "
              f"({len(built)} with GRPO's repeats)")  # fmt: skip

        start = time.perf_counter()
        for image_path in image_paths:
            with Image.open(image_path) as image:
                image.convert("RGB")
        print(f"for scale: decoding all {len(image_paths)} images up front: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
