"""Writing a task as a local dataset: JSON Lines plus one PNG file per image, as data often arrives.

    python -m vlm_rl.data.export --dataset synthetic:shapes --output_dir data/shapes_jsonl

writes `train.jsonl` and `eval.jsonl` (rows `{"question", "image", "label", "task"}`, `image` a path relative
to the file, a list of them, or null) and `images/`: the input of `recipes/local_jsonl_cpu.yaml`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datasets import Dataset

from vlm_rl.data.synthetic import make_grounding_math_dataset, make_shapes_dataset


def export_jsonl(dataset: Dataset, path: str | Path) -> Path:
    """Write rows with a conversational `prompt`, `images`, `answer` and `task` as JSON Lines and PNG files."""
    path = Path(path)
    image_dir = path.parent / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for index, row in enumerate(dataset):
            names = []
            for k, image in enumerate(row["images"]):
                names.append(f"images/{path.stem}-{index:06d}-{k}.png")
                image.save(path.parent / names[-1])
            question = next(m["content"] for m in row["prompt"] if m["role"] == "user")
            image_field = None if not names else names[0] if len(names) == 1 else names
            record = {"question": question, "image": image_field, "label": row["answer"], "task": row["task"]}
            f.write(json.dumps(record) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", default="synthetic:shapes", choices=["synthetic:shapes", "synthetic:grounding_math"]
    )
    parser.add_argument("--output_dir", default="data/shapes_jsonl")
    parser.add_argument("--train_size", type=int, default=256)
    parser.add_argument("--eval_size", type=int, default=64)
    parser.add_argument("--text_fraction", type=float, default=0.25, help="synthetic:shapes only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for split, size in (("train", args.train_size), ("eval", args.eval_size)):
        if args.dataset == "synthetic:shapes":
            rows = make_shapes_dataset(
                size, "train" if split == "train" else "test", text_fraction=args.text_fraction, seed=args.seed
            )
        else:
            rows = make_grounding_math_dataset(size, "train" if split == "train" else "test", seed=args.seed)
        print(export_jsonl(rows, Path(args.output_dir) / f"{split}.jsonl"))


if __name__ == "__main__":
    main()
