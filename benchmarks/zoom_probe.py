"""Does `synthetic:zoom` need the zoom? Probes of the answer on what the model sees without and with it.

    python benchmarks/zoom_probe.py [--rows 1000] [--test-rows 400] [--max-pixels 12544]

Without the tool the vision tower gets the whole image at `max_pixels` (672 pixels → 112: 16 visual tokens, the
named cell 7 pixels); with it, the cell cut from the original image and brought to the same budget. For each view
it fits a softmax-regression probe (held-out rows scored) on: the cell's mean colour, the cell's raw pixels as the
vision tower receives them, and the tiny Qwen2-VL's (random, untrained) vision-tower output (the merged token holding
the cell; the zoomed cell's mean token); and it reads the colour of the cell's most saturated pixel, a hand-made
nonlinear detector. Prints one JSON object; docs/tools.md has the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
from PIL import Image

from vlm_rl.data.zoom import GRID, ZOOM_COLORS, make_zoom_dataset
from vlm_rl.models import build_tiny_model, load_model_and_processor
from vlm_rl.zooming import crop_region


def views(row: dict, max_pixels: int) -> dict[str, Image.Image]:
    """The named cell as the vision tower gets it: `low`, from the whole image at `max_pixels`; `crop`, cut from the
    original; `zoomed`, the crop brought up to `max_pixels` (a processor with `min_pixels = max_pixels`)."""
    image, region = row["images"][0], json.loads(row["region"])
    side = round(math.sqrt(max_pixels) / 28) * 28
    small = image.resize((side, side), Image.Resampling.BICUBIC)
    scale = side / image.width
    crop, _ = crop_region(image, tuple(region), max_pixels)
    return {
        "low": small.crop(tuple(round(v * scale) for v in region)),
        "crop": crop,
        "zoomed": crop.resize((side, side), Image.Resampling.BICUBIC),
    }


def probe(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor) -> float:
    """Held-out accuracy of an L2-regularised softmax regression on standardised features."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    weights = torch.zeros(train.shape[1], len(ZOOM_COLORS), requires_grad=True)
    bias = torch.zeros(len(ZOOM_COLORS), requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(train @ weights + bias, train_y) + 1e-3 * weights.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(((test @ weights + bias).argmax(1) == test_y).float().mean())


def saturated_color(image: Image.Image) -> int:
    """The palette colour nearest the image's most saturated pixel."""
    pixels = torch.tensor(list(image.get_flattened_data()), dtype=torch.float)
    best = pixels[(pixels.max(1).values - pixels.min(1).values).argmax()]
    palette = torch.tensor(list(ZOOM_COLORS.values()), dtype=torch.float)
    return int((palette - best).norm(dim=1).argmin())


def tower_output(model, processor, image: Image.Image, cell: int | None) -> torch.Tensor:
    """The vision tower's merged-token outputs for `image`: the token of `cell` (row-major), or their mean."""
    inputs = processor.image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        tokens = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    tokens = getattr(tokens, "pooler_output", tokens)
    return tokens[cell] if cell is not None else tokens.mean(0)


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.tensor(list(image.get_flattened_data()), dtype=torch.float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--test-rows", type=int, default=400)
    parser.add_argument("--max-pixels", type=int, default=112 * 112)
    parser.add_argument("--grid", type=int, default=GRID)
    args = parser.parse_args()
    names = list(ZOOM_COLORS)
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = load_model_and_processor(
            str(build_tiny_model("qwen2_vl", Path(tmp) / "m")), dtype="float32"
        )
    processor.image_processor.size = {"shortest_edge": args.max_pixels, "longest_edge": args.max_pixels}
    features: dict[str, dict[str, list]] = {}
    for split, count in (("train", args.rows), ("test", args.test_rows)):
        rows = make_zoom_dataset(count, split, grid=args.grid, seed=0)
        table: dict[str, list] = {"labels": [], "saturated_low": [], "saturated_zoomed": []}
        for row in rows:
            cell_view = views(row, args.max_pixels)
            region = json.loads(row["region"])
            table["labels"].append(names.index(row["answer"]))
            for view, image in (("low", cell_view["low"]), ("zoomed", cell_view["crop"])):
                table.setdefault(f"{view}/mean_color", []).append(pixels(image).mean(0))
                table.setdefault(f"{view}/raw_pixels", []).append(pixels(image).flatten())
                table[f"saturated_{view}"].append(saturated_color(image))
            # The merged token (28 pixels at the budget's side) holding the cell's centre, row-major.
            side, width = round(math.sqrt(args.max_pixels) / 28) * 28, row["images"][0].width
            x, y = ((region[0] + region[2]) / 2 * side / width // 28, (region[1] + region[3]) / 2 * side / width // 28)
            index = int(y * (side // 28) + x)
            table.setdefault("low/vision_tower", []).append(tower_output(model, processor, row["images"][0], index))
            table.setdefault("zoomed/vision_tower", []).append(
                tower_output(model, processor, cell_view["zoomed"], None)
            )
        features[split] = table
    train, test = features["train"], features["test"]
    labels = torch.tensor(train["labels"]), torch.tensor(test["labels"])
    results: dict[str, dict[str, float]] = {"chance": {"uniform": 1 / len(names)}, "low": {}, "zoomed": {}}
    for key in (k for k in train if "/" in k):
        view, name = key.split("/")
        results[view][name] = probe(torch.stack(train[key]), labels[0], torch.stack(test[key]), labels[1])
    for view in ("low", "zoomed"):
        guesses = torch.tensor(test[f"saturated_{view}"])
        results[view]["most_saturated_pixel"] = float((guesses == labels[1]).float().mean())
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
